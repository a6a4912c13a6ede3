"""The embedded synthetic world: a COCO-format source set and a VOC-format target set.

Format 3 is made to be as hard as VOC for colour-based methods. Objects are class-specific
shapes (ellipse, triangle, star, cross, blob with thin limbs, L, ring with a hole, fork with
thin prongs) painted with 2-3 colours of one palette that the background uses too, in a
class texture (plain, stripes, checker, dots, patches), shaded, alpha-blended with a blurred
border, one in eight pulled towards the colours around it (low contrast). The background
holds camouflage patches (palette colours and object textures with no object), unlabelled
clutter objects, lines and dots. Objects occlude each other and may run off the image edge.
A class is recognisable by its shape, texture and colours together; objectness (a coherent,
textured shape with an outline) is shared by all 80 classes, so a class-agnostic segmenter
learned on the 60 source classes carries over to the 20 target classes, as on real data.
Generation scores the baselines on the train masks (`SynthWorld.calibration`): on the
default world box-filled 58 and GrabCut 66 mIoU (VOC: about 62 and 65.7), where format 2's
saturated objects on grey clutter gave GrabCut 95.7.

Appearance depends only on the class (fixed seed per COCO id); layouts depend on `seed`, one
random stream per image, so a world is reproducible and can be generated in parallel.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from boxseg.data.boxes import fill_boxes
from boxseg.data.classes import COCO_CATEGORIES, IGNORE, SOURCE_COCO_IDS, VOC_CLASSES, VOC_COCO_IDS
from boxseg.data.coco import encode_rle
from boxseg.data.files import encode_label_png, write_bytes_atomic, write_jpeg
from boxseg.metrics import ConfusionMatrix

SHAPES = ("ellipse", "triangle", "star", "cross", "blob", "lshape", "ring", "fork")
TEXTURES = ("plain", "stripes", "checker", "dots", "patches")
# Bumped when a world written by an older boxseg lacks something: 2 added SegmentationObject/,
# 3 the hard world (shared palette, camouflage, soft borders, holes, thin parts, clutter).
# A cached world of an older format is rebuilt (the same seed gives the same images).
SYNTH_FORMAT = 3

def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (r * 255.0, g * 255.0, b * 255.0)


# One palette for objects and background alike (format 3): no colour belongs to objects only,
# so a colour model of "object" against "background" inside a box is often wrong, as on VOC.
PALETTE = tuple(_hsv(*hsv) for hsv in (
    (0.00, 0.75, 0.80), (0.07, 0.70, 0.85), (0.13, 0.65, 0.90), (0.25, 0.55, 0.60), (0.33, 0.60, 0.55),
    (0.45, 0.50, 0.65), (0.55, 0.60, 0.75), (0.62, 0.65, 0.55), (0.72, 0.45, 0.60), (0.83, 0.50, 0.70),
    (0.08, 0.35, 0.45), (0.10, 0.15, 0.75), (0.00, 0.00, 0.25), (0.60, 0.10, 0.50), (0.15, 0.30, 0.35),
    (0.95, 0.35, 0.55)))
@dataclass(frozen=True)
class SynthSize:
    n_source: int    # COCO source images
    n_train: int     # VOC target train images
    n_val: int       # VOC target val images
    min_side: int    # image sides are drawn from [min_side, max_side]
    max_side: int


SIZES: dict[str, SynthSize] = {
    "tiny": SynthSize(400, 200, 100, 96, 144),      # the CPU demo
    "small": SynthSize(2000, 1000, 300, 128, 224),
    "medium": SynthSize(10000, 5000, 1449, 256, 400),
    "large": SynthSize(40000, 10582, 1449, 320, 500),  # VOC/SBD-sized, for GPU runs
}


def size_preset(name: str) -> SynthSize:
    try:
        return SIZES[name]
    except KeyError:
        raise KeyError(f"unknown synthetic size {name!r}; valid: {sorted(SIZES)}") from None


@dataclass(frozen=True)
class Appearance:
    shape: str
    colors: tuple[tuple[float, float, float], ...]   # 2-3 RGB 0..255, from PALETTE
    texture: str
    period: float      # texture period in pixels at radius 40
    tex_angle: float
    shape_param: float  # star inner radius / cross or fork arm width / blob roughness / ring hole
    limbs: int          # thin appendages (1-3 px wide)


def class_appearance(coco_id: int) -> Appearance:
    """The fixed look of a COCO category: shape, texture and 2-3 colours of the shared
    palette. The 20 VOC classes get distinct (shape, texture, colour) combinations so that a
    small network can tell them apart; no colour is theirs alone."""
    rng = np.random.default_rng(1000 + coco_id)
    if coco_id in VOC_COCO_IDS:
        k = VOC_COCO_IDS.index(coco_id)  # 0..19
        shape = SHAPES[k % len(SHAPES)]
        texture = TEXTURES[(k // 2) % len(TEXTURES)]
        first = (3 * k) % len(PALETTE)
        idx = [first, (first + 5 + k // 8) % len(PALETTE)] + ([(first + 11) % len(PALETTE)] if k % 3 == 0 else [])
    else:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        idx = rng.choice(len(PALETTE), int(rng.integers(2, 4)), replace=False).tolist()
    colors = tuple(PALETTE[i] for i in idx)
    shape_param = {"star": rng.uniform(0.45, 0.55), "cross": rng.uniform(0.3, 0.45), "blob": rng.uniform(0.12, 0.22),
                   "ring": rng.uniform(0.4, 0.55), "fork": rng.uniform(0.2, 0.26)}.get(shape, 0.0)
    limbs = int(rng.integers(1, 3)) if shape == "blob" else 0
    return Appearance(shape, colors, texture, float(rng.uniform(7, 12)), float(rng.uniform(0, math.pi)),
                      float(shape_param), limbs)


def _unit_polygons(app: Appearance, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """(K, 2) outline in [-1, 1]^2 for one instance of a class, and a hole's outline (or None)."""
    if app.shape in ("ellipse", "ring"):
        t = np.linspace(0, 2 * np.pi, 28, endpoint=False)
        outer = np.stack([np.cos(t), np.sin(t)], 1)
        if app.shape == "ring":
            return outer, outer * app.shape_param + rng.uniform(-0.08, 0.08, 2)
        return outer, None
    if app.shape == "triangle":
        t = np.array([90, 210, 330]) * np.pi / 180 + rng.uniform(-0.15, 0.15, 3)
        return np.stack([np.cos(t), np.sin(t)], 1), None
    if app.shape == "star":
        n = 5
        t = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, app.shape_param)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1), None
    if app.shape == "cross":
        a = app.shape_param
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
        return np.array(pts, dtype=np.float64), None
    if app.shape == "blob":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        r = np.ones_like(t)
        for k in (2, 3, 5):
            r += app.shape_param * rng.uniform(0.5, 1.0) * np.sin(k * t + rng.uniform(0, 2 * np.pi))
        r /= r.max()
        return np.stack([r * np.cos(t), r * np.sin(t)], 1), None
    if app.shape == "lshape":
        return np.array([(-1, -1), (1, -1), (1, -0.15), (-0.15, -0.15), (-0.15, 1), (-1, 1)], dtype=np.float64), None
    if app.shape == "fork":  # a bar with three thin prongs
        a = app.shape_param
        pts = [(-1, 1), (1, 1), (1, -1), (1 - 2 * a, -1), (1 - 2 * a, 0.4), (a, 0.4), (a, -1), (-a, -1), (-a, 0.4),
               (-1 + 2 * a, 0.4), (-1 + 2 * a, -1), (-1, -1)]
        return np.array(pts, dtype=np.float64), None
    raise ValueError(app.shape)


