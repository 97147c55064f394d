"""What inference does, decided on validation as nnU-Net decides it, and cross-validation's folds and report.

- Folds: patient-grouped and seeded (a patient's slices, a case's modalities, never straddle two folds); the test
  split is in none of them.
- The decision: each network predicts its validation cases (one network for a plain run, which trained on them too
  under ``--train-on-val``; every fold's for cross-validation, each on cases it never trained on, pooled); on those
  predictions, test-time flips (of the axes training flipped) are expected and kept unless validation refutes them
  (``postprocess.refuted``), then the postprocessing rules are decided (``postprocess.decide``). The decision goes
  into every checkpoint judged, so that ``infer.py`` (one checkpoint or the ensemble of the folds) applies it.
- The report: Dice per fold, mean, standard deviation and pooled, for the network alone, with flips, with
  postprocessing and with both (``cv.csv``, ``cv.png``), so that a user sees what each step bought.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dataset import FLIP_AXES, AugmentParams, Caching, PrepParams, make_dataset  # noqa: E402
from dice import scored_targets  # noqa: E402
from evaluation.postprocess import (  # noqa: E402
    OnDisk,
    Unit,
    decide,
    object_table,
    refuted,
    single_object,
    small_sizes,
    stack_units,
    unit_scores,
)
from imaging.cases import deal_folds, record_group  # noqa: E402
from imaging.common import InputError, atomic_write, write_json  # noqa: E402
from imaging.readers import label_dtype  # noqa: E402
from model import (  # noqa: E402
    checkpoint_sliding,
    flipped_probabilities,
    inference_amp,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    to_classes,
    use_amp,
)

log = logging.getLogger("crossval")

STEPS = ("network", "flips", "postprocessing", "flips+postprocessing")  # the rows of the report, per fold


def assign_folds(manifest: dict, folds: int, seed: int) -> dict[str, int]:
    """``{case name: fold}`` for the labelled cases that train or validate (never the test split), dealt by patient
    (``cases.deal_folds``)."""
    groups = {c["name"]: record_group(c) for c in manifest["cases"] if c.get("split") in ("train", "val")}
    patients = len(set(groups.values()))
    if not 2 <= folds <= patients:
        raise InputError(f"--folds {folds}: need 2 to {patients} folds for {patients} patients (groups) "
                         "of training and validation cases")
    return deal_folds(groups, folds, seed)


@dataclasses.dataclass(frozen=True)
class Judged:
    """A network (its ``model.pt``), or an ensemble whose probabilities are averaged (a seed ensemble's members),
    and its validation items (a fold's: never trained on)."""

    checkpoints: tuple[Path, ...]
    items: list[dict]
    fold: int = 0


@dataclasses.dataclass(frozen=True)
class Deciding:
    """How the validation cases are predicted for a decision, and what is decided: the networks on ``device`` in
    precision ``amp``, flips of the axes ``flips`` tried ((): none), the Dice also over ``regions``, and with
    ``postprocess`` the postprocessing rules."""

    device: torch.device
    amp: bool = False
    flips: tuple[int, ...] = FLIP_AXES
    regions: dict[str, Sequence[int]] | None = None
    postprocess: bool = True

    @classmethod
    def as_inferred(cls, device: torch.device, amp: bool | None, regions: dict | None = None,
                    postprocess: bool = True) -> Deciding:
        """The networks in the precision infer.py gives them (``amp`` as train.py's ``--amp``: None for the
        device's default); flips tried where postprocessing is decided."""
        return cls(device, use_amp(inference_amp(amp), device), FLIP_AXES if postprocess else (), regions,
                   postprocess)


def predict_validation(judged: Judged, cases: dict[str, dict], how: Deciding
                       ) -> Iterator[tuple[dict, np.ndarray, np.ndarray, np.ndarray]]:
    """Per validation item, one at a time: (manifest case, mask without flips, mask with ``how.flips``, true mask),
    label values on the prepared grid (D, H, W), predicted as inference predicts (the checkpoint's window and
    overlap; the networks' probabilities summed as they come, so that one volume's are held once or twice, not per
    network and flip)."""
    device, amp, flips = how.device, how.amp, how.flips
    ckpts = [load_checkpoint(p) for p in judged.checkpoints]
    nets = [model_from_checkpoint(c, p).to(device, memory_format=torch.channels_last_3d).eval()
            for c, p in zip(ckpts, judged.checkpoints)]
    ckpt = ckpts[0]
    values = np.asarray(ckpt["label_values"], dtype=label_dtype(max(ckpt["label_values"])))
    chain = make_dataset(judged.items, "val", ckpt["label_values"], AugmentParams(crop=tuple(ckpt["config"]["crop"])),
                         ckpt["model_args"]["in_channels"], PrepParams.from_dict(ckpt["prep_params"]), Caching(0.0))
    for item in chain:
        plain, every, n = None, None, 0
        for net in nets:
            for k, p in enumerate(flipped_probabilities(net, item["image"][None], checkpoint_sliding(ckpt, amp),
                                                        item["tissue"][None], flips)):
                if k == 0:
                    plain = p.clone() if plain is None else plain.add_(p)
                every, n = (p.clone() if every is None else every.add_(p)) if flips else None, n + 1
        means = (plain.div_(len(nets)), every.div_(n) if flips else plain)
        masks = [values[to_classes(p)[0, 0].cpu().numpy()] for p in means]
        del plain, every, means
        yield cases[item["name"]], *masks, values[np.asarray(item["label"][0])]


def nifti_on_disk(path: str | Path) -> OnDisk:
    """A label file's voxels, read when used (its shape and type from the header)."""
    header = nib.load(path)
    return OnDisk(lambda: np.asarray(nib.load(path).dataobj), header.shape, header.get_data_dtype())


def judge(judged: Sequence[Judged], manifest: dict, train_items: Sequence[dict], how: Deciding,
          scratch: Path | None = None) -> dict:
    """Predict every network's validation cases, decide flips (of the axes ``how.flips``) then, with
    ``how.postprocess``, the postprocessing rules on the pooled predictions, and score each fold under each step;
    returns the record (``postprocessing.json``; its ``folds`` feed cv.csv). Each predicted mask waits in a file in
    ``scratch`` (a run's output; None: the system's temporary folder) until it is scored, and each training mask is
    read once for its objects' sizes, so that memory holds a few volumes, not every fold's."""
    flips = how.flips
    t0, labels = time.perf_counter(), manifest["label_values"]
    cases = {c["name"]: c for c in manifest["cases"]}
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".decision-") as tmp:
        units: dict[int, dict[bool, list[Unit]]] = {}
        for j in judged:
            entries = [(c, *(OnDisk.saved(m, Path(tmp)) for m in masks))
                       for c, *masks in predict_validation(j, cases, how)]
            units[j.fold] = {mirrored: [spilled(u, Path(tmp)) for u in stack_units(
                [(c, (m1 if mirrored else m0), t) for c, m0, m1, t in entries])] for mirrored in (False, True)}
        pooled = {m: [u for fold in units.values() for u in fold[m]] for m in (False, True)}
        per_label = [(v,) for v in labels[1:]]
        plain, mirrored = (unit_scores(pooled[m], per_label) for m in (False, True))
        # The network saw these flips in training, as nnU-Net's always mirrors: a few validation cases cannot tell a
        # small gain or loss from their noise, so only a loss beyond chance refuses them (see docs/experiments.md,
        # "Test-time flips").
        use_flips = bool(flips) and not refuted(plain, mirrored)
        truths = [(cases[i["name"]], nifti_on_disk(i["label"]), None) for i in train_items]
        table = object_table(((mask, mm3) for mask, _, mm3 in stack_units(truths)), labels[1:])
        small, single = small_sizes(table), single_object(table)
        rules, trace = decide(pooled[use_flips], labels[1:], small, single) if how.postprocess else ([], [])
        targets = scored_targets(labels, how.regions)
        folds = {fold: fold_scores(u, targets, rules) for fold, u in units.items()}
    return {"rules": rules, "flips": list(flips) if use_flips else [], "trace": trace,
            "flips_dice": {"without": round(float(plain.mean()), 6), "with": round(float(mirrored.mean()), 6),
                           "axes_tried": list(flips)},
            "validation_units": len(pooled[False]),
            "small_mm3": {",".join(map(str, k)): v for k, v in small.items()},
            "one_object": [",".join(map(str, k)) for k in single],
            "folds": folds, "targets": targets,
            "seconds": round(time.perf_counter() - t0, 1)}


def spilled(unit: Unit, folder: Path) -> Unit:
    """A unit with its masks in files: those in memory (a patient's stacked slices) saved in ``folder``."""
    pred, truth, mm3 = unit
    return (*(m if m is None or isinstance(m, OnDisk) else OnDisk.saved(m, folder) for m in (pred, truth)), mm3)


def fold_scores(units: dict[bool, list[Unit]], targets: dict[str, list[int]], rules: list[dict]
                ) -> dict[str, list[list[float]]]:
    """Per step (``STEPS``), the Dice of each unit (volume or patient) for each target: {step: [[...], ...]}."""
    out = {}
    for step in STEPS:
        mirrored, post = "flips" in step, "postprocessing" in step
        out[step] = unit_scores(units[mirrored], list(targets.values()), rules if post else []).tolist()
    return out


def decide_run(out_dir: Path, manifest: dict, train_items: Sequence[dict], val_items: Sequence[dict], how: Deciding,
               checkpoints: Sequence[Path] | None = None) -> dict:
    """The decision of one run (no folds): its network (``out_dir/model.pt``) or the ensemble ``checkpoints``
    (a seed ensemble's members, averaged) judged on its validation items, then ``write_decision``; returns the
    record."""
    checkpoints = list(checkpoints or [out_dir / "model.pt"])
    record = judge([Judged(tuple(checkpoints), list(val_items))], manifest, train_items, how, out_dir)
    write_decision(record, checkpoints, out_dir)
    return record


def write_decision(record: dict, checkpoints: Sequence[Path], out_dir: Path) -> None:
    """The decision into each checkpoint judged, and the checkpoint ``model.pt`` copies (``last.pt`` for the final
    epoch, ``best.pt`` for the best), and ``out_dir/postprocessing.json``."""
    kept = {k: v for k, v in record.items() if k != "folds"}
    for path in checkpoints:
        ckpt = load_checkpoint(path)
        save_checkpoint({**ckpt, "postprocessing": kept}, path)
        twin = path.parent / ("best.pt" if ckpt.get("selected") == "best" else "last.pt")
        if twin.is_file():
            save_checkpoint({**load_checkpoint(twin), "postprocessing": kept}, twin)
    write_json(kept, out_dir / "postprocessing.json")
    for row in record["trace"]:
        log.info("postprocessing: %s: Dice %.4f → %.4f%s", row["rule"], row["dice_before"], row["dice_after"],
                 " (kept)" if row["kept"] else "")
    f = record["flips_dice"]
    log.info("test-time flips of axes %s: Dice %.4f → %.4f (%s)", f["axes_tried"], f["without"], f["with"],
             "kept: expected unless validation refutes them" if record["flips"] else "refuted by validation"
             if f["axes_tried"] else "not tried")
    log.info("decided on %d validation units in %.1f s: flips %s, postprocessing %s", record["validation_units"],
             record["seconds"], record["flips"] or "none", record["rules"] or "none")


def report(record: dict, out_dir: Path) -> list[dict]:
    """``cv.csv``: per fold, then mean and standard deviation over folds and pooled over all units, the mean Dice
    over units of each target under each step; ``cv.png``: the mean Dice per fold and step. Returns the rows."""
    names = list(record["targets"])
    rows = []
    folds = sorted(record["folds"])
    chosen_step = chosen(record)
    for step in STEPS:
        taken = step == chosen_step
        per_fold = {k: np.asarray(record["folds"][k][step]) for k in folds}
        means = {k: a.mean(0) for k, a in per_fold.items()}
        for k in folds:
            rows.append(cv_row(str(k), step, taken, len(per_fold[k]), means[k], names))
        stacked = np.stack([means[k] for k in folds])
        rows.append(cv_row("mean", step, taken, len(folds), stacked.mean(0), names))
        rows.append(cv_row("std", step, taken, len(folds), stacked.std(0), names))
        rows.append(cv_row("pooled", step, taken, sum(len(a) for a in per_fold.values()),
                           np.concatenate(list(per_fold.values())).mean(0), names))
    with atomic_write(out_dir / "cv.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, folds, out_dir / "cv.png")
    for row in rows:
        if row["fold"] in ("mean", "pooled"):
            log.info("cross-validation %s, %s: Dice %s%s", row["fold"], row["step"], row["dice"],
                     " (what inference does)" if row["chosen"] == "yes" else "")
    return rows


def chosen(record: dict) -> str:
    """The step that inference takes: ``network``, ``flips``, ``postprocessing`` or both."""
    return "+".join(s for s, on in (("flips", record["flips"]), ("postprocessing", record["rules"])) if on) or "network"


def cv_row(fold: str, step: str, taken: bool, units: int, dice: np.ndarray, names: list[str]) -> dict:
    """One line of cv.csv: the mean over labels (regions left out) and each target's Dice."""
    n_labels = sum(name.isdigit() for name in names)
    return {"fold": fold, "step": step, "chosen": "yes" if taken else "", "units": units,
            "dice": round(float(dice[:n_labels].mean()), 4),
            **{f"dice_{name}": round(float(d), 4) for name, d in zip(names, dice)}}


def plot(rows: list[dict], folds: list[int], path: Path) -> None:
    """Bars of the mean Dice per fold (and pooled), one bar per step."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * (len(folds) + 1)), 3.5))
    width = 0.8 / len(STEPS)
    columns = [str(k) for k in folds] + ["pooled"]
    for i, step in enumerate(STEPS):
        dice = {r["fold"]: r["dice"] for r in rows if r["step"] == step}
        ax.bar(np.arange(len(columns)) + (i - 1.5) * width, [dice[c] for c in columns], width, label=step)
    ax.set_xticks(np.arange(len(columns)), [f"fold {c}" if c.isdigit() else c for c in columns])
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
