"""Segment volumes with a trained checkpoint; masks are written on each input's own grid.

    python infer.py volume.nii.gz [more.nii.gz | folder ...] [--checkpoint output] [--out output]

``--checkpoint`` takes checkpoints or train.py output folders (the checkpoints their models.json lists: model.pt, a
cross-validation's folds or a seed ensemble's members); several networks average their probabilities.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from tqdm import tqdm

from dataset import PrepParams
from dice import dice_binary, dice_from_counts, mean_dice, overlap_counts, scored_targets
from imaging.cases import Case, cases_from_manifest, find_inputs, patient_units, read_case, with_truth
from imaging.common import ArgumentParser, InputError, atomic_write, region_arg, run_command
from imaging.readers import (
    MASK_FORMATS,
    is_2d,
    is_blank,
    mask_suffix,
    segmented_size,
    spacing_mm,
    voxel_size,
    write_mask,
)
from inference.onnx_engine import export_onnx
from inference.overlays import write_overlay
from inference.segmenter import Given, checkpoint_paths, load_segmenter, mask_path, postprocess_unit

log = logging.getLogger("infer")


# ---------------------------------------------------------------- a mask on the input's grid


def mask_targets(cases: Sequence[Case], out_dir: Path, forced: str | None = None) -> list[Path]:
    """Where each case's mask goes, in its input's format (``forced``: one for all): ``out_dir/<case>_mask.<ext>``;
    cases that share a name keep the folders that tell them apart (``out_dir/a/scan_mask.nii.gz``,
    ``out_dir/b/scan_mask.nii.gz``), so that no two masks collide."""
    targets = [mask_path(Path(c.name), out_dir, mask_suffix(c.image, forced)) for c in cases]
    parents = [c.image.resolve().parent for c in cases]
    out = list(targets)
    clashes: dict[Path, list[int]] = {}
    for k, target in enumerate(targets):
        clashes.setdefault(target, []).append(k)
    for target, clash in clashes.items():
        if len(clash) > 1:
            root = Path(os.path.commonpath([parents[k] for k in clash]))
            for k in clash:
                out[k] = out_dir / parents[k].relative_to(root) / target.name
    return out


def evaluate_case(mask: np.ndarray, truth: np.ndarray, affine: np.ndarray, labels: Sequence[int],
                  regions: dict[str, Sequence[int]] | None = None) -> dict:
    """Per foreground label, and per region (a union of labels), on masks (X, Y, Z) in label values on one grid:
    Dice, IoU, 95th-percentile Hausdorff distance (mm), predicted and true size (mL, or mm² for a single slice)."""
    spacing = spacing_mm(affine)
    unit, per_voxel = voxel_size(mask.shape, affine)
    row: dict[str, float] = {}
    for key, values in scored_targets(labels, regions).items():
        p, t = np.isin(mask, values), np.isin(truth, values)
        row[f"dice_{key}"] = float(dice_binary(p[None, None], t[None, None]))
        union = int((p | t).sum())
        row[f"iou_{key}"] = 1.0 if union == 0 else float((p & t).sum() / union)
        row[f"hd95_mm_{key}"] = float("nan")
        if p.any() and t.any():
            with warnings.catch_warnings():  # MONAI warns about its own internal call to get_mask_edges
                warnings.simplefilter("ignore", FutureWarning)
                row[f"hd95_mm_{key}"] = float(compute_hausdorff_distance(
                    torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None], percentile=95,
                    spacing=spacing.tolist()))
        row[f"pred_{unit}_{key}"], row[f"true_{unit}_{key}"] = float(p.sum() * per_voxel), float(t.sum() * per_voxel)
    return row


class PatientDice:
    """Dice over all of a patient's slices stacked (as the LGG literature reports), accumulated slice by slice."""

    def __init__(self, labels: Sequence[int], regions: dict[str, Sequence[int]] | None = None) -> None:
        self.targets = scored_targets(labels, regions)
        self.counts: dict[str, torch.Tensor] = {}  # patient → (targets, [intersection, predicted, true])
        self.slices: dict[str, int] = {}

    def add(self, patient: str, mask: np.ndarray, truth: np.ndarray) -> None:
        counts = overlap_counts(mask, truth, list(self.targets.values()))
        self.counts[patient] = self.counts.get(patient, 0) + counts
        self.slices[patient] = self.slices.get(patient, 0) + 1

    def rows(self) -> dict[str, dict[str, float]]:
        """Per patient with at least two slices: ``dice_<label>`` (1.0 when nothing to find and none found)."""
        return {patient: {"slices": float(self.slices[patient]),
                          **{f"dice_{key}": float(d) for key, d in zip(self.targets, dice_from_counts(counts))}}
                for patient, counts in self.counts.items() if self.slices[patient] >= 2}