def _texture(texture: str, period: float, tex_angle: float, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float,
             r: float, rot: float, ncol: int) -> np.ndarray:
    """Colour index weights: float (H, W) in [0, ncol - 1] (fractional = a blend of two)."""
    period = period * max(r, 12.0) / 40.0
    phi = tex_angle + rot
    u = ((xx - cx) * math.cos(phi) + (yy - cy) * math.sin(phi)) / period
    v = (-(xx - cx) * math.sin(phi) + (yy - cy) * math.cos(phi)) / period
    if texture == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u)
    elif texture == "checker":
        t = ((np.floor(u) + np.floor(v)) % 2).astype(np.float64)
    elif texture == "dots":
        t = ((np.sin(2 * np.pi * u) * np.sin(2 * np.pi * v)) > 0.35).astype(np.float64)
    elif texture == "patches":  # a few large single-colour regions
        return (np.floor(u / 2.2) * 7 + np.floor(v / 2.2) * 3) % ncol
    else:  # plain: radial shading between the first two colours
        t = np.clip(np.hypot(xx - cx, yy - cy) / max(r, 1.0), 0, 1) * 0.6
    return t * (ncol - 1) if ncol > 2 else t


def _paint(colors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(H, W, 3) colours from a (C, 3) palette and fractional index weights (H, W)."""
    lo = np.clip(np.floor(weights).astype(int), 0, len(colors) - 1)
    hi = np.clip(lo + 1, 0, len(colors) - 1)
    f = (weights - lo)[..., None]
    return colors[lo] * (1 - f) + colors[hi] * f


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Background: a smoothly varying field tinted by a palette colour, large camouflage
    patches in palette colours and object textures with soft edges, thin clutter lines and
    dots: float32 (H, W, 3)."""
    tint = np.array(PALETTE[int(rng.integers(len(PALETTE)))], np.float32)
    grey = np.full(3, rng.uniform(80, 180), np.float32)
    base = grey + (tint - grey) * rng.uniform(0.05, 0.3)
    coarse = rng.normal(0, 1, (5, 5, 3)).astype(np.float32)
    coarse = coarse.mean(2, keepdims=True) * 0.8 + coarse * 0.2  # mostly luminance variation
    smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    img = base + 30.0 * smooth + rng.normal(0, 5, (h, w, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    side = min(h, w)
    for _ in range(int(rng.integers(0, 3))):  # camouflage: object colours and textures without objects
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.15, 0.4) * side
        n = int(rng.integers(4, 8))
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        pts = np.stack([cx + r * rng.uniform(0.5, 1.2, n) * np.cos(t), cy + r * rng.uniform(0.5, 1.2, n) * np.sin(t)], 1)
        m = np.zeros((h, w), np.float32)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1.0)
        m = cv2.GaussianBlur(m, (0, 0), rng.uniform(1.0, 4.0))[..., None]
        cols = np.array([PALETTE[i] for i in rng.choice(len(PALETTE), int(rng.integers(2, 4)), replace=False)])
        wts = _texture(str(rng.choice(TEXTURES)), rng.uniform(7, 14), rng.uniform(0, np.pi), xx, yy, cx, cy, r,
                       0.0, len(cols))
        m = m * rng.uniform(0.3, 0.6)  # mixed into the background, a little muted
        img = img * (1 - m) + (_paint(cols, wts).astype(np.float32) * rng.uniform(0.75, 1.1)) * m
    for _ in range(int(rng.integers(4, 11))):  # thin clutter lines
        col = PALETTE[int(rng.integers(len(PALETTE)))]
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(img, p0, p1, col, int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(3, 10))):  # small dots
        col = PALETTE[int(rng.integers(len(PALETTE)))]
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(1, 4)), col, -1)
    return img


