"""boxseg-report on a tiny run: every picture it references exists and decodes, the gallery
holds the worst and the best image, and headless Chromium loads the page with no console
errors, no broken image and a screenshot that is not blank."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from boxseg.cli.report import main as report_cli
from boxseg.cli.train import main as train_cli
from boxseg.report.browser import find_chromium, inspect_page
from boxseg.report.gallery import image_miou, pick

FAST = ["--preset", "tiny", "--rounds", "2", "--set", "baselines=box,full", "--set", "segnet1.iters=4",
        "--set", "segnet2.iters=4", "--set", "segnet2.iters_next=2", "--set", "segnet1.batch=4",
        "--set", "segnet2.batch=4"]


@pytest.fixture(scope="module")
def report(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    r = CliRunner().invoke(train_cli, ["--voc-root", str(world.voc_root), "--coco-ann", str(world.coco_ann),
                                       "--coco-images", str(world.coco_images), "--out", str(d / "run"), *FAST])
    assert r.exit_code == 0, r.output
    bench = d / "bench"
    bench.mkdir()
    (bench / "b.md").write_text("`boxseg-bench --quick`\n\n| backend | images/s |\n|---|---|\n| torch | 3.1 |\n")
    Image.new("RGB", (60, 40), (10, 120, 200)).save(bench / "b.png")
    r = CliRunner().invoke(report_cli, [str(d / "run"), "--voc-root", str(world.voc_root), "--out", str(d / "rep"),
                                        "--bench", str(bench), "--images", "5", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return d / "rep"


def test_every_referenced_picture_exists_and_decodes(report):
    page = (report / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 5 * (1 + 2 + 2) + 5  # gallery (image, 2 rounds, prediction, truth) + 5 plots
    for s in srcs:
        with Image.open(report / s) as im:
            im.load()
            assert im.width > 10 and im.height > 10
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "(worst)" in page and "(best)" in page and "ignore (255)" in page
    assert "<td>torch</td><td>3.1</td>" in page  # the bench table
    assert "preset: tiny" in page  # the config
    for heading in ("Results", "Gallery", "Per-class IoU (val)", "Confusion matrix (val)", "Training curves",
                    "Benchmarks", "Config", "Versions"):
        assert f"<h2>{heading}</h2>" in page


def test_gallery_order_and_per_image_iou_are_right():
    # valid scores sorted: 0.1 (1), 0.3 (4), 0.5 (0), 0.9 (2); three picks at positions 0, 2, 3
    assert pick([0.5, 0.1, 0.9, float("nan"), 0.3], 3) == [1, 0, 2]
    assert pick([0.2, 0.1], 8) == [1, 0]
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 255], [0, 0, 1, 1]], np.uint8)
    # on the 7 labelled pixels: background IoU 3/4, class 1 IoU 3/4
    assert image_miou(pred, gt, 21) == pytest.approx(0.75)


def test_bad_run_folder_is_a_clear_error(tmp_path, world):
    r = CliRunner().invoke(report_cli, [str(tmp_path), "--voc-root", str(world.voc_root), "--out", str(tmp_path / "o")])
    assert r.exit_code == 3 and f"{tmp_path}: not a finished boxseg-train run folder" in r.output
    (tmp_path / "config.yaml").write_text("data: [unclosed\n")
    r = CliRunner().invoke(report_cli, [str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 3 and f"{tmp_path / 'config.yaml'}: malformed YAML" in r.output


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium; "
                                                    ".ci/run installs it)")
def test_report_in_headless_chromium(report):
    rep = inspect_page(report / "index.html", width=1280)
    assert rep.console_errors == []
    assert rep.title.startswith("boxseg report")
    assert len(rep.images) == 30 and rep.broken_images == []
    shot = np.asarray(Image.open(io.BytesIO(rep.screenshot)).convert("RGB"))
    assert shot.shape[1] == 1280 and shot.shape[0] > 2000  # the whole page, not the first screen
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 500  # not blank


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed")
def test_browser_check_sees_errors_and_broken_images(tmp_path):
    """The checker itself: a page with a console error and a missing picture is caught."""
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "p.html").write_text('<title>x</title><img src="a.png"><img src="gone.png">'
                                     '<script>console.error("boom")</script>')
    rep = inspect_page(tmp_path / "p.html")
    assert "boom" in rep.console_errors
    assert any("gone.png" in e for e in rep.console_errors)
    assert [s.rsplit("/", 1)[1] for s in rep.broken_images] == ["gone.png"]


def test_summary_table_shows_no_proposal_figures_for_full_supervision():
    from boxseg.report.page import _summary_table

    res = {"baselines": {"full": {"proposal_miou": 1.0, "proposal_coverage": 1.0, "val_miou": 0.7},
                         "box": {"proposal_miou": 0.6, "proposal_coverage": 1.0, "val_miou": 0.63}}, "rounds": {}}
    html = _summary_table(res)
    full_row = html.split("<tr>")[2]
    assert "<td>-</td><td>-</td><td>70.0</td><td>1.000</td>" in full_row, full_row
    assert "<td>60.0</td><td>100.0</td><td>63.0</td><td>0.900</td>" in html.split("<tr>")[3]
