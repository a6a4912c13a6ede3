"""COCO instances reader (the source dataset) through pycocotools.

METHOD.md: objects of the 20 VOC categories are removed (not relabelled), images left with
no source object are dropped, crowd regions become 255, and the 60 source categories get
the stable contiguous index of `SOURCE_CLASSES` (ascending COCO id), saved with every
artifact that depends on it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from boxseg.data.boxes import union_box_mask
from boxseg.data.classes import COCO_NAMES, IGNORE, SOURCE_CLASSES, VOC_COCO_IDS, ClassMap
from boxseg.data.files import check_boxes, clip_boxes, read_image, resolve_inside
from boxseg.errors import BadInputLog, DataError


@dataclass
class Instance:
    label: int            # source index 1..60
    box: np.ndarray       # float32 (4,) x0, y0, x1, y1
    mask: np.ndarray      # bool (H, W)
    crowd: bool


@dataclass
class COCOSample:
    id: int
    image: np.ndarray             # uint8 (H, W, 3)
    boxes: np.ndarray             # float32 (N, 4), non-crowd instances
    labels: np.ndarray            # int64 (N,), 1..60
    mask: np.ndarray | None       # uint8 (H, W): 0 background, 1..60 classes, 255 crowd regions (None: `boxed`)
    instances: list[Instance]


def load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(path, "annotation file is missing")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"malformed JSON: {e}") from None
    except RecursionError:
        raise DataError(path, "malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise DataError(path, "top level is not a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(path, f"missing or non-list '{key}'")
        for k, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise DataError(path, f"{key}[{k}] is a {type(entry).__name__}, not an object: {entry!r:.60}")
    for k, img in enumerate(data["images"]):
        if not _whole(img.get("id")):
            raise DataError(path, f"images[{k}] has id {img.get('id')!r:.40}; expected an integer")
        for dim in ("height", "width"):
            if not (_whole(img.get(dim)) and 1 <= img[dim] <= 1_000_000):
                raise DataError(path, f"image {img['id']} has {dim} {img.get(dim)!r:.40}; expected a positive integer")
    for k, ann in enumerate(data["annotations"]):
        if not _whole(ann.get("image_id")):
            raise DataError(path, f"annotations[{k}] (id {ann.get('id')!r:.20}) has image_id {ann.get('image_id')!r:.40}; "
                                  f"expected an integer")
    return data


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    """A finite JSON number of a sane size (an integer like 10**400 overflows a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) < 1e12 if isinstance(v, int) else math.isfinite(v) and abs(v) < 1e12


