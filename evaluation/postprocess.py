"""Postprocessing decided on validation, as nnU-Net's ``determine_postprocessing``: for all foreground labels together,
then for each label alone, try keeping only the largest connected component, and removing the components smaller
than a size learned from the training masks; a rule is kept only where it raises the mean validation Dice and lowers
no label's. Applied to a whole volume, or to a patient's 2D slices stacked in order, so that an isolated blob on a
slice without tumour is a small 3D component.

Masks here are label maps ``(D, H, W)`` in label values (0 background); a rule is a JSON-able dict,
``{"labels": [1, 2], "keep": "largest"}`` or ``{"labels": [1], "small_mm3": 120.0}`` (components of at most this
size go; in mm³, so that it holds on the prepared grid it was decided on and on the input's grid it is applied to),
and the components it removes become background.
"""

from __future__ import annotations

import math
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent, RemoveSmallObjects
from scipy import ndimage
from scipy.stats import binomtest

from dice import dice_binary
from imaging.cases import patient_slice, patient_units
from imaging.readers import is_2d

Rule = dict
Unit = tuple["np.ndarray | OnDisk", "np.ndarray | OnDisk", float]  # prediction, truth, voxel volume in mm³
Sizes = tuple[dict[tuple[int, ...], list[int]], float]  # a unit's object sizes per target (voxels), voxel mm³
SMALL_SHARE = 0.01  # "small" components: together they hold at most this share of the training masks' foreground
# An expected step ("keep the largest component" where the training masks hold one object per unit; test-time flips
# of the axes training flipped, crossval.judge) is dropped only when validation shows a loss of more than
# EXPECTED_MARGIN in mean Dice that is not chance: the units it lowers are so many among those it changes that a
# one-sided sign test gives p < EXPECTED_P (at least 5 units, all of them lowered). A run validates on a few cases,
# whose noise swamps such a step's small effect: a margin alone lets one poor case refuse a step that held-out
# patients bear out (benchmarks/holdout.py; see docs/experiments.md, "Postprocessing" and "Test-time flips").
EXPECTED_MARGIN = 0.02
EXPECTED_P = 0.05


class OnDisk:
    """A label map that waits in a file until it is used: its shape and dtype known, its voxels read by
    ``np.asarray`` each time (and dropped after), so that a decision over thousands of validation volumes holds one
    at a time, not all of them (a memory map would keep every page it touched in the process's memory)."""

    def __init__(self, read: Callable[[], np.ndarray], shape: Sequence[int], dtype: np.dtype) -> None:
        self.read, self.shape, self.dtype = read, tuple(shape), np.dtype(dtype)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        a = self.read()
        return a if dtype is None else a.astype(dtype)

    @classmethod
    def saved(cls, array: np.ndarray, folder: Path) -> OnDisk:
        """``array`` written to a new ``.npy`` in ``folder`` (a scratch folder its owner removes)."""
        path = folder / f"{uuid.uuid4().hex}.npy"
        np.save(path, array)
        return cls(lambda: np.load(path), array.shape, array.dtype)


def apply_rule(mask: np.ndarray, rule: Rule, voxel_mm3: float = 1.0) -> np.ndarray:
    """``mask`` (D, H, W) with the components ``rule`` rejects set to background (connectivity: full)."""
    target = np.isin(mask, rule["labels"])
    if not target.any():
        return mask
    selected = torch.from_numpy(target.copy())[None]  # MONAI may edit it in place; target must stay
    if rule.get("keep") == "largest":
        kept = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, connectivity=target.ndim)(selected)
    else:
        at_most = math.floor(rule["small_mm3"] / voxel_mm3 + 1e-9)
        if at_most < 1:
            return mask
        with warnings.catch_warnings():
            # scikit-image 0.26 deprecates the min_size MONAI passes; it removes objects of at most that size
            warnings.simplefilter("ignore", FutureWarning)
            kept = RemoveSmallObjects(min_size=at_most, connectivity=target.ndim)(selected)
    out = mask.copy()
    out[target & ~np.asarray(kept[0], dtype=bool)] = 0
    return out