@dataclass
class DrawnObject:
    coco_id: int
    mask: np.ndarray          # bool (H, W), visible part
    full_mask: np.ndarray     # bool (H, W), before occlusion (inside the image)
    polygon: np.ndarray       # (K, 2) image coordinates of the outline
    truncated: bool           # the shape runs off the image
    simple: bool              # the mask is exactly the polygon (no hole, no limbs): COCO may store it as one


def _shape_mask(app: Appearance, rng: np.random.Generator, h: int, w: int, cx: float, cy: float, r: float,
                rot: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """bool (H, W) mask of one instance (outline minus hole, plus thin limbs), its outline
    in image coordinates, and whether the mask is the outline's polygon alone."""
    outer, hole = _unit_polygons(app, rng)
    aspect = math.exp(rng.uniform(-0.3, 0.3))
    c, s = math.cos(rot), math.sin(rot)
    to_image = lambda p: (p * np.array([aspect, 1 / aspect])) @ np.array([[c, s], [-s, c]]) * r + np.array([cx, cy])  # noqa: E731
    poly = to_image(outer)
    rle = mask_utils.frPyObjects([poly.reshape(-1).tolist()], h, w)
    full = mask_utils.decode(rle)[..., 0].astype(bool)
    simple = True
    if hole is not None:
        hole_rle = mask_utils.frPyObjects([to_image(hole).reshape(-1).tolist()], h, w)
        full &= ~mask_utils.decode(hole_rle)[..., 0].astype(bool)
        simple = False
    if app.limbs:
        limbs = np.zeros((h, w), np.uint8)
        for _ in range(app.limbs):
            a = rng.uniform(0, 2 * np.pi)
            p0 = (int(round(cx + 0.5 * r * math.cos(a))), int(round(cy + 0.5 * r * math.sin(a))))
            p1 = (int(round(cx + rng.uniform(1.0, 1.3) * r * math.cos(a))),
                  int(round(cy + rng.uniform(1.0, 1.3) * r * math.sin(a))))
            cv2.line(limbs, p0, p1, 1, int(rng.integers(1, 4)))
        full |= limbs.astype(bool)
        simple = False
    return full, poly, simple


def render_scene(rng: np.random.Generator, coco_ids: list[int], h: int, w: int
                 ) -> tuple[np.ndarray, list[DrawnObject]]:
    """Paint objects of the given categories, in order (later ones occlude earlier ones),
    over the background, with a few unlabelled clutter objects of random appearance among
    them.

    Objects are alpha-composited with a blurred border (sigma 0.5-2 px; the label is the
    unblurred mask), shaded by a luminance gradient, and one in three is low-contrast (its
    colours pulled towards the background's around it). Returns the uint8 image and the
    objects that stayed visible enough (>= 35% of their area and >= 40 pixels); placements
    that would hide most of an earlier object are retried.
    """
    img = _background(rng, h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    objects: list[DrawnObject] = []
    side = min(h, w)
    order = [(cid, True) for cid in coco_ids]
    for _ in range(int(rng.choice([0, 1, 2], p=[0.5, 0.35, 0.15]))):  # unlabelled clutter
        order.insert(int(rng.integers(len(order) + 1)), (-1, False))
    for cid, labelled in order:
        if labelled:
            app = class_appearance(cid)
        else:
            cols = tuple(PALETTE[i] for i in rng.choice(len(PALETTE), int(rng.integers(2, 4)), replace=False))
            app = Appearance(str(rng.choice(SHAPES[:6])), cols, str(rng.choice(TEXTURES)), float(rng.uniform(7, 12)),
                             float(rng.uniform(0, np.pi)), 0.4, 0)
        for _attempt in range(12):
            r = rng.uniform(0.22, 0.42) * side * (1.0 if labelled else 0.5)
            rot = rng.uniform(0, 2 * np.pi)
            cx, cy = rng.uniform(-0.05 * w, 1.05 * w), rng.uniform(-0.05 * h, 1.05 * h)
            full, poly, simple = _shape_mask(app, rng, h, w, cx, cy, r, rot)
            area = int(full.sum())
            if area < 40:
                continue
            if any((o.mask & ~full).sum() < 0.5 * o.mask.sum() for o in objects):
                continue  # would hide more than half of an earlier object
            break
        else:
            continue
        cols = np.array(app.colors)
        wts = _texture(app.texture, app.period, app.tex_angle, xx, yy, cx, cy, r, rot, len(cols))
        col = _paint(cols, wts)
        shade = 1.0 - 0.3 * (((xx - cx) * math.cos(rot) + (yy - cy) * math.sin(rot)) / max(r, 1.0))[..., None]
        col = col * shade + rng.normal(0, 8, 3)
        if rng.uniform() < 0.12:  # low contrast: towards the background around the object
            ring = cv2.dilate(full.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~full
            if ring.any():
                col = col + (img[ring].mean(0) - col) * rng.uniform(0.2, 0.45)
        alpha = cv2.GaussianBlur(full.astype(np.float32), (0, 0), rng.uniform(0.5, 2.0))[..., None]
        img = img * (1 - alpha) + col.astype(np.float32) * alpha
        for o in objects:
            o.mask &= ~full
        if not labelled:
            continue
        truncated = bool(poly[:, 0].min() < 0 or poly[:, 1].min() < 0 or poly[:, 0].max() > w or poly[:, 1].max() > h)
        objects.append(DrawnObject(cid, full.copy(), full, poly, truncated, simple))
    img += rng.normal(0, 3, img.shape)
    kept = [o for o in objects if o.mask.sum() >= max(40, 0.35 * o.full_mask.sum())]
    return np.clip(img, 0, 255).astype(np.uint8), kept


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """0-based, exclusive-end box x0, y0, x1, y1 of a non-empty bool mask."""
    rows, cols = np.any(mask, 1), np.any(mask, 0)
    y0, y1 = int(np.argmax(rows)), int(len(rows) - np.argmax(rows[::-1]))
    x0, x1 = int(np.argmax(cols)), int(len(cols) - np.argmax(cols[::-1]))
    return x0, y0, x1, y1


def void_band(label: np.ndarray) -> np.ndarray:
    """Mark pixels whose 4-neighbour carries another label as 255 (VOC's border band)."""
    out = label.copy()
    edge = np.zeros(label.shape, dtype=bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, 1:] != label[:, :-1]
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    edge[:-1, :] |= label[1:, :] != label[:-1, :]
    out[edge] = IGNORE
    return out


def _n_objects(rng: np.random.Generator) -> int:
    return int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.23, 0.12]))


