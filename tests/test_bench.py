"""boxseg-bench on CPU: every row has numbers that fit together, or says why it did not run."""

from __future__ import annotations

import json

from click.testing import CliRunner

from boxseg.cli.bench import main as bench_cli


def test_bench_writes_consistent_rows(tmp_path):
    r = CliRunner().invoke(bench_cli, ["--model", "segnet2", "--preset", "tiny", "--size", "64",
                                       "--backends", "torch,onnxruntime,tensorrt", "--batch", "1,2",
                                       "--warmup", "1", "--iters", "3", "--out", str(tmp_path), "--tag", "t"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(row["command"].startswith("boxseg-bench") and row["date"] for row in rows)
    ok = [row for row in rows if row["status"] == "ok"]
    assert {(row["backend"], row["batch"]) for row in ok} >= {("torch", 1), ("torch", 2), ("onnxruntime", 1)}
    for row in ok:
        assert row["median_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert abs(row["images_per_s"] - row["batch"] / (row["median_ms"] / 1000)) < 0.01 * row["images_per_s"] + 0.01
        assert abs(row["tflops"] - row["images_per_s"] * row["gflop_per_image"] / 1000) <= 0.05 * row["tflops"] + 1e-4
        assert row["gflop_per_image"] > 0 and row["matmul_tflops"] > 0
    trt = [row for row in rows if row["backend"] == "tensorrt"]
    assert all(row["status"].startswith("not run:") for row in trt)
    assert (tmp_path / "t.png").stat().st_size > 1000 and "| segnet2@64 |" in (tmp_path / "t.md").read_text()
