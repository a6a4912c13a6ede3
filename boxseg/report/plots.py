"""The report's plots (matplotlib, Agg backend), each written atomically as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from boxseg.data.files import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 110) -> None:
    plt = _plt()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def confusion_png(mat, names: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (rows: ground truth) as a PNG."""
    plt = _plt()
    m = np.asarray(mat, dtype=np.float64)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(names)
    fig, ax = plt.subplots(figsize=(0.38 * n + 2.5, 0.38 * n + 2))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


BASELINE_STYLE = {"box": ("box-filled", "tab:red"), "box-centre": ("box-centre", "tab:orange"),
                  "grabcut": ("GrabCut", "tab:purple"), "full": ("full supervision", "black")}


def rounds_png(results: dict, path: Path) -> None:
    """Per round: proposal mIoU (train) and SegNet1 val mIoU, against each baseline and the
    fully supervised line (dashed)."""
    plt = _plt()
    rounds = sorted(results.get("rounds", {}), key=lambda k: int(k.removeprefix("round")))
    xs = [int(k.removeprefix("round")) for k in rounds]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "proposal_miou", "proposal mIoU (train)"),
                           (axes[1], "val_miou", "SegNet1 val mIoU")):
        if xs:
            ax.plot(xs, [100 * results["rounds"][k][key] for k in rounds], "o-", color="tab:blue", lw=2,
                    label="learned (boxseg)")
        for name, res in results.get("baselines", {}).items():
            if key in res and not (name == "full" and key == "proposal_miou"):
                label, colour = BASELINE_STYLE.get(name, (name, "grey"))
                ax.axhline(100 * res[key], ls="--", color=colour, lw=1.2, label=label)
        ax.set_xlabel("round")
        ax.set_xticks(xs or [1])
        ax.set_ylabel("mIoU (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    _save(fig, path)


def per_class_png(names: list[str], final: list, full: list | None, path: Path) -> None:
    """Per-class val IoU of the final round beside full supervision (horizontal bars)."""
    plt = _plt()
    n = len(names)
    y = np.arange(n)
    fig, ax = plt.subplots(figsize=(7, 0.28 * n + 1.2))
    val = lambda v: np.array([np.nan if x is None else 100 * x for x in v])  # noqa: E731
    h = 0.4 if full is not None else 0.8
    ax.barh(y - (h / 2 if full is not None else 0), val(final), height=h, color="tab:blue", label="final round")
    if full is not None:
        ax.barh(y + h / 2, val(full), height=h, color="0.6", label="full supervision")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("val IoU (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def curves_png(stages: dict[str, list[dict]], path: Path) -> None:
    """Training loss against iteration, one line per stage (from each stage's metrics.csv)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for name, rows in stages.items():
        if rows:
            ax.plot([int(r["iteration"]) for r in rows], [float(r["loss"]) for r in rows], lw=1, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