def _image_size(rng: np.random.Generator, size: SynthSize) -> tuple[int, int]:
    return int(rng.integers(size.min_side, size.max_side + 1)), int(rng.integers(size.min_side, size.max_side + 1))


CALIBRATION_IMAGES = 100  # train images GrabCut is scored on at generation time (all for the others)


def _make_target(args: tuple[int, int, str, SynthSize]) -> dict:
    seed, index, split, size = args
    rng = np.random.default_rng([seed, 1 if split == "train" else 2, index])
    h, w = _image_size(rng, size)
    while True:
        ids = [int(rng.choice(VOC_COCO_IDS)) for _ in range(_n_objects(rng))]
        image, objs = render_scene(rng, ids, h, w)
        if objs:
            break
    label = np.zeros((h, w), np.uint8)
    instance = np.zeros((h, w), np.uint8)  # VOC's SegmentationObject: k = the k-th object of the XML
    for k, o in enumerate(objs, start=1):
        label[o.mask] = VOC_COCO_IDS.index(o.coco_id) + 1
        instance[o.mask] = k
    objects = [{"name": VOC_CLASSES[VOC_COCO_IDS.index(o.coco_id) + 1], "box": tight_box(o.mask),
                "truncated": o.truncated, "difficult": bool(o.mask.sum() < 0.01 * h * w)} for o in objs]
    out = {"id": f"synth_{split}_{index:06d}", "image": image, "label": void_band(label),
           "instances": void_band(instance), "objects": objects}
    if split == "train" and index < CALIBRATION_IMAGES:
        from boxseg.baselines import grabcut

        boxes, labels = _boxes_labels(objects)
        out["grabcut"] = grabcut(image, boxes, labels)
    return out