def apply_rules(mask: np.ndarray, rules: Sequence[Rule], voxel_mm3: float = 1.0) -> np.ndarray:
    """Every rule in order (all foreground first, then label by label, as they were decided)."""
    for rule in rules:
        mask = apply_rule(mask, rule, voxel_mm3)
    return mask


def object_sizes(mask: np.ndarray, labels: Sequence[int]) -> list[int]:
    """Voxels of each connected component (full connectivity) of the voxels holding any of ``labels``."""
    components, n = ndimage.label(np.isin(np.asarray(mask), labels), structure=np.ones((3,) * mask.ndim, bool))
    return np.bincount(components.ravel())[1:].tolist() if n else []


def targets(labels: Sequence[int]) -> list[tuple[int, ...]]:
    """All foreground labels together, then each alone (a single label: once)."""
    fg = tuple(int(v) for v in labels)
    return [fg] + ([(v,) for v in fg] if len(fg) > 1 else [])


def object_table(truths: Iterable[tuple[np.ndarray | OnDisk, float]], labels: Sequence[int]) -> list[Sizes]:
    """Per unit of ``truths`` (training masks, each with its voxel volume in mm³; read once, one at a time), the
    voxels of each connected component of each target (``targets``): what ``small_sizes`` and ``single_object``
    learn from, without holding the masks."""
    out = []
    for mask, mm3 in truths:
        mask = np.asarray(mask)
        out.append(({target: object_sizes(mask, target) for target in targets(labels)}, mm3))
    return out


def small_sizes(table: Sequence[Sizes]) -> dict[tuple[int, ...], float]:
    """Per target (all foreground, then each label) the size in mm³ up to which a component counts as small, from
    the training masks' ``object_table``: the largest size such that all true components up to it hold at most
    ``SMALL_SHARE`` of the true foreground (removing them would cost little), or half the smallest true component
    where even that one holds more; none for a target without objects. (A share of the median object size would
    not do: label maps like BraTS's hold many fragments of a few voxels.)"""
    out = {}
    for target in table[0][0] if table else ():
        sizes = np.sort([n * mm3 for by_target, mm3 in table for n in by_target[target]])
        if len(sizes):
            fits = sizes[np.cumsum(sizes) <= SMALL_SHARE * sizes.sum()]
            out[target] = round(float(fits[-1] if len(fits) else sizes[0] / 2), 3)
    return out


def single_object(table: Sequence[Sizes]) -> list[tuple[int, ...]]:
    """The targets (``targets``) whose training masks (their ``object_table``) hold one object per unit: outside
    each unit's largest component lies at most ``SMALL_SHARE`` of their foreground, pooled (LGG's patients, PH2's
    lesions; not the demo's 1–3 blobs per volume)."""
    out = []
    for target in table[0][0] if table else ():
        sizes = [by_target[target] for by_target, _ in table]
        total = sum(sum(s) for s in sizes)
        if total and sum(sum(s) - max(s) for s in sizes if s) <= SMALL_SHARE * total:
            out.append(target)
    return out


def unit_scores(units: Sequence[Unit], targets: Sequence[Sequence[int]], rules: Sequence[Rule] = ()) -> np.ndarray:
    """Dice of each unit after ``rules`` for each target (a label, or a union of labels such as BraTS's whole
    tumour): (len(units), len(targets))."""
    rows = []
    for pred, truth, mm3 in units:
        pred, truth = apply_rules(np.asarray(pred), rules, mm3), np.asarray(truth)
        rows.append([float(dice_binary(np.isin(pred, t)[None, None], np.isin(truth, t)[None, None])) for t in targets])
    return np.asarray(rows, dtype=np.float64).reshape(len(units), len(targets))


def better(after: np.ndarray, before: np.ndarray, floor: np.ndarray | None = None) -> bool:
    """Whether per-label Dice ``after`` is worth a step: a higher mean than ``before``, and no label below ``floor``
    (``before`` unless given)."""
    floor = before if floor is None else floor
    return bool(after.mean() > before.mean() + 1e-9 and (after >= floor - 1e-9).all())


