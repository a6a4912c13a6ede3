"""boxseg-propose: region proposals for every image of a VOC split or COCO file, resumable."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import click

from boxseg.cli import (HELP, Exit, check_backend, exit_on_errors, no_space, stop_on_sigterm,
                        threads_option, version)
from boxseg.config import ProposalConfig, proposal_problems
from boxseg.data.files import output_folder
from boxseg.errors import BadInputLog, DataError, NoSpace
from boxseg.predict import BACKENDS, default_precision
from boxseg.propose import merge_manifest
from boxseg.threads import configure_threads
from boxseg.workers import DECODERS, WRITERS, decoder_options, writer_options
from boxseg.versions import library_versions

METHODS = ("learned", "box", "box-centre", "grabcut")


@dataclasses.dataclass
class Target:
    images: object            # ImageSet
    names: list[str]          # class names, index 0 = background
    coco_ids: tuple[int, ...]
    describe: dict
    coco_ann: Path | None     # ground-truth instances for mask AP


def open_target(voc_root: Path | None, split: str, coco_ann: Path | None, coco_images: Path | None,
                skip_bad: bool, log: BadInputLog, masks: str = "auto") -> Target:
    """The images to work on: a COCO source or a VOC split (default: the synthetic world's).
    `masks="require"` (a model's evaluation): a VOC image without its ground truth is an error
    naming the missing file, or with `skip_bad` skipped and listed."""
    from boxseg.data.classes import SOURCE_CLASSES, VOC_CLASSES, VOC_TARGET_CLASSES
    from boxseg.data.images import ImageSet

    if coco_ann is not None:
        from boxseg.data.coco import COCOSource

        if coco_images is None:
            raise click.UsageError("--coco-ann needs --coco-images")
        src = COCOSource(coco_ann, coco_images, skip_bad=skip_bad, log=log)
        return Target(ImageSet(src, SOURCE_CLASSES.num_classes), ["background", *SOURCE_CLASSES.names],
                      SOURCE_CLASSES.coco_ids, {"coco_ann": str(coco_ann), "coco_images": str(coco_images)}, coco_ann)
    from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset, find_voc_root

    if voc_root is None:
        from boxseg.cli.train import synth_world

        voc_root = synth_world("tiny", 0)[2]
    ds = VOCDataset(voc_root, split, masks=masks, skip_bad=skip_bad, log=log)
    if len(ds) == 0:  # an empty split would be "scored" as mIoU 0.0
        from boxseg.data.voc import split_list_path

        raise DataError(split_list_path(find_voc_root(voc_root), split), "the split lists no usable image")
    return Target(ImageSet(ds, NUM_VOC_CLASSES), list(VOC_CLASSES), VOC_TARGET_CLASSES.coco_ids,
                  {"voc_root": str(voc_root), "split": split}, None)


@click.command(context_settings=HELP)
@version("boxseg-propose")
@click.option("--model", "model_path", type=click.Path(path_type=Path),
              help="SegNet2: a checkpoint (stages/segnet2_rN/final.pt) or an exported artifact (.onnx, .pt2, .engine).")
@click.option("--segnet1", "segnet1_path", type=click.Path(path_type=Path),
              help="SegNet1 for the score-map channel (needed by a 5-channel SegNet2, round >= 2).")
@click.option("--method", type=click.Choice(METHODS), default="learned", show_default=True,
              help="learned: SegNet2 (--model); box, box-centre, grabcut: the baselines through the same writer.")
@click.option("--voc-root", type=click.Path(path_type=Path), help="VOC2012 folder. Omit both data options for the synthetic world.")
@click.option("--split", default="train", show_default=True, help="VOC split list (ImageSets/Segmentation).")
@click.option("--coco-ann", type=click.Path(path_type=Path), help="A COCO instances JSON instead of VOC.")
@click.option("--coco-images", type=click.Path(path_type=Path), help="The COCO image folder.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output folder (ID.png, manifest.json).")
@click.option("--batch", type=int, default=64, show_default=True, help="(image, class) pairs per batch.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Default: fp16 on CUDA, fp32 on CPU.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Image decoders: threads on CPU, DataLoader processes on CUDA; 0 decodes in the main loop. "
                   "Default: 2 threads on CPU, half the CPUs (2 to 8) as processes on CUDA.")
@click.option("--decoders", type=click.Choice(DECODERS), default="auto",
              show_default=True,
              help="What --workers are: auto (processes on CUDA, threads on CPU), threads, DataLoader processes "
                   "forked from this process, or forked from a small forkserver process instead.")
@click.option("--writers", type=click.Choice(WRITERS), default="auto", show_default=True,
              help="What writes the PNGs: auto (processes on CUDA, threads on CPU), threads, processes forked from "
                   "this process, or forked from a small forkserver process instead.")
@click.option("--streams", type=click.IntRange(min=1), default=None,
              help="Batches in the model at once, each in its own thread with a share of --threads (default: 2 on "
                   "CPU with the torch or onnxruntime backend, else 1; more only with those).")
@click.option("--decode-on-device", is_flag=True,
              help="Decode JPEGs on the model's device (torchvision.io.decode_jpeg: nvJPEG on CUDA); other files, "
                   "and any JPEG it refuses, on the CPU. Needs torchvision. Pixels within JPEG-decoder tolerance of "
                   "the CPU path's (README), so the PNGs can differ slightly.")
@click.option("--instances", is_flag=True, help="Also write per-box masks (COCO results, RLE) and their mask AP.")
@click.option("--threshold", type=float, default=ProposalConfig.threshold, show_default=True,
              help="Foreground probability at or above which a pixel inside a box takes the box's class.")
@click.option("--margin", type=float, default=ProposalConfig.margin, show_default=True, help="|p - threshold| < margin -> 255.")
@click.option("--class-margin", type=float, default=ProposalConfig.class_margin, show_default=True,
              help="Two covering classes whose probabilities are closer than this (and near or above the "
                   "threshold) -> 255.")
@click.option("--merge", type=click.Choice(["ignore", "order"]), default="ignore", show_default=True,
              help="ignore: METHOD.md's rule; order: the reference code's (no 255).")
@click.option("--crf", is_flag=True,
              help="Refine SegNet2's probabilities inside the boxes with the fully connected CRF (DeepLab-v1's "
                   "settings, boxseg.crf) before the merge rule, as BCM and BANA do.")
@click.option("--box-centre-fraction", type=float, default=0.5, show_default=True,
              help="box-centre baseline: the inner fraction of each box side labelled with its class; the rest 255.")
@click.option("--skip-bad", is_flag=True, help="Skip and list unreadable inputs instead of stopping.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Predictor backend (default: the model file's own; a checkpoint runs eagerly). cudagraph "
                   "(CUDA only) replays the eager network as a CUDA graph. A checkpoint with onnxruntime, aoti "
                   "or tensorrt is exported once into $BOXSEG_CACHE/artifacts.")
@click.option("--overwrite", is_flag=True,
              help="Replace the proposals already in --out (a folder made with other settings is refused without it).")
@threads_option
def main(model_path, segnet1_path, method, voc_root, split, coco_ann, coco_images, out_dir, batch, precision, device,
         workers, decoders, writers, streams, decode_on_device, instances, threshold, margin, class_margin, merge, crf,
         box_centre_fraction, skip_bad, backend, overwrite, threads) -> None:
    """Turn boxes into pixel-level proposals: one VOC-palette PNG per image (255 = uncertain).
    A rerun completes only the images whose PNG is missing."""
    from boxseg.cli.train import resolve_device
    from boxseg.train import dist

    if batch < 1:
        raise click.BadParameter("must be >= 1", param_hint="--batch")
    problems = proposal_problems(ProposalConfig(threshold=threshold, margin=margin, class_margin=class_margin,
                                                merge=merge, batch=batch))
    if problems:
        raise click.BadParameter("; ".join(problems), param_hint="--threshold/--margin/--class-margin")
    if not (math.isfinite(box_centre_fraction) and 0 < box_centre_fraction <= 1):
        raise click.BadParameter(f"must be in (0, 1], not {box_centre_fraction}", param_hint="--box-centre-fraction")
    configure_threads(threads)  # the decode workers run at the lowest priority (boxseg.propose): not counted
    dev = resolve_device(device)
    dist.init_from_env(dev)
    rank, world = dist.rank_world()
    precision = precision or default_precision(dev)
    cfg = ProposalConfig(threshold=threshold, margin=margin, class_margin=class_margin, merge=merge, batch=batch,
                         crf=crf)
    if crf and method != "learned":
        raise click.UsageError("--crf refines SegNet2's probabilities (--method learned)")
    log = BadInputLog()
    stop_on_sigterm()
    check_backend(backend, precision, dev)
    with exit_on_errors():
        output_folder(out_dir)
        target = open_target(voc_root, split, coco_ann, coco_images, skip_bad, log)
        if method == "learned":
            if model_path is None:
                raise click.UsageError("--method learned needs --model (a SegNet2 checkpoint or artifact)")
            _claim(out_dir, overwrite, method=method, model_sha256=_digest(model_path),
                   segnet1_sha256=_digest(segnet1_path), backend=backend or _own_backend(model_path),
                   precision=precision, instances=instances, data=target.describe, **_merge_fields(cfg),
                   # pixels within decoder tolerance of the CPU path's: not mixed with its PNGs (only
                   # recorded when set, so folders made before the option still match)
                   **({"jpeg_decoder": "device"} if decode_on_device and not crf else {}))
            info, run = _learned(model_path, segnet1_path, target, out_dir, cfg, dev, precision, workers, instances,
                                 skip_bad, log, (rank, world), backend, decoders, streams, decode_on_device, writers)
        else:
            if instances:
                raise click.UsageError("--instances is for --method learned")
            _claim(out_dir, overwrite, method=method, data=target.describe,
                   box_centre_fraction=box_centre_fraction if method == "box-centre" else None)
            info, run = _baseline(method, target, out_dir, box_centre_fraction, (rank, world))
    # each rank's part travels to rank 0 through the process group, not through files in --out,
    # so two runs sharing a folder cannot read or delete each other's parts
    parts = dist.gather({"rank": rank, "run": run, "bad_input": log.to_dict()})
    if rank != 0:
        dist.shutdown()
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    from boxseg.data.files import write_bytes_atomic

    manifest = merge_manifest(out_dir, parts, {**info, "method": method, "config": dataclasses.asdict(cfg),
                                                "data": target.describe, "precision": precision, "device": str(dev),
                                                "world_size": world, "versions": library_versions(),
                                                "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    try:
        manifest["quality"], bad_truth = _quality(out_dir, target, instances), None
    except DataError as e:  # a bad ground-truth file: the proposals stand, the score does not
        manifest["quality"], bad_truth = {"error": str(e)}, e
    try:
        write_bytes_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=2).encode())
    except NoSpace as e:
        no_space(e)
    _report(manifest, out_dir)
    if bad_truth is not None:
        click.echo(f"error: cannot score the proposals: {bad_truth}", err=True)
        sys.exit(Exit.BAD_INPUT)
    dist.shutdown()
    if manifest["counts"]["failed"]:
        sys.exit(Exit.NON_FINITE)


def _digest(path: Path | None) -> str | None:
    from boxseg.data.files import file_digest

    return file_digest(path) if path is not None and Path(path).is_file() else None


def _own_backend(path: Path) -> str | None:
    from boxseg.predict.load import artifact_backend

    try:
        return artifact_backend(Path(path))
    except DataError:
        return None  # load_predictor says what is wrong with the file


def _merge_fields(cfg: ProposalConfig) -> dict:
    return {"threshold": cfg.threshold, "margin": cfg.margin, "class_margin": cfg.class_margin, "merge": cfg.merge,
            **({"crf": True} if cfg.crf else {})}  # absent when off: folders made before the option still match


def _claim(out_dir: Path, overwrite: bool, **signature) -> None:
    """Refuse (or with --overwrite clear) a folder made with other settings; rank 0 decides."""
    from boxseg.propose import claim_folder
    from boxseg.train import dist

    if dist.is_main():
        claim_folder(out_dir, signature, overwrite)
    dist.barrier()


def _learned(model_path, segnet1_path, target: Target, out_dir, cfg, dev, precision, workers, instances, skip_bad,
             log, shard, backend=None, decoders="auto", streams=None, decode_on_device=False, writers="auto"):
    from boxseg.export.artifacts import open_predictor
    from boxseg.propose import StreamsRefused, check_streams, propose

    say = lambda s: click.echo(s, err=True)  # noqa: E731
    segnet2 = open_predictor(model_path, dev, precision, backend, "segnet2", cfg.batch, log=say)
    segnet1 = None
    if segnet2.meta["in_channels"] == 5:
        if segnet1_path is None:
            raise click.UsageError(f"{model_path} is a 5-channel SegNet2 (round >= 2): pass --segnet1")
        segnet1 = open_predictor(segnet1_path, dev, precision, backend, "segnet1", cfg.batch, log=say,
                                 input_size=segnet2.meta["input_size"])
        if segnet1.meta["num_classes"] != len(target.names):
            raise DataError(segnet1_path, f"SegNet1 has {segnet1.meta['num_classes']} classes; this dataset has "
                                          f"{len(target.names)}")
    elif segnet1_path is not None:
        raise click.UsageError(f"{model_path} is a 4-channel SegNet2 (round 1): it takes no --segnet1")
    try:
        check_streams(streams, segnet2, segnet1)
    except StreamsRefused as e:
        raise click.BadParameter(str(e), param_hint="--streams") from None
    run = propose(segnet2, segnet1, target.images, out_dir, segnet2.meta["input_size"], cfg, dev, precision,
                  workers, instances, skip_bad, log, shard, progress=sys.stderr.isatty(),
                  streams=streams, device_jpeg=decode_on_device, **decoder_options(decoders),
                  **writer_options(writers))
    info = {"model": str(model_path), "model_meta": segnet2.meta, "predictor": segnet2.describe(),
            "segnet1": str(segnet1_path) if segnet1_path else None}
    return info, run.to_dict()


def _baseline(method, target: Target, out_dir, fraction, shard):
    from boxseg.inference import write_baseline

    rank, world = shard
    t0 = time.perf_counter()
    done = write_baseline(method, target.images, out_dir, fraction, sys.stderr.isatty(),
                          indices=list(range(rank, len(target.images), world)))
    secs = time.perf_counter() - t0
    mine = len(range(rank, len(target.images), world))
    return {"box_centre_fraction": fraction}, {"written": done["written"], "skipped_existing": mine - done["written"],
                                               "pairs": 0, "failed": [], "seconds": round(secs, 3)}


def _quality(out_dir: Path, target: Target, instances: bool) -> dict:
    """Proposal mIoU (and per-class IoU) against ground truth where it exists; mask AP for --instances."""
    from boxseg.inference import score_label_dir
    from boxseg.propose import coco_results, mask_ap

    images = target.images
    q: dict = {}
    scores, coverage = score_label_dir(out_dir, images, missing_ok=True)
    if scores.pixels:
        q["miou"] = scores.miou
        q["coverage"] = coverage
        q["per_class_iou"] = {n: v for n, v in zip(target.names, scores.iou)}
    if instances:
        coco = target.coco_ann is not None
        image_id = (lambda i: int(images.id(i))) if coco else (lambda i: i)
        results = coco_results(out_dir, images, target.coco_ids, image_id)
        from boxseg.data.files import write_bytes_atomic

        write_bytes_atomic(out_dir / "instances.json", json.dumps(results).encode())
        q["instances"] = len(results)
        if coco:
            q["mask_ap"] = mask_ap(target.coco_ann, results, [image_id(i) for i in range(len(images))])
        else:
            from boxseg.propose import drop_void, voc_instance_truth

            gt, void = voc_instance_truth(images, target.coco_ids)
            if gt["images"]:  # VOC: the images with SegmentationObject PNGs, void pixels not scored
                q["mask_ap"] = mask_ap(gt, drop_void(results, void), sorted(void))
            else:
                q["mask_ap"] = "not computed: no SegmentationObject/ID.png for any image of the split"
    return q


def _report(m: dict, out_dir: Path) -> None:
    c, t, q = m["counts"], m["timing"], m["quality"]
    click.echo(f"{m['method']}: wrote {c['written']} (already there {c['skipped_existing']}, bad {c['skipped_bad']}, "
               f"failed {c['failed']}); {c['pairs']} pairs in {t['seconds']:.1f} s"
               + (f" = {t['images_per_s']:.1f} images/s, {t['pairs_per_s']:.1f} pairs/s" if t.get("images_per_s") else ""))
    if t.get("stages"):
        click.echo("where the time went: " + ", ".join(f"{k} {v:.2f} s" for k, v in t["stages"].items() if k != "wall")
                   + (f"; device busy {100 * t['device_busy']:.0f}% of the wall time" if t.get("device_busy") is not None
                      else ""))
        click.echo(f"pipeline fill {t.get('fill', 0):.2f} s (the start to the first batch in the model; "
                   f"starting processes {t.get('start', 0):.2f} s of it), drain {t.get('drain', 0):.2f} s "
                   f"(the last batch in the model to the end)")
    if "miou" in q:
        click.echo(f"proposal mIoU {100 * q['miou']:.2f} (coverage {100 * q['coverage']:.1f}%)")
    if isinstance(q.get("mask_ap"), dict):
        a = q["mask_ap"]
        click.echo(f"mask AP {100 * a['AP']:.1f}, AP50 {100 * a['AP50']:.1f}, AP75 {100 * a['AP75']:.1f} "
                   f"({a['images']} images with ground-truth instances)")
    for s in m["skipped_files"]:
        click.echo(f"skipped {s['path']}: {s['problem']}", err=True)
    for f in m["failed"]:
        click.echo(f"failed {f['id']} class {f['class']}: {f['problem']}", err=True)
    click.echo(f"manifest: {out_dir / 'manifest.json'}")


if __name__ == "__main__":
    main()