def write_evaluation(rows: dict[str, dict], path: Path) -> dict[str, float]:
    """``evaluation.csv``: one row per case, then ``mean`` and ``median`` rows (NaN-aware); returns the mean."""
    columns = list(next(iter(rows.values())))
    table = np.array([[r.get(c, np.nan) for c in columns] for r in rows.values()], dtype=float)
    with warnings.catch_warnings():  # a column that is all NaN (no case had both masks) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        summary = {"mean": np.nanmean(table, axis=0), "median": np.nanmedian(table, axis=0)}
    lines = [",".join(["case", *columns])]
    lines += [",".join([name, *(f"{v:.6g}" for v in row)]) for name, row in zip(rows, table)]
    lines += [",".join([name, *(f"{v:.6g}" for v in values)]) for name, values in summary.items()]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return dict(zip(columns, summary["mean"].tolist()))


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(__doc__)
    p.add_argument("inputs", nargs="*", help="images (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd, .tif, .tiff, .png, "
                   ".bmp), DICOM series folders, case folders (one file per modality), or folders of these")
    p.add_argument("--checkpoint", nargs="+", default=["output"], metavar="CKPT",
                   help="train.py checkpoints or output folders (a folder: the ensemble of its cross-validation "
                        "folds, or its model.pt); several are an ensemble that averages probabilities")
    p.add_argument("--out", default="output", help="folder for <case>_mask.nii.gz, evaluation.csv, overlays/")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--window", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="sliding-window size (default: the checkpoint's)")
    p.add_argument("--overlap", type=float, default=None, help="window overlap (default: the checkpoint's, 0.75)")
    p.add_argument("--sw-batch-size", type=int, default=None,
                   help="windows per network pass (default: 2 on the CPU, 4 on a GPU)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision: on CUDA, and bf16 on a CPU that has it in hardware")
    p.add_argument("--overwrite", action="store_true", help="replace masks that exist already")
    p.add_argument("--resume", action="store_true", help="keep the masks that exist already (a mask is written "
                   "whole or not at all) and segment the other inputs")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time flips (in-plane, as in training): averaged over every combination; default: as "
                        "train.py decided on validation (recorded in the checkpoint)")
    p.add_argument("--no-postprocess", action="store_true",
                   help="leave out the postprocessing the checkpoint holds (train.py decides it on validation)")
    p.add_argument("--truth", nargs="+", default=None, metavar="MASK",
                   help="true masks, one per input in order: writes evaluation.csv (Dice, IoU, HD95, sizes)")
    p.add_argument("--evaluate", default=None, metavar="PREP",
                   help="segment and score the --split cases of a prepared dataset (instead of INPUTS)")
    p.add_argument("--split", choices=["val", "test", "train"], default="val", help="which cases --evaluate takes")
    p.add_argument("--regions", type=region_arg, nargs="+", default=None, metavar="NAME=V,V",
                   help="label unions also scored (default: the checkpoint's; BraTS: WT=1,2,3,4 TC=1,3,4 ET=4)")
    p.add_argument("--format", choices=MASK_FORMATS, default=None,
                   help="mask file format (default: the input's own: NIfTI, NRRD, MHA, PNG, BMP, TIFF; DICOM: NIfTI)")
    p.add_argument("--overlays", action="store_true",
                   help="also write OUT/overlays/<case>.png: image, predicted mask, true outline")
    p.add_argument("--engine", choices=["torch", "onnx"], default="torch",
                   help="onnx: --checkpoint is a .onnx file from --export-onnx, run by ONNX Runtime on the CPU")
    p.add_argument("--export-onnx", default=None, metavar="FILE",
                   help="write the checkpoint's network as ONNX (metadata included), check it against PyTorch, stop")
    args = p.parse_args(argv)
    if args.export_onnx and (args.inputs or args.evaluate or args.engine == "onnx"):
        p.error("--export-onnx takes a --checkpoint (.pt) and nothing to segment")
    if not args.export_onnx and bool(args.inputs) == bool(args.evaluate):
        p.error("give input volumes or --evaluate PREP, not both (nor neither)")
    if args.evaluate and args.truth:
        p.error("--evaluate takes the true masks from the manifest; leave out --truth")
    if args.resume and (args.overwrite or args.truth or args.evaluate):
        p.error("--resume keeps the masks written and scores none of them: not with --overwrite, --truth or "
                "--evaluate")
    if args.overlap is not None and not 0 <= args.overlap < 1:
        p.error("--overlap must be in [0, 1)")
    if (args.sw_batch_size is not None and args.sw_batch_size < 1) or (args.window and min(args.window) < 1):
        p.error("--sw-batch-size and --window must be positive")
    return args


