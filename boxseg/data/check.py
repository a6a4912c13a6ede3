"""`boxseg-data check`: validate a VOC or COCO tree and summarise it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from boxseg.data.boxes import fill_boxes
from boxseg.data.classes import VOC_CLASSES
from boxseg.data.coco import COCOSource
from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset, find_voc_root
from boxseg.errors import BadInputLog, DataError
from boxseg.metrics import ConfusionMatrix


@dataclass
class CheckReport:
    kind: str                                   # "voc" or "coco"
    root: str
    images: dict[str, int] = field(default_factory=dict)      # per split / file
    objects: dict[str, int] = field(default_factory=dict)     # per class name
    box_stats: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    log: BadInputLog = field(default_factory=BadInputLog)

    @property
    def ok(self) -> bool:
        return not self.log.skipped

    def render(self) -> str:
        lines = [f"{self.kind.upper()} tree: {self.root}"]
        lines += [f"  images in {k}: {v}" for k, v in self.images.items()]
        lines.append(f"  objects: {sum(self.objects.values())} in {len(self.objects)} classes")
        lines += [f"    {name:<16s} {n}" for name, n in sorted(self.objects.items())]
        if self.box_stats:
            lines.append("  boxes: " + ", ".join(f"{k} {v:.3g}" for k, v in self.box_stats.items()))
        lines += [f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in self.extra.items()]
        lines.append(f"  clipped boxes: {self.log.clipped_boxes}")
        if self.ok:
            lines.append("  problems: none")
        else:
            lines.append(f"  problems: {len(self.log.skipped)}")
            lines += [f"    {s['path']}: {s['problem']}" for s in self.log.skipped]
        return "\n".join(lines)


def _box_stats(boxes: list[np.ndarray], sizes: list[tuple[int, int]]) -> dict[str, float]:
    if not boxes:
        return {}
    b = np.concatenate(boxes)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    frac = np.concatenate([(bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1]) / (hw[0] * hw[1])
                           for bb, hw in zip(boxes, sizes)])
    return {"count": float(len(b)), "width_median": float(np.median(w)), "height_median": float(np.median(h)),
            "width_min": float(w.min()), "height_min": float(h.min()),
            "area_fraction_median": float(np.median(frac)), "area_fraction_max": float(frac.max())}


def check_voc(root: Path, progress: bool = False) -> CheckReport:
    """Read every split list under ImageSets/Segmentation: parse every XML, decode every image
    and mask, and score the box-filled baseline against the masks that exist."""
    from tqdm import tqdm

    root = find_voc_root(root)
    report = CheckReport("voc", str(root))
    lists = sorted((root / "ImageSets" / "Segmentation").glob("*.txt"))
    lists += sorted((root / "ImageSets" / "SegmentationAug").glob("*.txt"))
    if not lists:
        report.log.skip(DataError(root / "ImageSets" / "Segmentation", "no split lists found"))
        return report
    seen: set[str] = set()
    boxes, sizes = [], []
    conf = ConfusionMatrix(NUM_VOC_CLASSES)
    for lst in lists:
        split = lst.stem
        try:
            ds = VOCDataset(root, split, skip_bad=True, log=report.log)
        except DataError as err:
            report.log.skip(err)
            continue
        report.images[split] = len(ds)
        for i in tqdm(range(len(ds)), desc=f"check {split}", disable=not progress):
            if ds.ids[i] in seen:
                continue
            seen.add(ds.ids[i])
            s = ds[i]
            for c in s.labels:
                report.objects[VOC_CLASSES[c]] = report.objects.get(VOC_CLASSES[c], 0) + 1
            boxes.append(s.boxes)
            sizes.append(s.image.shape[:2])
            if s.mask is not None:
                conf.update(fill_boxes(s.boxes, s.labels, *s.mask.shape), s.mask)
    unique = {(e["path"], e["problem"]): e for e in report.log.skipped}  # trainval repeats train/val
    report.log.skipped = list(unique.values())
    report.box_stats = _box_stats(boxes, sizes)
    scores = conf.scores()
    if scores.pixels:
        report.extra["box-filled baseline mIoU vs masks (all images with masks), %"] = round(100 * scores.miou, 2)
    return report


def check_coco(ann_file: Path, image_root: Path, progress: bool = False) -> CheckReport:
    """Validate a COCO instances file and its images as the source reader sees them."""
    from tqdm import tqdm

    report = CheckReport("coco", str(ann_file))
    try:
        src = COCOSource(ann_file, image_root, skip_bad=True, log=report.log)
    except DataError as err:
        report.log.skip(err)
        return report
    report.images[ann_file.name] = len(src)
    boxes, sizes = [], []
    crowd = 0
    for i in tqdm(range(len(src)), desc="check annotations", disable=not progress):
        info = src.images[i]
        anns = src.annotations(i)
        for a in anns:
            if a.get("iscrowd", 0):
                crowd += 1
                continue
            name = src.coco.cats[a["category_id"]]["name"]
            report.objects[name] = report.objects.get(name, 0) + 1
        b = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in anns if not a.get("iscrowd", 0)], np.float32).reshape(-1, 4)
        boxes.append(b)
        sizes.append((info["height"], info["width"]))
    report.box_stats = _box_stats(boxes, sizes)
    report.extra["VOC-class objects removed"] = src.removed_voc_objects
    report.extra["images dropped (no source object)"] = src.dropped_no_source
    report.extra["crowd regions (ignored)"] = crowd
    report.extra["(image, class) samples for SegNet2"] = len(src.class_pairs())
    return report


def coco_image_dir(ann: Path) -> Path:
    """The image folder of `.../annotations/instances_<split>.json` by one rule for a file or
    a tree: `<tree>/images` if it exists, else `<tree>/<split>` (COCO's own layout, e.g.
    train2017/), where <tree> is the folder holding annotations/."""
    tree = ann.parent.parent
    split = ann.stem.removeprefix("instances_")
    return next((d for d in (tree / "images", tree / split) if d.is_dir()), tree / "images")


def find_coco_files(root: Path, images: Path | None) -> list[tuple[Path, Path]]:
    """(annotation file, image folder) pairs for ROOT: a JSON file, or a folder with
    annotations/instances_*.json; the folder is `images` or else `coco_image_dir`'s."""
    anns = [root] if root.is_file() else sorted((root / "annotations").glob("instances_*.json"))
    return [(ann, images or coco_image_dir(ann)) for ann in anns]
