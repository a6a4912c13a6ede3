"""boxseg-eval: mIoU of a SegNet1 artifact (any backend) or of a proposal folder on a VOC split."""

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
from boxseg.data.files import output_folder
from boxseg.predict import BACKENDS, default_precision
from boxseg.report.plots import confusion_png
from boxseg.threads import configure_threads


def iou_table(names: list[str], iou: list) -> str:
    rows = ["| class | IoU |", "|---|---|"]
    rows += [f"| {n} | {'-' if v is None else f'{100 * v:.1f}'} |" for n, v in zip(names, iou)]
    return "\n".join(rows)


@click.command(context_settings=HELP)
@version("boxseg-eval")
@click.option("--model", "model_path", type=click.Path(path_type=Path),
              help="SegNet1: a checkpoint or an exported artifact (.onnx, .pt2, .engine).")
@click.option("--proposals", "prop_dir", type=click.Path(path_type=Path),
              help="Score a folder of label PNGs (255 = not scored, coverage reported) instead of a model.")
@click.option("--voc-root", type=click.Path(path_type=Path), help="VOC2012 folder; omit for the synthetic world.")
@click.option("--split", default=None, help="Split list (default: val for --model, train for --proposals).")
@click.option("--flip", is_flag=True, help="Average with the mirrored image.")
@click.option("--scales", default="1", show_default=True, help="Comma list of test scales, averaged (e.g. 0.75,1,1.25).")
@click.option("--crf", is_flag=True, help="Refine with a dense CRF (DeepLab-v1's settings, 10 mean-field "
              "iterations; boxseg.crf).")
@click.option("--crf-method", type=click.Choice(["full", "window"]), default="full", show_default=True,
              help="full: the fully connected CRF (permutohedral lattice, as Krähenbühl's code); window: the "
                   "kernels cut to an 11x11 window (faster, no long-range term).")
@click.option("--save-predictions", "save_dir", type=click.Path(path_type=Path),
              help="Write each image's predicted labels (after --crf) as ID.png in the VOC palette here.")
@click.option("--batch", type=int, default=16, show_default=True, help="Images per batch.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Default: fp16 on CUDA, fp32 on CPU (as boxseg-propose).")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Predictor backend (default: the model file's own; a checkpoint runs eagerly). cudagraph "
                   "(CUDA only) replays the eager network as a CUDA graph. A checkpoint with onnxruntime, aoti "
                   "or tensorrt is exported once into $BOXSEG_CACHE/artifacts.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Write results.json, per_class.md, confusion.png here.")
@click.option("--skip-bad", is_flag=True, help="Skip and list unreadable images and labels instead of stopping.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Threads that decode the images and ground truth ahead of the model (default: 2 on CPU; on CUDA "
                   "half the CPUs, 2 to 8).")
@threads_option
def main(model_path, prop_dir, voc_root, split, flip, scales, crf, crf_method, save_dir, batch, precision, backend,
         device, out_dir, skip_bad, workers, threads) -> None:
    """Print mIoU and the per-class IoU table; with --out also the JSON and the confusion matrix."""
    from boxseg.cli.propose import open_target
    from boxseg.cli.train import resolve_device
    from boxseg.errors import BadInputLog, DataError, NonFiniteOutput, NoSpace
    from boxseg.metrics import ConfusionMatrix

    if (model_path is None) == (prop_dir is None):
        raise click.UsageError("give exactly one of --model and --proposals")
    if crf and prop_dir is not None:
        raise click.UsageError("--crf refines a model's probabilities; proposal folders hold labels only")
    if save_dir is not None and prop_dir is not None:
        raise click.UsageError("--save-predictions writes a model's labels; --proposals are labels already")
    try:
        scale_list = tuple(float(s) for s in scales.split(","))
    except ValueError:
        raise click.BadParameter(f"not a comma list of numbers: {scales!r}", param_hint="--scales") from None
    bad = [s for s in scale_list if not (math.isfinite(s) and 0.1 <= s <= 4)]
    if bad:  # a scale of 100 grew the process to 23 GB
        raise click.BadParameter(f"scales must lie in [0.1, 4], not {bad}", param_hint="--scales")
    if batch < 1:
        raise click.BadParameter("must be >= 1", param_hint="--batch")
    split = split or ("val" if model_path else "train")
    configure_threads(threads)
    dev = resolve_device(device)
    precision = precision or default_precision(dev)
    log = BadInputLog()
    t0 = time.perf_counter()
    stop_on_sigterm()
    check_backend(backend, precision, dev)
    try:
        with exit_on_errors():
            if out_dir is not None:
                output_folder(out_dir)
            if save_dir is not None:
                output_folder(save_dir, "--save-predictions")
            # a model's score needs every image's ground truth; a proposal folder is scored where there is one
            target = open_target(voc_root, split, None, None, skip_bad, log,
                                 masks="require" if model_path is not None else "auto")
            conf = ConfusionMatrix(target.images.num_classes)
            res: dict = {"split": split, "data": target.describe}
            if model_path is not None:
                from boxseg.inference import evaluate_segnet1
                from boxseg.export.artifacts import open_predictor

                pred = open_predictor(model_path, dev, precision, backend, "segnet1", batch,
                                      log=lambda s: click.echo(s, err=True))
                if pred.meta["num_classes"] != target.images.num_classes:
                    raise DataError(model_path, f"predicts {pred.meta['num_classes']} classes; the split has "
                                                f"{target.images.num_classes}")
                from boxseg.crf import CRFParams

                crf_params = CRFParams(method=crf_method) if crf else None
                scores = evaluate_segnet1(pred, target.images, pred.meta["input_size"], dev, batch, scale_list, flip,
                                          progress=sys.stderr.isatty(), conf=conf, crf=crf_params, save_dir=save_dir,
                                          workers=workers)
                res.update({"model": str(model_path), "predictor": pred.describe(), "scales": list(scale_list), "flip": flip,
                            "crf": dataclasses.asdict(crf_params) if crf_params else None,
                            "predictions": str(save_dir) if save_dir is not None else None})
            else:
                from boxseg.inference import score_label_dir

                scores, coverage = score_label_dir(prop_dir, target.images, conf=conf)
                res.update({"proposals": str(prop_dir), "coverage": coverage})
    except NonFiniteOutput as e:
        click.echo(f"error: {model_path}: {e}", err=True)
        sys.exit(Exit.NON_FINITE)
    res.update(scores.to_dict(target.names))
    res["seconds"] = round(time.perf_counter() - t0, 3)
    res["bad_input"] = log.to_dict()
    click.echo(iou_table(target.names, scores.iou))
    click.echo(f"mIoU {100 * scores.miou:.2f} over {scores.pixels} pixels"
               + (f" (coverage {100 * res['coverage']:.1f}%)" if "coverage" in res else ""))
    if out_dir is not None:
        from boxseg.data.files import write_bytes_atomic

        try:
            write_bytes_atomic(out_dir / "results.json", json.dumps(res, indent=2).encode())
            write_bytes_atomic(out_dir / "per_class.md", (iou_table(target.names, scores.iou) + "\n").encode())
            confusion_png(conf.mat.numpy(), target.names, out_dir / "confusion.png",
                          f"{model_path or prop_dir}: mIoU {100 * scores.miou:.1f}")
        except NoSpace as e:
            no_space(e)
        click.echo(f"results: {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
