"""Malformed input that gave tracebacks (issue 17): each is now an error naming the file and
the problem; where one image is bad, --skip-bad skips, counts and lists it, and
`boxseg-data check` reports the same file (the shared `_run_case` checks all three)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from faults.test_bad_data import (_bomb_png, _check, _coco_edit, _first_ann, _png, _propose, _run_case,
                                  _split, _xml)


# -- one bad image among good ones ---------------------------------------------------------------
def label_png_bomb(w):
    _bomb_png(_png(w))
    return _png(w), "decompression bomb"


def voc_width_1e400(w):
    text = _xml(w).read_text()
    start = text.index("<width>") + len("<width>")
    _xml(w).write_text(text[:start] + "1e400" + text[text.index("</width>"):])
    return _xml(w), "<width> is not a finite number"


def voc_width_negative(w):
    text = _xml(w).read_text()
    start = text.index("<width>") + len("<width>")
    _xml(w).write_text(text[:start] + "-5" + text[text.index("</width>"):])
    return _xml(w), "<size><width> must be a positive whole number of pixels, not -5"


def _first_image(d):
    return next(i for i in d["images"] if i["id"] == _first_ann(d)["image_id"])


def coco_bbox_10_pow_400(w):
    _coco_edit(w, lambda d: _first_ann(d).update(bbox=[1, 2, 10**400, 5]))
    return w.coco_ann, "malformed bbox"


def coco_file_name_with_nul(w):
    _coco_edit(w, lambda d: _first_image(d).update(file_name="a\0b.jpg"))
    return w.coco_ann, "holds a NUL byte"


ONE_BAD = {f.__name__: f for f in (label_png_bomb, voc_width_1e400, voc_width_negative)}
ONE_BAD_COCO = {f.__name__: f for f in (coco_bbox_10_pow_400, coco_file_name_with_nul)}


@pytest.mark.parametrize("case", ONE_BAD)
def test_voc_malformed(world_copy, tmp_path, case):
    _run_case(world_copy, tmp_path, ONE_BAD[case], coco=False)


def test_voc_width_nan(world_copy, tmp_path):
    def mutate(w):
        text = _xml(w).read_text()
        start = text.index("<width>") + len("<width>")
        _xml(w).write_text(text[:start] + "nan" + text[text.index("</width>"):])
        return _xml(w), "<width> is not a finite number"
    _run_case(world_copy, tmp_path, mutate, coco=False)


@pytest.mark.parametrize("case", ONE_BAD_COCO)
def test_coco_malformed(world_copy, tmp_path, case):
    _run_case(world_copy, tmp_path, ONE_BAD_COCO[case], coco=True)


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(world_copy, tmp_path, monkeypatch):
    """BOXSEG_MAX_PIXELS caps the decoded size (default 40 million): a 7 KB file claiming
    12,000 x 12,000 took 2.2 GB before it was refused."""
    monkeypatch.setenv("BOXSEG_MAX_PIXELS", "5000")  # the test world's images are 64-96 pixels a side
    r = _propose(world_copy, tmp_path / "o", False, "--skip-bad")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["counts"]["skipped_bad"] > 0 and all("over the limit of 5,000 (BOXSEG_MAX_PIXELS)" in s["problem"]
                                                  for s in m["skipped_files"])


# -- a whole file is bad: both modes stop, check reports it --------------------------------------
def _whole_file_bad(w, tmp_path, coco: bool, path, problem: str) -> None:
    for extra in ([], ["--skip-bad"]):
        r = _propose(w, tmp_path / f"o{len(extra)}", coco, *extra)
        assert r.exit_code == 3 and f"{path}: " in r.output and problem in r.output, r.output
        assert "Traceback" not in r.output
    r = _check(w, coco)
    assert r.exit_code == 1 and problem in r.output, r.output


@pytest.mark.parametrize("case, edit, problem", [
    ("image_id is a list", lambda d: _first_ann(d).update(image_id=[1]), "has image_id [1]; expected an integer"),
    ("image entry is a string", lambda d: d["images"].append("oops"), "is a str, not an object"),
    ("category entry is a string", lambda d: d["categories"].append("oops"), "is a str, not an object"),
    ("image without id", lambda d: d["images"][0].pop("id"), "has id None; expected an integer"),
    ("width Infinity", lambda d: d["images"][0].update(width=float("inf")), "has width inf; expected a positive integer"),
    ("width NaN", lambda d: d["images"][0].update(width=float("nan")), "has width nan; expected a positive integer"),
    ("width tall", lambda d: d["images"][0].update(width="tall"), "has width 'tall'; expected a positive integer"),
])
def test_coco_file_malformed(world_copy, tmp_path, case, edit, problem):
    _coco_edit(world_copy, edit)
    _whole_file_bad(world_copy, tmp_path, True, world_copy.coco_ann, problem)


def test_coco_json_nested_too_deep(world_copy, tmp_path):
    world_copy.coco_ann.write_text('{"images": ' + "[" * 200_000 + "]" * 200_000 + "}")
    _whole_file_bad(world_copy, tmp_path, True, world_copy.coco_ann, "nested too deeply")


def test_split_list_not_utf8(world_copy, tmp_path):
    _split(world_copy).write_bytes(_split(world_copy).read_bytes() + b"caf\xe9\n")
    _whole_file_bad(world_copy, tmp_path, False, _split(world_copy), "split list is not UTF-8 text")


def test_split_list_with_a_byte_order_mark_reads_the_first_id(world_copy, tmp_path):
    ids = _split(world_copy).read_text().split()
    _split(world_copy).write_bytes(b"\xef\xbb\xbf" + _split(world_copy).read_bytes())
    r = _propose(world_copy, tmp_path / "o", False)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / f"{ids[0]}.png").exists()  # not "\ufeffID.png"


def test_instances_with_a_segmentation_object_bomb_stop_with_a_manifest(world_copy, tmp_path):
    """A bomb among SegmentationObject PNGs crashed --instances after 200 PNGs with no manifest."""
    from faults.test_bad_data import TRAIN, _voc
    from test_propose import S2, _save
    from boxseg.cli.propose import main as propose_cli
    from boxseg.models.meta import segnet2_meta

    obj = _voc(world_copy) / "SegmentationObject" / f"{TRAIN}.png"
    _bomb_png(obj)
    ckpt = _save(tmp_path / "s2.pt", segnet2_meta(S2, 4))
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpt), "--voc-root", str(world_copy.voc_root), "--workers", "0",
                                         "--instances", "--out", str(tmp_path / "o")])
    assert r.exit_code == 3 and f"{obj}: refused as a decompression bomb" in r.output, r.output
    assert (tmp_path / "o" / "manifest.json").exists()
