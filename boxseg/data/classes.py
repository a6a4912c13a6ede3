"""Class tables: COCO's 80 categories, VOC's 20 classes, and the 60-class source split.

METHOD.md: the 20 VOC classes correspond to COCO ids 5, 2, 16, ..., 72 (VOC order); the
other 60 COCO categories are the source classes. The source index (1..60, 0 = background)
is the position of a category in ascending COCO-id order, so it never depends on the order
in which a JSON file lists its categories.
"""

from __future__ import annotations

from dataclasses import dataclass

# COCO 2017 "things": (category id, name).
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"),
    (6, "bus"), (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"),
    (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"), (15, "bench"),
    (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"),
    (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"),
    (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"),
    (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
    (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"),
    (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"),
    (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"),
    (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"),
    (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)
COCO_NAMES: dict[int, str] = dict(COCO_CATEGORIES)

# VOC 2012 classes in devkit order; index 0 is background, 255 is void.
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)
VOC_INDEX: dict[str, int] = {name: i for i, name in enumerate(VOC_CLASSES)}
IGNORE = 255

# COCO ids of VOC classes 1..20, in VOC order (METHOD.md).
VOC_COCO_IDS: tuple[int, ...] = (5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
SOURCE_COCO_IDS: tuple[int, ...] = tuple(
    cid for cid, _ in COCO_CATEGORIES if cid not in set(VOC_COCO_IDS)
)
assert len(SOURCE_COCO_IDS) == 60 and len(VOC_COCO_IDS) == 20


@dataclass(frozen=True)
class ClassMap:
    """A contiguous class index for a dataset: index 0 is background, 1..K the classes.

    `coco_ids[i-1]` is the COCO category id of class i (None for VOC-only datasets) and
    `names[i-1]` its name. Saved with every artifact whose outputs depend on the index.
    """

    names: tuple[str, ...]
    coco_ids: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        """Number of output classes including background."""
        return len(self.names) + 1

    def index_of_coco_id(self) -> dict[int, int]:
        return {cid: i + 1 for i, cid in enumerate(self.coco_ids)}

    def to_dict(self) -> dict:
        return {"names": list(self.names), "coco_ids": list(self.coco_ids)}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassMap":
        names, ids = d.get("names"), d.get("coco_ids")
        if not isinstance(names, list) or not isinstance(ids, list) or len(names) != len(ids):
            raise ValueError(f"malformed class map: {d!r}")
        return cls(tuple(str(n) for n in names), tuple(int(i) for i in ids))


SOURCE_CLASSES = ClassMap(tuple(COCO_NAMES[c] for c in SOURCE_COCO_IDS), SOURCE_COCO_IDS)
VOC_TARGET_CLASSES = ClassMap(VOC_CLASSES[1:], VOC_COCO_IDS)


def voc_palette() -> list[int]:
    """The VOC devkit colour map (768 ints, RGB for values 0..255), as in VOCdevkit's labelcolormap."""
    return list(_VOC_PALETTE)


def _labelcolormap() -> tuple[int, ...]:
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return tuple(palette)


_VOC_PALETTE = _labelcolormap()  # computed once: every label PNG written needs it
