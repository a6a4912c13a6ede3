"""The dense CRF: on a two-colour image whose network probabilities put the boundary 4
pixels off, mean-field inference moves it to the colour edge; it keeps probabilities
normalised and leaves a confident, colour-consistent map unchanged."""

import numpy as np
import torch

from boxseg.crf import CRFParams, dense_crf


def _scene():
    h, w = 48, 64
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :32] = (200, 40, 40)   # class 1 is red, x < 32
    image[:, 32:] = (40, 40, 200)   # class 2 is blue
    image = np.clip(image + np.random.default_rng(0).normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    gt = np.where(np.arange(w)[None, :] < 32, 1, 2).repeat(h, 0)
    return torch.from_numpy(image), gt


def test_crf_moves_a_blurred_boundary_to_the_colour_edge():
    image, gt = _scene()
    x = torch.arange(64, dtype=torch.float32)
    p1 = torch.sigmoid((27.5 - x) / 2.0)          # the network's boundary sits at x = 28, not 32
    probs = torch.stack([torch.full_like(p1, 0.02), 0.98 * p1, 0.98 * (1 - p1)])[:, None, :].expand(3, 48, 64)
    before = (probs.argmax(0).numpy() != gt).sum()
    out = dense_crf(probs.contiguous(), image)
    after = (out.argmax(0).numpy() != gt).sum()
    assert before == 4 * 48
    assert after <= before // 8, (before, after)
    assert torch.allclose(out.sum(0), torch.ones(48, 64), atol=1e-5)


def test_crf_keeps_a_confident_consistent_map():
    image, gt = _scene()
    probs = torch.nn.functional.one_hot(torch.from_numpy(gt), 3).permute(2, 0, 1).float() * 0.9 + 0.1 / 3
    out = dense_crf(probs, image, CRFParams(iterations=5, window=7))
    assert np.array_equal(out.argmax(0).numpy(), gt)


def test_eval_crf_flag(world, tmp_path):
    import json

    from click.testing import CliRunner

    from boxseg.cli.eval import main as eval_cli
    from boxseg.config import SegNet1Config
    from boxseg.data.classes import VOC_TARGET_CLASSES
    from boxseg.models.meta import build_model, segnet1_meta
    from boxseg.models.checkpoint import save_checkpoint

    meta = segnet1_meta(SegNet1Config(width=0.125, batch_norm=True, dropout=0.0, convs_per_block=(1, 1, 1, 1, 1),
                                      fc6_dilation=2, test_size=97), VOC_TARGET_CLASSES)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "s1.pt", {"model": build_model(meta).eval().state_dict(), "meta": meta})
    args = ["--model", str(tmp_path / "s1.pt"), "--voc-root", str(world.voc_root), "--device", "cpu"]
    r = CliRunner().invoke(eval_cli, [*args, "--crf", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert res["crf"] == {"iterations": 10, "window": 11, "bi_w": 4.0, "bi_xy_std": 121.0, "bi_rgb_std": 5.0,
                          "pos_w": 3.0, "pos_xy_std": 3.0}
    assert 0 <= res["miou"] <= 1
    r = CliRunner().invoke(eval_cli, ["--proposals", str(tmp_path), "--voc-root", str(world.voc_root), "--crf"])
    assert r.exit_code == 2 and "--crf refines a model's probabilities" in r.output