def _boxes_labels(objects: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.array([list(o["box"]) for o in objects], np.float32).reshape(-1, 4)
    return boxes, np.array([VOC_CLASSES.index(o["name"]) for o in objects], np.int64)


def _make_source(args: tuple[int, int, SynthSize]) -> dict:
    seed, index, size = args
    rng = np.random.default_rng([seed, 3, index])
    h, w = _image_size(rng, size)
    roll = rng.uniform()
    if roll < 0.03:   # only VOC objects: the reader must drop this image
        ids = [int(rng.choice(VOC_COCO_IDS)) for _ in range(_n_objects(rng))]
    else:
        ids = [int(rng.choice(SOURCE_COCO_IDS)) for _ in range(_n_objects(rng))]
        if roll < 0.28:  # a VOC-class object the reader must remove
            ids.insert(int(rng.integers(len(ids) + 1)), int(rng.choice(VOC_COCO_IDS)))
    image, objs = render_scene(rng, ids, h, w)
    crowd_index = int(rng.integers(len(objs))) if objs and rng.uniform() < 0.05 else -1
    anns = []
    for k, o in enumerate(objs):
        x0, y0, x1, y1 = tight_box(o.mask)
        if k == crowd_index:  # crowd regions come as uncompressed RLE, as in real COCO
            seg = {"size": [h, w], "counts": _uncompressed_counts(o.mask)}
        elif o.simple and not o.truncated and np.array_equal(o.mask, o.full_mask):
            seg = [np.round(o.polygon.reshape(-1), 2).tolist()]
        else:
            seg = encode_rle(o.mask)
        anns.append({"category_id": o.coco_id, "segmentation": seg, "area": float(o.mask.sum()),
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": int(k == crowd_index)})
    return {"image": image, "height": h, "width": w, "annotations": anns}


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    flat = mask.astype(np.uint8).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0] + runs


def _voc_xml(sample_id: str, h: int, w: int, objects: list[dict]) -> bytes:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "VOC2012"
    ET.SubElement(ann, "filename").text = f"{sample_id}.jpg"
    size = ET.SubElement(ann, "size")
    for tag, val in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(val)
    ET.SubElement(ann, "segmented").text = "1"
    for o in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = o["name"]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(o["truncated"]))
        ET.SubElement(obj, "difficult").text = str(int(o["difficult"]))
        bb = ET.SubElement(obj, "bndbox")
        x0, y0, x1, y1 = o["box"]
        for tag, val in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bb, tag).text = str(val)  # 1-based, inclusive
    ET.indent(ann)
    return ET.tostring(ann, encoding="utf-8")


