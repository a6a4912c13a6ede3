"""boxseg-train end to end on a small world with a few iterations per stage."""

import json

import pytest
import yaml
from click.testing import CliRunner

from boxseg.cli.train import main as train_cli

FAST = ["--set", "segnet1.iters=3", "--set", "segnet2.iters=3", "--set", "segnet2.iters_next=2",
        "--set", "checkpoint_every=2", "--set", "segnet1.batch=4", "--set", "segnet2.batch=4"]


def _args(world, out, *extra):
    return ["--preset", "tiny", "--voc-root", str(world.voc_root), "--coco-ann", str(world.coco_ann),
            "--coco-images", str(world.coco_images), "--out", str(out), *FAST, *extra]


def test_run_directory_holds_every_stage_and_results(world, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(train_cli, _args(world, out, "--rounds", "2", "--workers", "0", "--seed", "0",
                                            "--infer-backend", "torch"))
    assert r.exit_code == 0, r.output
    assert "| learned, round 2 |" in r.output and "| box-filled |" in r.output
    # no terminal: a plain line per stage (k of n) with iterations, loss, speed and ETA
    assert "[stage 1/9 segnet1_full] 3 iterations" in r.output and "[stage 9/9 segnet1_r2] iteration 3/3, loss" in r.output
    res = json.loads((out / "results.json").read_text())
    assert set(res["rounds"]) == {"round1", "round2"}
    assert set(res["baselines"]) == {"box", "box-centre", "grabcut", "full"}
    assert 0 < res["baselines"]["box"]["proposal_miou"] <= 1
    assert "ratio_learned_full" in res
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["rounds"] == 2 and cfg["segnet1"]["iters"] == 3
    assert cfg["workers"] == 0 and cfg["seed"] == 0 and cfg["infer_backend"] == "torch"
    # every proposal folder of the run holds boxseg-propose's manifest, with its score
    scored = {"source_r1": res["source_proposal_miou_r1"], "target_r1": res["rounds"]["round1"]["proposal_miou"],
              "target_r2": res["rounds"]["round2"]["proposal_miou"]}
    for props, miou in scored.items():
        m = json.loads((out / "proposals" / props / "manifest.json").read_text())
        assert m["counts"]["images"] == len(list((out / "proposals" / props).glob("*.png"))) > 0
        assert m["predictor"]["backend"] == "torch" and set(m["timing"]["stages"]) >= {"model", "post", "wall"}
        assert m["quality"]["miou"] == pytest.approx(miou)
    done = json.loads((out / "proposals" / "target_r2" / "done.json").read_text())
    assert done["predictor"]["backend"] == "torch" and done["precision"] == "fp32" and done["stages"]["model"] > 0
    for stage in ("segnet2_r1", "segnet1_source", "segnet1_r1", "segnet2_r2", "segnet1_r2", "segnet1_full"):
        assert (out / "stages" / stage / "final.pt").exists(), stage
        assert (out / "stages" / stage / "metrics.csv").exists(), stage
    # the source SegNet1 trains source_iters_factor x segnet1.iters (tiny: 3 x 3), the target ones iters
    rows = lambda stage: (out / "stages" / stage / "metrics.csv").read_text().split()[1:]
    assert cfg["segnet1"]["source_iters_factor"] == 3.0
    assert [r.split(",")[0] for r in rows("segnet1_source")] == [str(i) for i in range(1, 10)]
    assert len(rows("segnet1_r1")) == 3 and len(rows("segnet2_r2")) == 2
    n_train = len((world.voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split())
    for props in ("target_r1", "target_r2", "box", "grabcut"):
        assert len(list((out / "proposals" / props).glob("*.png"))) == n_train
    # a rerun reuses every finished stage and proposal folder
    before = (out / "stages" / "segnet1_r2" / "final.pt").stat().st_mtime
    r = CliRunner().invoke(train_cli, _args(world, out, "--rounds", "2"))
    assert r.exit_code == 0, r.output
    assert (out / "stages" / "segnet1_r2" / "final.pt").stat().st_mtime == before


def test_semi_uses_masks_of_exactly_the_listed_images(world, tmp_path):
    ids = (world.voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    lst = tmp_path / "semi.txt"
    lst.write_text("\n".join(ids[:3]))
    out = tmp_path / "semi"
    r = CliRunner().invoke(train_cli, _args(world, out, "--rounds", "1", "--setting", "semi",
                                            "--semi-list", str(lst), "--set", "baselines=[]"))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "results.json").read_text())["semi_ids"] == ids[:3]
    # the labels SegNet1 trains on: ground truth for exactly the listed images, proposals otherwise
    import numpy as np
    import torch

    from boxseg.config import override, preset
    from boxseg.train.alternate import Scheme, open_datasets, semi_indices

    data = open_datasets(world.voc_root, world.coco_ann, world.coco_images, "train", "val", False, False)
    cfg = override(override(preset("tiny"), "setting", "semi"), "semi_list", str(lst))
    semi = semi_indices(cfg, data.train)
    assert [data.train.id(i) for i in semi] == ids[:3]
    scheme = Scheme(cfg, tmp_path / "scheme", data, torch.device("cpu"), log=lambda s: None)
    label_of = scheme.target_labels(out / "proposals" / "target_r1", semi)
    from boxseg.data.files import read_label

    n_gt = 0
    for i in range(len(data.train)):
        item = data.train[i]
        prop = read_label(out / "proposals" / "target_r1" / f"{item.id}.png", 21, item.mask.shape)
        got = label_of(i)
        if i in semi:
            assert np.array_equal(got, item.mask)
            n_gt += 1
        else:
            assert np.array_equal(got, prop)
    assert n_gt == 3
    assert sum(not np.array_equal(data.train[i].mask, read_label(out / "proposals" / "target_r1" / f"{ids[i]}.png", 21,
                                                                   data.train[i].mask.shape)) for i in semi) > 0


def test_bad_flags_are_clear(world, tmp_path):
    r = CliRunner().invoke(train_cli, _args(world, tmp_path / "x", "--set", "segnet1.nosuch=1"))
    assert r.exit_code != 0 and "unknown field" in r.output
    r = CliRunner().invoke(train_cli, ["--voc-root", str(world.voc_root)])
    assert r.exit_code != 0 and "--coco-ann" in r.output


def test_bad_semi_list_and_config_name_the_file(world, tmp_path):
    lst = tmp_path / "semi.txt"
    lst.write_text("no_such_image\n")
    r = CliRunner().invoke(train_cli, _args(world, tmp_path / "s", "--setting", "semi", "--semi-list", str(lst),
                                            "--set", "baselines=[]"))
    assert r.exit_code == 3 and f"{lst}: ids not in the train split: ['no_such_image']" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("segnet1: [unclosed\n")
    r = CliRunner().invoke(train_cli, _args(world, tmp_path / "c", "--config", str(bad)))
    assert r.exit_code == 3 and f"{bad}: malformed YAML" in r.output


def test_amp_other_than_bf16_or_none_is_refused(world, tmp_path):
    for amp in ("fp16", "fp8"):
        r = CliRunner().invoke(train_cli, _args(world, tmp_path / amp, "--set", f"amp={amp}"))
        assert r.exit_code == 2 and "amp must be none or bf16" in r.output, r.output
        assert not (tmp_path / amp / "config.yaml").exists()


def test_a_field_added_by_a_newer_boxseg_does_not_block_a_resume():
    from boxseg.config import preset, to_dict
    from boxseg.train.alternate import _changed_fields, yaml_round_trip

    new = yaml_round_trip(to_dict(preset("tiny")))
    old = {k: v for k, v in new.items() if k not in ("sync_batch_norm", "infer_precision")}  # an older boxseg's
    assert _changed_fields(old, new) == set()
    assert _changed_fields(old, {**new, "sync_batch_norm": True}) == {"sync_batch_norm"}
    # a missing field whose new value is not the default: the older run did not use it
    old["segnet1"] = {k: v for k, v in new["segnet1"].items() if k != "source_iters_factor"}
    assert new["segnet1"]["source_iters_factor"] == 3.0 and _changed_fields(old, new) == {"segnet1.source_iters_factor"}
    assert _changed_fields({**new, "rounds": 2}, new) == {"rounds"}


def test_sync_batch_norm_without_cuda_is_refused(world, tmp_path):
    r = CliRunner().invoke(train_cli, _args(world, tmp_path / "r", "--set", "sync_batch_norm=true", "--device", "cpu"))
    assert r.exit_code == 2 and "sync_batch_norm needs CUDA" in r.output, r.output


def test_cudagraph_rounds_without_cuda_are_refused_before_anything_is_cleared(world, tmp_path):
    run = tmp_path / "r"
    (run / "stages").mkdir(parents=True)
    (run / "results.json").write_text("{}")
    for extra in (["--infer-backend", "cudagraph"], ["--set", "sync_batch_norm=true"]):
        r = CliRunner().invoke(train_cli, _args(world, run, *extra, "--device", "cpu", "--overwrite"))
        assert r.exit_code == 2 and "needs CUDA" in r.output.replace("needs a CUDA", "needs CUDA"), r.output
        assert (run / "stages").is_dir() and (run / "results.json").read_text() == "{}"  # --overwrite did not run
