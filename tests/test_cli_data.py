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


def test_check_finds_coco_images_by_one_rule_for_a_file_and_a_tree(world_copy):
    """COCO's own layout: annotations/instances_train2017.json beside train2017/ (no images/)."""
    tree = world_copy.coco_ann.parent.parent
    ann = tree / "annotations" / "instances_train2017.json"
    world_copy.coco_ann.rename(ann)
    (tree / "images").rename(tree / "train2017")
    outputs = []
    for root in (tree, ann):
        r = CliRunner().invoke(data_cli, ["check", str(root)])
        assert r.exit_code == 0 and "is missing" not in r.output and "problems: none" in r.output, r.output
        outputs.append(r.output)
    assert outputs[0] == outputs[1]


def test_check_prints_the_box_baseline_in_percent_as_synth_does(world):
    r = CliRunner().invoke(data_cli, ["check", str(world.voc_root)])
    line = next(l for l in r.output.splitlines() if "box-filled baseline" in l)
    assert line.strip().startswith("box-filled baseline mIoU vs masks (all images with masks), %:")
    # over train and val masks (check) against train masks (synth): close, and both in percent
    assert 100 * world.box_baseline_miou == __import__("pytest").approx(float(line.split(":")[-1]), abs=2)  # train+val vs train
