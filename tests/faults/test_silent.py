"""Silent wrong results: a rerun of boxseg-propose over a folder made with other settings
must not keep the old PNGs under a new manifest (issue 17). It is refused with exit 3,
naming the fields that differ; --overwrite replaces the old outputs."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from boxseg.cli.propose import main as propose_cli
from boxseg.models.meta import segnet2_meta

from test_propose import S2, _labels, _save


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("silent")
    return _save(d / "a.pt", segnet2_meta(S2, 4), 0), _save(d / "b.pt", segnet2_meta(S2, 4), 5)


def _run(world, out, model, *extra):
    return CliRunner().invoke(propose_cli, ["--model", str(model), "--voc-root", str(world.voc_root), "--device", "cpu",
                                            "--workers", "0", "--batch", "8", "--out", str(out), *extra])


@pytest.mark.parametrize("change, field", [
    ("model", "model_sha256"),
    ("threshold", "threshold"),
    ("margin", "margin"),
    ("merge", "merge"),
    ("precision", "precision"),
    ("backend", "backend"),
])
def test_rerun_with_other_settings_is_refused(world, tmp_path, two_models, change, field):
    a, b = two_models
    out = tmp_path / "p"
    assert _run(world, out, a).exit_code == 0
    before = _labels(out)
    model, extra = a, []
    if change == "model":
        model = b
    elif change == "threshold":
        extra = ["--threshold", "0.6"]
    elif change == "margin":
        extra = ["--margin", "0.05"]
    elif change == "merge":
        extra = ["--merge", "order"]
    elif change == "precision":
        extra = ["--precision", "bf16"]
    else:
        extra = ["--backend", "compile"]
    r = _run(world, out, model, *extra)
    assert r.exit_code == 3 and "other settings" in r.output and field in r.output and "--overwrite" in r.output, r.output
    assert _labels(out) == before  # nothing touched


def test_overwrite_replaces_and_equals_a_fresh_run(world, tmp_path, two_models):
    a, b = two_models
    assert _run(world, tmp_path / "p", a).exit_code == 0
    r = _run(world, tmp_path / "p", b, "--overwrite")
    assert r.exit_code == 0, r.output
    assert _run(world, tmp_path / "fresh", b).exit_code == 0
    assert _labels(tmp_path / "p") == _labels(tmp_path / "fresh") != {}
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert m["model"] == str(b) and m["counts"]["written"] == m["counts"]["images"]


def test_folder_without_a_record_is_refused(world, tmp_path, two_models):
    a, _ = two_models
    out = tmp_path / "p"
    assert _run(world, out, a).exit_code == 0
    (out / ".boxseg-propose.json").unlink()  # as an older boxseg left it
    r = _run(world, out, a)
    assert r.exit_code == 3 and "no record" in r.output, r.output


def test_same_settings_resume(world, tmp_path, two_models):
    a, _ = two_models
    out = tmp_path / "p"
    assert _run(world, out, a).exit_code == 0
    first = sorted(out.glob("*.png"))[0]
    first.unlink()
    r = _run(world, out, a, "--batch", "3", "--workers", "1")  # batch and workers do not change the output
    assert r.exit_code == 0 and "wrote 1 " in r.output, r.output


# -- COCO masks that decoded to garbage, or were read wrongly, while check said "none" ---------
from faults.test_bad_data import _coco_edit, _first_ann, _run_case  # noqa: E402


def _first_rle(data: dict) -> dict:
    from pycocotools import mask as mask_utils

    ann = _first_ann(data)
    img = next(i for i in data["images"] if i["id"] == ann["image_id"])
    h, w = img["height"], img["width"]
    rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))
    ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    return ann


def coco_short_rle_string(w):
    from pycocotools import mask as mask_utils

    from boxseg.data.coco import rle_counts

    def edit(d):
        seg = _first_rle(d)["segmentation"]
        short = rle_counts(seg["counts"])[:-1]  # the last run cut off: a well-formed string, too few pixels
        seg["counts"] = mask_utils.frPyObjects({"size": seg["size"], "counts": short}, *seg["size"])["counts"].decode()
    _coco_edit(w, edit)
    return w.coco_ann, "RLE runs covering"


def coco_short_rle_list(w):
    def edit(d):
        ann = _first_rle(d)
        ann["segmentation"]["counts"] = [5, 3]
    _coco_edit(w, edit)
    return w.coco_ann, "RLE runs covering 8 pixels"


def coco_rle_size_differs(w):
    def edit(d):
        ann = _first_rle(d)
        h, wd = ann["segmentation"]["size"]
        ann["segmentation"] = {"size": [h + 1, wd], "counts": [(h + 1) * wd]}
    _coco_edit(w, edit)
    return w.coco_ann, "has an RLE of size"


def coco_polygon_of_strings(w):
    _coco_edit(w, lambda d: _first_ann(d).update(segmentation=[["1", "1", "5", "1", "5", "5"]]))
    return w.coco_ann, "not a finite number"


def coco_iscrowd_no(w):
    _coco_edit(w, lambda d: _first_ann(d).update(iscrowd="no"))
    return w.coco_ann, "iscrowd 'no'"


def coco_bbox_of_booleans(w):
    _coco_edit(w, lambda d: _first_ann(d).update(bbox=[True, True, True, True]))
    return w.coco_ann, "malformed bbox"


COCO_SILENT = {f.__name__: f for f in (coco_short_rle_string, coco_short_rle_list, coco_rle_size_differs,
                                       coco_polygon_of_strings, coco_iscrowd_no, coco_bbox_of_booleans)}


@pytest.mark.parametrize("case", COCO_SILENT.keys())
def test_coco_annotation_read_wrongly(world_copy, tmp_path, case):
    """boxseg-propose stops naming the file, skips and lists it with --skip-bad, and
    boxseg-data check reports it (it said "problems: none" before)."""
    _run_case(world_copy, tmp_path, COCO_SILENT[case], coco=True)


def test_a_valid_rle_still_reads(world_copy, tmp_path):
    from boxseg.data.coco import COCOSource

    before = COCOSource(world_copy.coco_ann, world_copy.coco_images)
    _coco_edit(world_copy, _first_rle)
    after = COCOSource(world_copy.coco_ann, world_copy.coco_images)
    i = 0
    assert (before[i].mask == after[i].mask).all()