def refuted(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether validation refutes an expected step (the largest-component rule where the training masks hold one
    object per unit; test-time flips), from each validation unit's Dice per label without and with it
    (``unit_scores``: units × labels): it lost more than ``EXPECTED_MARGIN`` on a label's mean or on the mean of all,
    and the units whose mean Dice it lowered outnumber those it raised beyond chance (one-sided sign test,
    p < ``EXPECTED_P``)."""
    b, a = before.mean(0), after.mean(0)
    if not ((a < b - EXPECTED_MARGIN).any() or a.mean() < b.mean() - EXPECTED_MARGIN):
        return False
    change = after.mean(1) - before.mean(1)
    lower, higher = int((change < -1e-9).sum()), int((change > 1e-9).sum())
    return bool(lower and binomtest(lower, lower + higher, 0.5, alternative="greater").pvalue < EXPECTED_P)


def decide(units: Sequence[Unit], labels: Sequence[int], small: dict[tuple[int, ...], float],
           single: Sequence[tuple[int, ...]] = ()) -> tuple[list[Rule], list[dict]]:
    """The rules worth keeping on the validation ``units`` (volumes, or patients' stacked slices), tried target by
    target, each on top of those kept before; and the trace of every try (rule, mean Dice before and after, kept or
    not) for the log and ``postprocessing.json``. For the targets in ``single`` (``single_object``: what the training
    masks show) keeping the largest component is expected: it stays unless validation refutes it (``refuted``: a loss
    beyond ``EXPECTED_MARGIN`` on more units than chance explains), since a few validation cases cannot tell a rule's
    gain from their noise."""
    per_label = [(v,) for v in labels]
    kept: list[Rule] = []
    base = unit_scores(units, per_label)  # units × labels, as every score below
    trace = []
    for target in targets(labels):
        candidates = [{"labels": list(target), "keep": "largest"}]
        if target in small:
            candidates.append({"labels": list(target), "small_mm3": small[target]})
        best, best_scores = None, base
        for rule in candidates:
            after = unit_scores(units, per_label, [*kept, rule])
            expected = target in single and rule.get("keep") == "largest"
            if expected:
                gain = not refuted(base, after)
            elif best is not None and best.get("keep") == "largest" and target in single:
                gain = False  # the expected rule stands: a few validation cases cannot show that another beats it
            else:
                gain = better(after.mean(0), best_scores.mean(0), floor=base.mean(0))
            trace.append({"rule": rule, "dice_before": round(float(base.mean()), 6),
                          "dice_after": round(float(after.mean()), 6), "better": gain,
                          **({"expected": True} if expected else {})})
            if gain:
                best, best_scores = rule, after
        if best is not None:
            kept.append(best)
            base = best_scores
    for row in trace:
        row["kept"] = row["rule"] in kept
    return kept, trace


def stack_units(entries: Sequence[tuple[dict, np.ndarray | OnDisk, np.ndarray | OnDisk | None]]) -> Iterator[Unit]:
    """(manifest case, prediction, truth) on prepared grids (D, H, W) → units (``cases.patient_units``), one at a
    time: a patient's depth-1 slices pasted at their ``crop_box`` into one frame and stacked in slice order, with
    empty slices where a numbered slice is missing; every other case alone (as given: an ``OnDisk`` map stays on
    disk). The voxel volume is the prepared spacing's."""
    for unit in patient_units([(case["name"], case.get("group", "")) for case, _, _ in entries]):
        members = [entries[k] for k in unit]
        if len(members) == 1 or not all(is_2d(pred.shape, prepared=True) for _, pred, _ in members):
            yield from ((pred, truth, float(np.prod(case["prepared_spacing"]))) for case, pred, truth in members)
            continue
        numbers = [patient_slice(case["name"], case["group"]) for case, _, _ in members]
        height = max(case["crop_box"][1][1] for case, _, _ in members)
        width = max(case["crop_box"][2][1] for case, _, _ in members)
        stacks = [np.zeros((numbers[-1] - numbers[0] + 1, height, width), members[0][1].dtype) for _ in range(2)]
        for number, (case, pred, truth) in zip(numbers, members):
            (_, _), (h0, h1), (w0, w1) = case["crop_box"]
            stacks[0][number - numbers[0], h0:h1, w0:w1] = np.asarray(pred)[0]
            if truth is not None:
                stacks[1][number - numbers[0], h0:h1, w0:w1] = np.asarray(truth)[0]
        yield stacks[0], stacks[1], float(np.prod(members[0][0]["prepared_spacing"]))
