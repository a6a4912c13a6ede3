import hashlib
import json
import xml.etree.ElementTree as ET

import numpy as np
from click.testing import CliRunner
from PIL import Image
from pycocotools.coco import COCO

from boxseg.cli.data import main as data_cli
from boxseg.data.classes import IGNORE, SOURCE_COCO_IDS, VOC_CLASSES, VOC_COCO_IDS
from boxseg.data.coco import COCOSource
from boxseg.data.synth import SIZES, write_synth

from conftest import SMALL


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    size = SMALL.__class__(8, 6, 3, 48, 64)
    a = write_synth(tmp_path / "a", seed=5, size=size, workers=1)
    b = write_synth(tmp_path / "b", seed=5, size=size, workers=2)  # parallel gives the same bytes
    c = write_synth(tmp_path / "c", seed=6, size=size, workers=1)
    assert _digest(a.root) == _digest(b.root)
    assert _digest(a.root) != _digest(c.root)


def test_coco_file_loads_with_pycocotools_and_has_real_ids(world):
    coco = COCO(str(world.coco_ann))
    cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert len(cats) == 80 and cats[5] == "airplane" and cats[90] == "toothbrush"
    used = {a["category_id"] for a in coco.dataset["annotations"]}
    assert used & set(VOC_COCO_IDS), "some source images must hold VOC-class objects"
    assert used & set(SOURCE_COCO_IDS)
    # every mask decodes to a non-empty region inside its bbox
    for ann in coco.dataset["annotations"][:50]:
        m = coco.annToMask(ann)
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(m)
        assert m.sum() == ann["area"]
        assert xs.min() == x and ys.min() == y and xs.max() + 1 == x + w and ys.max() + 1 == y + h


def test_voc_tree_reads_with_plain_xml_and_pil(world):
    ids = (world.voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(ids) == SMALL.n_train
    for i in ids:
        root = ET.parse(world.voc_root / "Annotations" / f"{i}.xml").getroot()
        w, h = int(root.find("size/width").text), int(root.find("size/height").text)
        lab = Image.open(world.voc_root / "SegmentationClass" / f"{i}.png")
        assert lab.mode == "P" and lab.size == (w, h)
        assert Image.open(world.voc_root / "JPEGImages" / f"{i}.jpg").size == (w, h)
        values = set(np.unique(np.asarray(lab)).tolist())
        assert values <= set(range(21)) | {IGNORE}
        assert IGNORE in values, "object borders carry a void band"
        for obj in root.findall("object"):
            assert obj.find("name").text in VOC_CLASSES[1:]
            xmin, xmax = int(obj.find("bndbox/xmin").text), int(obj.find("bndbox/xmax").text)
            assert 1 <= xmin <= xmax <= w


def test_source_reader_exercises_exclusion_and_crowd(world):
    src = COCOSource(world.coco_ann, world.coco_images)
    assert src.removed_voc_objects > 0
    assert len(src) + src.dropped_no_source == SMALL.n_source
    data = json.loads(world.coco_ann.read_text())
    assert all(a["category_id"] not in VOC_COCO_IDS for a in src.coco.dataset["annotations"])
    assert len(data["annotations"]) > len(src.coco.dataset["annotations"])


def test_default_world_is_calibrated_as_hard_as_voc(tmp_path):
    """The default (tiny) world: box-filled labels score 55-70 mIoU and GrabCut 60-75 (VOC:
    about 62 and 65.7), computed at generation, stored and printed; box-centre, scored on
    the pixels it labels, lies above box-filled."""
    world = write_synth(tmp_path / "w", seed=0, size=SIZES["tiny"])
    cal = world.calibration
    assert 0.55 <= world.box_baseline_miou <= 0.70 and cal["box"] == world.box_baseline_miou
    assert 0.60 <= cal["grabcut"] <= 0.75 and cal["grabcut_images"] == 100
    assert cal["box-centre"] > cal["box"]
    meta = json.loads((world.root / "synth.json").read_text())
    assert meta["box_baseline_miou_train"] == world.box_baseline_miou and meta["calibration"] == cal
    assert meta["format"] == 3


def test_cli_synth_then_check_both_trees(tmp_path):
    runner = CliRunner()
    out = tmp_path / "w"
    r = runner.invoke(data_cli, ["synth", "--out", str(out), "--n-source", "20", "--n-train", "10",
                                 "--n-val", "5", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "box-filled baseline mIoU on target train masks:" in r.output and "GrabCut" in r.output
    r = runner.invoke(data_cli, ["check", str(out / "voc")])
    assert r.exit_code == 0, r.output
    assert "problems: none" in r.output and "images in train: 10" in r.output
    r = runner.invoke(data_cli, ["check", str(out / "coco")])
    assert r.exit_code == 0, r.output
    assert "problems: none" in r.output
    r = runner.invoke(data_cli, ["synth", "--out", str(out), "--size", "huge"])
    assert r.exit_code != 0 and "valid:" in r.output


def test_cached_world_of_an_older_format_is_rebuilt_identically(tmp_path, monkeypatch):
    import json

    from boxseg.cli.train import synth_world
    from boxseg.data import synth

    monkeypatch.setitem(synth.SIZES, "micro", synth.SynthSize(4, 3, 2, 64, 72))
    monkeypatch.setenv("BOXSEG_CACHE", str(tmp_path))
    _, _, voc = synth_world("micro", 5)
    meta_path = tmp_path / "synth" / "micro-seed5" / "synth.json"
    assert json.loads(meta_path.read_text())["format"] == synth.SYNTH_FORMAT
    before = {p.name: p.read_bytes() for p in (voc / "JPEGImages").iterdir()}
    # a world written before SegmentationObject existed
    for p in (voc / "SegmentationObject").iterdir():
        p.unlink()
    meta = json.loads(meta_path.read_text())
    del meta["format"]
    meta_path.write_text(json.dumps(meta))
    synth_world("micro", 5)
    assert len(list((voc / "SegmentationObject").iterdir())) == 5
    assert {p.name: p.read_bytes() for p in (voc / "JPEGImages").iterdir()} == before
    # a current one is left alone
    mtime = meta_path.stat().st_mtime_ns
    synth_world("micro", 5)
    assert meta_path.stat().st_mtime_ns == mtime
