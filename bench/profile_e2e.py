"""Where boxseg-propose's wall time goes, op by op: one warm run of the pipeline, then one
under torch.profiler (CPU and CUDA activity), on a synthetic VOC folder.

    python bench/profile_e2e.py VOC_ROOT [--device cuda] [--batch 64] [--precision fp16]
        [--workers 12] [--preset paper] [--backend torch] [--limit 300] [--out DIR]

Prints the pipeline's stage breakdown and the top operators by host (self CPU) time and by
device time, and writes DIR/profile_e2e.txt and a Chrome trace DIR/profile_e2e.json.gz
(open it in chrome://tracing or https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
from pathlib import Path

import torch

from boxseg.bench import make_predictor
from boxseg.config import ProposalConfig, preset
from boxseg.data.images import ImageSet
from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset
from boxseg.models.meta import build_model, segnet2_meta
from boxseg.propose import propose


class _Subset:
    """The first `n` images of an ImageSet (same interface as far as propose uses it)."""

    def __init__(self, images: ImageSet, n: int):
        self.images, self.n, self.dataset = images, min(n, len(images)), images.dataset

    def __len__(self) -> int:
        return self.n

    def id(self, i: int) -> str:
        return self.images.id(i)

    def __getattr__(self, name: str):  # boxed, ground_truth, ...: the ImageSet's
        return getattr(self.images, name)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("voc_root", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--limit", type=int, default=300, help="images in the profiled run")
    ap.add_argument("--out", type=Path, default=Path("."))
    return ap


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)

    device = torch.device(a.device)
    meta = segnet2_meta(preset(a.preset).segnet2, 4)
    model = build_model(meta).eval()
    images = _Subset(ImageSet(VOCDataset(a.voc_root, "train"), NUM_VOC_CLASSES), a.limit)
    with tempfile.TemporaryDirectory() as work:
        pred = make_predictor(a.backend, model, meta, a.precision, device, a.batch, Path(work))
        cfg = ProposalConfig(batch=a.batch)

        def once():
            out = Path(work) / "out"
            shutil.rmtree(out, ignore_errors=True)
            return propose(pred, None, images, out, meta["input_size"], cfg, device, a.precision, a.workers)

        warm = once()
        print("warm run:", warm.to_dict())
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            run = once()
    print("profiled run:", run.to_dict())
    a.out.mkdir(parents=True, exist_ok=True)
    ka = prof.key_averages()
    text = ["# host: self CPU time", ka.table(sort_by="self_cpu_time_total", row_limit=40)]
    if device.type == "cuda":
        text += ["# device: self CUDA time", ka.table(sort_by="self_device_time_total", row_limit=30)]
    (a.out / "profile_e2e.txt").write_text(f"{run.to_dict()}\n\n" + "\n\n".join(text))
    print("\n\n".join(text))
    trace = a.out / "profile_e2e.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, gzip.open(str(trace) + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    trace.unlink()


if __name__ == "__main__":
    main()
