"""PASCAL VOC 2012 devkit reader (the target dataset), for real and synthetic trees alike.

Layout under ROOT (a `VOC2012` folder; `VOCdevkit/VOC2012` and `VOC2012` below ROOT are
found too):
  JPEGImages/ID.jpg, Annotations/ID.xml, SegmentationClass/ID.png,
  ImageSets/Segmentation/{train,val,trainval}.txt, and SBD-style
  SegmentationClassAug/ID.png with ImageSets/Segmentation{,Aug}/train_aug.txt.
  SegmentationObject/ID.png (instance k = the k-th object of the XML), where it exists, gives
  ground-truth instances (`VOCDataset.instances`).

Boxes in the XML are 1-based inclusive pixel coordinates; samples carry them 0-based with
an exclusive end, as floats: x0 = xmin - 1, y0 = ymin - 1, x1 = xmax, y1 = ymax.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from boxseg.data.classes import VOC_CLASSES, VOC_INDEX
from boxseg.data.files import check_boxes, clip_boxes, read_image, read_image_size, read_label, read_list, resolve_inside
from boxseg.errors import BadInputLog, DataError

NUM_VOC_CLASSES = len(VOC_CLASSES)  # 21 with background


@dataclass
class BoxAnnotation:
    boxes: np.ndarray       # float32 (N, 4) x0, y0, x1, y1; 0-based, exclusive end
    labels: np.ndarray      # int64 (N,), 1..20
    difficult: np.ndarray   # bool (N,)
    truncated: np.ndarray   # bool (N,)
    size: tuple[int, int] | None  # (height, width) from <size>, if given


@dataclass
class VOCSample:
    id: str
    image: np.ndarray             # uint8 (H, W, 3) RGB
    boxes: np.ndarray             # float32 (N, 4)
    labels: np.ndarray            # int64 (N,), 1..20
    difficult: np.ndarray         # bool (N,)
    truncated: np.ndarray         # bool (N,)
    mask: np.ndarray | None       # uint8 (H, W), values 0..20 and 255, when a mask exists


def find_voc_root(root: Path) -> Path:
    """The folder holding JPEGImages: ROOT itself, ROOT/VOC2012 or ROOT/VOCdevkit/VOC2012."""
    root = Path(root)
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DataError(root, "not a VOC tree: no JPEGImages/ folder here or in VOC2012/ or VOCdevkit/VOC2012/")


def split_list_path(root: Path, split: str) -> Path:
    for sub in ("Segmentation", "SegmentationAug"):
        p = root / "ImageSets" / sub / f"{split}.txt"
        if p.is_file():
            return p
    raise DataError(root / "ImageSets" / "Segmentation" / f"{split}.txt", f"split list '{split}' is missing")


def _int_field(elem: ET.Element | None, tag: str, path: Path) -> float:
    node = elem.find(tag) if elem is not None else None
    if node is None or node.text is None:
        raise DataError(path, f"missing <{tag}>")
    try:
        v = float(node.text.strip())
    except ValueError:
        raise DataError(path, f"<{tag}> is not a number: {node.text.strip()[:40]!r}") from None
    if not math.isfinite(v):
        raise DataError(path, f"<{tag}> is not a finite number: {node.text.strip()[:40]!r}")
    return v


def _size_field(elem: ET.Element, tag: str, path: Path) -> int:
    v = _int_field(elem, tag, path)
    if v != int(v) or not 1 <= v <= 1_000_000:
        raise DataError(path, f"<size><{tag}> must be a positive whole number of pixels, not {v:g}")
    return int(v)


def parse_annotation(path: Path) -> BoxAnnotation:
    """Parse a VOC XML file. Unknown class names, missing fields and bad numbers are errors
    naming the file; box validity against the image is checked by the caller."""
    if not path.is_file():
        raise DataError(path, "annotation file is missing")
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise DataError(path, f"malformed XML: {e}") from None
    rootel = tree.getroot()
    if rootel.tag != "annotation":
        raise DataError(path, f"root element is <{rootel.tag}>, expected <annotation>")
    size = None
    size_el = rootel.find("size")
    if size_el is not None:
        size = (_size_field(size_el, "height", path), _size_field(size_el, "width", path))
    boxes, labels, difficult, truncated = [], [], [], []
    for obj in rootel.findall("object"):
        name_el = obj.find("name")
        name = (name_el.text or "").strip() if name_el is not None else ""
        if name not in VOC_INDEX or name == "background":
            raise DataError(path, f"unknown class name {name!r}")
        bb = obj.find("bndbox")
        if bb is None:
            raise DataError(path, f"object {name!r} has no <bndbox>")
        xmin, ymin, xmax, ymax = (_int_field(bb, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        labels.append(VOC_INDEX[name])
        flag = lambda t: obj.find(t) is not None and (obj.find(t).text or "0").strip() == "1"  # noqa: E731
        difficult.append(flag("difficult"))
        truncated.append(flag("truncated"))
    return BoxAnnotation(
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
        truncated=np.asarray(truncated, dtype=bool),
        size=size,
    )


@dataclass
class InstanceTruth:
    labels: np.ndarray      # int64 (K,), 1..20
    masks: np.ndarray       # bool (K, H, W)
    void: np.ndarray        # bool (H, W): 255 in SegmentationObject (object borders, unlabelled)


@dataclass
class _Entry:
    id: str
    image: Path
    xml: Path | None
    mask: Path | None
    ann: BoxAnnotation | None


class VOCDataset:
    """A VOC split: indexing parses every XML and checks every path up front; images and
    masks are decoded in `__getitem__`.

    Args:
        root: the VOC2012 folder (or a parent, see `find_voc_root`).
        split: name of a list in ImageSets/Segmentation (train, val, trainval, train_aug).
        boxes: read Annotations/ID.xml (required for every id when True).
        masks: "auto" reads a mask where one exists, "require" makes a missing mask an
            error, "none" reads none.
        skip_bad: skip bad items (logged in `self.log`) instead of raising DataError;
            also decodes every image and mask once at indexing so no bad file surfaces later.
    """

    def __init__(self, root: str | Path, split: str, boxes: bool = True, masks: str = "auto",
                 skip_bad: bool = False, log: BadInputLog | None = None):
        if masks not in ("auto", "require", "none"):
            raise ValueError(f"masks must be auto, require or none, not {masks!r}")
        self.root = find_voc_root(Path(root))
        self.split = split
        self.log = log if log is not None else BadInputLog()
        self.list_path = split_list_path(self.root, split)
        aug_dir = self.root / "SegmentationClassAug"
        plain_dir = self.root / "SegmentationClass"
        mask_dirs = [aug_dir, plain_dir] if "aug" in split else [plain_dir, aug_dir]
        self.mask_dirs = [d for d in mask_dirs if d.is_dir()] if masks != "none" else []
        self._masks_mode = masks
        self.entries: list[_Entry] = []
        for sample_id in read_list(self.list_path):
            try:
                entry = self._index(sample_id, boxes)
                if skip_bad:
                    self._decode(entry)
            except DataError as err:
                if not skip_bad:
                    raise
                self.log.skip(err, item=sample_id)
                continue
            self.entries.append(entry)
        self._ids = tuple(e.id for e in self.entries)  # built once: `ImageSet.id(i)` asks per item

    def _index(self, sample_id: str, boxes: bool) -> _Entry:
        image = resolve_inside(self.root / "JPEGImages", f"{sample_id}.jpg", self.list_path)
        if not image.is_file():
            raise DataError(image, "image file is missing")
        xml = ann = None
        if boxes:
            xml = resolve_inside(self.root / "Annotations", f"{sample_id}.xml", self.list_path)
            ann = parse_annotation(xml)
            if ann.size is not None:
                self._check_and_clip(ann, ann.size, xml)
        mask = None
        for d in self.mask_dirs:
            cand = resolve_inside(d, f"{sample_id}.png", self.list_path)
            if cand.is_file():
                mask = cand
                break
        if mask is None and self._masks_mode == "require":
            raise DataError(self.root / "SegmentationClass" / f"{sample_id}.png", "segmentation mask is missing")
        return _Entry(sample_id, image, xml, mask, ann)

    def _check_and_clip(self, ann: BoxAnnotation, hw: tuple[int, int], xml: Path) -> None:
        names = [VOC_CLASSES[c] for c in ann.labels]
        check_boxes(ann.boxes, hw[1], hw[0], xml, names)
        ann.boxes, n = clip_boxes(ann.boxes, hw[1], hw[0])
        self.log.clip(xml, n)

    def _decode(self, entry: _Entry, mask: bool = True, encoded_jpeg: bool = False) -> VOCSample:
        image = read_image(entry.image, encoded_jpeg)
        hw = image.shape[:2]
        if entry.ann is not None:
            if entry.ann.size is None:
                self._check_and_clip(entry.ann, hw, entry.xml)
                entry.ann.size = hw
            elif tuple(entry.ann.size) != hw:
                raise DataError(entry.xml, f"<size> {entry.ann.size[1]}x{entry.ann.size[0]} differs from "
                                           f"image {entry.image.name} {hw[1]}x{hw[0]}")
        mask = read_label(entry.mask, NUM_VOC_CLASSES, hw) if (mask and entry.mask is not None) else None
        ann = entry.ann or BoxAnnotation(np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                                         np.zeros(0, bool), np.zeros(0, bool), hw)
        return VOCSample(entry.id, image, ann.boxes, ann.labels, ann.difficult, ann.truncated, mask)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> VOCSample:
        return self._decode(self.entries[i])

    def boxed(self, i: int, encoded_jpeg: bool = False) -> VOCSample:
        """Item i without its mask (None): the image and its boxes, what proposals need; with
        `encoded_jpeg` a plain JPEG image as its checked bytes (`read_image`)."""
        return self._decode(self.entries[i], mask=False, encoded_jpeg=encoded_jpeg)

    @property
    def ids(self) -> tuple[str, ...]:
        return self._ids

    def annotation(self, i: int) -> BoxAnnotation | None:
        """Boxes of item i without decoding its image."""
        return self.entries[i].ann

    def ground_truth(self, i: int) -> np.ndarray | None:
        """The label map of item i (None if it has none) without decoding its image; its size is
        checked against the image's: the XML's <size> (checked against the image wherever that
        is decoded) or, without one, the image file's header."""
        e = self.entries[i]
        if e.mask is None:
            return None
        size = e.ann.size if e.ann is not None and e.ann.size is not None else read_image_size(e.image)
        return read_label(e.mask, NUM_VOC_CLASSES, size)

    def instances(self, i: int) -> InstanceTruth | None:
        """Ground-truth instances of item i from SegmentationObject/ID.png, None where there is
        no such file. Instance k's class is the majority class of its pixels in the class mask,
        or the k-th object of the XML where there is no class mask."""
        e = self.entries[i]
        path = resolve_inside(self.root / "SegmentationObject", f"{e.id}.png", self.list_path)
        if not path.is_file():
            return None
        cls = self.ground_truth(i)
        obj = read_label(path, 255, cls.shape if cls is not None else (e.ann.size if e.ann is not None else None))
        ks = [int(k) for k in np.unique(obj) if k not in (0, 255)]
        labels, masks = [], []
        for k in ks:
            m = obj == k
            if cls is not None:
                c = cls[m]
                c = c[(c != 0) & (c != 255)]
                if c.size == 0:
                    raise DataError(path, f"instance {k} covers no object pixel of {e.mask.name}")
                labels.append(int(np.bincount(c).argmax()))
            else:
                if e.ann is None or k > len(e.ann.labels):
                    raise DataError(path, f"instance {k} has no object {k} in {e.xml.name if e.xml else 'an XML'}")
                labels.append(int(e.ann.labels[k - 1]))
            masks.append(m)
        return InstanceTruth(np.asarray(labels, np.int64),
                             np.stack(masks) if masks else np.zeros((0, *obj.shape), bool), obj == 255)
