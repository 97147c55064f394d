"""Segment volumes with a trained checkpoint; masks are written on each input's own grid.

    python infer.py volume.nii.gz [more.nii.gz | folder ...] [--checkpoint output/best.pt] [--out output]
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.metrics import compute_hausdorff_distance
from monai.transforms import Compose, Invertd

from dataset import (
    LABEL_SUFFIXES,
    ArgumentParser,
    InputError,
    PrepParams,
    as_label_map,
    atomic_write,
    case_name,
    check_image,
    dicom_dir,
    prepare_transforms,
    read_volume,
    volume_suffix,
    write_nifti,
)
from dice import dice_binary
from model import load_checkpoint, model_from_checkpoint

log = logging.getLogger("infer")


# ---------------------------------------------------------------- prediction on the prepared grid


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it (no loss scaling needed), else fp16."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """Mixed precision on CUDA when asked; never on the CPU (no native bf16 on common CPUs: many times slower)."""
    on = enabled and device.type == "cuda"
    return torch.autocast(device.type, dtype=amp_dtype(device) if on else torch.bfloat16, enabled=on)


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, image: torch.Tensor, roi: Sequence[int], overlap: float = 0.75,
                   sw_batch_size: int = 4, amp: bool = False) -> torch.Tensor:
    """Gaussian-weighted sliding-window logits (B, K, D, H, W) for an image (B, C, D, H, W) on the model's device."""
    device = next(model.parameters()).device
    with autocast(device, amp):
        logits = sliding_window_inference(image.to(device), tuple(roi), sw_batch_size, model, overlap=overlap,
                                          mode="gaussian")
    return logits.float()


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid for one output channel (binary), softmax otherwise; same shape (B, K, D, H, W)."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def to_classes(probs: torch.Tensor) -> torch.Tensor:
    """Class indices (B, 1, D, H, W) from probabilities (B, K, D, H, W): threshold 0.5 or argmax."""
    if probs.shape[1] == 1:
        return (probs > 0.5).to(torch.uint8)
    return probs.argmax(dim=1, keepdim=True).to(torch.uint8)


# ---------------------------------------------------------------- back to the input's grid


def invert_to_original(probs: torch.Tensor, image: MetaTensor, chain: Compose) -> torch.Tensor:
    """Map probabilities (K, D, H, W) on the prepared grid back to the input's (K, X, Y, Z) grid.

    ``Invertd`` undoes ``chain`` (crop → pad with zeros, in-plane downsampling → trilinear upsampling,
    reorientation → the file's axis order) using the operations recorded on ``image``.
    """
    pred = MetaTensor(probs.detach().cpu(), meta=dict(image.meta))
    pred.applied_operations = list(image.applied_operations)
    inverter = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=False, to_tensor=True)
    return torch.as_tensor(inverter({"pred": pred, "image": image})["pred"])


