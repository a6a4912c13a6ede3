import numpy as np
import pytest
import torch

from boxseg.metrics import ConfusionMatrix


def test_hand_computed_case():
    # 3 classes; 255 ignored. Truth / prediction over 8 pixels:
    target = np.array([0, 0, 1, 1, 1, 2, 255, 255])
    pred = np.array([0, 1, 1, 1, 0, 2, 2, 0])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    s = cm.scores()
    # class 0: TP1 FP1 (pixel 4) FN1 (pixel 1) -> 1/3; class 1: TP2 FP1 FN1 -> 2/4; class 2: TP1 -> 1/1
    assert s.iou == pytest.approx([1 / 3, 0.5, 1.0])
    assert s.miou == pytest.approx((1 / 3 + 0.5 + 1.0) / 3)
    assert s.pixel_acc == pytest.approx(4 / 6)
    assert s.pixels == 6
    assert s.absent == []


def test_absent_classes_left_out_and_reported():
    cm = ConfusionMatrix(4)
    cm.update(np.array([[0, 0], [1, 1]]), np.array([[0, 0], [1, 0]]))
    s = cm.scores()
    assert s.absent == [2, 3]
    assert s.iou[2] is None and s.iou[3] is None
    # class 0: TP2 FP0 FN1 -> 2/3; class 1: TP1 FP1 -> 1/2
    assert s.miou == pytest.approx((2 / 3 + 0.5) / 2)


def test_accumulates_over_split_not_per_image():
    a, b = ConfusionMatrix(2), ConfusionMatrix(2)
    pairs = [(np.array([1, 1, 0]), np.array([1, 0, 0])), (np.array([0, 0]), np.array([1, 1]))]
    for p, t in pairs:
        a.update(p, t)
    b.update(np.concatenate([p for p, _ in pairs]), np.concatenate([t for _, t in pairs]))
    assert torch.equal(a.mat, b.mat)
    # class 1: TP 1, FP 1, FN 2 -> 0.25 (a per-image mean would differ)
    assert a.scores().iou[1] == pytest.approx(0.25)


def _numpy_loop_miou(pred, target, n):
    ious = []
    for c in range(n):
        valid = target != 255
        p, t = (pred == c) & valid, (target == c) & valid
        union = (p | t).sum()
        if union:
            ious.append((p & t).sum() / union)
    return float(np.mean(ious))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_independent_numpy_loop(seed):
    rng = np.random.default_rng(seed)
    n = 21
    target = rng.integers(0, n, (4, 37, 53))
    target[rng.uniform(size=target.shape) < 0.1] = 255
    pred = np.where(rng.uniform(size=target.shape) < 0.6, target, rng.integers(0, n, target.shape))
    pred[pred == 255] = 0
    cm = ConfusionMatrix(n)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    assert cm.scores().miou == pytest.approx(_numpy_loop_miou(pred, target, n), abs=1e-12)


def test_rejects_out_of_range_and_shape_mismatch():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="prediction holds a class"):
        cm.update(np.array([5]), np.array([0]))
    with pytest.raises(ValueError, match="target holds a class"):
        cm.update(np.array([0]), np.array([7]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros(3), np.zeros(4))
