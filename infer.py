"""Segment volumes with a trained checkpoint; masks are written on each input's own grid.

    python infer.py volume.nii.gz [more.nii.gz | folder ...] [--checkpoint output/best.pt] [--out output]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    NNUNET_CHANNEL,
    ORIENTATION,
    ArgumentParser,
    InputError,
    PrepParams,
    as_label_map,
    atomic_write,
    case_name,
    check_image,
    dicom_dir,
    is_case_label,
    match_channel,
    prepare_transforms,
    prepared_tissue,
    read_channels,
    read_stack,
    read_volume,
    region_arg,
    slice_number,
    volume_suffix,
    write_nifti,
)
from dice import dice_binary, dice_from_counts, overlap_counts
from model import axis_divisors, load_checkpoint, model_from_checkpoint, window_independent

log = logging.getLogger("infer")


# ---------------------------------------------------------------- prediction on the prepared grid


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it (no loss scaling needed), else fp16."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """Mixed precision on CUDA when asked; never on the CPU (no native bf16 on common CPUs: many times slower)."""
    on = enabled and device.type == "cuda"
    return torch.autocast(device.type, dtype=amp_dtype(device) if on else torch.bfloat16, enabled=on)


BACKGROUND_LOGIT = 12.0  # how sure a window without tissue is of background: sigmoid(-12) ≈ 6e-6


ONEDNN_MIN_SINGLE = 20480  # PyTorch's CPU convolution takes oneDNN for a batch of one only above this N·C·D·H


class Windows(torch.nn.Module):
    """The network as ``sliding_window_inference`` calls it, (N, C, d, h, w) windows → (N, K, d, h, w) logits.

    - With ``tissue`` the input's last channel marks tissue (``prepared_tissue``): a window without any gets
      certain-background logits instead of a network pass.
    - Windows run channels-last when the model's weights are (1.14× faster on the CPU, the layout cuDNN's 3D
      kernels prefer; mixing the two layouts is slower than either).
    - On the CPU a lone small window runs as a batch of two copies: for a batch of one whose N·C·D·H is at most
      20480, PyTorch (2.13) picks its slow unfold-and-GEMM 3D convolution over oneDNN (measured: the demo network
      on one 32×160×224 volume, 0.206 s for one copy, 0.075 s for two; per 48×96×96 window of the BraTS network
      231 ms alone, 69 ms in pairs).
    """

    def __init__(self, model: torch.nn.Module, out_channels: int, tissue: bool) -> None:
        super().__init__()
        self.model, self.out_channels, self.tissue = model, out_channels, tissue
        # A 3D convolution weight with several input channels (the layout of a 1-channel one is ambiguous).
        weight = next((p for p in model.parameters() if p.ndim == 5 and p.shape[1] > 1 and p.shape[2] > 1), None)
        last = weight is not None and weight.is_contiguous(memory_format=torch.channels_last_3d)
        self.layout = torch.channels_last_3d if last else torch.contiguous_format

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The network on windows (n, C, d, h, w), n ≥ 1."""
        if len(x) == 1 and x.device.type == "cpu" and x.shape[1] * x.shape[2] * x.shape[3] <= ONEDNN_MIN_SINGLE:
            return self.model(x.expand(2, *x.shape[1:]).contiguous(memory_format=self.layout))[:1]
        return self.model(x.contiguous(memory_format=self.layout))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        if not self.tissue:
            return self.run(windows)
        x, tissue = windows[:, :-1], windows[:, -1]
        keep = tissue.flatten(1).amax(1) > 0
        n_keep = int(keep.sum())  # one sync per window batch, not per voxel: decides whether the net runs
        if n_keep == len(keep):
            return self.run(x)
        out = torch.full((len(x), self.out_channels, *x.shape[2:]), -BACKGROUND_LOGIT, dtype=x.dtype,
                         device=x.device)
        if self.out_channels > 1:
            out[:, 0] = BACKGROUND_LOGIT
        if n_keep:
            kept = self.run(x[keep])
            out = out.to(kept.dtype)
            out[keep] = kept
        return out


def default_sw_batch_size(device: torch.device) -> int:
    """Windows per network pass: 2 on the CPU (measured, BraTS network: 69 ms per 48×96×96 window in pairs, 89 ms
    in fours, where the working set outgrows the caches), 4 on a GPU (MONAI's tutorials; not measured here)."""
    return 2 if device.type == "cpu" else 4


