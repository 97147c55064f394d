"""The Dice coefficient, binary and per class, for torch tensors (B, C, D, H, W) and numpy arrays.

Convention: when prediction and truth are both empty the Dice is 1.0 (nothing to find, nothing found);
when exactly one is empty it is 0.0. This is ``monai.metrics.DiceMetric(ignore_empty=False)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

Array = torch.Tensor | np.ndarray


def _as_tensor(x: Array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)


def dice_binary(pred: Array, truth: Array) -> torch.Tensor:
    """Dice per item of two binary masks (B, C, *spatial) → (B, C); any shape works, the first two dims are kept."""
    p, t = _as_tensor(pred).bool(), _as_tensor(truth).bool()
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from truth shape {tuple(t.shape)}")
    dims = tuple(range(2, p.ndim))
    inter = (p & t).sum(dims, dtype=torch.float64)
    total = p.sum(dims, dtype=torch.float64) + t.sum(dims, dtype=torch.float64)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def dice_per_class(pred: Array, truth: Array, labels: Sequence[int]) -> torch.Tensor:
    """Dice for each label of two label maps (B, 1, *spatial) → (B, len(labels))."""
    p, t = _as_tensor(pred), _as_tensor(truth)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from truth shape {tuple(t.shape)}")
    return torch.cat([dice_binary(p == v, t == v) for v in labels], dim=1)


def overlap_counts(pred: Array, truth: Array, targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """(intersection, predicted, true) voxel counts of each target, a set of label values, over all of two label
    maps: (len(targets), 3) int64. Summed over slices they give a patient's pooled Dice (``dice_from_counts``)."""
    p, t = _as_tensor(pred), _as_tensor(truth)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from truth shape {tuple(t.shape)}")
    rows = []
    for values in targets:
        v = torch.as_tensor(list(values), dtype=p.dtype, device=p.device)
        pm, tm = torch.isin(p, v), torch.isin(t, v.to(t.device, t.dtype))
        rows.append(torch.stack([(pm & tm).sum(), pm.sum(), tm.sum()]))
    return torch.stack(rows).to(torch.int64)


def dice_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Dice from ``overlap_counts`` (..., 3) → (...): 2·intersection / (predicted + true), 1.0 when both are 0."""
    c = counts.to(torch.float64)
    total = c[..., 1] + c[..., 2]
    return torch.where(total > 0, 2 * c[..., 0] / total.clamp_min(1), torch.ones_like(total))


def mean_dice(per_label: Iterable[float]) -> float:
    """The one summary over labels: the mean of per-label Dice values (foreground labels, or regions), NaN (a label
    that could not be scored) left out; NaN when none could."""
    values = np.asarray(list(per_label), dtype=np.float64)
    return float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else float("nan")


def scored_targets(labels: Sequence[int], regions: dict[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """``{"1": [1], "2": [2], …, "WT": [1, 2, 3, 4]}``: each foreground label, then each region."""
    return {**{str(v): [v] for v in list(labels)[1:]}, **{k: list(v) for k, v in (regions or {}).items()}}
