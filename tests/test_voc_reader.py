"""VOC reader: coordinates, flags, split lists, and every bad input of the foundation issue."""

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from boxseg.data.files import encode_label_png
from boxseg.data.voc import VOCDataset, parse_annotation
from boxseg.errors import BadInputLog, DataError

from conftest import first_id

XML = """<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>
<object><name>dog</name><truncated>1</truncated><difficult>0</difficult>
<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>
<object><name>cat</name><difficult>1</difficult>
<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>"""


def _write_xml(voc, sid, **kw):
    h, w = Image.open(voc / "JPEGImages" / f"{sid}.jpg").size[::-1]
    vals = dict(w=w, h=h, x0=3, y0=4, x1=10, y1=12)
    vals.update(kw)
    (voc / "Annotations" / f"{sid}.xml").write_text(XML.format(**vals))


def test_boxes_are_zero_based_exclusive_and_flags_kept(world_copy):
    voc = world_copy.voc_root
    sid = first_id(voc)
    _write_xml(voc, sid)
    ann = parse_annotation(voc / "Annotations" / f"{sid}.xml")
    # 1-based inclusive xmin=3..xmax=10 -> 0-based x0=2, exclusive x1=10 (8 pixels wide)
    assert ann.boxes.tolist()[0] == [2.0, 3.0, 10.0, 12.0]
    assert ann.labels.tolist() == [12, 8]  # dog, cat
    assert ann.truncated.tolist() == [True, False]
    assert ann.difficult.tolist() == [False, True]
    s = VOCDataset(voc, "train")[0]
    assert s.image.dtype == np.uint8 and s.image.ndim == 3 and s.mask.shape == s.image.shape[:2]


def test_reads_synthetic_split_with_masks(world):
    ds = VOCDataset(world.voc_root, "val", masks="require")
    assert len(ds) == 12
    s = ds[3]
    assert len(s.boxes) == len(s.labels) > 0 and set(s.labels.tolist()) <= set(range(1, 21))
    # every box encloses the pixels of its class in the mask (boxes are tight to visible parts)
    for box, lab in zip(s.boxes, s.labels):
        x0, y0, x1, y1 = box.astype(int)
        assert (s.mask[y0:y1, x0:x1] == lab).any()


def test_boxed_reads_the_image_and_boxes_of_getitem_without_the_mask(world):
    """What proposals need (ImageSet.boxed): the same image and boxes, the mask not decoded."""
    from boxseg.data.images import ImageSet

    ds = VOCDataset(world.voc_root, "val", masks="require")
    images = ImageSet(ds, 21)
    for i in range(len(ds)):
        full, boxed, item = ds[i], ds.boxed(i), images.boxed(i)
        assert full.mask is not None and boxed.mask is None and item.mask is None and item.id == ds.ids[i]
        for a in (boxed, item):
            assert np.array_equal(a.image, full.image) and np.array_equal(a.boxes, full.boxes)
            assert np.array_equal(a.labels, full.labels)


def test_ground_truth_without_decoding_the_image_is_the_decoded_mask(world_copy):
    """ImageSet.ground_truth (what scoring proposals reads): the mask of images[i], its size
    checked against the XML's <size> or, without one, the image file's header."""
    import re as _re

    from boxseg.data.images import ImageSet
    from boxseg.errors import DataError

    ds = VOCDataset(world_copy.voc_root, "val", masks="require")
    xml = world_copy.voc_root / "Annotations" / f"{ds.ids[0]}.xml"
    xml.write_text(_re.sub(r"<size>.*?</size>", "", xml.read_text(), flags=_re.S))  # no <size>
    ds = VOCDataset(world_copy.voc_root, "val", masks="require")
    assert ds.annotation(0).size is None
    images = ImageSet(ds, 21)
    for i in range(len(ds)):
        assert np.array_equal(images.ground_truth(i), ds[i].mask)
    ds = VOCDataset(world_copy.voc_root, "val", masks="require")  # <size> unknown again, and a wrong mask
    png = world_copy.voc_root / "SegmentationClass" / f"{ds.ids[0]}.png"
    Image.open(png).crop((0, 0, 20, 20)).save(png)
    with pytest.raises(DataError, match="differs from image size") as e:
        ImageSet(ds, 21).ground_truth(0)
    assert str(png) in str(e.value)


def test_train_aug_prefers_sbd_masks(world_copy):
    voc = world_copy.voc_root
    sid = first_id(voc)
    (voc / "SegmentationClassAug").mkdir()
    h, w = Image.open(voc / "JPEGImages" / f"{sid}.jpg").size[::-1]
    (voc / "SegmentationClassAug" / f"{sid}.png").write_bytes(encode_label_png(np.full((h, w), 7, np.uint8)))
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(sid + "\n")
    assert set(np.unique(VOCDataset(voc, "train_aug")[0].mask)) == {7}
    assert set(np.unique(VOCDataset(voc, "train")[0].mask)) != {7}