@dataclass(frozen=True)
class SynthWorld:
    """Where a synthetic world lies and how it was made."""
    root: Path
    coco_images: Path
    coco_ann: Path
    voc_root: Path
    box_baseline_miou: float
    calibration: dict | None = None  # baseline mIoU (0..1) on the target train masks: box, box-centre, grabcut


def world_paths(root: Path) -> tuple[Path, Path, Path]:
    return root / "coco" / "images", root / "coco" / "annotations" / "instances_train.json", root / "voc" / "VOC2012"


def write_synth(out: str | Path, seed: int = 0, size: SynthSize = SIZES["tiny"], workers: int | None = None,
                progress: bool = False) -> SynthWorld:
    """Write the synthetic world under `out` and return its paths and its calibration: the
    baselines' mIoU against the target train masks, in [0, 1] (box-filled and box-centre on
    every train image, GrabCut on the first `CALIBRATION_IMAGES`). VOC gives box-filled
    about 62 and GrabCut 65.7; the default world is made to land in 55-70 and 60-75."""
    from boxseg.baselines import box_centre
    from tqdm import tqdm

    out = Path(out)
    coco_images, coco_ann, voc = world_paths(out)
    for d in (coco_images, coco_ann.parent, voc / "JPEGImages", voc / "Annotations",
              voc / "SegmentationClass", voc / "SegmentationObject", voc / "ImageSets" / "Segmentation"):
        d.mkdir(parents=True, exist_ok=True)
    workers = workers or min(4, os.cpu_count() or 1)
    chunks = 16
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    mapper = (lambda f, it: pool.map(f, it, chunksize=chunks)) if pool else map
    try:
        conf = ConfusionMatrix(len(VOC_CLASSES))
        conf_centre, conf_grabcut = ConfusionMatrix(len(VOC_CLASSES)), ConfusionMatrix(len(VOC_CLASSES))
        for split, n in (("train", size.n_train), ("val", size.n_val)):
            ids = []
            jobs = [(seed, i, split, size) for i in range(n)]
            for s in tqdm(mapper(_make_target, jobs), total=n, desc=f"target {split}", disable=not progress):
                h, w = s["label"].shape
                write_jpeg(voc / "JPEGImages" / f"{s['id']}.jpg", s["image"])
                write_bytes_atomic(voc / "Annotations" / f"{s['id']}.xml", _voc_xml(s["id"], h, w, s["objects"]))
                write_bytes_atomic(voc / "SegmentationClass" / f"{s['id']}.png", encode_label_png(s["label"]))
                write_bytes_atomic(voc / "SegmentationObject" / f"{s['id']}.png", encode_label_png(s["instances"]))
                if split == "train":
                    boxes, labels = _boxes_labels(s["objects"])
                    conf.update(fill_boxes(boxes, labels, h, w), s["label"])
                    conf_centre.update(box_centre(boxes, labels, h, w), s["label"], pred_ignore=True)
                    if "grabcut" in s:
                        conf_grabcut.update(s["grabcut"], s["label"])
                ids.append(s["id"])
            write_bytes_atomic(voc / "ImageSets" / "Segmentation" / f"{split}.txt", ("\n".join(ids) + "\n").encode())
        trainval = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text() + \
            (voc / "ImageSets" / "Segmentation" / "val.txt").read_text()
        write_bytes_atomic(voc / "ImageSets" / "Segmentation" / "trainval.txt", trainval.encode())

        images, annotations = [], []
        jobs = [(seed, i, size) for i in range(size.n_source)]
        for i, s in enumerate(tqdm(mapper(_make_source, jobs), total=size.n_source, desc="source", disable=not progress)):
            image_id = i + 1
            name = f"{image_id:012d}.jpg"
            write_jpeg(coco_images / name, s["image"])
            images.append({"id": image_id, "file_name": name, "height": s["height"], "width": s["width"]})
            for a in s["annotations"]:
                annotations.append(dict(a, id=len(annotations) + 1, image_id=image_id))
    finally:
        if pool:
            pool.shutdown()
    coco = {"info": {"description": "boxseg synthetic source set", "seed": seed, "size": asdict(size)},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": cid, "name": name, "supercategory": "synthetic"} for cid, name in COCO_CATEGORIES]}
    write_bytes_atomic(coco_ann, json.dumps(coco).encode())
    box_miou = conf.scores().miou
    calibration = {"box": box_miou, "box-centre": conf_centre.scores().miou, "grabcut": conf_grabcut.scores().miou,
                   "grabcut_images": min(CALIBRATION_IMAGES, size.n_train)}
    meta = {"format": SYNTH_FORMAT, "seed": seed, "size": asdict(size), "box_baseline_miou_train": box_miou,
            "calibration": calibration,
            "coco_images": str(coco_images.relative_to(out)), "coco_ann": str(coco_ann.relative_to(out)),
            "voc_root": str(voc.relative_to(out))}
    write_bytes_atomic(out / "synth.json", json.dumps(meta, indent=2).encode())
    return SynthWorld(out, coco_images, coco_ann, voc, box_miou, calibration)
