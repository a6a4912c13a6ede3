"""Gallery pictures: an image with its boxes and class names, label maps in VOC colours
(255 in its own colour), per-image proposal IoU, and which images to show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from boxseg.data.classes import IGNORE, voc_palette
from boxseg.data.files import write_bytes_atomic

THUMB = 200  # longest side of a gallery picture, pixels


def palette_rgb() -> np.ndarray:
    """(256, 3) uint8: the VOC colour of every label value; 255 (ignore) is VOC's cream."""
    return np.asarray(voc_palette(), np.uint8).reshape(256, 3)


def colorize(label: np.ndarray) -> np.ndarray:
    """uint8 (H, W) labels -> uint8 (H, W, 3) RGB."""
    return palette_rgb()[label]


def _thumb(img: Image.Image, nearest: bool) -> Image.Image:
    scale = THUMB / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.NEAREST if nearest else Image.BILINEAR)


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def boxes_picture(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, names: list[str]) -> Image.Image:
    """The image (thumbnail) with each box outlined in its class colour and named."""
    img = _thumb(Image.fromarray(image), nearest=False)
    s = img.width / image.shape[1]
    draw = ImageDraw.Draw(img)
    pal = palette_rgb()
    font = _font(11)
    for (x0, y0, x1, y1), c in zip(boxes.tolist(), labels.tolist()):
        colour = tuple(int(v) for v in pal[c])
        draw.rectangle([x0 * s, y0 * s, x1 * s - 1, y1 * s - 1], outline=colour, width=2)
        text = names[c]
        tx, ty = x0 * s + 2, max(0, y0 * s - 13)
        bbox = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle(bbox, fill=colour)
        draw.text((tx, ty), text, fill=(255, 255, 255) if sum(colour) < 380 else (0, 0, 0), font=font)
    return img


def label_picture(label: np.ndarray) -> Image.Image:
    return _thumb(Image.fromarray(colorize(label)), nearest=True)


def save_png(img: Image.Image, path: Path) -> None:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def image_miou(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    """Mean IoU over the classes present in `gt` or `pred`, on pixels where neither is 255."""
    keep = (gt != IGNORE) & (pred != IGNORE)
    p, g = pred[keep].astype(np.int64), gt[keep].astype(np.int64)
    if p.size == 0:
        return float("nan")
    conf = np.bincount(g * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean())


def pick(scores: list[float], n: int) -> list[int]:
    """Indices of `n` images: the worst and the best by score, and the rest spread evenly
    between them (worst first). NaN scores are left out."""
    order = [i for i in np.argsort(scores).tolist() if not np.isnan(scores[i])]
    if len(order) <= n:
        return order
    positions = np.linspace(0, len(order) - 1, n).round().astype(int)
    return [order[p] for p in dict.fromkeys(positions.tolist())]


def legend_html(names: list[str]) -> str:
    pal = palette_rgb()
    items = [(n, pal[i]) for i, n in enumerate(names)] + [("ignore (255)", pal[IGNORE])]
    return "".join(f'<span class="sw"><i style="background:rgb({c[0]},{c[1]},{c[2]})"></i>{n}</span>'
                   for n, c in items)
