"""boxseg-report: a static HTML report of a boxseg-train run."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from boxseg.cli import HELP, Exit, threads_option, version
from boxseg.threads import configure_threads


@click.command(context_settings=HELP)
@version("boxseg-report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Folder for index.html and img/.")
@click.option("--bench", "bench", type=click.Path(exists=True, path_type=Path), multiple=True,
              help="boxseg-bench results: a folder (every .md and .png in it) or a results file; repeatable.")
@click.option("--images", "n_images", type=int, default=8, show_default=True, help="Gallery rows.")
@click.option("--voc-root", type=click.Path(path_type=Path), help="The run's VOC tree (default: from its config.yaml).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--screenshot", type=click.Path(path_type=Path),
              help="Also render the page in headless Chromium and save a PNG of it (needs chromium).")
@click.option("--screenshot-height", type=int, default=None, help="Only the top H pixels (default: the whole page).")
@threads_option
def main(run_dir: Path, out_dir: Path, bench: tuple[Path, ...], n_images: int, voc_root: Path | None, device: str,
         screenshot: Path | None, screenshot_height: int | None, threads) -> None:
    """Write OUT/index.html: gallery (image and boxes, each round's proposal, SegNet1's
    prediction, ground truth), per-round mIoU against the baselines, per-class IoU, the
    confusion matrix, training curves, benchmarks and the run's config and versions."""
    import yaml

    from boxseg.cli.train import resolve_device, synth_world
    from boxseg.errors import DataError
    from boxseg.report.page import build_report

    configure_threads(threads)
    try:
        cfg_path = run_dir / "config.yaml"
        try:
            cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
        except yaml.YAMLError as e:
            raise DataError(cfg_path, f"malformed YAML: {e}") from None
        data = (cfg or {}).get("data", {})
        if voc_root is None:
            if data.get("voc_root"):
                voc_root = Path(data["voc_root"])
            else:  # the synthetic world the run trained on (built again if the cache is gone)
                voc_root = synth_world(data.get("synth_size", "tiny"), int(data.get("synth_seed", 0)))[2]
        page = build_report(run_dir, out_dir, voc_root, n_images, list(bench), resolve_device(device),
                            data.get("train_split", "train"), data.get("val_split", "val"),
                            log=lambda s: click.echo(s, err=True))
    except DataError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(Exit.BAD_INPUT)
    click.echo(f"report: {page}")
    if screenshot is not None:
        from boxseg.data.files import write_bytes_atomic
        from boxseg.report.browser import find_chromium, inspect_page

        if find_chromium() is None:
            click.echo("error: --screenshot needs chromium (Debian: apt-get install chromium)", err=True)
            sys.exit(Exit.MISSING_PACKAGE)
        rep = inspect_page(page, width=1400, height=screenshot_height or 900, full_page=screenshot_height is None)
        write_bytes_atomic(screenshot, rep.screenshot)
        for e in rep.console_errors:
            click.echo(f"console error: {e}", err=True)
        click.echo(f"screenshot: {screenshot} ({len(rep.images)} images, {len(rep.broken_images)} broken, "
                   f"{len(rep.console_errors)} console errors)")
        if rep.console_errors or rep.broken_images:
            sys.exit(Exit.PAGE_CHECK_FAILED)


if __name__ == "__main__":
    main()