def segment_file(path: Path, model: torch.nn.Module, ckpt: dict, roi: Sequence[int], overlap: float,
                 sw_batch_size: int, amp: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mask (X, Y, Z) in label values on the file's own grid, and the file's affine (4, 4)."""
    params = PrepParams.from_dict(ckpt["prep_params"])
    raw = read_volume(path, params.channel)
    check_image(raw, path)
    if raw.shape[0] != ckpt["model_args"]["in_channels"]:
        raise InputError(f"{path}: has {raw.shape[0]} channel(s), the model takes {ckpt['model_args']['in_channels']}")
    chain = prepare_transforms(params, with_label=False)
    prepared = chain({"image": raw})["image"]
    probs = probabilities(predict_logits(model, prepared[None], roi, overlap, sw_batch_size, amp))[0]
    classes = to_classes(invert_to_original(probs, prepared, chain)[None])[0, 0]
    values = np.asarray(ckpt["label_values"])
    mask = values[classes.numpy()].astype(np.uint8 if values.max() < 256 else np.int16)
    return mask, np.asarray(raw.affine, dtype=np.float64)


def save_mask(mask: np.ndarray, affine: np.ndarray, source: Path, out_dir: Path) -> Path:
    """Write ``<stem>_mask.nii.gz``; NIfTI inputs lend their header so that the mask overlays them exactly."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = mask_path(source, out_dir)
    header = None
    if volume_suffix(source) in (".nii", ".nii.gz"):
        ref = nib.load(str(source))
        header, affine = ref.header.copy(), ref.affine
    write_nifti(mask, affine, out, header=header)
    return out


def mask_path(source: Path, out_dir: Path) -> Path:
    """``out_dir/<input stem>_mask.nii.gz``: a file name only, so it cannot point outside ``out_dir``."""
    return out_dir / f"{Path(case_name(source)).name}_mask.nii.gz"


def voxel_size(shape: Sequence[int], affine: np.ndarray) -> tuple[str, float]:
    """("mm2", pixel area) for a single slice, where an area means more than a volume; else ("ml", voxel mL)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if 1 in shape:
        return "mm2", float(np.prod(spacing[np.asarray(shape) > 1]))
    return "ml", abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


def evaluate_case(mask: np.ndarray, truth: np.ndarray, affine: np.ndarray, labels: Sequence[int]) -> dict:
    """Per foreground label: Dice, IoU, 95th-percentile Hausdorff distance (mm), predicted and true size
    (mL, or mm² for a single slice); masks (X, Y, Z) in label values on the same grid."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    unit, per_voxel = voxel_size(mask.shape, affine)
    row: dict[str, float] = {}
    for v in labels[1:]:
        p, t = mask == v, truth == v
        row[f"dice_{v}"] = float(dice_binary(p[None, None], t[None, None]))
        union = int((p | t).sum())
        row[f"iou_{v}"] = 1.0 if union == 0 else float((p & t).sum() / union)
        row[f"hd95_mm_{v}"] = float("nan")
        if p.any() and t.any():
            row[f"hd95_mm_{v}"] = float(compute_hausdorff_distance(
                torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None], percentile=95,
                spacing=spacing.tolist()))
        row[f"pred_{unit}_{v}"], row[f"true_{unit}_{v}"] = float(p.sum() * per_voxel), float(t.sum() * per_voxel)
    return row


class PatientDice:
    """Dice over all of a patient's slices stacked (as the LGG literature reports), accumulated slice by slice."""

    def __init__(self, labels: Sequence[int]) -> None:
        self.labels = list(labels)[1:]
        self.counts: dict[str, np.ndarray] = {}  # patient → (labels, [intersection, predicted, true, slices])

    def add(self, patient: str, mask: np.ndarray, truth: np.ndarray) -> None:
        counts = self.counts.setdefault(patient, np.zeros((len(self.labels), 4), np.int64))
        for row, v in zip(counts, self.labels):
            p, t = mask == v, truth == v
            row += [int((p & t).sum()), int(p.sum()), int(t.sum()), 1]

    def rows(self) -> dict[str, dict[str, float]]:
        """Per patient with at least two slices: ``dice_<label>`` (1.0 when nothing to find and none found)."""
        out = {}
        for patient, counts in self.counts.items():
            if counts[0, 3] < 2:
                continue
            out[patient] = {"slices": float(counts[0, 3])}
            for (inter, pred, true, _), v in zip(counts, self.labels):
                out[patient][f"dice_{v}"] = 1.0 if pred + true == 0 else 2.0 * inter / (pred + true)
        return out


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


def volume_ml(mask: np.ndarray, affine: np.ndarray) -> float:
    """Foreground volume in mL (voxel count × voxel volume in mm³ / 1000)."""
    return float((mask > 0).sum() * abs(np.linalg.det(affine[:3, :3])) / 1000.0)


# ---------------------------------------------------------------- command line