def _corrupt(voc, sid, case):
    img = voc / "JPEGImages" / f"{sid}.jpg"
    lab = voc / "SegmentationClass" / f"{sid}.png"
    h, w = Image.open(img).size[::-1]
    if case == "corrupt_jpeg":
        img.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 10)
    elif case == "truncated_jpeg":
        img.write_bytes(img.read_bytes()[: len(img.read_bytes()) // 2])
    elif case == "zero_byte_image":
        img.write_bytes(b"")
    elif case == "missing_image":
        img.unlink()
    elif case == "label_value_37":
        arr = np.asarray(Image.open(lab)).copy()
        arr[0, 0] = 37
        lab.write_bytes(encode_label_png(arr))
    elif case == "label_size":
        lab.write_bytes(encode_label_png(np.zeros((h + 3, w), np.uint8)))
    elif case == "label_rgb":
        Image.open(lab).convert("RGB").save(lab)
    elif case == "box_outside":
        _write_xml(voc, sid, x0=w + 5, x1=w + 20)
    elif case == "box_zero_area":
        # 1-based inclusive xmin=6, xmax=5 -> 0-based x0=5, x1=5: zero width
        _write_xml(voc, sid, x0=6, x1=5)
    elif case == "box_min_gt_max":
        _write_xml(voc, sid, x0=20, x1=10)
    elif case == "malformed_xml":
        (voc / "Annotations" / f"{sid}.xml").write_text("<annotation><object><name>dog</name></annotation")
    elif case == "unknown_class":
        _write_xml(voc, sid)
        p = voc / "Annotations" / f"{sid}.xml"
        p.write_text(p.read_text().replace("<name>dog</name>", "<name>unicorn</name>"))
    elif case == "missing_xml":
        (voc / "Annotations" / f"{sid}.xml").unlink()
    else:
        raise ValueError(case)


CASES = {
    "corrupt_jpeg": r"\.jpg: cannot decode image",
    "truncated_jpeg": r"\.jpg: cannot decode image",
    "zero_byte_image": r"\.jpg: image file is empty",
    "missing_image": r"\.jpg: image file is missing",
    "label_value_37": r"\.png: label values \[37\] outside 0\.\.20 and 255",
    "label_size": r"\.png: label size .* differs from image size",
    "label_rgb": r"\.png: label PNG is in mode RGB",
    "box_outside": r"\.xml: box 0 \(dog\) .* lies outside",
    "box_zero_area": r"\.xml: box 0 \(dog\) has zero area",
    "box_min_gt_max": r"\.xml: box 0 \(dog\) has min > max",
    "malformed_xml": r"\.xml: malformed XML",
    "unknown_class": r"\.xml: unknown class name 'unicorn'",
    "missing_xml": r"\.xml: annotation file is missing",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_names_file_or_is_skipped(world_copy, case):
    voc = world_copy.voc_root
    sid = first_id(voc)
    _corrupt(voc, sid, case)
    with pytest.raises(DataError, match=sid + CASES[case]):
        ds = VOCDataset(voc, "train")
        for i in range(len(ds)):  # image/mask problems surface when decoded
            ds[i]
    log = BadInputLog()
    ds = VOCDataset(voc, "train", skip_bad=True, log=log)
    assert sid not in ds.ids and len(ds) == 23
    assert len(log.skipped) == 1 and log.skipped[0]["item"] == sid
    assert re.search(CASES[case], log.skipped[0]["path"] + ": " + log.skipped[0]["problem"])
    for i in range(len(ds)):
        ds[i]


def test_partly_outside_box_is_clipped_and_counted(world_copy):
    voc = world_copy.voc_root
    sid = first_id(voc)
    h, w = Image.open(voc / "JPEGImages" / f"{sid}.jpg").size[::-1]
    _write_xml(voc, sid, x0=w - 5, x1=w + 30)
    log = BadInputLog()
    ds = VOCDataset(voc, "train", log=log)
    assert log.clipped_boxes == 1
    assert ds[0].boxes[0].tolist() == [w - 6, 3.0, w, 12.0]


@pytest.mark.parametrize("line", ["../../../etc/passwd", "/etc/passwd", "../Annotations/x"])
def test_split_line_escaping_root_is_refused(world_copy, line):
    voc = world_copy.voc_root
    lst = voc / "ImageSets" / "Segmentation" / "train.txt"
    lst.write_text(lst.read_text() + line + "\n")
    with pytest.raises(DataError, match=r"train\.txt: path .* (escapes the dataset root|is absolute)"):
        VOCDataset(voc, "train")
    log = BadInputLog()
    assert len(VOCDataset(voc, "train", skip_bad=True, log=log)) == 24
    assert log.skipped[0]["item"] == line


def test_symlink_escaping_root_is_refused(world_copy, tmp_path):
    voc = world_copy.voc_root
    sid = first_id(voc)
    outside = tmp_path / "outside.jpg"
    shutil.copy(voc / "JPEGImages" / f"{sid}.jpg", outside)
    (voc / "JPEGImages" / f"{sid}.jpg").unlink()
    (voc / "JPEGImages" / f"{sid}.jpg").symlink_to(outside)
    with pytest.raises(DataError, match="escapes the dataset root"):
        VOCDataset(voc, "train")


def test_duplicate_ids_and_missing_list(world_copy):
    voc = world_copy.voc_root
    lst = voc / "ImageSets" / "Segmentation" / "train.txt"
    sid = first_id(voc)
    lst.write_text(lst.read_text() + sid + "\n")
    with pytest.raises(DataError, match=r"train\.txt: duplicate ids in split list"):
        VOCDataset(voc, "train")
    with pytest.raises(DataError, match=r"nosuch\.txt: split list 'nosuch' is missing"):
        VOCDataset(voc, "nosuch")
    with pytest.raises(DataError, match="not a VOC tree"):
        VOCDataset(voc / "Annotations", "train")


@pytest.mark.parametrize("mode", ["CMYK", "L", "I;16", "RGBA"])
def test_unusual_image_modes_decode_to_rgb(world_copy, mode):
    voc = world_copy.voc_root
    sid = first_id(voc)
    p = voc / "JPEGImages" / f"{sid}.jpg"
    rgb = Image.open(p).convert("RGB")
    if mode == "I;16":
        arr = (np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
        img = Image.fromarray(arr)  # uint16 -> mode I;16
        fmt = "PNG"
    else:
        img, fmt = rgb.convert(mode), ("JPEG" if mode != "RGBA" else "PNG")
    img.save(p, format=fmt)  # a PNG under .jpg: Pillow goes by content, as real datasets need
    s = VOCDataset(voc, "train")[0]
    assert s.image.shape == (rgb.size[1], rgb.size[0], 3) and s.image.dtype == np.uint8
    if mode == "I;16":  # 16-bit is scaled, not clipped
        assert abs(int(s.image[..., 0].mean()) - int(np.asarray(rgb.convert("L")).mean())) <= 1


def test_decompression_bomb_guard_stays_on(world_copy, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every test image is now a "bomb"
    sid = first_id(world_copy.voc_root)
    with pytest.raises(DataError, match=sid + r"\.jpg: refused as a decompression bomb"):
        VOCDataset(world_copy.voc_root, "train")[0]


def test_instances_from_segmentation_object(world):
    ds = VOCDataset(world.voc_root, "train")
    n = 0
    for i in range(len(ds)):
        s, truth = ds[i], ds.instances(i)
        assert truth is not None and truth.masks.shape == (len(s.labels), *s.mask.shape)
        # instance k is the k-th object of the XML: its class, and its pixels inside its box
        assert truth.labels.tolist() == s.labels.tolist()
        for m, box in zip(truth.masks, s.boxes):
            x0, y0, x1, y1 = box.astype(int)
            assert m.any() and not m[:y0].any() and not m[y1:].any() and not m[:, :x0].any() and not m[:, x1:].any()
        # the instances of a class cover that class's pixels of the class mask, but for the void
        # band between touching instances of one class (void in SegmentationObject only)
        for c in range(1, 21):
            union = truth.masks[truth.labels == c].any(0)
            assert not (union & (s.mask != c)).any()
            assert not ((s.mask == c) & ~union & ~truth.void).any()
        assert (truth.void >= (s.mask == 255)).all()
        n += len(truth.labels)
    assert n > len(ds)  # several images hold more than one object


def test_instances_missing_file_and_bad_values(world_copy):
    voc = world_copy.voc_root
    sid = first_id(voc)
    obj = voc / "SegmentationObject" / f"{sid}.png"
    label = np.array(Image.open(obj))
    obj.unlink()
    assert VOCDataset(voc, "train").instances(0) is None
    # an instance painted on background pixels of the class mask is an error naming the file
    cls = np.array(Image.open(voc / "SegmentationClass" / f"{sid}.png"))
    bad = label.copy()
    bad[cls == 0] = 0
    bad[np.argwhere(cls == 0)[0][0], np.argwhere(cls == 0)[0][1]] = 9
    obj.write_bytes(encode_label_png(bad))
    with pytest.raises(DataError, match=re.escape(f"{sid}.png") + ".*instance 9 covers no object pixel"):
        VOCDataset(voc, "train").instances(0)
