from click.testing import CliRunner

from boxseg.cli.data import main as data_cli

from conftest import first_id


def test_check_reports_problems_and_exits_nonzero(world_copy):
    voc = world_copy.voc_root
    sid = first_id(voc)
    (voc / "JPEGImages" / f"{sid}.jpg").write_bytes(b"")
    (voc / "Annotations" / f"{first_id(voc, 'val')}.xml").write_text("<annotation>")
    r = CliRunner().invoke(data_cli, ["check", str(voc)])
    assert r.exit_code == 1
    assert f"{sid}.jpg: image file is empty (0 bytes)" in r.output
    assert "malformed XML" in r.output
    assert "problems: 2" in r.output  # once each, though trainval lists both ids again


def test_check_coco_reports_problem(world_copy):
    world_copy.coco_ann.write_text("{not json")
    r = CliRunner().invoke(data_cli, ["check", str(world_copy.coco_ann.parent.parent)])
    assert r.exit_code == 1
    assert "instances_train.json: malformed JSON" in r.output
