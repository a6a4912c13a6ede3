"""COCO source reader: VOC-class removal, crowd ignore, stable index, SegNet2 samples, bad input."""

import json

import numpy as np
import pytest

from boxseg.data.classes import IGNORE, SOURCE_CLASSES, SOURCE_COCO_IDS, VOC_COCO_IDS
from boxseg.data.coco import COCOSource, class_sample
from boxseg.errors import BadInputLog, DataError


def _edit(world, fn):
    data = json.loads(world.coco_ann.read_text())
    fn(data)
    world.coco_ann.write_text(json.dumps(data))
    return data


def test_stable_source_index():
    assert SOURCE_CLASSES.num_classes == 61
    assert SOURCE_CLASSES.coco_ids == tuple(sorted(SOURCE_COCO_IDS))
    assert SOURCE_CLASSES.coco_ids[0] == 8 and SOURCE_CLASSES.names[0] == "truck"
    assert not set(SOURCE_CLASSES.coco_ids) & set(VOC_COCO_IDS)


def test_index_does_not_depend_on_category_order(world_copy):
    a = COCOSource(world_copy.coco_ann, world_copy.coco_images)
    masks_a = [a[i].mask for i in range(5)]
    _edit(world_copy, lambda d: d["categories"].reverse())
    b = COCOSource(world_copy.coco_ann, world_copy.coco_images)
    assert all(np.array_equal(m, b[i].mask) for i, m in enumerate(masks_a))


