"""dice.py: hand-computed cases, the empty-mask convention, and agreement with MONAI's DiceMetric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from dice import dice_binary, dice_from_counts, dice_per_class, mean_dice, overlap_counts


def test_hand_computed():
    pred = torch.zeros(1, 1, 2, 3, 3, dtype=torch.bool)
    truth = torch.zeros_like(pred)
    pred[..., 0, :2, :] = True  # 6 voxels
    truth[..., 0, 1:, :] = True  # 6 voxels, 3 shared
    assert dice_binary(pred, truth).item() == pytest.approx(2 * 3 / 12)


def test_empty_conventions():
    empty, full = np.zeros((1, 1, 4, 4, 4), bool), np.ones((1, 1, 4, 4, 4), bool)
    assert dice_binary(empty, empty).item() == 1.0  # nothing to find, nothing found
    assert dice_binary(full, empty).item() == 0.0
    assert dice_binary(empty, full).item() == 0.0
    assert dice_binary(full, full).item() == 1.0


def test_numpy_and_torch_agree():
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 1, 5, 6, 7)) > 0.5, rng.random((2, 1, 5, 6, 7)) > 0.5
    assert torch.allclose(dice_binary(a, b), dice_binary(torch.from_numpy(a), torch.from_numpy(b)))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        dice_binary(np.zeros((1, 1, 2, 2, 2)), np.zeros((1, 1, 2, 2, 3)))


@pytest.mark.parametrize("seed", range(5))
def test_binary_matches_monai(seed):
    rng = np.random.default_rng(seed)
    pred = torch.from_numpy(rng.random((3, 1, 8, 9, 10)) > rng.uniform(0.2, 0.9))
    truth = torch.from_numpy(rng.random((3, 1, 8, 9, 10)) > rng.uniform(0.2, 0.9))
    truth[2] = False  # an empty truth on one item
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    expected = metric(pred.float(), truth.float())
    assert torch.allclose(dice_binary(pred, truth), expected.double(), atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_per_class_matches_monai(seed):
    rng = np.random.default_rng(seed)
    pred = torch.from_numpy(rng.integers(0, 4, (2, 1, 6, 7, 8)))
    truth = torch.from_numpy(rng.integers(0, 4, (2, 1, 6, 7, 8)))
    truth[truth == 3] = 0  # label 3 absent from the truth: the empty-truth convention per class
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    expected = metric(one_hot(pred, 4), one_hot(truth, 4))
    assert torch.allclose(dice_per_class(pred, truth, range(4)), expected.double(), atol=1e-6)
    per_label = dice_per_class(pred, truth, range(1, 4)).mean(0).tolist()  # foreground labels, batch averaged
    assert mean_dice(per_label) == pytest.approx(float(expected[:, 1:].mean()), abs=1e-6)


def test_mean_dice_leaves_out_labels_that_could_not_be_scored():
    assert mean_dice([0.5, float("nan"), 1.0]) == pytest.approx(0.75)
    assert np.isnan(mean_dice([float("nan")])) and np.isnan(mean_dice([]))


def test_region_dice_is_the_dice_of_the_union():
    rng = np.random.default_rng(3)
    pred, truth = rng.integers(0, 5, (2, 1, 6, 7, 8)), rng.integers(0, 5, (2, 1, 6, 7, 8))
    regions = torch.stack([dice_from_counts(overlap_counts(p, t, [[1, 2, 3, 4], [4]])) for p, t in zip(pred, truth)])
    whole = dice_binary(pred > 0, truth > 0)[:, 0]
    assert torch.allclose(regions[:, 0], whole)
    assert torch.allclose(regions[:, 1], dice_per_class(pred, truth, [4])[:, 0])
    # a region is not the mean of its labels' Dice: confusing label 1 with 2 costs nothing inside the union
    swapped = np.where(truth == 1, 2, np.where(truth == 2, 1, truth))
    assert all(dice_from_counts(overlap_counts(s, t, [[1, 2]])).eq(1).all() for s, t in zip(swapped, truth))
    assert dice_per_class(swapped, truth, [1]).lt(0.5).all()


def test_pooled_counts_give_the_dice_of_the_stacked_volume():
    """Summing a patient's per-slice counts gives the Dice of its slices stacked, not their mean Dice."""
    rng = np.random.default_rng(4)
    pred, truth = rng.integers(0, 3, (5, 1, 1, 9, 9)), rng.integers(0, 3, (5, 1, 1, 9, 9))
    truth[0] = pred[0] = 0  # a slice with nothing to find and nothing found
    targets = [[1], [2], [1, 2]]
    pooled = sum(overlap_counts(pred[i : i + 1], truth[i : i + 1], targets) for i in range(5))
    stacked = np.concatenate(list(pred), axis=1)[None], np.concatenate(list(truth), axis=1)[None]
    expected = torch.cat([dice_per_class(*stacked, [1, 2])[0], dice_binary(stacked[0] > 0, stacked[1] > 0)[0]])
    assert torch.allclose(dice_from_counts(pooled), expected)
    per_slice = dice_per_class(pred, truth, [1]).mean()
    assert not torch.isclose(dice_from_counts(pooled)[0], per_slice.double())  # the empty slice counts 1.0 there
    assert dice_from_counts(torch.zeros(3, dtype=torch.int64)).item() == 1.0