def expand_inputs(items: Sequence[str]) -> list[Path]:
    """Files as given, a DICOM folder as one series, other folders as the images they hold (not ``_seg`` …)."""
    paths: list[Path] = []
    for item in map(Path, items):
        if item.is_dir() and dicom_dir(item):
            paths.append(item)  # one DICOM series
        elif item.is_dir():
            found = sorted(p for p in item.iterdir() if volume_suffix(p) and not case_name(p).endswith(LABEL_SUFFIXES))
            if not found:
                raise InputError(f"{item}: folder holds no volumes")
            paths += found
        elif not item.is_file():
            raise InputError(f"{item}: no such file")
        elif not volume_suffix(item):
            raise InputError(f"{item}: unsupported file type (use .nii.gz, .nii, .nrrd, .mha or .mhd)")
        else:
            paths.append(item)
    return paths


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(__doc__)
    p.add_argument("inputs", nargs="+", help="volumes (.nii.gz, .nii, .nrrd, .mha), DICOM series folders, or folders")
    p.add_argument("--checkpoint", default="output/best.pt")
    p.add_argument("--out", default="output", help="folder for <input stem>_mask.nii.gz")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--roi", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="sliding-window size (default: the checkpoint's)")
    p.add_argument("--overlap", type=float, default=None, help="window overlap (default: the checkpoint's, 0.75)")
    p.add_argument("--sw-batch-size", type=int, default=4)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
    p.add_argument("--overwrite", action="store_true", help="replace masks that exist already")
    p.add_argument("--labels", nargs="+", default=None, metavar="MASK",
                   help="true masks, one per input in order: writes evaluation.csv (Dice, IoU, HD95, sizes)")
    args = p.parse_args(argv)
    if args.overlap is not None and not 0 <= args.overlap < 1:
        p.error("--overlap must be in [0, 1)")
    if args.sw_batch_size < 1 or (args.roi and min(args.roi) < 1):
        p.error("--sw-batch-size and --roi must be positive")
    return args


def run(config: argparse.Namespace) -> list[tuple[Path, float]]:
    """Segment every input; returns (mask path, foreground mL) per input."""
    paths = expand_inputs(config.inputs)
    device = resolve_device(config.device)
    out_dir = Path(config.out)
    targets = [mask_path(p, out_dir) for p in paths]
    existing = [t for t in targets if t.exists()]
    if existing and not config.overwrite:
        raise InputError(f"{existing[0]}: mask exists already (pass --overwrite to replace it)")
    if len(set(targets)) < len(targets):
        raise InputError(f"{out_dir}: two inputs would write the same mask name; segment them separately")
    ckpt = load_checkpoint(Path(config.checkpoint))
    model = model_from_checkpoint(ckpt, Path(config.checkpoint)).to(device).eval()
    roi = config.roi or ckpt["inference"]["roi"]
    overlap = ckpt["inference"]["overlap"] if config.overlap is None else config.overlap
    truths = [Path(t) for t in config.labels or []]
    if truths and len(truths) != len(paths):
        raise InputError(f"--labels: {len(truths)} masks for {len(paths)} inputs; give one mask per input, in order")
    results, scores, patients = [], {}, PatientDice(ckpt["label_values"])
    for k, path in enumerate(paths):
        mask, affine = segment_file(path, model, ckpt, roi, overlap, config.sw_batch_size, config.amp)
        if truths:
            truth = as_label_map(read_volume(truths[k]), truths[k])[0].numpy().astype(np.int64)
            if truth.shape != mask.shape:
                raise InputError(f"{truths[k]}: shape {truth.shape} differs from {path}'s {mask.shape}")
            scores[case_name(path)] = evaluate_case(mask, truth, affine, ckpt["label_values"])
            if 1 in mask.shape:  # a slice: it also counts towards its folder's (patient's) Dice
                patients.add(path.parent.name, mask, truth)
        out = save_mask(mask, affine, path, out_dir)
        results.append((out, volume_ml(mask, affine)))
        unit, per_voxel = voxel_size(mask.shape, affine)
        shown = {"ml": "mL", "mm2": "mm²"}[unit]
        log.info("%s: %.2f %s segmented → %s", path, (mask > 0).sum() * per_voxel, shown, out)
    if scores:
        mean = write_evaluation(scores, out_dir / "evaluation.csv")
        dice = np.nanmean([v for k, v in mean.items() if k.startswith("dice_")])
        log.info("evaluation: mean Dice %.4f over %d cases → %s", dice, len(scores), out_dir / "evaluation.csv")
    if patients.rows():
        mean = write_evaluation(patients.rows(), out_dir / "evaluation_patients.csv")
        dice = np.nanmean([v for k, v in mean.items() if k.startswith("dice_")])
        log.info("evaluation: mean per-patient Dice %.4f over %d patients → %s", dice, len(patients.rows()),
                 out_dir / "evaluation_patients.csv")
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(parse_args(argv))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
