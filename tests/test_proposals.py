"""The merge rule on hand-built probability maps."""

import numpy as np
import pytest

from boxseg.proposals import instance_masks, merge_foreground


def _maps(*probs):
    return np.stack(probs).astype(np.float32)


def test_outside_boxes_is_background_even_when_confident():
    p = np.full((6, 6), 0.99, np.float32)
    boxes = np.array([[1, 1, 3, 3]], np.float32)
    out = merge_foreground(_maps(p), [4], boxes, np.array([4]))
    expected = np.zeros((6, 6), np.uint8)
    expected[1:3, 1:3] = 4
    np.testing.assert_array_equal(out, expected)


def test_overlapping_boxes_highest_probability_wins():
    a = np.zeros((4, 8), np.float32)
    b = np.zeros((4, 8), np.float32)
    a[:, :5] = 0.9     # class 1's box covers cols 0..4
    b[:, 3:] = 0.7     # class 2's box covers cols 3..7
    b[:, 4] = 0.95     # column 4: class 2 is clearly higher
    boxes = np.array([[0, 0, 5, 4], [3, 0, 8, 4]], np.float32)
    out = merge_foreground(_maps(a, b), [1, 2], boxes, np.array([1, 2]), class_margin=0.04)
    assert (out[:, :4] == 1).all()      # col 3: 0.9 vs 0.7 -> class 1
    assert (out[:, 4] == 2).all()       # 0.95 vs 0.9: 0.05 apart, beyond the 0.04 margin -> class 2
    assert (out[:, 5:] == 2).all()
    # with a wider margin the same column is too close to call
    wide = merge_foreground(_maps(a, b), [1, 2], boxes, np.array([1, 2]), class_margin=0.1)
    assert (wide[:, 4] == 255).all() and (wide[:, :4] == 1).all()


def test_ignore_bands():
    p = np.array([[0.05, 0.45, 0.55, 0.65, 0.95]], np.float32)
    boxes = np.array([[0, 0, 5, 1]], np.float32)
    out = merge_foreground(_maps(p), [3], boxes, np.array([3]), threshold=0.5, margin=0.1)
    # |p - 0.5| < 0.1 -> 255; 0.65 clears the band; 0.05 is confident background
    np.testing.assert_array_equal(out, [[0, 255, 255, 3, 3]])


def test_two_close_classes_become_ignore():
    a = np.full((1, 3), 0.80, np.float32)
    b = np.array([[0.75, 0.30, 0.85]], np.float32)
    boxes = np.array([[0, 0, 3, 1], [0, 0, 3, 1]], np.float32)
    out = merge_foreground(_maps(a, b), [1, 2], boxes, np.array([1, 2]), class_margin=0.1)
    np.testing.assert_array_equal(out, [[255, 1, 255]])


def test_empty_classes_and_box_touching_border():
    assert merge_foreground(np.zeros((0, 3, 3), np.float32), [], np.zeros((0, 4)), np.zeros(0)).sum() == 0
    p = np.full((4, 4), 0.9, np.float32)
    boxes = np.array([[2.0, 0.0, 4.0, 4.0]], np.float32)  # touches the right and top/bottom borders
    out = merge_foreground(_maps(p), [7], boxes, np.array([7]))
    assert (out[:, 2:] == 7).all() and (out[:, :2] == 0).all()
    with pytest.raises(ValueError, match="2 probability maps for 1 classes"):
        merge_foreground(_maps(p, p), [7], boxes, np.array([7]))


def test_order_mode_paints_in_annotation_order_without_ignore():
    a = np.full((2, 4), 0.55, np.float32)
    b = np.full((2, 4), 0.9, np.float32)
    boxes = np.array([[0, 0, 4, 2], [0, 0, 2, 2]], np.float32)
    out = merge_foreground(_maps(a, b), [1, 2], boxes, np.array([2, 1]), mode="order")
    # box 0 (class 2, p 0.9) painted first, box 1 (class 1, p 0.55 >= 0.5) on top
    np.testing.assert_array_equal(out, [[1, 1, 2, 2], [1, 1, 2, 2]])
    assert 255 not in out


def test_instance_masks_one_per_box():
    p = np.zeros((4, 6), np.float32)
    p[:, 1] = p[:, 4] = 0.9
    boxes = np.array([[0, 0, 3, 4], [3, 0, 6, 4]], np.float32)
    masks = instance_masks(_maps(p), [5], boxes, np.array([5, 5]))
    assert len(masks) == 2
    assert masks[0][:, 1].all() and not masks[0][:, 4].any()
    assert masks[1][:, 4].all() and not masks[1][:, 1].any()
