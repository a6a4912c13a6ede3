"""boxseg-data: build the synthetic world, or check a dataset tree."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click

from boxseg.cli import HELP, Exit, version
from boxseg.data.check import check_coco, check_voc, find_coco_files
from boxseg.data.synth import size_preset, write_synth
from boxseg.errors import DataError


@click.group(context_settings=HELP)
@version("boxseg-data")
def main() -> None:
    """Datasets: the embedded synthetic world and checks of real VOC / COCO trees."""


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write the world into.")
@click.option("--seed", type=int, default=0, show_default=True, help="The world is a function of the seed.")
@click.option("--size", "size_name", default="tiny", show_default=True,
              help="tiny (CPU demo), small, medium or large (VOC-sized, for GPU runs).")
@click.option("--n-source", type=int, help="Override the number of COCO source images.")
@click.option("--n-train", type=int, help="Override the number of VOC train images.")
@click.option("--n-val", type=int, help="Override the number of VOC val images.")
@click.option("--workers", type=int, default=None, help="Processes (default: up to 4).")
def synth(out: Path, seed: int, size_name: str, n_source: int | None, n_train: int | None,
          n_val: int | None, workers: int | None) -> None:
    """Write a COCO-format source set and a VOC-format target set under OUT."""
    try:
        size = size_preset(size_name)
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="--size") from None
    overrides = {k: v for k, v in (("n_source", n_source), ("n_train", n_train), ("n_val", n_val)) if v is not None}
    size = replace(size, **overrides)
    world = write_synth(out, seed=seed, size=size, workers=workers, progress=sys.stderr.isatty())
    click.echo(f"source (COCO): {world.coco_ann}  images: {world.coco_images}")
    click.echo(f"target (VOC):  {world.voc_root}")
    click.echo(f"box-filled baseline mIoU on target train masks: {100 * world.box_baseline_miou:.2f}")
    click.echo(calibration_line(world.calibration))


def calibration_line(cal: dict) -> str:
    """The baselines a synthetic world was calibrated on (VOC: box-filled ~62, GrabCut 65.7)."""
    return (f"calibration (mIoU on target train masks): box-filled {100 * cal['box']:.2f}, box-centre "
            f"{100 * cal['box-centre']:.2f} (its labelled pixels), GrabCut {100 * cal['grabcut']:.2f} (first "
            f"{cal['grabcut_images']} images); VOC: GrabCut 65.7")


@main.command()
@click.argument("root", type=click.Path(exists=True, path_type=Path))
@click.option("--images", type=click.Path(path_type=Path),
              help="COCO image folder (default, for a JSON file as for a tree: images/ beside annotations/, else "
                   "the folder named after the JSON's split, e.g. train2017/ for instances_train2017.json).")
def check(root: Path, images: Path | None) -> None:
    """Validate a VOC tree, a COCO tree (folder with annotations/) or a COCO JSON file.

    Prints a summary and every problem found; exits 1 when there are problems.
    """
    progress = sys.stderr.isatty()
    reports = []
    try:
        if root.is_dir() and not (root / "annotations").is_dir():
            reports.append(check_voc(root, progress=progress))
        else:
            pairs = find_coco_files(root, images)
            if not pairs:
                raise DataError(root, "no annotations/instances_*.json found")
            reports += [check_coco(ann, img, progress=progress) for ann, img in pairs]
    except DataError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(Exit.PROBLEMS_FOUND)  # for check, a file it cannot read is a problem found
    for r in reports:
        click.echo(r.render())
    sys.exit(Exit.OK if all(r.ok for r in reports) else Exit.PROBLEMS_FOUND)


if __name__ == "__main__":
    main()
