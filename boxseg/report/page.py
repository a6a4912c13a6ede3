"""Build the static report of a boxseg-train run folder: index.html with its pictures in
img/ beside it. No server, no network, no JavaScript."""

from __future__ import annotations

import csv
import html
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from boxseg.data.classes import VOC_CLASSES
from boxseg.data.files import read_label, write_bytes_atomic
from boxseg.data.images import ImageSet
from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset
from boxseg.errors import DataError
from boxseg.report import gallery, plots
from boxseg.versions import library_versions

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1500px;
color:#222;padding:0 16px}
h1{font-size:24px}h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.gallery td{text-align:center;vertical-align:top;border:none;padding:4px}
.gallery img{display:block;margin:auto;image-rendering:pixelated}
.gallery th{background:none;border:none;font-weight:600}.cap{font-size:12px;color:#555}
.sw{display:inline-block;margin:2px 10px 2px 0;font-size:12px}
.sw i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-2px;border:1px solid #999}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto;max-height:420px}
.muted{color:#666;font-size:13px}
"""


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _summary_table(results: dict) -> str:
    full = results.get("baselines", {}).get("full", {}).get("val_miou")
    rows = ["<tr><th>method</th><th>proposal mIoU (train)</th><th>proposal coverage</th>"
            "<th>SegNet1 val mIoU</th><th>/ full</th></tr>"]

    def row(name: str, d: dict, masks: bool = False) -> str:
        ratio = f"{d['val_miou'] / full:.3f}" if full and d.get("val_miou") is not None else "-"
        prop, cover = ("-", "-") if masks else (_pct(d.get("proposal_miou")), _pct(d.get("proposal_coverage")))
        return (f"<tr><td>{html.escape(name)}</td><td>{prop}</td><td>{cover}</td><td>{_pct(d.get('val_miou'))}</td>"
                f"<td>{ratio}</td></tr>")

    for name, d in results.get("baselines", {}).items():  # full supervision has masks, not proposals: "-" as the CLI
        rows.append(row(plots.BASELINE_STYLE.get(name, (name,))[0], d, masks=name == "full"))
    for key in sorted(results.get("rounds", {}), key=lambda k: int(k.removeprefix("round"))):
        rows.append(row(f"learned, round {key.removeprefix('round')}", results["rounds"][key]))
    return "<table>" + "".join(rows) + "</table>"


def _markdown_table(md: str) -> str:
    """The bench markdown (a header paragraph and a pipe table) as HTML."""
    out, table = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                tag = "th" if not table else "td"
                table.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
        elif line.strip():
            out.append(f'<p class="muted">{html.escape(line.strip())}</p>')
    return "".join(out) + ("<table>" + "".join(table) + "</table>" if table else "")


def _stage_rows(run_dir: Path) -> dict[str, list[dict]]:
    stages = {}
    for f in sorted((run_dir / "stages").glob("*/metrics.csv")):
        with open(f) as fh:
            stages[f.parent.name] = list(csv.DictReader(fh))
    return stages


def build_report(run_dir: Path, out_dir: Path, voc_root: Path, n_images: int = 8,
                 bench: list[Path] | None = None, device: torch.device = torch.device("cpu"),
                 train_split: str = "train", val_split: str = "val",
                 log: Callable[[str], None] = print, precision: str | None = None, backend: str = "torch") -> Path:
    """Write out_dir/index.html (and img/) for the run in `run_dir`, whose target data is the
    VOC tree `voc_root`. Returns the page's path."""
    from boxseg.inference import evaluate_segnet1, segnet1_probs
    from boxseg.metrics import ConfusionMatrix
    from boxseg.predict import default_precision, load_predictor

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    res_path = run_dir / "results.json"
    if not res_path.is_file():
        raise DataError(run_dir, "not a finished boxseg-train run folder (results.json is missing)")
    try:
        results = json.loads(res_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(res_path, f"malformed JSON: {e}") from None
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    rounds = sorted(int(k.removeprefix("round")) for k in results.get("rounds", {}))
    if not rounds:
        raise DataError(res_path, "the run has no finished round")
    final = rounds[-1]
    img_dir = out_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    names = list(VOC_CLASSES)
    train_voc = VOCDataset(voc_root, train_split)
    train = ImageSet(train_voc, NUM_VOC_CLASSES)
    val = ImageSet(VOCDataset(voc_root, val_split, masks="require"), NUM_VOC_CLASSES)

    # -- gallery: the best, the worst and evenly spread images by final-round proposal IoU ---------
    final_dir = run_dir / "proposals" / f"target_r{final}"
    log(f"scoring {len(train)} proposals of round {final}")
    scores = []
    for i in range(len(train)):  # masks and proposals only: no image is decoded here
        path = final_dir / f"{train.id(i)}.png"
        gt = train_voc.ground_truth(i) if path.exists() else None
        if gt is None:
            scores.append(float("nan"))
            continue
        scores.append(gallery.image_miou(read_label(path, NUM_VOC_CLASSES, gt.shape), gt, NUM_VOC_CLASSES))
    chosen = gallery.pick(scores, n_images)
    seg1_path = run_dir / "stages" / f"segnet1_r{final}" / "final.pt"
    segnet1 = load_predictor(seg1_path, device, precision or default_precision(device), backend, "segnet1", 16)
    meta1 = segnet1.meta
    columns = ["image and boxes"] + [f"proposal, round {r}" for r in rounds] + ["SegNet1 prediction", "ground truth"]
    rows = []
    with torch.no_grad():
        for k, i in enumerate(chosen):
            item = train[i]
            pics = [gallery.boxes_picture(item.image, item.boxes, item.labels, names)]
            for r in rounds:
                p = run_dir / "proposals" / f"target_r{r}" / f"{item.id}.png"
                pics.append(gallery.label_picture(read_label(p, NUM_VOC_CLASSES, item.image.shape[:2])))
            pred = segnet1_probs(segnet1, [item.image], meta1["input_size"], device)[0].max(0).indices.cpu().numpy()
            pics.append(gallery.label_picture(pred.astype(np.uint8)))
            pics.append(gallery.label_picture(item.mask))
            cells = []
            for c, pic in enumerate(pics):
                rel = f"img/g{k:02d}_{c}.png"
                gallery.save_png(pic, out_dir / rel)
                cells.append(f'<td><img src="{rel}" width="{pic.width}" height="{pic.height}" '
                             f'alt="{html.escape(columns[c])} of {html.escape(item.id)}"></td>')
            tag = " (worst)" if k == 0 else " (best)" if k == len(chosen) - 1 else ""
            rows.append(f'<tr><td colspan="{len(columns)}" class="cap" style="text-align:left">'
                        f'{html.escape(item.id)}: round-{final} proposal IoU {100 * scores[i]:.1f}{tag}</td></tr>'
                        f'<tr>{"".join(cells)}</tr>')
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    gallery_html = f'<table class="gallery">{head}{"".join(rows)}</table>'

    # -- plots -------------------------------------------------------------------------------------
    plots.rounds_png(results, img_dir / "rounds.png")
    final_iou = results["rounds"][f"round{final}"].get("val_iou")
    full_iou = results.get("baselines", {}).get("full", {}).get("val_iou")
    if final_iou:
        plots.per_class_png(names, final_iou, full_iou, img_dir / "per_class.png")
    log(f"confusion matrix of SegNet1 round {final} on {val_split} ({len(val)} images)")
    conf = ConfusionMatrix(NUM_VOC_CLASSES)
    val_scores = evaluate_segnet1(segnet1, val, meta1["input_size"], device, conf=conf)
    plots.confusion_png(conf.mat.numpy(), names, img_dir / "confusion.png",
                        f"SegNet1 round {final} on {val_split}: mIoU {100 * val_scores.miou:.1f}")
    stages = _stage_rows(run_dir)
    if stages:
        plots.curves_png(stages, img_dir / "curves.png")

    # -- benchmarks --------------------------------------------------------------------------------
    bench_html = []
    for b in bench or []:
        files = sorted(Path(b).glob("*")) if Path(b).is_dir() else [Path(b).with_suffix(s) for s in (".md", ".png")]
        for f in files:
            if f.suffix == ".md" and f.exists():
                bench_html.append(f"<h3>{html.escape(f.stem)}</h3>" + _markdown_table(f.read_text()))
            elif f.suffix == ".png" and f.exists():
                dst = img_dir / f"bench_{f.name}"
                shutil.copyfile(f, dst)
                bench_html.append(f'<p><img src="img/{dst.name}" alt="benchmark plot {html.escape(f.stem)}" '
                                  f'style="max-width:100%"></p>')

    # -- the page ------------------------------------------------------------------------------------
    versions = library_versions()
    cfg = yaml.safe_load(config_text) if config_text else {}
    title = f"boxseg report: {run_dir.name}"
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="muted">run folder {html.escape(str(run_dir))}; preset {html.escape(str(cfg.get("preset")))}, '
        f'setting {html.escape(str(results.get("setting")))}, {len(rounds)} round(s); report written '
        f'{time.strftime("%Y-%m-%d %H:%M")}</p>',
        "<h2>Results</h2>", _summary_table(results),
        '<p><img src="img/rounds.png" alt="mIoU per round" style="max-width:100%"></p>',
        f"<h2>Gallery</h2><p class=muted>{len(chosen)} training images chosen by the proposal IoU of round {final} "
        f"against the ground truth: the worst first, the best last.</p>",
        f"<p>{gallery.legend_html(names)}</p>", gallery_html,
        "<h2>Per-class IoU (val)</h2>",
        '<p><img src="img/per_class.png" alt="per-class IoU" style="max-width:100%"></p>' if final_iou else "",
        "<h2>Confusion matrix (val)</h2>",
        '<p><img src="img/confusion.png" alt="confusion matrix" style="max-width:100%"></p>',
        "<h2>Training curves</h2>",
        '<p><img src="img/curves.png" alt="training loss per stage" style="max-width:100%"></p>' if stages else
        "<p class=muted>no metrics.csv found</p>",
    ]
    if bench_html:
        parts += ["<h2>Benchmarks</h2>", *bench_html]
    parts += ["<h2>Config</h2>", f"<pre>{html.escape(config_text)}</pre>",
              "<h2>Versions</h2><table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                                                  for k, v in versions.items()) + "</table>",
              "</body></html>"]
    page = out_dir / "index.html"
    write_bytes_atomic(page, "\n".join(parts).encode())
    return page