def input_cases(config: argparse.Namespace, ckpt: dict) -> list[Case]:
    """The cases to segment: the inputs (with ``--truth`` masks, in order) or a prepared dataset's split."""
    if config.evaluate:
        return cases_from_manifest(Path(config.evaluate), config.split)
    cases = find_inputs(config.inputs, ckpt.get("channels"), bool(ckpt.get("stack_slices")), skip=[Path(config.out)])
    truths = [Path(t) for t in config.truth or []]
    if truths and len(truths) != len(cases):
        raise InputError(f"--truth: {len(truths)} masks for {len(cases)} inputs; give one mask per input, in order")
    return [with_truth(c, t) for c, t in zip(cases, truths)] if truths else cases


def check_outputs(targets: Sequence[Path], cases: Sequence[Case], out_dir: Path, config: argparse.Namespace
                  ) -> None:
    """Refuse before any work when the output folder is a file, a mask would land on an input or a truth file
    (whatever the options), or on a mask that exists (unless ``--overwrite`` replaces it or ``--resume`` keeps
    it)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: --out is a file, not a folder")
    inputs = {p.resolve() for c in cases for p in (*c.sources, *c.label_slices, *([c.label] if c.label else []))}
    onto = next((t for t in targets if t.resolve() in inputs), None)
    if onto is not None:
        raise InputError(f"{onto}: the mask would overwrite an input or truth file; choose another --out")
    existing = [t for t in targets if t.exists()]
    if existing and not (config.overwrite or config.resume):
        raise InputError(f"{existing[0]}: mask exists already (pass --overwrite to replace it, --resume to keep the "
                         "masks written and segment the rest)")
    if len(set(targets)) < len(targets):
        raise InputError(f"{out_dir}: two inputs would write the same mask name; segment them separately")


def model_regions(config: argparse.Namespace, labels: Sequence[int], ckpt: dict) -> dict[str, list[int]]:
    """The label unions to score: ``--regions``, else the checkpoint's; each must use the model's labels."""
    regions = dict(config.regions) if config.regions is not None else ckpt.get("regions") or {}
    unknown = sorted({v for values in regions.values() for v in values} - set(labels))
    if unknown:
        raise InputError(f"--regions: label values {unknown} are not among the model's labels {labels}")
    return regions


def run(config: argparse.Namespace) -> list[tuple[Path, float, str]]:
    """Segment every input; returns (mask path, segmented amount, its unit: mL or mm²) per input."""
    paths = checkpoint_paths(config.checkpoint)
    given = Given(config.window, config.overlap, config.sw_batch_size, config.amp, config.tta)
    segmenter = load_segmenter(paths, config.device, config.engine, given)
    log.info("%s; test-time flips %s; postprocessing %s", f"ensemble of {len(paths)} networks" if len(paths) > 1
             else f"network {paths[0]}", list(segmenter.flips) or "none",
             "off" if config.no_postprocess else list(segmenter.rules) or "none")
    cases = input_cases(config, segmenter.ckpt)
    out_dir = Path(config.out)
    targets = mask_targets(cases, out_dir, config.format)
    check_outputs(targets, cases, out_dir, config)
    done = {k for k, t in enumerate(targets) if config.resume and t.exists()}  # written atomically: complete
    if done:
        log.info("--resume: %d of %d masks exist already and are kept (not scored again)", len(done), len(cases))
    labels = segmenter.ckpt["label_values"]
    regions = model_regions(config, labels, segmenter.ckpt)
    channel = PrepParams.from_dict(segmenter.ckpt["prep_params"]).channel
    rules = [] if config.no_postprocess else list(segmenter.rules)
    scores, patients, results, blank, t0 = {}, PatientDice(labels, regions), [], 0, time.perf_counter()
    bar = tqdm(total=len(cases), desc="infer", unit="case", disable=None)  # quiet off a terminal
    bar.update(len(done))
    for unit in patient_units([(c.name, c.group) for c in cases]):
        if all(k in done for k in unit):
            continue
        raws = [read_case(cases[k], channel) for k in unit]
        blank += sum(is_blank(raw["image"]) for raw in raws)
        masks = segmenter.segment([(raw["image"], cases[k].image) for k, raw in zip(unit, raws)])
        bar.update(sum(k not in done for k in unit))
        masks = postprocess_unit(masks, [raw["image"].affine for raw in raws], rules)
        for k, raw, mask in zip(unit, raws, masks):
            case, out = cases[k], targets[k]
            affine = np.asarray(raw["image"].affine, dtype=np.float64)
            truth = raw["label"][0].numpy().astype(np.int64) if "label" in raw else None
            if truth is not None:
                scores[case.name] = evaluate_case(mask, truth, affine, labels, regions)
                if len(unit) > 1 and is_2d(mask.shape):  # one of a patient's slices: scored with them too
                    patients.add(case.group, mask, truth)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_mask(mask, affine, out, binary=list(labels) == [0, 1], source=case.image)
            if config.overlays:
                overlay = out_dir / "overlays" / f"{Path(case.name).name}.png"
                write_overlay(raw["image"], mask, truth, labels, overlay)
            amount, unit_name = segmented_size(mask, affine)
            results.append((out, amount, unit_name))
            log.info("%s: %.2f %s segmented → %s", case.sources[0], amount, unit_name, out)
    bar.close()
    totals: dict[str, float] = {}  # mL of volumes, mm² of single slices
    for _, amount, unit in results:
        totals[unit] = totals.get(unit, 0.0) + amount
    log.info("segmented %d cases in %.1f s: %s%s → %s", len(results), time.perf_counter() - t0,
             ", ".join(f"{a:.2f} {u}" for u, a in totals.items()),
             f"; {blank} blank images (constant: empty masks)" if blank else "", out_dir)
    report(scores, patients, labels, regions, out_dir)
    return results


def report(scores: dict[str, dict], patients: PatientDice, labels: Sequence[int], regions: dict, out_dir: Path
           ) -> None:
    """``evaluation.csv`` (per case) and ``evaluation_patients.csv`` (per patient's pooled slices), when scored."""
    if scores:
        mean = write_evaluation(scores, out_dir / "evaluation.csv")
        log.info("evaluation: mean Dice %.4f over %d cases → %s%s", mean_label_dice(mean, labels), len(scores),
                 out_dir / "evaluation.csv", region_text(mean, regions))
    if patients.rows():
        mean = write_evaluation(patients.rows(), out_dir / "evaluation_patients.csv")
        log.info("evaluation: mean per-patient Dice %.4f over %d patients → %s", mean_label_dice(mean, labels),
                 len(patients.rows()), out_dir / "evaluation_patients.csv")


def mean_label_dice(mean: dict[str, float], labels: Sequence[int]) -> float:
    """Mean over foreground labels (regions left out) of an evaluation's per-label mean Dice."""
    return mean_dice(mean[f"dice_{v}"] for v in list(labels)[1:])


def region_text(mean: dict[str, float], regions: dict) -> str:
    """``; regions WT 0.81, TC 0.62`` for the log, or nothing."""
    return "; regions " + ", ".join(f"{k} {mean[f'dice_{k}']:.4f}" for k in regions) if regions else ""


def export(config: argparse.Namespace) -> None:
    """``--export-onnx``: the checkpoint's network as ONNX, and how far ONNX Runtime is from PyTorch."""
    paths = checkpoint_paths(config.checkpoint)
    if len(paths) != 1:
        raise InputError(f"--export-onnx: exports one network, got {len(paths)} checkpoints; name one (a fold's)")
    diff = export_onnx(paths[0], Path(config.export_onnx))
    log.info("exported %s → %s; ONNX Runtime vs PyTorch on a random window: max abs difference %.3g (logits)",
             paths[0], config.export_onnx, diff)


def main(argv: list[str] | None = None) -> int:
    def command(config: argparse.Namespace) -> None:
        export(config) if config.export_onnx else run(config)
    return run_command(lambda: command(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