def test_voc_objects_removed_not_relabelled(world_copy):
    def only_voc_in_first(d):
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] != 1]
        d["annotations"].append({"id": 99999, "image_id": 1, "category_id": 18, "bbox": [0, 0, 10, 10],
                                 "area": 100, "iscrowd": 0, "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]})
    _edit(world_copy, only_voc_in_first)
    src = COCOSource(world_copy.coco_ann, world_copy.coco_images)
    assert 1 not in [img["id"] for img in src.images], "image left with only a VOC object is dropped"
    for i in range(len(src)):
        s = src[i]
        assert set(np.unique(s.mask).tolist()) <= set(range(61)) | {IGNORE}
        assert all(1 <= inst.label <= 60 for inst in s.instances)


def test_crowd_regions_become_ignore(world_copy):
    src = COCOSource(world_copy.coco_ann, world_copy.coco_images)
    crowd_images = [i for i in range(len(src)) if any(a.get("iscrowd") for a in src.annotations(i))]
    if not crowd_images:  # make one crowd if this world has none
        def crowd(d):
            d["annotations"][0]["iscrowd"] = 1
        _edit(world_copy, crowd)
        src = COCOSource(world_copy.coco_ann, world_copy.coco_images)
        crowd_images = [i for i in range(len(src)) if any(a.get("iscrowd") for a in src.annotations(i))]
    s = src[crowd_images[0]]
    crowd_inst = [x for x in s.instances if x.crowd][0]
    assert (s.mask[crowd_inst.mask] == IGNORE).all()
    assert len(s.boxes) == sum(not x.crowd for x in s.instances)


def test_boxed_reads_the_image_and_boxes_of_getitem_without_masks(world_copy):
    """COCOSource.boxed: the image and the non-crowd boxes (clipped) of src[i], in its order,
    without rasterising a polygon; checked on a world with a crowd and a box over the edge."""
    def edit(d):
        d["annotations"][0]["iscrowd"] = 1
        a = d["annotations"][1]
        a["bbox"] = [a["bbox"][0], a["bbox"][1], 10_000, a["bbox"][3]]  # clipped to the image
    _edit(world_copy, edit)
    src = COCOSource(world_copy.coco_ann, world_copy.coco_images)
    n_boxes = 0
    for i in range(len(src)):
        full, boxed = src[i], src.boxed(i)
        assert boxed.mask is None and boxed.instances == [] and boxed.id == full.id
        assert np.array_equal(boxed.image, full.image)
        assert boxed.boxes.dtype == full.boxes.dtype and np.array_equal(boxed.boxes, full.boxes)
        assert np.array_equal(boxed.labels, full.labels)
        assert np.array_equal(src.ground_truth(i), full.mask)  # the mask without decoding the image
        n_boxes += len(full.boxes)
    assert n_boxes > 0


def test_class_sample_label_is_every_pixel_not_clipped_to_box(world):
    src = COCOSource(world.coco_ann, world.coco_images)
    pairs = src.class_pairs()
    assert len(pairs) >= len(src)
    i, m = pairs[0]
    s = src[i]
    cs = class_sample(s, m)
    assert cs.label == m and cs.image is s.image
    np.testing.assert_array_equal(cs.target == 1, s.mask == m)
    assert cs.box_mask[cs.target == 1].all()  # tight boxes hold their masks
    # the box mask is the union of class-m boxes
    for x0, y0, x1, y1 in cs.boxes.astype(int):
        assert cs.box_mask[y0:y1, x0:x1].all()


CASES = {
    "malformed_json": ("instances_train.json: malformed JSON", None),
    "missing_key": ("instances_train.json: missing or non-list 'categories'", None),
    "missing_file": (r"\.jpg: image file of image id 1 .* is missing", "1"),
    "escape_dotdot": (r"instances_train\.json: path '\.\./\.\./secret\.jpg' escapes the dataset root", "1"),
    "escape_absolute": (r"instances_train\.json: path '/etc/passwd' is absolute", "1"),
    "polygon_two_points": ("instances_train.json: annotation .* has a polygon with 2 point", "1"),
    "unknown_category": ("instances_train.json: annotation .* has category_id 12 not among", "1"),
    "bbox_outside": (r"instances_train\.json: box 0 \(annotation .*\) .* lies outside", "1"),
    "corrupt_image": (r"\.jpg: cannot decode image", "1"),
}


def _break(world, case):
    first = lambda d: next(a for a in d["annotations"] if a["image_id"] == 1 and a["category_id"] not in VOC_COCO_IDS)  # noqa: E731
    if case == "malformed_json":
        world.coco_ann.write_text('{"images": [')
    elif case == "missing_key":
        _edit(world, lambda d: d.pop("categories"))
    elif case == "missing_file":
        (world.coco_images / "000000000001.jpg").unlink()
    elif case == "escape_dotdot":
        _edit(world, lambda d: d["images"][0].update(file_name="../../secret.jpg"))
    elif case == "escape_absolute":
        _edit(world, lambda d: d["images"][0].update(file_name="/etc/passwd"))
    elif case == "polygon_two_points":
        _edit(world, lambda d: first(d).update(segmentation=[[1, 1, 5, 5]]))
    elif case == "unknown_category":
        _edit(world, lambda d: first(d).update(category_id=12))  # 12 is not a COCO category
    elif case == "bbox_outside":
        _edit(world, lambda d: first(d).update(bbox=[500, 500, 10, 10]))
    elif case == "corrupt_image":
        (world.coco_images / "000000000001.jpg").write_bytes(b"garbage" * 20)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_names_file_or_is_skipped(world_copy, case):
    data = json.loads(world_copy.coco_ann.read_text())
    image1_has_source = any(a["image_id"] == 1 and a["category_id"] not in VOC_COCO_IDS for a in data["annotations"])
    assert image1_has_source, "fixture world: image 1 must hold a source object"
    _break(world_copy, case)
    pattern, item = CASES[case]
    with pytest.raises(DataError, match=pattern):
        src = COCOSource(world_copy.coco_ann, world_copy.coco_images)
        for i in range(len(src)):
            src[i]
    if item is None:  # the whole file is unusable: no skipping possible
        with pytest.raises(DataError, match=pattern):
            COCOSource(world_copy.coco_ann, world_copy.coco_images, skip_bad=True)
        return
    log = BadInputLog()
    src = COCOSource(world_copy.coco_ann, world_copy.coco_images, skip_bad=True, log=log)
    assert [s["item"] for s in log.skipped] == [item]
    assert 1 not in [img["id"] for img in src.images]
    for i in range(len(src)):
        src[i]