def rle_counts(counts: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (pycocotools' rleFrString, which does
    not check what it reads). Raises ValueError for a string that ends inside a number."""
    out: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("the counts string ends inside a number")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {counts[p]!r} is not in COCO's RLE alphabet")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def check_segmentation(ann: dict, h: int, w: int, path: Path) -> None:
    """A mask that decodes to exactly the image: an RLE whose size is the image's and whose
    runs cover its h*w pixels (a short RLE decodes to uninitialised memory in pycocotools),
    polygons of finite numbers."""
    aid = ann.get("id")
    seg = ann["segmentation"]
    if isinstance(seg, list):
        for poly in seg:
            if not all(_number(v) for v in poly):
                raise DataError(path, f"annotation {aid} has a polygon with a coordinate that is not a finite number")
        return
    size, counts = seg["size"], seg["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in size)):
        raise DataError(path, f"annotation {aid} has an RLE size {size!r}; expected [height, width]")
    if tuple(size) != (h, w):
        raise DataError(path, f"annotation {aid} has an RLE of size {size[1]}x{size[0]} on a {w}x{h} image")
    if isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            raise DataError(path, f"annotation {aid} has RLE counts that are not all integers")
        runs = counts
    elif isinstance(counts, str):
        try:
            runs = rle_counts(counts)
        except ValueError as e:
            raise DataError(path, f"annotation {aid} has malformed RLE counts: {e}") from None
    else:
        raise DataError(path, f"annotation {aid} has RLE counts of type {type(counts).__name__}")
    if any(v < 0 for v in runs):
        raise DataError(path, f"annotation {aid} has a negative RLE run")
    if sum(runs) != h * w:
        raise DataError(path, f"annotation {aid} has RLE runs covering {sum(runs)} pixels; the {w}x{h} image has "
                              f"{h * w}")


def _check_annotation(ann: dict, cats: set[int], path: Path) -> None:
    aid = ann.get("id")
    if ann.get("category_id") not in cats:
        raise DataError(path, f"annotation {aid} has category_id {ann.get('category_id')} "
                              f"not among the file's categories")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
        raise DataError(path, f"annotation {aid} has a malformed bbox {bbox!r:.80}")
    if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd", 0), float):
        raise DataError(path, f"annotation {aid} has iscrowd {ann.get('iscrowd')!r:.40}; expected 0 or 1")
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        if not seg:
            raise DataError(path, f"annotation {aid} has an empty polygon list")
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                n = len(poly) // 2 if isinstance(poly, list) else 0
                raise DataError(path, f"annotation {aid} has a polygon with {n} point(s); at least 3 are needed")
    elif isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise DataError(path, f"annotation {aid} has an RLE without counts/size")
    else:
        raise DataError(path, f"annotation {aid} has no usable segmentation")


def _box(ann: dict, w: int, h: int) -> np.ndarray:
    """An annotation's bbox (x, y, width, height) as float32 x0, y0, x1, y1 clipped to the image."""
    x, y, bw, bh = ann["bbox"]
    return clip_boxes(np.array([[x, y, x + bw, y + bh]], np.float32), w, h)[0][0]


class COCOSource:
    """The source set: COCO images holding at least one object of the 60 non-VOC classes.

    Indexing validates the JSON, every annotation and every file path; images are decoded in
    `__getitem__`. With `skip_bad`, a bad image (or an image with a bad annotation) is
    skipped and logged, and every image is decoded once at indexing.
    """

    classes: ClassMap = SOURCE_CLASSES

    def __init__(self, ann_file: str | Path, image_root: str | Path, skip_bad: bool = False,
                 log: BadInputLog | None = None):
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        self.log = log if log is not None else BadInputLog()
        data = load_json(self.ann_file)
        cats = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
        unknown = sorted(c for c in cats if c not in COCO_NAMES)
        if unknown:
            raise DataError(self.ann_file, f"category ids {unknown} are not COCO's 80 categories")
        voc_ids = set(VOC_COCO_IDS)
        to_index = self.classes.index_of_coco_id()

        anns_by_image: dict[int, list[dict]] = {}
        bad_images: dict[int, DataError] = {}
        self.removed_voc_objects = 0
        for ann in data["annotations"]:
            img_id = ann.get("image_id") if isinstance(ann, dict) else None
            try:
                if img_id is None:
                    raise DataError(self.ann_file, f"annotation {ann!r:.80} has no image_id")
                _check_annotation(ann, cats, self.ann_file)
            except DataError as err:
                if not skip_bad or img_id is None:
                    raise
                bad_images.setdefault(img_id, err)
                continue
            if ann["category_id"] in voc_ids:
                self.removed_voc_objects += 1
                continue
            anns_by_image.setdefault(img_id, []).append(ann)

        images, kept_anns = [], []
        self.dropped_no_source = 0
        seen_ids: set[int] = set()
        for img in data["images"]:
            img_id = img.get("id")
            try:
                if img_id in seen_ids:
                    raise DataError(self.ann_file, f"duplicate image id {img_id}")
                seen_ids.add(img_id)
                if img_id in bad_images:
                    raise bad_images[img_id]
                anns = anns_by_image.get(img_id, [])
                if not any(not a.get("iscrowd", 0) for a in anns):
                    self.dropped_no_source += 1
                    continue
                path = resolve_inside(self.image_root, str(img.get("file_name", "")), self.ann_file)
                if not path.is_file():
                    raise DataError(path, f"image file of image id {img_id} (from {self.ann_file.name}) is missing")
                h, w = int(img.get("height", 0)), int(img.get("width", 0))
                if h <= 0 or w <= 0:
                    raise DataError(self.ann_file, f"image {img_id} has no valid height/width")
                for a in anns:
                    check_segmentation(a, h, w, self.ann_file)
                    x, y, bw, bh = a["bbox"]
                    check_boxes(np.array([[x, y, x + bw, y + bh]], np.float32), w, h, self.ann_file,
                                [f"annotation {a.get('id')}"])
                if skip_bad:
                    self._check_image(path, (h, w))
            except DataError as err:
                if not skip_bad:
                    raise
                self.log.skip(err, item=str(img_id))
                continue
            images.append(img)
            kept_anns.extend(anns)

        self.images = images
        self.paths = {img["id"]: self.image_root / img["file_name"] for img in images}
        filtered = dict(data, images=images, annotations=kept_anns,
                        categories=[c for c in data["categories"] if c["id"] in to_index])
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO()
            self.coco.dataset = filtered
            self.coco.createIndex()
        self._to_index = to_index

    def _check_image(self, path: Path, hw: tuple[int, int], encoded_jpeg: bool = False) -> np.ndarray:
        image = read_image(path, encoded_jpeg)
        if image.shape[:2] != hw:
            raise DataError(path, f"image is {image.shape[1]}x{image.shape[0]} but {self.ann_file.name} "
                                  f"says {hw[1]}x{hw[0]}")
        return image

    def __len__(self) -> int:
        return len(self.images)

    def annotations(self, i: int) -> list[dict]:
        return self.coco.imgToAnns[self.images[i]["id"]]

    def boxed(self, i: int, encoded_jpeg: bool = False) -> COCOSample:
        """Item i without masks (mask None, no instances): the image and the non-crowd boxes,
        as `self[i]` gives them, without rasterising a polygon; with `encoded_jpeg` a plain
        JPEG image as its checked bytes (`read_image`)."""
        info = self.images[i]
        h, w = int(info["height"]), int(info["width"])
        image = self._check_image(self.paths[info["id"]], (h, w), encoded_jpeg)
        objs = [a for a in self.annotations(i) if not a.get("iscrowd", 0)]
        boxes = np.stack([_box(a, w, h) for a in objs]) if objs else np.zeros((0, 4), np.float32)
        return COCOSample(int(info["id"]), image, boxes,
                          np.array([self._to_index[a["category_id"]] for a in objs], dtype=np.int64), None, [])

    def __getitem__(self, i: int) -> COCOSample:
        info = self.images[i]
        h, w = int(info["height"]), int(info["width"])
        image = self._check_image(self.paths[info["id"]], (h, w))
        mask, instances = self._rasterise(i, h, w)
        objs = [inst for inst in instances if not inst.crowd]
        boxes = np.stack([o.box for o in objs]).astype(np.float32) if objs else np.zeros((0, 4), np.float32)
        labels = np.array([o.label for o in objs], dtype=np.int64)
        return COCOSample(int(info["id"]), image, boxes, labels, mask, instances)

    def ground_truth(self, i: int) -> np.ndarray:
        """The label map of item i (`self[i].mask`) without decoding its image."""
        info = self.images[i]
        return self._rasterise(i, int(info["height"]), int(info["width"]))[0]

    def _rasterise(self, i: int, h: int, w: int) -> tuple[np.ndarray, list[Instance]]:
        """Item i's label map (crowd regions 255) and its instances, from the polygons and RLEs."""
        mask = np.zeros((h, w), dtype=np.uint8)
        crowd = np.zeros((h, w), dtype=bool)
        instances = []
        for ann in self.annotations(i):
            m = self.coco.annToMask(ann).astype(bool)
            label = self._to_index[ann["category_id"]]
            is_crowd = bool(ann.get("iscrowd", 0))
            instances.append(Instance(label, _box(ann, w, h), m, is_crowd))
            if is_crowd:
                crowd |= m
            else:
                mask[m] = label
        mask[crowd] = IGNORE
        return mask, instances

    def class_pairs(self) -> list[tuple[int, int]]:
        """(image index, source class 1..60) for every class present (non-crowd) in an image."""
        pairs = []
        for i in range(len(self.images)):
            present = sorted({self._to_index[a["category_id"]] for a in self.annotations(i) if not a.get("iscrowd", 0)})
            pairs += [(i, c) for c in present]
        return pairs


@dataclass
class ClassSample:
    """One SegNet2 training sample: (image, class m)."""
    image: np.ndarray     # uint8 (H, W, 3)
    box_mask: np.ndarray  # bool (H, W): 1 inside any box of class m
    target: np.ndarray    # uint8 (H, W): 1 on every pixel of class m (not clipped to the box), 0 else, 255 ignore
    boxes: np.ndarray     # float32 (K, 4): the boxes of class m
    label: int            # m


def class_sample(sample, label: int) -> ClassSample:
    """Build the per-(image, class) sample of METHOD.md from a decoded source image (a
    COCOSample or any item with image, boxes, labels and a ground-truth mask)."""
    h, w = sample.mask.shape
    boxes = sample.boxes[sample.labels == label]
    target = (sample.mask == label).astype(np.uint8)
    target[sample.mask == IGNORE] = IGNORE
    return ClassSample(sample.image, union_box_mask(boxes, h, w), target, boxes, label)


def encode_rle(mask: np.ndarray) -> dict:
    """bool (H, W) -> COCO compressed RLE with utf-8 counts (JSON-serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle
