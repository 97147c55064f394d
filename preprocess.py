"""Find image/label pairs, reorient, downsample in-plane, crop to the body, normalize; write data/prep + manifest.

    python preprocess.py data/raw data/prep [--synthetic 12] [--modality auto|ct|mr|rgb] [--inplane 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, CropForegroundd
from scipy import ndimage
from tqdm import tqdm

from dataset import PrepParams, prepare_transforms
from imaging.cases import (
    LAYOUTS,
    MANIFEST_VERSION,
    NNUNET_CHANNEL,
    Case,
    case_name,
    dataset_names,
    find_cases,
    read_case,
    split_cases,
)
from imaging.common import ArgumentParser, InputError, partial_path, run_command, write_json
from imaging.readers import is_2d, is_blank, label_dtype, spacing_mm, write_nifti

log = logging.getLogger("preprocess")
SYNTHETIC_SHAPE = (32, 512, 512)  # (D, H, W): a 512×512 CT of 32 slices, downsampled ×2 in-plane


# ---------------------------------------------------------------- 1. checking and preparing one case


def detect_modality(image: torch.Tensor) -> str:
    """"ct" when intensities look like Hounsfield units (the 0.5th percentile is air, below -500), else "mr".
    ("rgb" is never detected, only asked for: its gain did not hold across pictures; see docs/experiments.md,
    "Colour pictures divided by 255".)

    A percentile, not the minimum: interpolated MR can hold a few large negative values.
    """
    sample = image.flatten()[:: max(1, image.numel() // 1_000_000)].float()  # quantile() limits its input size
    return "ct" if float(torch.quantile(sample, 0.005)) < -500 else "mr"


def is_8bit_colour(image: torch.Tensor) -> bool:
    """Whether ``image`` (C, X, Y, Z) is what ``--modality rgb`` expects: three channels of whole numbers in 0..255
    on one slice (a photograph)."""
    return (image.ndim == 4 and image.shape[0] == 3 and image.shape[-1] == 1 and float(image.min()) >= 0
            and float(image.max()) <= 255 and bool(torch.equal(image, image.round())))


# ---------------------------------------------------------------- 3. one case


def prepare_case(case: Case, params: PrepParams, out_dir: Path, labels: Sequence[int] | None = None) -> dict:
    """Preprocess one case into ``out_dir`` and return its manifest record (JSON-ready)."""
    raw = read_case(case, params.channel, labels)
    image = raw["image"]
    if params.modality == "rgb":  # asked for, never detected: the check is the picture's, not detect_modality's
        if not is_8bit_colour(image):
            log.warning("%s: not an 8-bit colour picture (3 channels of 0..255 on one slice), processing as rgb",
                        case.image)
    elif (looks_like := detect_modality(image)) != params.modality:
        log.warning("%s: intensities look like %s, processing as %s", case.image, looks_like, params.modality)
    keys = list(raw)
    chain = prepare_transforms(params, with_label=case.label is not None)
    # Run in two parts so that label voxels cut away by the body crop can be counted.
    crop_at = next(i for i, t in enumerate(chain.transforms) if isinstance(t, CropForegroundd))
    resized = Compose(chain.transforms[:crop_at])(raw)
    label_before_crop = int((resized["label"] > 0).sum()) if "label" in keys else 0
    prepared = Compose(chain.transforms[crop_at:])(resized)
    crop = _crop_box(prepared["image"])
    record: dict = {
        "name": case.name,
        "group": case.split_group,
        "image": str(case.image),
        **({"images": [str(p) for p in case.modalities]} if case.modalities else {}),
        **({"slices": [str(p) for p in case.slices]} if case.slices else {}),
        **({"label_slices": [str(p) for p in case.label_slices]} if case.label_slices else {}),
        "label": str(case.label) if case.label else None,
        "original_shape": list(image.shape[1:]),
        "original_affine": np.asarray(image.affine, dtype=float).round(6).tolist(),
        "original_spacing": spacing_mm(image.affine).round(6).tolist(),
        "inplane_factor": _inplane_factor(prepared["image"]),
        "crop_box": crop,
        "prepared_shape": list(prepared["image"].shape[1:]),
        "prepared_spacing": spacing_mm(prepared["image"].affine).round(6).tolist(),
        "in_channels": int(prepared["image"].shape[0]),
        "blank": is_blank(image),  # constant: nothing to segment (a blank slice at the end of a stack)
        "prepared_image": f"{case.name}_image.nii.gz",
        "stats": case_statistics(prepared["image"], prepared.get("label")),
    }
    if "label" in keys:
        values = sorted(int(v) for v in torch.unique(raw["label"]))
        foreground = int((prepared["label"] > 0).sum())
        record.update(prepared_label=f"{case.name}_label.nii.gz", label_values=values,
                      foreground_voxels=foreground, foreground_voxels_outside_crop=label_before_crop - foreground)
        if label_before_crop > foreground:
            log.warning("%s: %d foreground voxels lie outside the body crop and are lost", case.label,
                        label_before_crop - foreground)
        _write(prepared["label"], out_dir / record["prepared_label"], label_dtype(max(values)))
    _write(prepared["image"], out_dir / record["prepared_image"], np.float32)
    return record


def case_statistics(image: torch.Tensor, label: torch.Tensor | None) -> dict:
    """What the data fingerprint gathers from one prepared case: intensity percentiles (0.5, 50, 99.5) of all its
    voxels and of its foreground, and per foreground label value its voxels and the sizes of its connected objects
    (voxels, largest first, at most 32)."""
    x = np.asarray(image.detach().cpu(), dtype=np.float32)
    stats: dict = {"voxels": int(x[0].size), "intensity": np.percentile(x, [0.5, 50, 99.5]).round(4).tolist()}
    if label is None:
        return stats
    lab = np.asarray(label.detach().cpu())[0]
    fg = x[:, lab > 0]
    stats["foreground_intensity"] = np.percentile(fg, [0.5, 50, 99.5]).round(4).tolist() if fg.size else None
    stats["labels"] = {}
    for value in np.unique(lab)[1:]:
        components, _ = ndimage.label(lab == value)
        sizes = np.sort(np.bincount(components.ravel())[1:])[::-1]
        stats["labels"][str(int(value))] = {"voxels": int(sizes.sum()), "objects": sizes[:32].tolist()}
    return stats


def fingerprint(records: list[dict]) -> dict:
    """The dataset in numbers, as nnU-Net's fingerprint has it (what train.py plans from): labelled cases, 2D or 3D,
    median prepared shape and spacing, intensity percentiles (medians over cases), and per label its share of the
    voxels, objects per case and median object size (voxels and mm³)."""
    labelled = [r for r in records if r.get("label")]
    shapes = np.asarray([r["prepared_shape"] for r in labelled])
    spacing = np.median(np.asarray([r["prepared_spacing"] for r in labelled]), axis=0)
    total = sum(r["stats"]["voxels"] for r in labelled)
    labels: dict[str, dict] = {}
    for value in sorted({v for r in labelled for v in r["stats"].get("labels", {})}, key=int):
        found = [r["stats"]["labels"].get(value) for r in labelled]
        sizes = [s for f in found if f for s in f["objects"]]
        labels[value] = {"share": round(sum(f["voxels"] for f in found if f) / total, 6),
                         "cases_with": sum(1 for f in found if f),
                         "objects_per_case": float(np.median([len(f["objects"]) if f else 0 for f in found])),
                         "median_object_voxels": float(np.median(sizes)),
                         "median_object_mm3": round(float(np.median(sizes) * np.prod(spacing)), 3)}
    fg = [r["stats"]["foreground_intensity"] for r in labelled if r["stats"].get("foreground_intensity")]
    return {"cases": len(labelled), "dims": "2d" if all(is_2d(s, prepared=True) for s in shapes) else "3d",
            "median_shape": np.median(shapes, axis=0).round(1).tolist(), "median_spacing": spacing.round(6).tolist(),
            "intensity": np.median([r["stats"]["intensity"] for r in labelled], axis=0).round(4).tolist(),
            "foreground_intensity": np.median(fg, axis=0).round(4).tolist() if fg else None,
            "blank": sum(bool(r.get("blank")) for r in labelled), "labels": labels}


def _write(volume: torch.Tensor, path: Path, dtype: type) -> None:
    """Write a (C, D, H, W) MetaTensor with its affine; several channels go last, (D, H, W, C)."""
    array = np.asarray(volume.detach().cpu()).astype(dtype)
    write_nifti(array[0] if len(array) == 1 else np.moveaxis(array, 0, -1), np.asarray(volume.affine), path)


def _crop_box(prepared: torch.Tensor) -> list[list[int]]:
    """[[start, end], …] per spatial axis of the crop, in the reoriented, resized grid."""
    op = next(o for o in prepared.applied_operations if o["class"] == "CropForeground")
    cropped, shape = op["extra_info"]["cropped"], op["orig_size"]  # cropped: [before0, after0, before1, …]
    return [[int(cropped[2 * i]), int(shape[i] - cropped[2 * i + 1])] for i in range(3)]


def _inplane_factor(prepared: torch.Tensor) -> list[float]:
    """Resampling factor per (D, H, W) axis: original voxels per prepared voxel."""
    op = next(o for o in prepared.applied_operations if o["class"] == "InplaneResize")
    before = op["orig_size"]
    after = next(o for o in prepared.applied_operations if o["class"] == "CropForeground")["orig_size"]
    return [round(b / a, 6) for b, a in zip(before, after)]


# ---------------------------------------------------------------- 4. synthetic data


def make_synthetic(folder: Path, n: int, seed: int = 0, shape: tuple[int, int, int] = SYNTHETIC_SHAPE) -> list[Path]:
    """Write ``n`` CT-like volumes (int16 HU, ``(D, H, W)`` = ``shape``) with blob-shaped targets as flat pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        image, label = synthetic_volume(rng, shape)
        # Stored as (x, y, z) = (W, H, D) with an LPS-like affine, the way DICOM converters write CT.
        spacing = (0.78, 0.78, 2.5)
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        affine[:3, 3] = [spacing[0] * shape[2] / 2, spacing[1] * shape[1] / 2, -spacing[2] * shape[0] / 2]
        for array, path in ((image, folder / f"synth_{i:03d}.nii.gz"), (label, folder / f"synth_{i:03d}_seg.nii.gz")):
            write_nifti(np.ascontiguousarray(array.transpose(2, 1, 0)), affine, path)
            written.append(path)
    return written


def _ellipsoid(grid: tuple[np.ndarray, ...], center, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii))


def synthetic_volume(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One (D, H, W) int16 CT-like image in HU (air, body, organs, spine, 1-3 bright blobs) and its uint8 label."""
    d, h, w = shape
    grid = np.ogrid[:d, :h, :w]
    z, y, x = (g.astype(np.float32) for g in grid)
    cy, cx = h / 2 + rng.uniform(-0.03, 0.03) * h, w / 2 + rng.uniform(-0.03, 0.03) * w
    ry, rx = h * rng.uniform(0.28, 0.34), w * rng.uniform(0.38, 0.44)
    body = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
    image = np.full(shape, -1000.0, np.float32)
    image[np.broadcast_to(body, shape)] = 40.0
    organs = [  # (centre offset as fraction of the radii, radii as fraction, HU): liver, kidneys, spine
        ((0.0, -0.45, -0.35), (0.9, 0.45, 0.35), 60.0),
        ((0.0, 0.35, 0.45), (0.4, 0.15, 0.12), 30.0),
        ((0.0, 0.35, -0.45), (0.4, 0.15, 0.12), 30.0),
        ((0.0, 0.75, 0.0), (3.0, 0.12, 0.08), 500.0),
    ]
    for (oz, oy, ox), (az, ay, ax), hu in organs:
        inside = _ellipsoid((z, y, x), (d / 2 + oz * d, cy + oy * ry, cx + ox * rx), (az * d, ay * ry, ax * rx)) < 1
        image[inside & body] = hu
    label = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(1, 4)):
        label |= _blob(rng, (z, y, x), (d, h, w), (cy, cx, ry, rx))
    image[label > 0] = 130.0 + rng.normal(0, 5)
    image += rng.normal(0, 12, shape).astype(np.float32)
    image = ndimage.gaussian_filter(image, sigma=(0, 0.7, 0.7))  # scanner blur, in-plane
    return np.clip(image, -1024, 3071).astype(np.int16), label


def _blob(rng: np.random.Generator, grid, shape, body) -> np.ndarray:
    """A lumpy ellipsoid of random size inside the body's inner part."""
    d, h, w = shape
    cy, cx, ry, rx = body
    angle, frac = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.4))
    center = (rng.uniform(0.25, 0.75) * d, cy + frac * ry * np.sin(angle), cx + frac * rx * np.cos(angle))
    radii = (rng.uniform(1.5, 4.0) * max(1.0, d / 16), rng.uniform(0.025, 0.06) * h, rng.uniform(0.025, 0.06) * w)
    dist = _ellipsoid(grid, center, radii)
    z, y, x = grid
    lumps = 0.25 * np.sin(3 * np.arctan2(y - center[1], x - center[2]) + rng.uniform(0, 6)) * np.cos(
        (z - center[0]) / radii[0] + rng.uniform(0, 6))
    return (dist < 1 + lumps).astype(np.uint8)


# ---------------------------------------------------------------- 5. the whole folder


def run(config: argparse.Namespace) -> dict:
    """Preprocess ``config.input`` into ``config.output``; returns the manifest."""
    src, dst = Path(config.input), Path(config.output)
    if config.synthetic:
        make_synthetic(src, config.synthetic, config.seed, tuple(config.synthetic_shape))
    labelled, unlabelled = find_cases(src, config.layout, config.modalities, config.stack_slices, skip=[dst])
    if not labelled:
        raise InputError(f"{src}: no image/label pairs found (MSD imagesTr/labelsTr, <case> + <case>_seg, or a "
                         "folder per case with a seg file)")
    for case in unlabelled:
        log.warning("%s: no label; prepared for inference only", case.image)
    modality = config.modality if config.modality != "auto" else first_modality(labelled, config)
    params = PrepParams(modality=modality, window=tuple(config.ct_window), inplane=config.inplane,
                        channel=config.channel)
    records, skipped = process_all(labelled + unlabelled, params, dst, config)
    for message in skipped:
        log.warning("skipped %s", message)
    if not any(r["label"] for r in records):
        raise InputError(f"{src}: every labelled case was skipped as bad input")
    if all(r.get("label_values") == [0] for r in records if r["label"]):
        raise InputError(f"{src}: every mask is empty; there is nothing to learn")
    channels = {r["in_channels"] for r in records}
    if len(channels) > 1:
        odd = next(r for r in records if r["in_channels"] != records[0]["in_channels"])
        raise InputError(f"{odd['image']}: has {odd['in_channels']} channel(s), other cases "
                         f"{records[0]['in_channels']}; pick one with --channel")
    splits = assign_splits(labelled, records, config)
    for r in records:
        r["split"] = splits.get(r["name"], "none")
    manifest = {
        "version": MANIFEST_VERSION,
        "source": str(src),
        "params": dataclasses.asdict(params),
        "label_values": sorted({v for r in records for v in r.get("label_values", [])}),
        "in_channels": records[0]["in_channels"],
        "channels": modality_names(labelled, config.modalities),  # modality per input channel (None: one file a case)
        **chosen_names(dataset_names(src), params.channel),  # what an MSD dataset.json calls channels and labels
        "layout": config.layout,
        "stack_slices": config.stack_slices,
        "split": {"seed": config.seed, "val_fraction": config.val_fraction,
                  "from_folders": any(c.split for c in labelled)},
        "skipped": skipped,
        "fingerprint": fingerprint(records),
        "cases": sorted(records, key=lambda r: r["name"]),
    }
    write_json(manifest, dst / "dataset.json")  # last: a manifest exists only for a complete dataset
    return manifest


def chosen_names(names: dict, channel: int | None) -> dict:
    """``dataset_names`` for the channels kept: ``--channel K`` keeps K's name alone."""
    channels = names["channel_names"]
    if channels is not None and channel is not None:
        names = {**names, "channel_names": channels[channel : channel + 1] or None}
    return names


def modality_names(cases: list[Case], modalities: list[str] | None) -> list[str] | None:
    """What inference needs to find a case's files: nnU-Net channel numbers, or the ``--modalities`` names."""
    first = cases[0].modalities
    if first and all(NNUNET_CHANNEL.match(case_name(p)) for p in first):
        return [NNUNET_CHANNEL.match(case_name(p))["channel"] for p in first]
    return modalities


def assign_splits(labelled: list[Case], records: list[dict], config: argparse.Namespace) -> dict[str, str]:
    """``{case: "train" | "val" | "test"}``: the dataset's own split folders when every labelled case lies in one
    (a ``test`` case is prepared but never trained or validated on), else a seeded split by group."""
    done = {r["name"] for r in records if r["label"]}
    folder = {c.name: c.split for c in labelled if c.name in done}
    if folder and all(folder.values()):
        if not {"train", "val"} <= set(folder.values()):
            log.warning("split folders hold no %s cases", "validation" if "val" not in folder.values() else "training")
        return folder
    if any(folder.values()):
        log.warning("only some cases lie in train/validation/test folders; splitting all at random instead")
    return split_cases({r["name"]: r["group"] for r in records if r["label"]}, config.val_fraction, config.seed)


def first_modality(cases: list[Case], config: argparse.Namespace) -> str:
    """The modality of the first readable labelled case."""
    for case in cases:
        try:
            return detect_modality(read_case(case, config.channel)["image"])
        except InputError:
            if not config.skip_bad:
                raise
    raise InputError(f"{cases[0].image.parent}: no readable case")


def prepare_or_reuse(case: Case, params: PrepParams, dst: Path, labels: list[int] | None) -> dict:
    """``prepare_case``, unless a previous run already prepared this case from the same source and settings.

    A stamp is written after the case's volumes, so an interrupted run redoes exactly the unfinished cases.
    """
    stamp_path = dst / ".cases" / f"{case.name}.json"
    files = [*case.sources, *(case.label_slices or [case.label])]
    stamp = {"version": MANIFEST_VERSION, "params": dataclasses.asdict(params), "labels": labels,
             "source": {str(p): _signature(p) for p in files if p}}
    if stamp_path.is_file():
        try:
            old = json.loads(stamp_path.read_text())
        except json.JSONDecodeError:
            old = {}
        record = old.pop("record", None)
        files = [record.get("prepared_image"), record.get("prepared_label")] if record else []
        if old == json.loads(json.dumps(stamp)) and all((dst / f).is_file() for f in files if f):
            return record
    record = prepare_case(case, params, dst, labels)
    stamp_path.parent.mkdir(exist_ok=True)
    write_json({**stamp, "record": record}, stamp_path)
    return record


def _signature(path: Path) -> list[int]:
    """Size and modification time of a file, or of every file in a DICOM folder."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return [sum(f.stat().st_size for f in files), max(f.stat().st_mtime_ns for f in files), len(files)]


def process_all(cases: list[Case], params: PrepParams, dst: Path, config: argparse.Namespace
                ) -> tuple[list[dict], list[str]]:
    """Prepare every case in ``config.workers`` processes; returns (records, skipped-case messages)."""
    dst.mkdir(parents=True, exist_ok=True)
    pattern = partial_path(Path("*")).name
    for stale in [*dst.glob(pattern), *(dst / ".cases").glob(pattern)]:  # left by a killed run
        stale.unlink()
    labels = config.labels
    bar = tqdm(total=len(cases), desc="preprocess", unit="case", disable=None)
    records, skipped = [], []

    def collect(get_record) -> None:
        try:
            records.append(get_record())
        except InputError as exc:
            if not config.skip_bad:
                raise
            skipped.append(str(exc))
        bar.update()

    try:
        if config.workers <= 1 or len(cases) == 1:
            for case in cases:
                collect(lambda case=case: prepare_or_reuse(case, params, dst, labels))
        else:
            # spawn, not fork: a forked child inherits torch's thread pools mid-state and can hang.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=config.workers, mp_context=ctx) as pool:
                futures = [pool.submit(prepare_or_reuse, case, params, dst, labels) for case in cases]
                try:
                    for future in as_completed(futures):
                        collect(future.result)
                except BaseException:
                    pool.shutdown(cancel_futures=True)
                    raise
    finally:
        bar.close()
    return records, sorted(skipped)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(__doc__)
    p.add_argument("input", help="folder of raw image/label pairs (never modified, except by --synthetic)")
    p.add_argument("output", help="folder for prepared volumes and dataset.json")
    p.add_argument("--modality", choices=["auto", "ct", "mr", "rgb"], default="auto",
                   help="intensity scaling: CT's HU window, MR's z-score, an 8-bit colour picture's /255 (auto: CT or "
                   "MR, detected)")
    p.add_argument("--ct-window", type=float, nargs=2, default=list(PrepParams.window), metavar=("LO", "HI"),
                   help="CT intensity window, HU")
    p.add_argument("--inplane", type=int, default=PrepParams.inplane,
                   help="largest in-plane size after downsampling, voxels")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="first write N synthetic CT volumes with labels into INPUT")
    p.add_argument("--synthetic-shape", type=int, nargs=3, default=list(SYNTHETIC_SHAPE), metavar=("D", "H", "W"))
    p.add_argument("--labels", type=int, nargs="+", default=None, metavar="V",
                   help="the values masks may hold (default: any non-negative integers)")
    p.add_argument("--channel", type=int, default=None,
                   help="keep only this channel of colour 2D images (LGG FLAIR: 1); default: all, as input channels")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="how cases are stored (auto: detected; see find_cases)")
    p.add_argument("--modalities", type=lambda v: [c for c in v.split(",") if c], default=None, metavar="A,B",
                   help="input modalities, in order, by file name (BraTS: Flair,T1c) or nnU-Net number (0000,0001)")
    p.add_argument("--stack-slices", action="store_true",
                   help="rebuild one 3D volume per patient folder from numbered 2D slices (LGG), 1 mm apart")
    p.add_argument("--skip-bad", action="store_true", help="skip bad cases (listed at the end) instead of stopping")
    args = p.parse_args(argv)
    if not 8 <= args.inplane <= 4096 or not 0 <= args.val_fraction < 1 or not 1 <= args.workers <= 64:
        p.error("need 8 <= --inplane <= 4096, 0 <= --val-fraction < 1, 1 <= --workers <= 64")
    if not 0 <= args.synthetic <= 1000 or min(args.synthetic_shape) < 1 or min(args.labels or [0]) < 0:
        p.error("need 0 <= --synthetic <= 1000, a positive --synthetic-shape, non-negative --labels")
    if args.ct_window[0] >= args.ct_window[1]:
        p.error("--ct-window LO must be below HI")
    return args


def prepare(config: argparse.Namespace) -> dict:
    """``run``, then one summary line; returns the manifest."""
    manifest = run(config)
    n = {s: sum(c["split"] == s for c in manifest["cases"]) for s in ("train", "val", "test", "none")}
    blank = sum(bool(c.get("blank")) for c in manifest["cases"])
    empty = sum(c.get("label_values") == [0] for c in manifest["cases"])
    log.info("prepared %d cases into %s (train %d, val %d, test %d, unlabelled %d), labels %s, %d input channel(s); "
             "%d blank images (constant: nothing to segment), %d empty masks", len(manifest["cases"]),
             config.output, n["train"], n["val"], n["test"], n["none"], manifest["label_values"],
             manifest["in_channels"], blank, empty)
    return manifest


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: prepare(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
