"""Bad data through the real commands. Each case corrupts one file of a copy of the synthetic
world, then checks three things: boxseg-propose stops with exit 3 and an error naming the
file and the problem; with --skip-bad it finishes, and manifest.json counts and lists the
file with the problem; boxseg-data check reports the same file and problem (exit 1).
Images in unusual modes are not errors: they are converted, and the tests check the pixels."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from boxseg.cli.data import main as data_cli
from boxseg.cli.propose import main as propose_cli

TRAIN = "synth_train_000002"


def _voc(w) -> Path:
    return w.voc_root


def _xml(w, sid=TRAIN) -> Path:
    return _voc(w) / "Annotations" / f"{sid}.xml"


def _jpg(w, sid=TRAIN) -> Path:
    return _voc(w) / "JPEGImages" / f"{sid}.jpg"


def _png(w, sid=TRAIN) -> Path:
    return _voc(w) / "SegmentationClass" / f"{sid}.png"


def _split(w) -> Path:
    return _voc(w) / "ImageSets" / "Segmentation" / "train.txt"


def _edit_xml(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def _first_box(path: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    bb = ET.parse(path).getroot().find("object/bndbox")
    return {t: bb.find(t).text for t in ("xmin", "ymin", "xmax", "ymax")}


def _set_box(path: Path, **new) -> None:
    box = _first_box(path)
    text = path.read_text()
    for tag, value in new.items():
        text = text.replace(f"<{tag}>{box[tag]}</{tag}>", f"<{tag}>{value}</{tag}>", 1)
    path.write_text(text)


def _bomb_png(path: Path, side: int = 14000) -> None:
    """A valid PNG header claiming side x side greyscale pixels (> 2x Pillow's limit) and no data to speak of."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


# -- VOC cases: mutate(world) -> (file that must be named, problem text) --------------------------
def corrupt_jpeg(w):
    p = _jpg(w)
    p.write_bytes(p.read_bytes()[:200] + os.urandom(64))
    return p, "cannot decode image"


def zero_byte_image(w):
    _jpg(w).write_bytes(b"")
    return _jpg(w), "image file is empty (0 bytes)"


def decompression_bomb(w):
    _bomb_png(_jpg(w))
    return _jpg(w), "decompression bomb"


def missing_image(w):
    _jpg(w).unlink()
    return _jpg(w), "image file is missing"


def missing_xml(w):
    _xml(w).unlink()
    return _xml(w), "annotation file is missing"


def malformed_xml(w):
    _xml(w).write_text(_xml(w).read_text()[:-40])
    return _xml(w), "malformed XML"


def unknown_class_name(w):
    import xml.etree.ElementTree as ET

    name = ET.parse(_xml(w)).getroot().find("object/name").text
    _edit_xml(_xml(w), f"<name>{name}</name>", "<name>unicorn</name>")
    return _xml(w), "unknown class name 'unicorn'"


def zero_area_box(w):
    # VOC corners are 1-based and inclusive: xmax = xmin - 1 is a box of width 0
    _set_box(_xml(w), xmax=str(int(_first_box(_xml(w))["xmin"]) - 1))
    return _xml(w), "zero area"


def box_outside_image(w):
    _set_box(_xml(w), xmin="5000", xmax="5100")
    return _xml(w), "lies outside the"


def box_min_above_max(w):
    b = _first_box(_xml(w))
    _set_box(_xml(w), ymin=b["ymax"], ymax=b["ymin"])
    return _xml(w), "min > max"


def non_numeric_box(w):
    _set_box(_xml(w), xmin="twelve")
    return _xml(w), "<xmin> is not a number"


def xml_size_differs_from_image(w):
    _edit_xml(_xml(w), "<width>", "<width>1")
    return _xml(w), "differs from image"


def label_unexpected_values(w):
    label = np.array(Image.open(_png(w)))
    label[0, :4] = 50
    img = Image.fromarray(label, mode="P")
    img.putpalette(Image.open(_png(w)).getpalette())
    img.save(_png(w))
    return _png(w), "label values [50] outside 0..20 and 255"


def label_in_rgb_mode(w):
    Image.open(_png(w)).convert("RGB").save(_png(w))
    return _png(w), "label PNG is in mode RGB"


def label_wrong_size(w):
    Image.open(_png(w)).crop((0, 0, 20, 20)).save(_png(w))
    return _png(w), "differs from image size"


def corrupt_label(w):
    _png(w).write_bytes(_png(w).read_bytes()[:60])
    return _png(w), "cannot decode label PNG"


def id_escaping_root(w):
    outside = w.root.parent / "outside.jpg"
    outside.write_bytes(_jpg(w).read_bytes())
    lines = _split(w).read_text().split()
    _split(w).write_text("\n".join([*lines, "../../../outside"]) + "\n")
    return _split(w), "escapes the dataset root"


def symlink_escaping_root(w):
    outside = w.root.parent / "elsewhere.jpg"
    outside.write_bytes(_jpg(w).read_bytes())
    _jpg(w).unlink()
    _jpg(w).symlink_to(outside)
    return _split(w), "escapes the dataset root"


VOC_CASES: dict[str, Callable] = {f.__name__: f for f in (
    corrupt_jpeg, zero_byte_image, decompression_bomb, missing_image, missing_xml, malformed_xml, unknown_class_name,
    zero_area_box, box_outside_image, box_min_above_max, non_numeric_box, xml_size_differs_from_image,
    label_unexpected_values, label_in_rgb_mode, label_wrong_size, corrupt_label, id_escaping_root,
    symlink_escaping_root)}


# -- COCO cases ---------------------------------------------------------------------------------
def _coco_edit(w, edit: Callable[[dict], None]) -> None:
    data = json.loads(w.coco_ann.read_text())
    edit(data)
    w.coco_ann.write_text(json.dumps(data))


def _first_ann(data: dict) -> dict:
    return next(a for a in data["annotations"] if isinstance(a["segmentation"], list) and not a.get("iscrowd"))


def coco_polygon_two_points(w):
    _coco_edit(w, lambda d: _first_ann(d).update(segmentation=[[1.0, 1.0, 5.0, 5.0]]))
    return w.coco_ann, "polygon with 2 point(s); at least 3 are needed"


def coco_category_not_in_file(w):
    def edit(d):
        used = {c["id"] for c in d["categories"]}
        free = next(c for c in range(1, 200) if c not in used)
        _first_ann(d)["category_id"] = free
    _coco_edit(w, edit)
    return w.coco_ann, "not among the file's categories"


def coco_zero_area_bbox(w):
    def edit(d):
        a = _first_ann(d)
        a["bbox"] = [a["bbox"][0], a["bbox"][1], 0, a["bbox"][3]]
    _coco_edit(w, edit)
    return w.coco_ann, "zero area"


def coco_malformed_bbox(w):
    _coco_edit(w, lambda d: _first_ann(d).update(bbox=[1, 2, "x"]))
    return w.coco_ann, "malformed bbox"


def coco_missing_image(w):
    data = json.loads(w.coco_ann.read_text())
    img = next(i for i in data["images"] if i["id"] == _first_ann(data)["image_id"])
    (w.coco_images / img["file_name"]).unlink()
    return w.coco_images / img["file_name"], "is missing"


def coco_corrupt_image(w):
    data = json.loads(w.coco_ann.read_text())
    img = next(i for i in data["images"] if i["id"] == _first_ann(data)["image_id"])
    (w.coco_images / img["file_name"]).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return w.coco_images / img["file_name"], "cannot decode image"


def coco_file_name_escaping_root(w):
    def edit(d):
        img = next(i for i in d["images"] if i["id"] == _first_ann(d)["image_id"])
        img["file_name"] = "../../../../etc/hostname"
    _coco_edit(w, edit)
    return w.coco_ann, "escapes the dataset root"


VOC_COCO_CASES = {f.__name__: f for f in (
    coco_polygon_two_points, coco_category_not_in_file, coco_zero_area_bbox, coco_malformed_bbox,
    coco_missing_image, coco_corrupt_image, coco_file_name_escaping_root)}


def _propose(w, out: Path, coco: bool, *extra) -> object:
    data = ["--coco-ann", w.coco_ann, "--coco-images", w.coco_images] if coco else ["--voc-root", w.voc_root]
    return CliRunner().invoke(propose_cli, [*map(str, data), "--method", "box", "--out", str(out), *extra])


def _named(path: Path, problem: str, text: str) -> bool:
    return any(f"{p}: " in text for p in {str(path), os.path.realpath(path)}) and problem in text


def _check(w, coco: bool) -> object:
    root = w.coco_ann.parent.parent if coco else w.voc_root
    return CliRunner().invoke(data_cli, ["check", str(root)])


def _run_case(w, tmp_path, mutate, coco: bool) -> None:
    n_before = len(_split(w).read_text().split())
    path, problem = mutate(w)
    r = _propose(w, tmp_path / "stop", coco)
    assert r.exit_code == 3, r.output
    assert _named(path, problem, r.output), r.output

    r = _propose(w, tmp_path / "skip", coco, "--skip-bad")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert manifest["counts"]["skipped_bad"] == len(manifest["skipped_files"]) == 1
    (s,) = manifest["skipped_files"]
    assert os.path.realpath(s["path"]) == os.path.realpath(path) and problem in s["problem"]
    if not coco and "escap" not in problem:
        assert manifest["counts"]["images"] == n_before - 1
    assert "bad 1," in r.output and _named(path, problem, r.output), r.output  # listed on the console too

    r = _check(w, coco)
    assert r.exit_code == 1 and _named(path, problem, r.output), r.output


@pytest.mark.parametrize("case", VOC_CASES.keys())
def test_voc_bad_input(world_copy, tmp_path, case):
    _run_case(world_copy, tmp_path, VOC_CASES[case], coco=False)


@pytest.mark.parametrize("case", VOC_COCO_CASES.keys())
def test_coco_bad_input(world_copy, tmp_path, case):
    _run_case(world_copy, tmp_path, VOC_COCO_CASES[case], coco=True)


def test_malformed_coco_json_is_an_error_in_both_modes(world_copy, tmp_path):
    world_copy.coco_ann.write_text('{"images": [')
    for extra in ([], ["--skip-bad"]):
        r = _propose(world_copy, tmp_path / "o", True, *extra)
        assert r.exit_code == 3 and _named(world_copy.coco_ann, "malformed JSON", r.output), r.output


def test_duplicate_ids_in_split_list_are_an_error_in_both_modes(world_copy, tmp_path):
    """A list naming an image twice is a broken list, not a bad image: --skip-bad does not guess."""
    ids = _split(world_copy).read_text().split()
    _split(world_copy).write_text("\n".join([*ids, ids[3]]) + "\n")
    for extra in ([], ["--skip-bad"]):
        r = _propose(world_copy, tmp_path / "o", False, *extra)
        assert r.exit_code == 3 and _named(_split(world_copy), f"duplicate ids in split list: ['{ids[3]}']",
                                           r.output), r.output


def test_box_partly_outside_is_clipped_and_counted(world_copy, tmp_path):
    _set_box(_xml(world_copy), xmin="-30")
    r = _propose(world_copy, tmp_path / "o", False)
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["clipped_boxes"] == 1 and manifest["counts"]["skipped_bad"] == 0
    assert list(manifest["clipped_files"]) == [os.path.realpath(_xml(world_copy))]
    assert "clipped boxes: 1" in _check(world_copy, False).output


MODES = {
    "CMYK JPEG": lambda rgb: Image.fromarray(rgb).convert("CMYK"),
    "greyscale JPEG": lambda rgb: Image.fromarray(rgb).convert("L"),
    "16-bit greyscale PNG": lambda rgb: Image.fromarray(
        np.asarray(Image.fromarray(rgb).convert("L"), np.uint16) * 257),
    "palette PNG": lambda rgb: Image.fromarray(rgb).convert("P"),
    "RGBA PNG": lambda rgb: Image.fromarray(rgb).convert("RGBA"),
}


@pytest.mark.parametrize("mode", MODES.keys())
def test_image_in_unusual_mode_is_converted_to_rgb(world_copy, tmp_path, mode):
    from boxseg.data.voc import VOCDataset

    ds = VOCDataset(world_copy.voc_root, "train")
    k = ds.ids.index(TRAIN)
    rgb = ds[k].image
    img = MODES[mode](rgb)
    fmt = "JPEG" if "JPEG" in mode else "PNG"
    img.save(_jpg(world_copy), format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    with Image.open(_jpg(world_copy)) as im:
        expected = np.asarray(im.convert("RGB")) if im.mode != "I;16" else np.repeat(
            (np.asarray(im, np.uint16) // 257).astype(np.uint8)[..., None], 3, 2)
    got = VOCDataset(world_copy.voc_root, "train")[k].image
    assert got.dtype == np.uint8 and got.shape == rgb.shape and np.array_equal(got, expected)
    if mode in ("greyscale JPEG", "16-bit greyscale PNG"):
        assert np.array_equal(got[..., 0], got[..., 2])
    r = _propose(world_copy, tmp_path / "o", False, "--skip-bad")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["counts"]["skipped_bad"] == 0 and (tmp_path / "o" / f"{TRAIN}.png").exists()