def fit_window(roi: Sequence[int], shape: Sequence[int], divisors: Sequence[int], shrink: bool = True
               ) -> tuple[int, ...]:
    """The window for a volume of ``shape`` (D, H, W): ``roi`` rounded up to the network's multiples and, with
    ``shrink``, no larger than the volume itself rounded up to them (a volume smaller than the window is one pass,
    not padded to the window)."""
    return tuple(min(-(-r // d) * d, -(-s // d) * d) if shrink else -(-r // d) * d
                 for r, s, d in zip(roi, shape, divisors))


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, image: torch.Tensor, roi: Sequence[int], overlap: float = 0.75,
                   sw_batch_size: int | None = None, amp: bool = False, tissue: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Gaussian-weighted sliding-window logits (B, K, D, H, W) for an image (B, C, D, H, W) on the model's device.

    ``roi`` is fitted to the image (``fit_window``); ``sw_batch_size`` windows per pass, by default the device's
    (``default_sw_batch_size``); with ``tissue`` (B, 1, D, H, W) the windows without any are skipped. Stitching
    happens on the model's device.
    """
    device = next(model.parameters()).device
    sw_batch_size = sw_batch_size or default_sw_batch_size(device)
    divisors = axis_divisors({"strides": model.strides}) if hasattr(model, "strides") else (1, 1, 1)
    # A batch-norm network gives the same answer in any window, so a small volume is one pass of its own size.
    # Instance norm's statistics include the zero padding that training crops of small volumes had, and that
    # the plain call gives them: its window stays the crop.
    window = fit_window(roi, image.shape[2:], divisors, shrink=window_independent(getattr(model, "norm", None)))
    x = image.to(device, non_blocking=True)
    if tissue is not None:
        x = torch.cat([x, tissue.to(device, x.dtype)], dim=1)
    predictor = Windows(model, getattr(model, "out_channels", 1), tissue is not None)
    with autocast(device, amp):
        logits = sliding_window_inference(x, window, sw_batch_size, predictor, overlap=overlap, mode="gaussian")
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


@dataclasses.dataclass(frozen=True)
class InferCase:
    """One input: its image files (one per input channel), its true mask when evaluating, its patient."""

    name: str
    sources: tuple[Path, ...]
    truth: Path | None = None
    group: str = ""  # slices of one group (a patient) are also scored together
    slices: bool = False  # sources are a patient's numbered 2D slices, stacked into one volume
    truth_slices: tuple[Path, ...] = ()


def segment_case(case: InferCase, model: torch.nn.Module, ckpt: dict, roi: Sequence[int], overlap: float,
                 sw_batch_size: int | None, amp: bool) -> tuple[np.ndarray, MetaTensor]:
    """Mask (X, Y, Z) in label values on the input's own grid, and the input as read (C, X, Y, Z) with its affine."""
    params = PrepParams.from_dict(ckpt["prep_params"])
    raw = read_stack(case.sources, params.channel) if case.slices else read_channels(case.sources, params.channel)
    for k, path in enumerate(case.sources if len(case.sources) > 1 and not case.slices else []):
        check_image(raw[k : k + 1], path)  # each modality file answers for its own content
    check_image(raw, case.sources[0].parent if case.slices else case.sources[0])
    if raw.shape[0] != ckpt["model_args"]["in_channels"]:
        raise InputError(f"{case.sources[0]}: has {raw.shape[0]} channel(s), the model takes "
                         f"{ckpt['model_args']['in_channels']}")
    chain = prepare_transforms(params, with_label=False)
    prepared = chain({"image": raw})["image"]
    tissue = prepared_tissue(prepared, params)[None]
    probs = probabilities(predict_logits(model, prepared[None], roi, overlap, sw_batch_size, amp, tissue))[0]
    classes = to_classes(invert_to_original(probs, prepared, chain)[None])[0, 0]
    values = np.asarray(ckpt["label_values"])
    mask = values[classes.numpy()].astype(np.uint8 if values.max() < 256 else np.int16)
    return mask, raw


def save_mask(mask: np.ndarray, affine: np.ndarray, source: Path, out_dir: Path, name: str | None = None) -> Path:
    """Write ``<name>_mask.nii.gz`` (name: the source's stem by default); NIfTI inputs lend their header so that
    the mask overlays them exactly."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = mask_path(Path(name) if name else source, out_dir)
    header = None
    if volume_suffix(source) in (".nii", ".nii.gz"):
        ref = nib.load(str(source))
        header, affine = ref.header.copy(), ref.affine
    write_nifti(mask, affine, out, header=header)
    return out


def mask_path(source: Path, out_dir: Path) -> Path:
    """``out_dir/<input stem>_mask.nii.gz`` (a case name works too): a file name only, so it cannot point outside
    ``out_dir``."""
    return out_dir / f"{Path(case_name(source)).name}_mask.nii.gz"


def voxel_size(shape: Sequence[int], affine: np.ndarray) -> tuple[str, float]:
    """("mm2", pixel area) for a single slice, where an area means more than a volume; else ("ml", voxel mL)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if 1 in shape:
        return "mm2", float(np.prod(spacing[np.asarray(shape) > 1]))
    return "ml", abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


def evaluate_case(mask: np.ndarray, truth: np.ndarray, affine: np.ndarray, labels: Sequence[int],
                  regions: dict[str, Sequence[int]] | None = None) -> dict:
    """Per foreground label, and per region (a union of labels), on masks (X, Y, Z) in label values on one grid:
    Dice, IoU, 95th-percentile Hausdorff distance (mm), predicted and true size (mL, or mm² for a single slice)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
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


def scored_targets(labels: Sequence[int], regions: dict[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """``{"1": [1], "2": [2], …, "WT": [1, 2, 3, 4]}``: each foreground label, then each region."""
    return {**{str(v): [v] for v in list(labels)[1:]}, **{k: list(v) for k, v in (regions or {}).items()}}


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


def volume_ml(mask: np.ndarray, affine: np.ndarray) -> float:
    """Foreground volume in mL (voxel count × voxel volume in mm³ / 1000)."""
    return float((mask > 0).sum() * abs(np.linalg.det(affine[:3, :3])) / 1000.0)


# ---------------------------------------------------------------- pictures


def write_overlay(image: MetaTensor, mask: np.ndarray, truth: np.ndarray | None, labels: Sequence[int], title: str,
                  path: Path) -> None:
    """PNG of the image (C, X, Y, Z) with the predicted mask as a translucent colour and the truth as an outline:
    a single slice as displayed, or for 3D the axial, coronal and sagittal planes through the lesion's centre."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from monai.transforms import Orientation

    # Reoriented like the network's input: (D, H, W) = inferior→superior, anterior→posterior, right→left.
    orient = Orientation(axcodes=ORIENTATION, labels=(("L", "R"), ("P", "A"), ("I", "S")))
    img = orient(MetaTensor(image.as_tensor(), affine=image.affine))
    spacing = np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0)
    grid = [np.asarray(orient(MetaTensor(torch.from_numpy(m.astype(np.int16))[None], affine=image.affine)))[0]
            if m is not None else None for m in (mask, truth)]
    pixels = np.asarray(img, dtype=np.float32)
    lo, hi = np.percentile(pixels, [0.5, 99.5], axis=(1, 2, 3), keepdims=True)
    pixels = np.clip((pixels - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    pixels = np.moveaxis(pixels, 0, -1) if pixels.shape[0] == 3 else pixels[0]  # RGB photographs stay in colour

    where = next((m for m in grid if m is not None and m.any()), None)
    centre = [int(round(c)) for c in np.argwhere(where > 0).mean(0)] if where is not None else [
        n // 2 for n in grid[0].shape]
    d, h, w = centre
    planes: list[tuple[str, tuple, float]] = [("axial", (d, slice(None), slice(None)), spacing[1] / spacing[2])]
    if grid[0].shape[0] > 1:  # coronal and sagittal: superior up
        planes += [("coronal", (slice(None, None, -1), h, slice(None)), spacing[0] / spacing[2]),
                   ("sagittal", (slice(None, None, -1), slice(None), w), spacing[0] / spacing[1])]
    colours = colormaps["tab10"](np.arange(10))
    cmap = ListedColormap([(0, 0, 0, 0), *[(*colours[i % 10][:3], 0.45) for i in range(len(labels) - 1)]])
    index = {v: i for i, v in enumerate(labels)}
    fig = Figure(figsize=(4 * len(planes), 4.4), dpi=100)
    FigureCanvasAgg(fig)
    for ax, (name, sl, aspect) in zip(fig.subplots(1, len(planes), squeeze=False)[0], planes):
        ax.imshow(pixels[sl], cmap="gray", aspect=aspect, interpolation="nearest")
        pred = np.vectorize(lambda v: index.get(int(v), 0))(grid[0][sl]) if grid[0][sl].any() else grid[0][sl] * 0
        ax.imshow(pred, cmap=cmap, vmin=0, vmax=len(labels) - 1, aspect=aspect, interpolation="nearest")
        if grid[1] is not None:
            for v in labels[1:]:
                if (grid[1][sl] == v).any():
                    ax.contour(grid[1][sl] == v, levels=[0.5], colors=[colours[(index[v] - 1) % 10]], linewidths=1)
        ax.set_title(name if len(planes) > 1 else "", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title + ("  (fill: prediction, line: truth)" if truth is not None else "  (fill: prediction)"),
                 fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")


# ---------------------------------------------------------------- command line


def expand_inputs(items: Sequence[str], channels: Sequence[str] | None = None, stacked: bool = False
                  ) -> list[InferCase]:
    """Inputs as cases. Files as given; a DICOM folder as one series; other folders as the images they hold (not
    ``_seg`` …). With a multi-modal checkpoint (``channels``): ``<case>_0000`` brings its ``_0001`` … (nnU-Net),
    and a folder holding the modality files (or a folder of such folders) is one case each (BraTS). With a model
    trained on stacked slices (``stacked``), a folder of numbered slices (or a folder of such) is one case each."""
    nnunet = bool(channels) and all(NNUNET_CHANNEL.match(f"x_{c}") for c in channels)
    cases: dict[tuple[Path, ...], InferCase] = {}
    for item in map(Path, items):
        if item.is_dir() and dicom_dir(item):
            found = [InferCase(item.name, (item,), group=item.parent.name)]  # one DICOM series
        elif item.is_dir() and stacked:
            found = [_stack_case(d) for d in _case_folders(item, "slices")]
        elif item.is_dir() and channels and not nnunet:
            found = [_case_folder(d, channels) for d in _case_folders(item, "volumes")]
        elif item.is_dir():
            files = sorted(p for p in item.iterdir() if volume_suffix(p) and not case_name(p).endswith(LABEL_SUFFIXES))
            if not files:
                raise InputError(f"{item}: folder holds no volumes")
            found = [_file_case(f, channels if nnunet else None) for f in files]
        elif not item.is_file():
            raise InputError(f"{item}: no such file")
        elif not volume_suffix(item):
            raise InputError(f"{item}: unsupported file type (use .nii.gz, .nii, .nrrd, .mha or .mhd)")
        else:
            found = [_file_case(item, channels if nnunet else None)]
        cases.update((c.sources, c) for c in found)  # an nnU-Net case named by each of its files is one case
    return list(cases.values())


def _stack_case(folder: Path) -> InferCase:
    """A patient's folder of numbered 2D slices (masks beside them left out), in slice order."""
    files = [p for p in folder.iterdir() if volume_suffix(p) and not case_name(p).endswith(LABEL_SUFFIXES)]
    unnumbered = next((p for p in files if slice_number(p) is None), None)
    if unnumbered:
        raise InputError(f"{unnumbered}: not a numbered slice (<patient>_<n>.tif); the model takes stacked slices")
    return InferCase(folder.name, tuple(sorted(files, key=slice_number)), group=folder.name, slices=True)


def _mask_slices(folder: Path, case: InferCase) -> tuple[Path, ...]:
    """The numbered masks (``<patient>_<n>_mask.tif``) in ``folder`` that match a stacked case's slices."""
    masks = {slice_number(p): p for p in (folder.iterdir() if folder.is_dir() else [])
             if volume_suffix(p) and case_name(p).endswith(LABEL_SUFFIXES)}
    wanted = [slice_number(p) for p in case.sources]
    missing = next((n for n in wanted if n not in masks), None)
    if missing is not None:
        raise InputError(f"{folder}: no mask for slice {missing} of {case.name} (give the folder of its masks)")
    return tuple(masks[n] for n in wanted)


def _case_folders(item: Path, what: str) -> list[Path]:
    """The case folder itself, or a folder of case folders (BraTS's test/, LGG's patients)."""
    folders = [item] if _holds_volumes(item) else [d for d in sorted(item.iterdir()) if _holds_volumes(d)]
    if not folders:
        raise InputError(f"{item}: folder holds no {what}")
    return folders


def _holds_volumes(folder: Path) -> bool:
    return folder.is_dir() and any(volume_suffix(p) for p in folder.iterdir())


def _case_folder(folder: Path, channels: Sequence[str]) -> InferCase:
    """A folder per case: its modality files in ``channels`` order (the label beside them is not an input)."""
    files = sorted(p for p in folder.iterdir() if volume_suffix(p) and not is_case_label(p))
    return InferCase(folder.name, tuple(match_channel(files, c, folder) for c in channels), group=folder.name)


def _file_case(path: Path, nnunet: Sequence[str] | None) -> InferCase:
    """One file, or with nnU-Net ``channels`` the ``<case>_0000``, ``<case>_0001`` … beside ``path``."""
    match = NNUNET_CHANNEL.match(case_name(path))
    if not nnunet:
        return InferCase(case_name(path), (path,), group=path.parent.name)
    if not match:
        raise InputError(f"{path}: the model takes channels {list(nnunet)}; name the files <case>_0000.nii.gz …")
    siblings = tuple(path.with_name(f"{match['case']}_{c}{volume_suffix(path)}") for c in nnunet)
    missing = next((s for s in siblings if not s.is_file()), None)
    if missing:
        raise InputError(f"{missing}: no such file (channel {case_name(missing)[-4:]} of case {match['case']})")
    return InferCase(match["case"], siblings, group=path.parent.name)


def cases_from_manifest(prep_dir: Path, split: str) -> list[InferCase]:
    """The ``split`` cases of a prepared dataset, as their original files with their true masks."""
    path = prep_dir / "dataset.json"
    try:
        manifest = json.loads(path.read_text())
        records = [r for r in manifest["cases"] if r.get("split") == split and r.get("label")]
        cases = [InferCase(r["name"], tuple(Path(p) for p in r.get("slices") or r.get("images") or [r["image"]]),
                           Path(r["label"]), r.get("group", ""), "slices" in r,
                           tuple(Path(p) for p in r.get("label_slices", []))) for r in records]
    except FileNotFoundError:
        raise InputError(f"{path}: no manifest (run preprocess.py first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a manifest written by preprocess.py ({type(exc).__name__}: {exc})") from None
    if not cases:
        raise InputError(f"{path}: no labelled {split!r} cases to evaluate")
    return cases


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(__doc__)
    p.add_argument("inputs", nargs="*", help="volumes (.nii.gz, .nii, .nrrd, .mha, .tif, .bmp, .png), DICOM series "
                   "folders, case folders (one file per modality), or folders of these")
    p.add_argument("--checkpoint", default="output/best.pt")
    p.add_argument("--out", default="output", help="folder for <case>_mask.nii.gz, evaluation.csv, overlays/")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--roi", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="sliding-window size (default: the checkpoint's)")
    p.add_argument("--overlap", type=float, default=None, help="window overlap (default: the checkpoint's, 0.75)")
    p.add_argument("--sw-batch-size", type=int, default=None,
                   help="windows per network pass (default: 2 on the CPU, 4 on a GPU)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
    p.add_argument("--overwrite", action="store_true", help="replace masks that exist already")
    p.add_argument("--labels", nargs="+", default=None, metavar="MASK",
                   help="true masks, one per input in order: writes evaluation.csv (Dice, IoU, HD95, sizes)")
    p.add_argument("--evaluate", default=None, metavar="PREP",
                   help="segment and score the --split cases of a prepared dataset (instead of INPUTS)")
    p.add_argument("--split", choices=["val", "test", "train"], default="val", help="which cases --evaluate takes")
    p.add_argument("--regions", type=region_arg, nargs="+", default=None, metavar="NAME=V,V",
                   help="label unions also scored (default: the checkpoint's; BraTS: WT=1,2,3,4 TC=1,3,4 ET=4)")
    p.add_argument("--overlays", action="store_true",
                   help="also write OUT/overlays/<case>.png: image, predicted mask, true outline")
    args = p.parse_args(argv)
    if bool(args.inputs) == bool(args.evaluate):
        p.error("give input volumes or --evaluate PREP, not both (nor neither)")
    if args.evaluate and args.labels:
        p.error("--evaluate takes the true masks from the manifest; leave out --labels")
    if args.overlap is not None and not 0 <= args.overlap < 1:
        p.error("--overlap must be in [0, 1)")
    if (args.sw_batch_size is not None and args.sw_batch_size < 1) or (args.roi and min(args.roi) < 1):
        p.error("--sw-batch-size and --roi must be positive")
    return args


def run(config: argparse.Namespace) -> list[tuple[Path, float]]:
    """Segment every input; returns (mask path, foreground mL) per input."""
    device = resolve_device(config.device)
    ckpt = load_checkpoint(Path(config.checkpoint))
    if config.evaluate:
        cases = cases_from_manifest(Path(config.evaluate), config.split)
    else:
        cases = expand_inputs(config.inputs, ckpt.get("channels"), bool(ckpt.get("stack_slices")))
        truths = [Path(t) for t in config.labels or []]
        if truths and len(truths) != len(cases):
            raise InputError(f"--labels: {len(truths)} masks for {len(cases)} inputs; give one mask per input, "
                             "in order")
        cases = [dataclasses.replace(c, truth=t, truth_slices=_mask_slices(t, c) if c.slices else ())
                 for c, t in zip(cases, truths)] if truths else cases
    out_dir = Path(config.out)
    targets = [mask_path(Path(c.name), out_dir) for c in cases]
    existing = [t for t in targets if t.exists()]
    if existing and not config.overwrite:
        raise InputError(f"{existing[0]}: mask exists already (pass --overwrite to replace it)")
    if len(set(targets)) < len(targets):
        raise InputError(f"{out_dir}: two inputs would write the same mask name; segment them separately")
    model = model_from_checkpoint(ckpt, Path(config.checkpoint)).to(device, memory_format=torch.channels_last_3d)
    model.eval()
    roi = config.roi or ckpt["inference"]["roi"]
    overlap = ckpt["inference"]["overlap"] if config.overlap is None else config.overlap
    labels = ckpt["label_values"]
    regions = dict(config.regions) if config.regions is not None else ckpt.get("regions") or {}
    unknown = sorted({v for values in regions.values() for v in values} - set(labels))
    if unknown:
        raise InputError(f"--regions: label values {unknown} are not among the model's labels {labels}")
    results, scores, patients = [], {}, PatientDice(labels, regions)
    for case in cases:
        mask, raw = segment_case(case, model, ckpt, roi, overlap, config.sw_batch_size, config.amp)
        affine = np.asarray(raw.affine, dtype=np.float64)
        truth = None
        if case.truth:
            stored = read_stack(case.truth_slices) if case.truth_slices else read_volume(case.truth)
            truth = as_label_map(stored, case.truth)[0].numpy().astype(np.int64)
            if truth.shape != mask.shape:
                raise InputError(f"{case.truth}: shape {truth.shape} differs from {case.sources[0]}'s {mask.shape}")
            scores[case.name] = evaluate_case(mask, truth, affine, labels, regions)
            if 1 in mask.shape:  # a slice: it also counts towards its patient's Dice
                patients.add(case.group, mask, truth)
        out = save_mask(mask, affine, case.sources[0], out_dir, case.name)
        if config.overlays:
            write_overlay(raw, mask, truth, labels, case.name, out_dir / "overlays" / f"{Path(case.name).name}.png")
        results.append((out, volume_ml(mask, affine)))
        unit, per_voxel = voxel_size(mask.shape, affine)
        shown = {"ml": "mL", "mm2": "mm²"}[unit]
        log.info("%s: %.2f %s segmented → %s", case.sources[0], (mask > 0).sum() * per_voxel, shown, out)
    if scores:
        mean = write_evaluation(scores, out_dir / "evaluation.csv")
        log.info("evaluation: mean Dice %.4f over %d cases → %s%s", mean_dice(mean, labels), len(scores),
                 out_dir / "evaluation.csv", region_text(mean, regions))
    if patients.rows():
        mean = write_evaluation(patients.rows(), out_dir / "evaluation_patients.csv")
        log.info("evaluation: mean per-patient Dice %.4f over %d patients → %s", mean_dice(mean, labels),
                 len(patients.rows()), out_dir / "evaluation_patients.csv")
    return results


def mean_dice(mean: dict[str, float], labels: Sequence[int]) -> float:
    """Mean over foreground labels (regions left out) of the per-label mean Dice."""
    return float(np.nanmean([mean[f"dice_{v}"] for v in list(labels)[1:]]))


def region_text(mean: dict[str, float], regions: dict) -> str:
    """``; regions WT 0.81, TC 0.62`` for the log, or nothing."""
    return "; regions " + ", ".join(f"{k} {mean[f'dice_{k}']:.4f}" for k in regions) if regions else ""


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
