"""boxseg-propose and boxseg.propose: batch-size independence, resumability after a kill,
the manifest, instances with mask AP, bad input, wrong models, non-finite outputs."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from boxseg.cli.propose import main as propose_cli
from boxseg.config import ProposalConfig, SegNet1Config, SegNet2Config
from boxseg.data.classes import VOC_TARGET_CLASSES
from boxseg.data.images import ImageSet
from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset
from boxseg.models.meta import build_model, segnet1_meta, segnet2_meta
from boxseg.propose import propose
from boxseg.threads import available_cpus
from boxseg.workers import writer_options
from boxseg.models.checkpoint import save_checkpoint

from conftest import first_id

S2 = SegNet2Config(widths=(16, 16, 24, 24), blocks=1, bottom_blocks=1, stem_channels=8, input_size=96)
S1 = SegNet1Config(width=0.125, batch_norm=True, dropout=0.0, convs_per_block=(1, 1, 1, 1, 1), fc6_dilation=2,
                   test_size=97)


def _model(meta: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_model(meta)
    with torch.no_grad():  # make BN statistics non-trivial so outputs vary across pixels
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
        if meta["kind"] == "segnet2":  # spread the foreground probability around 0.5
            head = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)][-1]
            head.weight.mul_(40.0)
            m.eval()
            diff = m(torch.randn(2, meta["in_channels"], 64, 64)).diff(dim=1).mean()
            head.bias[1] -= diff
    return m.eval()


def _save(path: Path, meta: dict, seed: int = 0) -> Path:
    save_checkpoint(path, {"model": _model(meta, seed).state_dict(), "meta": meta})
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    return {"s2_4": _save(d / "s2_4.pt", segnet2_meta(S2, 4)),
            "s2_5": _save(d / "s2_5.pt", segnet2_meta(S2, 5), 1),
            "s1": _save(d / "s1.pt", segnet1_meta(S1, VOC_TARGET_CLASSES), 2)}


def _train_set(world) -> ImageSet:
    return ImageSet(VOCDataset(world.voc_root, "train"), NUM_VOC_CLASSES)


def _labels(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


@pytest.mark.parametrize("channels", [4, 5])
def test_batched_output_equals_per_image_output(world, tmp_path, channels):
    """Batch sizes 1, 7 and 64 give byte-identical label PNGs (CPU fp32), 4 and 5 channels;
    so do 1, 2 and 3 model streams (batches in flight at once, finished in order)."""
    images = _train_set(world)
    segnet2 = _model(segnet2_meta(S2, channels), 0)
    segnet1 = _model(segnet1_meta(S1, VOC_TARGET_CLASSES), 2) if channels == 5 else None
    outs, threads = {}, torch.get_num_threads()
    for b, streams in ((1, 1), (7, 1), (7, 2), (7, 3), (64, 2)):
        run = propose(segnet2, segnet1, images, tmp_path / f"b{b}s{streams}", S2.input_size,
                      ProposalConfig(batch=b, margin=0.02, class_margin=0.02), torch.device("cpu"), streams=streams)
        assert run.written == len(images) and not run.failed and run.streams == streams
        assert torch.get_num_threads() == threads  # the streams' share of the threads is given back
        if streams == 1:  # the stages follow each other: together no more than the wall time
            t = run.timing
            assert t["wait_decode"] + t["upload"] + t["model"] + t["post"] <= t["wall"]
        outs[b, streams] = _labels(tmp_path / f"b{b}s{streams}")
    assert len(outs[1, 1]) == len(images)
    assert outs[1, 1] == outs[7, 1] == outs[7, 2] == outs[7, 3] == outs[64, 2]
    outs[1] = outs[1, 1]
    # not a degenerate answer: several values occur, including foreground classes
    values = set()
    for name in outs[1]:
        values |= set(np.unique(np.array(Image.open(tmp_path / "b1s1" / name))).tolist())
    assert len(values - {0, 255}) >= 2


@pytest.mark.parametrize("channels", [4, 5])
def test_pipeline_equals_a_plain_per_pair_reference(world, tmp_path, channels):
    """The staged pipeline (boxes-only decode, inputs built into a reused buffer, the device
    merge) writes the labels of the plainest route: each (image, class) pair alone through
    `segnet2_inputs` from the full decode, softmax, un-letterbox, and the numpy reference
    `merge_foreground` (CPU fp32, byte for byte)."""
    from boxseg.data.boxes import box_pixel_range
    from boxseg.data.transforms import MEAN_U8
    from boxseg.predict.image import letterbox, letterbox_params, segnet2_inputs, unletterbox
    from boxseg.proposals import merge_foreground, range_masks

    ds = VOCDataset(world.voc_root, "train")
    segnet2 = _model(segnet2_meta(S2, channels), 0)
    segnet1 = _model(segnet1_meta(S1, VOC_TARGET_CLASSES), 2) if channels == 5 else None
    cfg = ProposalConfig(batch=7, margin=0.02, class_margin=0.02)
    run = propose(segnet2, segnet1, ImageSet(ds, NUM_VOC_CLASSES), tmp_path, S2.input_size, cfg, torch.device("cpu"))
    assert run.written == len(ds)
    fg_pixels = 0
    with torch.no_grad():
        for i in range(len(ds)):
            s = ds[i]
            h, w = s.image.shape[:2]
            lb = letterbox_params(h, w, S2.input_size)
            canvas = torch.from_numpy(letterbox(s.image, lb, MEAN_U8))[None]
            boxes, labels = np.asarray(s.boxes, np.float32), np.asarray(s.labels)
            classes = sorted(set(labels.tolist()))
            maps = []
            for m in classes:
                ranges = np.array([box_pixel_range(b * lb.scale, S2.input_size, S2.input_size)
                                   for b in boxes[labels == m]], np.int64)
                box = range_masks([ranges], S2.input_size, S2.input_size, torch.device("cpu")).float()
                x = segnet2_inputs(canvas, box, torch.tensor([m]), segnet1)
                maps.append(unletterbox(segnet2(x).softmax(1)[:, 1], lb)[0].numpy())
            want = (merge_foreground(np.stack(maps), classes, boxes, labels, cfg.threshold, cfg.margin,
                                     cfg.class_margin) if classes else np.zeros((h, w), np.uint8))
            got = np.array(Image.open(tmp_path / f"{ds.ids[i]}.png"))
            assert np.array_equal(got, want), ds.ids[i]
            fg_pixels += int(((want > 0) & (want < 255)).sum())
    assert fg_pixels > 1000  # not an all-background answer


def test_channels_last_inputs_equal_segnet2_inputs():
    """The CPU round-1 input built in a channels-last network's layout (a lookup table per
    image, the pairs' rows by cv2.mixChannels, the boxes painted) holds the values of
    `segnet2_inputs`, already in the layout the Predictor takes without a copy."""
    from boxseg.propose import _Inputs

    g = np.random.default_rng(0)
    s = 48
    canvases = torch.from_numpy(g.integers(0, 256, (9, s, s, 3), dtype=np.uint8))
    img_idx = torch.from_numpy(np.sort(g.integers(0, 9, 23)))
    ranges = []
    for _ in range(23):  # one to three boxes a pair, some touching the canvas's edges
        r0, c0 = g.integers(0, s - 1, (2, 3))
        ranges.append(np.stack([r0, np.minimum(s, r0 + g.integers(1, s, 3)), c0,
                                np.minimum(s, c0 + g.integers(1, s, 3))], 1)[: g.integers(1, 4)])
    ranges[0] = np.array([[0, s, 0, s]])
    cl = _Inputs(32, 4, s, torch.device("cpu"), torch.channels_last)(canvases, img_idx, None, ranges, None)
    plain = _Inputs(32, 4, s, torch.device("cpu"))(canvases, img_idx, None, ranges, None)
    assert cl.is_contiguous(memory_format=torch.channels_last) and cl.shape == (23, 4, s, s)
    assert torch.equal(cl, plain)
    assert plain[:, 3].sum() > 0 and plain[0, 3].min() == 1
    # a second, shorter batch reuses the buffers: nothing of the first is left
    cl2 = _Inputs(32, 4, s, torch.device("cpu"), torch.channels_last)
    cl2(canvases, img_idx, None, ranges, None)
    assert torch.equal(cl2(canvases[:2], img_idx[:3] * 0 + 1, None, ranges[5:8], None),
                       _Inputs(32, 4, s, torch.device("cpu"))(canvases[:2], img_idx[:3] * 0 + 1, None, ranges[5:8],
                                                                 None))


def test_rerun_completes_only_what_is_missing(world, tmp_path):
    images = _train_set(world)
    segnet2 = _model(segnet2_meta(S2, 4), 0)
    cfg, cpu = ProposalConfig(batch=5), torch.device("cpu")
    full = propose(segnet2, None, images, tmp_path / "a", S2.input_size, cfg, cpu)
    ref = _labels(tmp_path / "a")
    gone = sorted(ref)[:5]
    for name in gone:
        (tmp_path / "a" / name).unlink()
    again = propose(segnet2, None, images, tmp_path / "a", S2.input_size, cfg, cpu)
    assert (full.written, again.written, again.skipped_existing) == (len(images), 5, len(images) - 5)
    assert _labels(tmp_path / "a") == ref


def test_cli_manifest_quality_and_baselines(world, tmp_path, ckpts):
    out = tmp_path / "p"
    args = ["--voc-root", str(world.voc_root), "--out", str(out), "--workers", "0", "--batch", "7"]
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpts["s2_4"]), *args])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    n = len((world.voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split())
    assert m["counts"]["images"] == m["counts"]["written"] == n and m["counts"]["pairs"] > n
    assert m["model_meta"]["kind"] == "segnet2" and m["config"]["batch"] == 7 and m["precision"] == "fp32"
    assert 0.0 <= m["quality"]["miou"] <= 1.0 and "aeroplane" in m["quality"]["per_class_iou"]
    assert m["timing"]["pairs_per_s"] > 0 and not list(out.glob("manifest.rank*.json"))
    # the stage breakdown: every stage timed, together no more than the wall time (one process)
    st = m["timing"]["stages"]
    assert set(st) == {"wait_decode", "upload", "model", "post", "download", "wait_writers", "wall"}
    assert st["model"] > 0 and st["wall"] == pytest.approx(m["timing"]["seconds"], abs=1e-3)
    # two model streams here (2 CPUs): the model's time is the union of the streams' intervals
    assert m["timing"]["streams"] == min(2, available_cpus())
    assert st["model"] <= st["wall"] and st["wait_decode"] + st["upload"] <= st["wall"]
    assert 0 < m["timing"]["device_busy"] <= 1
    assert "where the time went: wait_decode" in r.output
    # the fill (start to the first batch in the model) and drain (the last batch to the end): both
    # happen, neither is the whole run, and the batches in between took the rest
    t = m["timing"]
    assert 0 < t["fill"] < st["wall"] and 0 < t["drain"] < st["wall"] and t["fill"] + t["drain"] < st["wall"]
    assert 0 <= t["start"] < t["fill"]  # threads only here: nothing forked before the first batch
    assert f"pipeline fill {t['fill']:.2f} s" in r.output
    # decoder processes from a forkserver (--decoders): the same bytes, recorded in the manifest
    fs = tmp_path / "fs"
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpts["s2_4"]), *args[:2], "--out", str(fs), "--batch", "7",
                                         "--workers", "2", "--decoders", "forkserver"])
    assert r.exit_code == 0, r.output
    tf = json.loads((fs / "manifest.json").read_text())["timing"]
    assert tf["decoders"] == "processes (forkserver)"
    assert 0 < tf["start"] < tf["fill"]  # the decoder processes started before the first batch
    assert m["timing"]["decoders"] == "main thread" and m["timing"]["writers"] == "threads"
    assert _labels(fs) == _labels(out)
    # a rerun writes nothing new
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpts["s2_4"]), *args])
    assert json.loads((out / "manifest.json").read_text())["counts"]["skipped_existing"] == n
    # the box baseline through the same command reproduces the world's recorded box mIoU
    r = CliRunner().invoke(propose_cli, ["--method", "box", "--voc-root", str(world.voc_root), "--out", str(tmp_path / "box")])
    assert r.exit_code == 0, r.output
    mb = json.loads((tmp_path / "box" / "manifest.json").read_text())
    assert mb["quality"]["miou"] == pytest.approx(world.box_baseline_miou, abs=1e-9)


def test_cli_five_channels_needs_segnet1_and_kinds_are_checked(world, tmp_path, ckpts):
    base = ["--voc-root", str(world.voc_root), "--workers", "0"]
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpts["s2_5"]), "--out", str(tmp_path / "a"), *base])
    assert r.exit_code != 0 and "--segnet1" in r.output
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpts["s1"]), "--out", str(tmp_path / "b"), *base])
    assert r.exit_code == 3 and "segnet1 model, but a segnet2 is expected" in r.output
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpts["s2_5"]), "--segnet1", str(ckpts["s1"]),
                                         "--out", str(tmp_path / "c"), *base])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["model_meta"]["in_channels"] == 5


def test_cli_instances_on_coco_give_mask_ap(world, tmp_path, ckpts):
    out = tmp_path / "c"
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpts["s2_4"]), "--coco-ann", str(world.coco_ann),
                                         "--coco-images", str(world.coco_images), "--out", str(out),
                                         "--instances", "--workers", "0"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    res = json.loads((out / "instances.json").read_text())
    ann = json.loads(world.coco_ann.read_text())
    kept = {c["id"] for c in ann["categories"]}
    assert len(res) == m["quality"]["instances"] > 0
    assert {r["category_id"] for r in res} <= kept and all("counts" in r["segmentation"] for r in res)
    assert 0.0 <= m["quality"]["mask_ap"]["AP"] <= 1.0


def test_cli_bad_image_named_or_skipped(world_copy, tmp_path, ckpts):
    bad = first_id(world_copy.voc_root)
    (world_copy.voc_root / "JPEGImages" / f"{bad}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    args = ["--model", str(ckpts["s2_4"]), "--voc-root", str(world_copy.voc_root), "--workers", "0"]
    r = CliRunner().invoke(propose_cli, [*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 3 and f"{bad}.jpg" in r.output
    r = CliRunner().invoke(propose_cli, [*args, "--out", str(tmp_path / "b"), "--skip-bad"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["counts"]["skipped_bad"] == 1 and m["skipped_files"][0]["path"].endswith(f"{bad}.jpg")
    assert not (tmp_path / "b" / f"{bad}.png").exists()


@pytest.mark.parametrize("where", ["whole map NaN", "one logit NaN", "one logit +inf"])
def test_non_finite_output_is_reported_not_written(world, tmp_path, where):
    images = _train_set(world)
    from boxseg.predict.torch_backends import TorchPredictor

    class FirstOutputNaN(TorchPredictor):  # a backend whose first output overflows
        def run(self, x):
            y = super().run(x)
            if not hasattr(self, "seen"):
                self.seen = True
                y = y.clone()
                if where == "whole map NaN":
                    y[0] = float("nan")
                else:  # one pixel of one pair: its whole map is refused
                    y[0, 1, 5, 7] = float("nan") if where == "one logit NaN" else float("inf")
            return y

    model = FirstOutputNaN(_model(segnet2_meta(S2, 4), 0), segnet2_meta(S2, 4), torch.device("cpu"), "fp32", 3)
    run = propose(model, None, images, tmp_path / "p", S2.input_size, ProposalConfig(batch=3), torch.device("cpu"))
    assert len(run.failed) == 1 and "non-finite" in run.failed[0]["problem"]
    failed_id = run.failed[0]["id"]
    assert not (tmp_path / "p" / f"{failed_id}.png").exists()
    assert run.written == len(images) - 1


def _png_ok(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except FileNotFoundError:
        return True  # renamed away between listing and opening: not a partial file
    except Exception:
        return False


def test_killed_run_rerun_is_byte_identical_and_never_truncated(world, tmp_path):
    """SIGKILL mid-run, rerun: the same bytes as an uninterrupted run, and every *.png seen
    at any moment decodes completely (temporary files carry other names)."""
    big = SegNet2Config(widths=(32, 32, 48, 48), blocks=1, bottom_blocks=1, stem_channels=16, input_size=192)
    ckpt = _save(tmp_path / "big.pt", segnet2_meta(big, 4))
    base = [sys.executable, "-m", "boxseg.cli.propose", "--model", str(ckpt), "--voc-root", str(world.voc_root),
            "--workers", "0", "--batch", "1"]
    ref = tmp_path / "ref"
    subprocess.run([*base, "--out", str(ref)], check=True, capture_output=True)
    out = tmp_path / "out"
    proc = subprocess.Popen([*base, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen_bad, n_at_kill = [], 0
    deadline = time.time() + 120
    while time.time() < deadline:
        pngs = list(out.glob("*.png")) if out.exists() else []
        seen_bad += [p.name for p in pngs if not _png_ok(p)]
        if len(pngs) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            n_at_kill = len(pngs)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    total = len(list(ref.glob("*.png")))
    assert 3 <= n_at_kill < total and not seen_bad
    assert not (out / "manifest.json").exists()
    subprocess.run([*base, "--out", str(out)], check=True, capture_output=True)
    names = sorted(p.name for p in ref.glob("*.png"))
    assert sorted(p.name for p in out.glob("*.png")) == names
    match, mismatch, errors = filecmp.cmpfiles(ref, out, names, shallow=False)
    assert len(match) == total and not mismatch and not errors
    # a write cut by the kill can leave only a hidden temporary file, never a visible partial one
    assert all(p.name.startswith(".") for p in out.iterdir() if p.suffix == ".tmp")


def test_image_without_boxes_is_all_background(tmp_path):
    from types import SimpleNamespace

    class NoBoxes:
        ids = ["empty"]

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return SimpleNamespace(image=np.zeros((40, 50, 3), np.uint8), boxes=np.zeros((0, 4), np.float32),
                                   labels=np.zeros(0, np.int64), mask=None)

    run = propose(_model(segnet2_meta(S2, 4), 0), None, ImageSet(NoBoxes(), NUM_VOC_CLASSES), tmp_path, S2.input_size,
                  ProposalConfig(), torch.device("cpu"), instances=True)
    assert (run.written, run.pairs) == (1, 0)
    label = np.array(Image.open(tmp_path / "empty.png"))
    assert label.shape == (40, 50) and not label.any()
    assert json.loads((tmp_path / "instances" / "empty.json").read_text()) == []


def test_voc_instance_truth_scores_itself_as_ap_1_and_a_shifted_copy_lower(world):
    from boxseg.data.coco import encode_rle
    from boxseg.propose import drop_void, mask_ap, voc_instance_truth

    images = ImageSet(VOCDataset(world.voc_root, "train"), NUM_VOC_CLASSES)
    gt, void = voc_instance_truth(images, VOC_TARGET_CLASSES.coco_ids)
    assert len(gt["images"]) == len(images) and len(gt["annotations"]) >= len(images)
    ids = sorted(void)
    own = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
            "score": 1.0} for a in gt["annotations"]]
    assert mask_ap(gt, drop_void(own, void), ids)["AP"] == pytest.approx(1.0)
    # each mask grown by the void band around it: the void pixels are not scored, AP stays 1
    from pycocotools import mask as mask_utils

    def grow(m):  # one pixel in the four directions
        g = m.copy()
        g[1:] |= m[:-1]
        g[:-1] |= m[1:]
        g[:, 1:] |= m[:, :-1]
        g[:, :-1] |= m[:, 1:]
        return g

    grown = []
    for r in own:
        m = mask_utils.decode(r["segmentation"]).astype(bool)
        g = grow(m) & (void[r["image_id"]] | m)
        assert g.sum() > m.sum()
        grown.append({**r, "segmentation": encode_rle(g)})
    assert mask_ap(gt, drop_void(grown, void), ids)["AP"] == pytest.approx(1.0)
    # shifted by 4 pixels: lower AP
    shifted = [{**r, "segmentation": encode_rle(np.roll(mask_utils.decode(r["segmentation"]).astype(bool), 4, axis=1))}
               for r in own]
    assert mask_ap(gt, drop_void(shifted, void), ids)["AP"] < 0.9


def test_cli_instances_on_voc_give_mask_ap(world, tmp_path, ckpts):
    out = tmp_path / "v"
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpts["s2_4"]), "--voc-root", str(world.voc_root),
                                         "--out", str(out), "--instances", "--workers", "0"])
    assert r.exit_code == 0, r.output
    q = json.loads((out / "manifest.json").read_text())["quality"]
    n = len(VOCDataset(world.voc_root, "train"))
    assert q["instances"] > 0 and q["mask_ap"]["images"] == n and 0.0 <= q["mask_ap"]["AP"] <= 1.0
    assert f"({n} images with ground-truth instances)" in r.output


def test_cli_bad_instance_truth_is_named_and_the_proposals_kept(world_copy, tmp_path, ckpts):
    sid = first_id(world_copy.voc_root)
    (world_copy.voc_root / "SegmentationObject" / f"{sid}.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "v"
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpts["s2_4"]), "--voc-root", str(world_copy.voc_root),
                                         "--out", str(out), "--instances", "--workers", "0"])
    assert r.exit_code == 3, r.output
    assert f"cannot score the proposals: {world_copy.voc_root / 'SegmentationObject' / sid}.png: cannot decode" in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert f"{sid}.png" in m["quality"]["error"]
    assert m["counts"]["written"] == len(VOCDataset(world_copy.voc_root, "train")) == len(list(out.glob("*.png")))


def test_writer_processes_write_the_bytes_of_writer_threads(world, tmp_path):
    """On CUDA the PNG writers are processes (their Python work off the main loop's GIL),
    forked from this process or from a forkserver; they write exactly what the writer
    threads write, instance masks included."""
    meta = segnet2_meta(S2, 4)
    model = _model(meta, 0)
    images = ImageSet(VOCDataset(world.voc_root, "train"), NUM_VOC_CLASSES)
    runs = {}
    for kind in ("threads", "processes", "forkserver"):
        runs[kind] = propose(model, None, images, tmp_path / kind, S2.input_size, ProposalConfig(batch=8),
                             torch.device("cpu"), "fp32", 0, instances=True, writers=3, **writer_options(kind))
        assert runs[kind].written == len(images)
    assert [r.writers for r in runs.values()] == ["threads", "processes", "processes (forkserver)"]
    assert runs["forkserver"].to_dict()["writers"] == "processes (forkserver)"
    for pattern in ("*.png", "instances/*.json"):
        a = sorted((tmp_path / "threads").glob(pattern))
        for kind in ("processes", "forkserver"):
            assert a and [p.read_bytes() for p in a] == [
                (tmp_path / kind / p.relative_to(tmp_path / "threads")).read_bytes() for p in a]
    with pytest.raises(ValueError, match="writer_start must be fork or forkserver"):
        propose(model, None, images, tmp_path / "x", S2.input_size, ProposalConfig(batch=8), torch.device("cpu"),
                "fp32", 0, writer_processes=True, writer_start="spawn")


def test_decoders_by_default(world, tmp_path, monkeypatch):
    """Without a worker count: two decode threads on CPU; as processes (CUDA's default),
    half the CPUs, 2 to 8. Recorded in the manifest's run."""
    from boxseg import threads, workers

    model = _model(segnet2_meta(S2, 4), 0)
    images = ImageSet(VOCDataset(world.voc_root, "train"), NUM_VOC_CLASSES)
    run = propose(model, None, images, tmp_path / "auto", S2.input_size, ProposalConfig(batch=8),
                  torch.device("cpu"), "fp32", None)
    assert run.written == len(images) and (run.decoders, run.decode_workers) == ("threads", 2)
    assert run.to_dict()["decode_workers"] == 2
    for cpus, want in ((1, 2), (2, 2), (6, 3), (16, 8), (64, 8)):
        monkeypatch.setattr(threads, "available_cpus", lambda cpus=cpus: cpus)
        assert workers.default_helpers(processes=True) == want and workers.default_helpers(processes=False) == 2


def test_decode_threads_processes_and_main_thread_write_the_same_bytes(world_copy, tmp_path):
    """Decoders are threads on CPU, DataLoader processes on CUDA (forked, or from a
    forkserver), the main thread with 0 workers: the same bytes, and a bad image is
    reported by each (named, or skipped and logged with --skip-bad)."""
    from boxseg.errors import BadInputLog, DataError

    model = _model(segnet2_meta(S2, 4), 0)
    images = ImageSet(VOCDataset(world_copy.voc_root, "train"), NUM_VOC_CLASSES)
    outs, kinds = [], []
    for workers, procs, start in ((0, None, "fork"), (2, False, "fork"), (2, True, "fork"), (3, False, "fork"),
                                  (2, True, "forkserver")):
        out = tmp_path / f"{workers}-{procs}-{start}"
        run = propose(model, None, images, out, S2.input_size, ProposalConfig(batch=8), torch.device("cpu"), "fp32",
                      workers, chunk=3, decode_processes=procs, decode_start=start)
        assert run.written == len(images) and run.to_dict()["decoders"] == run.decoders
        outs.append(_labels(out))
        kinds.append(run.decoders)
    assert kinds == ["main thread", "threads", "processes", "threads", "processes (forkserver)"]
    assert outs[0] and all(o == outs[0] for o in outs)
    with pytest.raises(ValueError, match="decode_start must be fork or forkserver"):
        propose(model, None, images, tmp_path / "x", S2.input_size, ProposalConfig(batch=8), torch.device("cpu"),
                "fp32", 2, decode_processes=True, decode_start="spawn")
    bad = world_copy.voc_root / "JPEGImages" / f"{images.id(5)}.jpg"
    bad.write_bytes(b"not a jpeg")
    for procs, start in ((False, "fork"), (True, "fork"), (True, "forkserver")):
        with pytest.raises(DataError, match="cannot decode image") as e:
            propose(model, None, images, tmp_path / f"bad-{procs}-{start}", S2.input_size, ProposalConfig(batch=8),
                    torch.device("cpu"), "fp32", 2, chunk=3, decode_processes=procs, decode_start=start)
        assert str(bad) in str(e.value)
        log = BadInputLog()
        run = propose(model, None, images, tmp_path / f"skip-{procs}-{start}", S2.input_size, ProposalConfig(batch=8),
                      torch.device("cpu"), "fp32", 2, chunk=3, decode_processes=procs, decode_start=start,
                      skip_bad=True, log=log)
        assert run.written == len(images) - 1 and len(log.skipped) == 1
        assert log.skipped[0]["path"] == str(bad) and "cannot decode image" in log.skipped[0]["problem"]


def _propose_script(arguments: str) -> str:
    """A Python script that runs `propose` on the CPU: argv the checkpoint, the VOC root and
    the output folder; `arguments` follow the precision (workers first). Prints the count
    written."""
    return ("import sys, torch\n"
            "from pathlib import Path\n"
            "from boxseg.config import ProposalConfig\n"
            "from boxseg.data.images import ImageSet\n"
            "from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset\n"
            "from boxseg.predict import load_predictor\n"
            "from boxseg.propose import propose\n"
            "pred = load_predictor(Path(sys.argv[1]), torch.device('cpu'), 'fp32')\n"
            "images = ImageSet(VOCDataset(sys.argv[2], 'train'), NUM_VOC_CLASSES)\n"
            "run = propose(pred, None, images, Path(sys.argv[3]), pred.meta['input_size'], ProposalConfig(batch=4),\n"
            f"              torch.device('cpu'), 'fp32', {arguments})\n"
            "print('written', run.written)\n")


def _left_behind(mark: str, wait: float = 20.0) -> list[str]:
    """Command lines of the processes whose environment holds BOXSEG_TEST_MARK=`mark` (a
    command run by a test and everything it started), once they have had `wait` s to end."""
    needle, deadline = f"BOXSEG_TEST_MARK={mark}".encode(), time.monotonic() + wait
    while True:
        alive = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    alive.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
            except OSError:  # ended meanwhile, or not ours
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the processes through /proc (Linux)")
def test_a_killed_command_leaves_no_forkserver_decoders_behind(world, tmp_path):
    """Decoder processes forked by a forkserver end with the command: a SIGKILL of the
    command left the server and its workers waiting for each other (~180 MB each)."""
    ckpt = _save(tmp_path / "s2.pt", segnet2_meta(S2, 4))
    script = _propose_script("2, chunk=2, decode_processes=True, decode_start='forkserver', writer_processes=True, "
                             "writer_start='forkserver', writers=2")
    mark = f"{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "BOXSEG_FAILPOINT": "propose.batch@3", "BOXSEG_TEST_MARK": mark}
    with open(tmp_path / "log", "w") as log:  # (a file, not a pipe: the survivors would hold a pipe open)
        r = subprocess.run([sys.executable, "-c", script, str(ckpt), str(world.voc_root), str(tmp_path / "out")],
                           env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    assert r.returncode == -signal.SIGKILL, (tmp_path / "log").read_text()[-2000:]
    assert _left_behind(mark) == []


@pytest.mark.parametrize("start", ["fork", "forkserver"])
def test_a_kill_inside_a_writer_process_kills_the_command_and_the_rerun_completes(world, tmp_path, start):
    """A failpoint in a writer process stands for a kill of the command during that write:
    the command dies (SIGKILL), nothing under a final name is truncated, and a rerun writes
    only what is missing, byte-identical to an uninterrupted run. Writers forked from a
    forkserver kill the command, not the server, and none of them is left behind."""
    images = ImageSet(VOCDataset(world.voc_root, "train"), NUM_VOC_CLASSES)
    meta = segnet2_meta(S2, 4)
    ckpt = _save(tmp_path / "s2.pt", meta)
    script = _propose_script(f"0, writer_processes=True, writers=2, writer_start={start!r}")
    mark = f"{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "BOXSEG_FAILPOINT": f"write:{images.id(9)}.png@1", "BOXSEG_TEST_MARK": mark}
    out, ref = tmp_path / "out", tmp_path / "ref"
    r = subprocess.run([sys.executable, "-c", script, str(ckpt), str(world.voc_root), str(out)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _left_behind(mark) == []
    done = sorted(out.glob("*.png"))
    assert len(done) < len(images) and not (out / f"{images.id(9)}.png").exists()
    for p in done:  # whole files only under the final names
        Image.open(p).load()
    env.pop("BOXSEG_FAILPOINT")
    for folder in (out, ref):
        r = subprocess.run([sys.executable, "-c", script, str(ckpt), str(world.voc_root), str(folder)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        want = len(images) - len(done) if folder == out else len(images)
        assert f"written {want}\n" in r.stdout, r.stdout  # the rerun wrote only what was missing
    names = sorted(p.name for p in ref.glob("*.png"))
    assert names == sorted(p.name for p in out.glob("*.png")) and len(names) == len(images)
    assert all((ref / n).read_bytes() == (out / n).read_bytes() for n in names)


# -- JPEGs decoded on the device (--decode-on-device) -----------------------------------------

def test_letterbox_on_the_device_is_within_one_of_opencv(world):
    """`letterbox_tensor` (the device path's, float bilinear) against `letterbox` (OpenCV's
    INTER_LINEAR on uint8, 11-bit fixed point): every value within 1, down- and upscaling."""
    from boxseg.data.files import read_image
    from boxseg.data.transforms import MEAN_U8
    from boxseg.predict.image import letterbox, letterbox_params, letterbox_tensor

    paths = sorted((world.voc_root / "JPEGImages").glob("*.jpg"))[:20]
    differing = total = 0
    for size in (64, 128, 321):
        for p in paths:
            image = read_image(p)
            lb = letterbox_params(*image.shape[:2], size)
            want = letterbox(image, lb, MEAN_U8)
            got = letterbox_tensor(torch.from_numpy(image).permute(2, 0, 1), lb, MEAN_U8).numpy()
            d = np.abs(got.astype(int) - want.astype(int))
            assert got.shape == want.shape and d.max() <= 1, (p.name, size)
            differing, total = differing + int((d > 0).sum()), total + d.size
    assert 0 < differing < 0.3 * total  # rounding differences, not a shifted grid


def test_device_canvases_fall_back_to_the_cpu_decoder_and_name_a_bad_file(world_copy, monkeypatch):
    """A JPEG the device decoder refuses is decoded on the CPU (the CPU path's bytes exactly,
    counted); one the CPU cannot read either becomes an error record naming the file."""
    import boxseg.propose as P

    images = _train_set(world_copy)
    cpu_side = P._Decoded(images, list(range(4)), S2.input_size)
    dev_side = P._Decoded(images, list(range(4)), S2.input_size, device_jpeg=True)
    recs = [dev_side[k] for k in range(4)]
    assert all("jpeg" in r and "canvas" not in r for r in recs)
    bad = recs[2]["jpeg"].path
    bad.unlink()  # gone since the decoder read it: the CPU fallback cannot read it either
    monkeypatch.setattr(P, "decode_jpegs", lambda datas, device: [None] * len(datas))
    run = P.ProposalRun()
    canvases = P._device_canvases(recs, None, torch.device("cpu"), run)
    assert run.jpeg_fallbacks == 4 and len(canvases) == 3
    assert "error" in recs[2] and recs[2]["error"][0] == str(bad)
    for c, k in zip(canvases, (0, 1, 3)):
        assert torch.equal(c, torch.from_numpy(cpu_side[k]["canvas"]))


def test_propose_decode_on_device_with_torchvision(world, tmp_path, ckpts):
    """The whole pipeline with torchvision's decoder (on CPU, libjpeg-turbo, OpenCV's pixels)
    and the device letterbox: labels nearly all those of the CPU path (99.92% of pixels on
    the test world); recorded in the manifest and the folder's signature, so a rerun without
    the option does not mix the two."""
    pytest.importorskip("torchvision", reason="torchvision is not installed (needed by --decode-on-device)")
    base = ["--model", str(ckpts["s2_4"]), "--voc-root", str(world.voc_root), "--batch", "16"]
    r = CliRunner().invoke(propose_cli, [*base, "--out", str(tmp_path / "cpu")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(propose_cli, [*base, "--out", str(tmp_path / "dev"), "--decode-on-device"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "dev" / "manifest.json").read_text())
    assert m["timing"]["jpeg_decoder"] == "torchvision on cpu" and m["counts"]["jpeg_fallbacks"] == 0
    same = total = 0
    for p in sorted((tmp_path / "cpu").glob("*.png")):
        a, b = np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "dev" / p.name))
        same, total = same + int((a == b).sum()), total + a.size
    assert total and same / total >= 0.995
    (tmp_path / "dev" / sorted(p.name for p in (tmp_path / "dev").glob("*.png"))[0]).unlink()
    r = CliRunner().invoke(propose_cli, [*base, "--out", str(tmp_path / "dev")])
    assert r.exit_code == 3 and "jpeg_decoder" in r.output


def test_decode_on_device_without_torchvision_names_the_package(world, tmp_path, ckpts, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpts["s2_4"]), "--voc-root", str(world.voc_root),
                                         "--out", str(tmp_path / "p"), "--decode-on-device"])
    assert r.exit_code == 6 and "needs torchvision" in r.output


def test_streams_need_a_backend_that_allows_them(world, tmp_path):
    """Two batches at once: eager torch (shared) and onnxruntime on CPU (a session each)
    allow it; a compiled graph, like a CUDA graph or an engine, has one set of buffers, so
    it is refused up front."""
    from boxseg.predict.torch_backends import CompiledPredictor

    meta = segnet2_meta(S2, 4)
    pred = CompiledPredictor(_model(meta, 0), meta, torch.device("cpu"), "fp32", 8)  # compiles when first called
    with pytest.raises(ValueError, match="does not allow"):
        propose(pred, None, _train_set(world), tmp_path, S2.input_size, ProposalConfig(batch=8), torch.device("cpu"),
                streams=2)
    assert not list(tmp_path.glob("*.png"))


def test_cli_refuses_streams_the_backend_does_not_allow(world, tmp_path, ckpts):
    """The same check (boxseg.propose.check_streams) behind boxseg-propose's --streams: a
    usage error naming the option, before anything is written."""
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpts["s2_4"]), "--voc-root", str(world.voc_root),
                                         "--out", str(tmp_path / "p"), "--backend", "compile", "--streams", "2"])
    assert r.exit_code == 2 and "--streams" in r.output and "compile backend" in r.output, r.output
    assert not list((tmp_path / "p").glob("*.png"))
