"""Reading volumes and the one transform chain shared by preprocessing, training, validation and inference.

Arrays are channel-first ``(C, D, H, W)``: after ``Orientationd("SPL")`` axis D runs inferior→superior,
H anterior→posterior and W right→left, which is how SimpleITK/numpy users see an axial scan.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import nibabel as nib
import numpy as np
import PIL.Image
import SimpleITK as sitk
import torch
from monai.data import CacheDataset, Dataset, ImageReader, MetaTensor, NibabelReader
from monai.transforms import (
    ClipIntensityPercentilesd,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandRotated,
    Resize,
    Resized,
    ScaleIntensityRanged,
    SpatialPadd,
    ToDeviced,
)
from monai.transforms.spatial.functional import resize
from monai.transforms.utils import map_binary_to_indices
from monai.utils import get_equivalent_dtype
from nibabel.filebasedimages import ImageFileError
from scipy import ndimage

ORIENTATION = "SPL"  # array axes (D, H, W) = inferior→superior, anterior→posterior, right→left
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_2D_SUFFIXES = (".tif", ".tiff", ".png", ".bmp")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES + IMAGE_2D_SUFFIXES
LABEL_SUFFIXES = ("_seg", "_mask", "_label", "_lesion")  # <case>_seg.nii.gz is the label of <case>.nii.gz
# In a folder per case (BraTS), the label is the file with one of these names (or ending in a LABEL_SUFFIX).
CASE_LABEL_NAMES = ("seg", "label", "labels", "mask", "segmentation", "truth", "ground_truth", "OTMultiClass", "OT")
NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net: <case>_0000.nii.gz, <case>_0001 …


READ_ERRORS = (OSError, EOFError, ValueError, RuntimeError, MemoryError, zlib.error, ImageFileError)


MAX_VOXELS = 2**31  # a header declaring more is corrupt or not meant for this pipeline


class InputError(Exception):
    """A user's mistake (bad file, bad argument): reported as one line, exit code 2."""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one: ``None`` means "decided from the data or checkpoint", said in
    the option's own help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is argparse.SUPPRESS or action.default is False:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with documented defaults shown; a bad argument raises ``InputError`` (one line, exit 2)."""

    def __init__(self, description: str | None) -> None:
        super().__init__(description=description, formatter_class=DefaultsHelpFormatter)

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{self.prog}: {message}")


def region_arg(text: str) -> tuple[str, tuple[int, ...]]:
    """``--regions`` item ``NAME=V,V,…`` (BraTS whole tumour: ``WT=1,2,3,4``) → (name, label values)."""
    name, _, values = text.partition("=")
    try:
        labels = tuple(int(v) for v in values.split(",") if v)
    except ValueError:
        labels = ()
    if not name or not labels or min(labels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=V,V,… with foreground label values")
    return name, labels


@dataclasses.dataclass(frozen=True)
class PrepParams:
    """How raw volumes become network input; stored in the manifest and in every checkpoint."""

    modality: str = "ct"  # "ct": HU window to [0, 1]; "mr": percentile clip then z-score
    window: tuple[float, float] = (-1000.0, 1000.0)  # HU
    percentiles: tuple[float, float] = (0.5, 99.5)
    inplane: int = 256  # largest in-plane size after downsampling, voxels
    body_threshold_hu: float = -500.0  # CT body mask: tissue is denser than this
    body_fraction: float = 0.05  # MR body mask: differs from the border by this share of the range
    crop_margin: int = 4  # voxels kept around the body's bounding box
    channel: int | None = None  # which channel of a colour 2D image to keep; None: all, as input channels

    @classmethod
    def from_dict(cls, d: dict) -> PrepParams:
        """Rebuild from a manifest/checkpoint dict (lists become tuples)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})


def volume_suffix(path: Path) -> str | None:
    """The recognised volume extension of ``path`` (``.nii.gz`` …) or None."""
    name = path.name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


def case_name(path: Path) -> str:
    """File name without its volume extension; a DICOM series folder's own name."""
    if path.is_dir():
        return path.name
    suffix = volume_suffix(path) or path.suffix
    return path.name[: len(path.name) - len(suffix)]


def dicom_dir(folder: Path) -> Path | None:
    """The one folder at or below ``folder`` that holds ``.dcm`` files, or None when none does."""
    dirs = sorted({p.parent for p in folder.rglob("*") if p.suffix.lower() == ".dcm" and p.is_file()})
    if len(dirs) > 1:
        raise InputError(f"{folder}: DICOM files in {len(dirs)} folders; give each case one series folder")
    return dirs[0] if dirs else None


def read_dicom_series(folder: Path, spacing_tolerance: float = 0.01) -> sitk.Image:
    """The single series in ``folder``: slices ordered by position along the slice normal, evenly spaced."""
    series_dir = dicom_dir(folder) or folder
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(series_dir))
    if len(ids) != 1:
        raise InputError(f"{folder}: holds {len(ids)} DICOM series; keep exactly one series per case folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir), ids[0])  # sorted by position
    n_dcm = sum(1 for p in series_dir.iterdir() if p.suffix.lower() == ".dcm")
    if len(files) < n_dcm:
        raise InputError(f"{folder}: {n_dcm - len(files)} of {n_dcm} DICOM files are unreadable or not in the series")
    positions = np.array([_slice_position(f) for f in files])
    gaps = np.diff(np.sort(positions))
    if len(gaps) and (gaps.min() <= 0 or gaps.max() - gaps.min() > spacing_tolerance * np.median(gaps)):
        raise InputError(f"{folder}: slice spacing varies from {gaps.min():.3g} to {gaps.max():.3g} mm "
                         "(a missing or duplicated slice?)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def _slice_position(path: str) -> float:
    """Position of one DICOM slice along its normal, mm (from ImagePositionPatient and ImageOrientationPatient)."""
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    try:
        r.ReadImageInformation()
        position = np.array([float(v) for v in r.GetMetaData("0020|0032").split("\\")])
        row, col = np.array([float(v) for v in r.GetMetaData("0020|0037").split("\\")]).reshape(2, 3)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: not a readable DICOM slice with a position ({exc})") from None
    return float(np.dot(position, np.cross(row, col)))


class SimpleITKReader(ImageReader):
    """MONAI reader for NRRD/MHA/MHD files and DICOM series folders via SimpleITK: (i, j, k) array, RAS affine."""

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        names = [filename] if isinstance(filename, str | Path) else filename
        return all(str(n).lower().endswith(SITK_SUFFIXES) or Path(n).is_dir() for n in names)

    def read(self, data: Sequence[str] | str, **kwargs) -> sitk.Image:
        path = Path(data if isinstance(data, str | Path) else data[0])
        return read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))

    def get_data(self, img: sitk.Image) -> tuple[np.ndarray, dict]:
        # SimpleITK gives (k, j, i); MONAI and nibabel work in (i, j, k) with the affine's columns.
        array = sitk.GetArrayFromImage(img).transpose(tuple(reversed(range(img.GetDimension()))))
        ndim = img.GetDimension()
        direction = np.asarray(img.GetDirection()).reshape(ndim, ndim)
        affine = np.eye(4)
        affine[:ndim, :ndim] = direction * np.asarray(img.GetSpacing())
        affine[:ndim, 3] = img.GetOrigin()
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK is LPS, MONAI/nibabel RAS
        meta = {
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(array.shape[:3]),
            "original_channel_dim": float("nan") if array.ndim == ndim else -1,
        }
        return array, meta


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is moved into place: hidden, same folder, same suffix."""
    return path.with_name(f".partial-{path.name}")


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` only if the block succeeds, and never lingers."""
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path, header: nib.Nifti1Header | None = None) -> None:
    """Write ``array`` (X, Y, Z[, C]) with ``affine`` as NIfTI atomically (temporary file, then rename)."""
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64), header=header)
    if header is None:
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    img.header.set_data_dtype(array.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    with atomic_write(path) as tmp:
        nib.save(img, tmp)


class Image2DReader(ImageReader):
    """TIFF/PNG/BMP via Pillow as a depth-1 volume: array (C, X, Y, 1), 1 mm pixels, x to the left, y to the back.

    With that affine, ``Orientationd("SPL")`` gives (C, 1, rows, columns): the picture as it is displayed.
    """

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        names = [filename] if isinstance(filename, str | Path) else filename
        return all(str(n).lower().endswith(IMAGE_2D_SUFFIXES) for n in names)

    def read(self, data: Sequence[str] | str, **kwargs) -> PIL.Image.Image:
        img = PIL.Image.open(str(data if isinstance(data, str | Path) else data[0]))
        img.load()
        return img

    def get_data(self, img: PIL.Image.Image) -> tuple[np.ndarray, dict]:
        if img.mode == "1":
            img = img.convert("L").point(lambda v: 1 if v else 0)  # 1-bit masks become 0/1
        elif img.mode in ("P", "RGBA", "LA", "CMYK", "YCbCr"):
            img = img.convert("RGB")
        array = np.asarray(img)
        array = array[..., None] if array.ndim == 2 else array  # (rows, columns, C)
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])
        meta = {"affine": affine, "original_affine": affine.copy(),
                "spatial_shape": np.asarray([*array.shape[1::-1], 1]), "channel_first": True}
        return np.ascontiguousarray(array.transpose(2, 1, 0)[..., None]), meta


def reader_for(path: str | Path) -> ImageReader:
    """NIfTI through nibabel, NRRD/MHA/MHD files and DICOM folders through SimpleITK.

    Chosen by suffix here because ``LoadImage`` given a list of readers tries each in turn until one
    does not fail, so SimpleITK would read NIfTI files too (and differently).
    """
    if Path(path).is_dir():
        return SimpleITKReader()
    suffix = volume_suffix(Path(path))
    if suffix is None:
        raise InputError(f"{path}: unsupported file type (use {', '.join(VOLUME_SUFFIXES)})")
    if suffix in IMAGE_2D_SUFFIXES:
        return Image2DReader()
    return NibabelReader() if suffix in NIFTI_SUFFIXES else SimpleITKReader()


def tissue_mask(image: torch.Tensor, params: PrepParams, threshold_hu: float | None = None) -> np.ndarray:
    """Voxels that are not background, (C, D, H, W) → bool (D, H, W). ``threshold_hu`` replaces the CT
    threshold (for an image already scaled to [0, 1]); the MR rule is relative, so it holds before and after
    normalization."""
    x = np.asarray(image.detach().cpu(), dtype=np.float32).mean(0)  # channels averaged
    if params.modality == "ct":
        return x > (params.body_threshold_hu if threshold_hu is None else threshold_hu)
    # MR has no absolute scale: background is what the volume's border holds (the faces of the axes
    # that have them: a single slice's border is its edge, not the slice itself), ...
    faces = [np.moveaxis(x, a, 0)[[0, -1]].ravel() for a in range(3) if x.shape[a] > 2]
    background = np.median(np.concatenate(faces)) if faces else x.min()
    lo, hi = np.percentile(x, [0.5, 99.5])
    mask = np.abs(x - background) > params.body_fraction * max(hi - lo, 1e-6)
    if mask.any() and x[mask].mean() < background:
        # ... when it is darker than the body. Skin filling a photograph, around a darker lesion, is not.
        return np.ones_like(mask)
    return mask


def prepared_tissue(image: torch.Tensor, params: PrepParams) -> torch.Tensor:
    """``tissue_mask`` of a prepared (normalized) image (C, D, H, W) → bool (1, D, H, W), dilated by 2 voxels
    in-plane: inference skips the windows that hold none of it."""
    threshold = None
    if params.modality == "ct":
        lo, hi = params.window
        threshold = (params.body_threshold_hu - lo) / (hi - lo)  # the HU threshold on the [0, 1] scale
    mask = tissue_mask(image, params, threshold)
    mask = ndimage.binary_dilation(mask, structure=np.ones((1, 5, 5), bool)) if mask.any() else mask
    return torch.from_numpy(mask)[None]


class BodyMask:
    """``select_fn`` for ``CropForegroundd``: largest connected component of a thresholded body, (C,D,H,W)→bool."""

    def __init__(self, params: PrepParams) -> None:
        self.params = params

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        mask = tissue_mask(image, self.params)
        if mask.all():
            return torch.ones_like(image, dtype=torch.bool)
        labels, n = ndimage.label(mask)
        if n > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            mask = labels == sizes.argmax()
        if not mask.any():  # nothing body-like: keep the whole volume rather than crop to nothing
            mask[:] = True
        return torch.from_numpy(mask)[None].expand_as(image)


class InplaneResize(Resize):
    """Downsample (C, D, H, W) so that max(H, W) <= ``max_size``, keeping D and the aspect ratio; invertible."""

    def __init__(self, max_size: int, **kwargs) -> None:
        super().__init__(spatial_size=-1, **kwargs)
        self.max_size = max_size

    def target_size(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """Output (D, H, W) for an input spatial ``shape``."""
        d, h, w = shape
        scale = min(1.0, self.max_size / max(h, w))
        return d, max(1, round(h * scale)), max(1, round(w * scale))

    def __call__(self, img: torch.Tensor, mode=None, align_corners=None, anti_aliasing=None,
                 anti_aliasing_sigma=None, dtype=None, lazy=None) -> torch.Tensor:
        size = self.target_size(img.shape[1:])
        mode = mode or self.mode
        out = resize(
            img, size, "nearest" if mode == "label" else mode,
            self.align_corners if align_corners is None else align_corners,
            get_equivalent_dtype(dtype or self.dtype or img.dtype, torch.Tensor), 3,
            self.anti_aliasing if anti_aliasing is None else anti_aliasing,
            self.anti_aliasing_sigma if anti_aliasing_sigma is None else anti_aliasing_sigma,
            False, self.get_transform_info(),
        )
        if mode == "label" and tuple(size) != tuple(img.shape[1:]):
            out.copy_(majority_resize(img, size))
        return out


def majority_resize(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Label map (1, D, H, W) → (1, *size): each output voxel takes the value covering most of its box.

    Nearest-neighbour would pick one corner voxel and shift the mask by half an input voxel; box
    averaging each value's indicator keeps it centred. One value at a time keeps memory at O(output).
    """
    x = torch.as_tensor(label)[None]
    best_share = torch.full((1, 1, *size), -1.0)
    best_value = torch.zeros((1, 1, *size), dtype=x.dtype)
    for value in torch.unique(x):
        share = torch.nn.functional.interpolate((x == value).float(), size=tuple(size), mode="area")
        better = share > best_share
        best_share = torch.where(better, share, best_share)
        best_value[better] = value
    return best_value[0]


class InplaneResized(Resized):
    """Dictionary version of ``InplaneResize``; images get anti-aliased trilinear, labels a majority vote."""

    def __init__(self, keys: Sequence[str], max_size: int, mode: Sequence[str], anti_aliasing: Sequence[bool],
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, spatial_size=-1, mode=mode, anti_aliasing=anti_aliasing,
                         allow_missing_keys=allow_missing_keys)
        self.resizer = InplaneResize(max_size)


def intensity_transforms(params: PrepParams) -> list[MapTransform]:
    """CT: clip to the HU window and scale to [0, 1]; MR: percentile clip then z-score."""
    if params.modality == "ct":
        lo, hi = params.window
        return [ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)]
    lo, hi = params.percentiles
    return [ClipIntensityPercentilesd("image", lower=lo, upper=hi, channel_wise=True),
            NormalizeIntensityd("image", channel_wise=True)]


def load_transforms(keys: Sequence[str], in_channels: int = 1) -> list[MapTransform]:
    """Read prepared NIfTI files as ``(C, D, H, W)`` MetaTensors with their affine, dtypes kept.

    Several image channels are stored last, ``(D, H, W, C)``; labels always have one.
    """
    return [LoadImaged(keys, reader=NibabelReader(), image_only=True, dtype=None),
            EnsureChannelFirstd([k for k in keys if k != "image" or in_channels == 1], channel_dim="no_channel"),
            *([EnsureChannelFirstd("image", channel_dim=-1)] if in_channels > 1 and "image" in keys else [])]


def read_volume(path: str | Path, channel: int | None = None) -> torch.Tensor:
    """One file as a (C, X, Y, Z) MetaTensor (C > 1 only for colour 2D images, unless ``channel`` picks one);
    unreadable or non-3D files raise ``InputError`` naming the file."""
    if Path(path).is_dir():
        if dicom_dir(Path(path)) is None:
            raise InputError(f"{path}: folder holds no DICOM (.dcm) files")
    elif not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")
    declared = _declared_voxels(Path(path))
    if declared > MAX_VOXELS:
        raise InputError(f"{path}: header declares {declared} voxels, more than {MAX_VOXELS}; the file is corrupt")
    # The reader is called directly, not through LoadImage: LoadImage falls back to every other reader
    # when one fails, printing a line for each, and then reports the wrong reader's complaint.
    reader = reader_for(path)
    try:
        array, meta = reader.get_data(reader.read(str(path)))
        # float32 also turns big-endian files (which torch cannot hold) into native order; labels stay exact.
        data = torch.from_numpy(np.asarray(array, dtype=np.float32))
    except READ_ERRORS as exc:
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[-1][:160]}" if lines else type(exc).__name__
        raise InputError(f"{path}: cannot read volume ({reason})") from None
    data = data if meta.pop("channel_first", False) else data[None]
    if channel is not None and data.ndim == 4:
        if not 0 <= channel < data.shape[0]:
            raise InputError(f"{path}: has {data.shape[0]} channel(s), cannot take --channel {channel}")
        data = data[channel : channel + 1]
    affine = torch.as_tensor(np.asarray(meta.pop("affine")), dtype=torch.float64)
    volume = MetaTensor(data, affine=affine, meta={**meta, "filename_or_obj": str(path)})
    if volume.ndim != 4:
        raise InputError(f"{path}: expected a 3D volume, got shape {tuple(volume.shape[1:])}")
    if sorted(volume.shape[1:])[-2] < 4:
        raise InputError(f"{path}: volume of shape {tuple(volume.shape[1:])} is too small (need 4 voxels on 2 axes)")
    return volume


def _declared_voxels(path: Path) -> int:
    """Voxel count a NIfTI header declares (0 when not NIfTI or unreadable: the full read reports that)."""
    if volume_suffix(path) not in NIFTI_SUFFIXES:
        return 0
    try:
        return int(np.prod(nib.load(str(path)).shape, dtype=np.float64))
    except READ_ERRORS:
        return 0


def as_label_map(mask: torch.Tensor, path: Path) -> torch.Tensor:
    """(1, X, Y, Z) label map from a mask stored as grey or RGB, 0/1, 0/255 or float 0./1."""
    if mask.shape[0] > 1:
        if not (mask == mask[:1]).all():
            raise InputError(f"{path}: colour mask whose channels differ; save it as a grey-level label map")
        mask = mask[:1]
    if set(torch.unique(mask).tolist()) == {0.0, 255.0}:
        mask = mask / 255  # 8-bit black/white masks
    return mask


def read_channels(paths: Sequence[Path], channel: int | None = None) -> MetaTensor:
    """One case stored as one file per modality: (C, X, Y, Z) with the first file's geometry, which all must share."""
    volumes = [read_volume(p, channel) for p in paths]
    first = volumes[0]
    for path, v in zip(paths[1:], volumes[1:]):
        if v.shape[1:] != first.shape[1:]:
            raise InputError(f"{path}: shape {tuple(v.shape[1:])} differs from {paths[0]}'s {tuple(first.shape[1:])}")
        if not np.allclose(np.asarray(v.affine), np.asarray(first.affine), atol=1e-3, rtol=0):
            raise InputError(f"{path}: affine differs from {paths[0]}'s; channels of a case must share one grid")
    if len(volumes) == 1:
        return first
    meta = {k: v for k, v in first.meta.items() if k != "affine"}
    return MetaTensor(torch.cat([v.as_tensor() for v in volumes]), affine=first.affine, meta=meta)


def slice_number(path: Path) -> int | None:
    """The number a 2D slice's name ends with (``TCGA_CS_4942_19970222_12`` → 12; a ``_mask`` suffix ignored)."""
    name = case_name(path)
    name = next((name[: -len(s)] for s in LABEL_SUFFIXES if name.endswith(s)), name)
    match = re.search(r"_(\d+)$", name)
    return int(match.group(1)) if match else None


def read_stack(paths: Sequence[Path], channel: int | None = None) -> MetaTensor:
    """A patient's numbered 2D slices, given in slice order, as one (C, X, Y, N) volume (1 mm apart, as 2D
    images carry no slice spacing); all must have one size."""
    slices = [read_volume(p, channel) for p in paths]
    for path, s in zip(paths[1:], slices[1:]):
        if s.shape[:3] != slices[0].shape[:3] or s.shape[3] != 1:
            raise InputError(f"{path}: slice of shape {tuple(s.shape)} does not stack with {paths[0]}'s "
                             f"{tuple(slices[0].shape)}")
    meta = {k: v for k, v in slices[0].meta.items() if k != "affine"}
    return MetaTensor(torch.cat([s.as_tensor() for s in slices], dim=3), affine=slices[0].affine, meta=meta)


def is_case_label(path: Path) -> bool:
    """A label file inside a case folder: ``seg``, ``OTMultiClass`` … or ``<anything>_seg``."""
    name = case_name(path)
    return name.lower() in {n.lower() for n in CASE_LABEL_NAMES} or name.lower().endswith(LABEL_SUFFIXES)


def match_channel(files: Sequence[Path], channel: str, where: Path) -> Path:
    """The one file among ``files`` for modality ``channel``: a name part (split at ``_``, ``-``, ``.``) equal to it,
    else the one part that starts with it (case-insensitive): ``Flair`` → ``Flair_subtrMeanDivStd.nii.gz``,
    ``t1c`` → ``case_t1ce.nii.gz``."""
    key = channel.lower()
    parts = {f: [t.lower() for t in re.split(r"[_\-.]", case_name(f)) if t] for f in files}
    found = [f for f, ts in parts.items() if key in ts] or [f for f, ts in parts.items()
                                                            if any(t.startswith(key) for t in ts)]
    if len(found) != 1:
        names = ", ".join(case_name(f) for f in files) or "no volumes"
        what = "no file" if not found else f"{len(found)} files"
        raise InputError(f"{where}: {what} for channel {channel!r} among {names}")
    return found[0]


def check_image(volume: torch.Tensor, path: str | Path) -> None:
    """An image must hold finite, non-constant intensities."""
    if not torch.isfinite(volume).all():
        raise InputError(f"{path}: image contains NaN or Inf intensities")
    if volume.min() == volume.max():
        raise InputError(f"{path}: image is constant ({float(volume.min())}); nothing to segment")


def prepare_transforms(params: PrepParams, with_label: bool) -> Compose:
    """Loaded volume → prepared (C, D, H, W): reorient, downsample in-plane, crop to the body, normalize.

    Used by ``preprocess.py`` (image and label) and by ``infer.py`` (image only), whose ``Invertd``
    walks this same chain backwards to put the prediction on the input's grid.
    """
    keys = ["image", "label"] if with_label else ["image"]
    return Compose([
        EnsureTyped("image", dtype=torch.float32),
        Orientationd(keys, axcodes=ORIENTATION, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        InplaneResized(keys, params.inplane, mode=["trilinear", "label"][: len(keys)],
                       anti_aliasing=[True, False][: len(keys)]),
        CropForegroundd(keys, source_key="image", select_fn=BodyMask(params), margin=params.crop_margin,
                        allow_smaller=True),
        *intensity_transforms(params),
    ])


def label_mapping(label_values: Sequence[int]) -> list[MapTransform]:
    """Map stored label values (e.g. 0/255) to class indices 0..K-1, when they differ."""
    values = [int(v) for v in label_values]
    if values == list(range(len(values))):
        return []
    return [MapLabelValued("label", orig_labels=values, target_labels=list(range(len(values))))]


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Random part of the training chain."""

    roi: tuple[int, int, int] = (48, 96, 96)
    pos: float = 1.0
    neg: float = 1.0
    num_samples: int = 4
    rotate_degrees: float = 15.0  # small random in-plane rotation, on top of 90° turns


class CropCentresd(MapTransform):
    """Where ``RandCropByPosNegLabeld`` may centre its crops, computed once for the cache instead of at every
    draw: ``label_fg``/``label_bg``, flat int32 indices of foreground and background voxels of (1, D, H, W)
    ``label``. More than ``max_indices`` of either are thinned to every k-th, as nnU-Net keeps a sample of each
    class's locations: a regular subset, so that memory stays at most 4 bytes × ``max_indices`` per volume."""

    def __init__(self, key: str = "label", max_indices: int = 2**20) -> None:
        super().__init__([key])
        self.max_indices = max_indices

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.keys:
            # As bool: given uint8, MONAI's ``~`` flips bits, not truth, and every voxel counts as background.
            fg, bg = map_binary_to_indices(torch.as_tensor(d[key]) > 0)
            for name, idx in (("fg", fg), ("bg", bg)):
                idx = np.asarray(idx)
                step = -(-len(idx) // self.max_indices)
                d[f"{key}_{name}"] = np.ascontiguousarray(idx[::max(step, 1)], dtype=np.int32)
        return d


class Tissued(MapTransform):
    """``tissue``: the windows validation may skip (``prepared_tissue`` of ``image``), cached with the volume."""

    def __init__(self, params: PrepParams) -> None:
        super().__init__(["image"])
        self.params = params

    def __call__(self, data: dict) -> dict:
        return {**data, "tissue": prepared_tissue(data["image"], self.params)}


def get_transforms(mode: str, label_values: Sequence[int] = (0, 1), aug: AugmentParams | None = None,
                   in_channels: int = 1, params: PrepParams | None = None,
                   device: torch.device | str | None = None) -> Compose:
    """Chain over *prepared* files for ``"train"`` or ``"val"``; both share the deterministic prefix.

    ``"train"`` pads to the ROI, precomputes crop centres and adds ``RandCropByPosNegLabeld`` plus 90° turns,
    small rotations and flips; ``"val"`` adds the tissue mask when ``params`` are given. With ``device`` the
    deterministic part ends by moving the volumes there, so that a GPU caches them and crops them itself
    (MONAI's fast-training recipe); crop centres stay on the CPU, where they are drawn.
    """
    aug = aug or AugmentParams()
    keys = ["image", "label"]
    xforms: list = [
        *load_transforms(keys, in_channels),
        EnsureTyped("image", dtype=torch.float32),
        *label_mapping(label_values),
        EnsureTyped("label", dtype=torch.uint8),
    ]
    to_device = [ToDeviced(keys, device=str(device))] if device is not None else []
    if mode == "train":
        xforms += [
            SpatialPadd(keys, spatial_size=aug.roi),  # volumes smaller than the ROI
            CropCentresd("label"),
            *to_device,
            RandCropByPosNegLabeld(keys, "label", spatial_size=aug.roi, pos=aug.pos, neg=aug.neg,
                                   num_samples=aug.num_samples, fg_indices_key="label_fg",
                                   bg_indices_key="label_bg"),
            RandRotate90d(keys, prob=0.5, spatial_axes=(1, 2)),
            # range_x turns the (H, W) plane, about the depth axis; MONAI's range_z would tilt depth into
            # height, which empties most of a depth-1 crop.
            RandRotated(keys, range_x=np.deg2rad(aug.rotate_degrees), prob=0.5, mode=["bilinear", "nearest"],
                        padding_mode="zeros"),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            EnsureTyped("label", dtype=torch.uint8),  # rotation resampled it as float
            EnsureTyped(keys, track_meta=False),
            OwnCrops(keys),  # the crop-centre indices stay behind
        ]
    elif mode == "val":
        xforms += [*([Tissued(params)] if params is not None else []), *to_device,
                   EnsureTyped(keys, track_meta=False)]
    else:
        raise ValueError(f"mode must be 'train' or 'val', not {mode!r}")
    return Compose(xforms)


class OwnCrops(MapTransform):
    """Keep only ``keys`` (plus the item's ``name`` and ``group``), each in memory of its own: an unturned,
    unflipped crop is a view into the cached volume, which is not copied at each draw."""

    def __call__(self, data: dict) -> dict:
        out = {k: v for k, v in data.items() if k in ("name", "group")}
        return out | {k: data[k].clone(memory_format=torch.contiguous_format) for k in self.keys}


def make_dataset(items: list[dict], mode: str, label_values: Sequence[int], aug: AugmentParams,
                 cache_rate: float = 1.0, num_workers: int = 0, in_channels: int = 1,
                 params: PrepParams | None = None, device: torch.device | str | None = None) -> Dataset:
    """``CacheDataset`` over prepared ``{"image", "label"}`` items: the deterministic prefix is cached once
    (``cache_rate`` of the items; the rest are read at every use), on ``device`` when given."""
    xforms = get_transforms(mode, label_values, aug, in_channels, params, device)
    if cache_rate <= 0:
        return Dataset(items, xforms)
    try:
        # copy_cache=False: the random transforms never write into the cached arrays and the crops end in memory
        # of their own (OwnCrops; tests/test_transforms.py checks), so a deep copy of each volume at each draw
        # would be wasted.
        return CacheDataset(items, xforms, cache_rate=cache_rate, num_workers=num_workers or None, progress=False,
                            copy_cache=False)
    except RuntimeError:
        for item in items:  # find and name the file that broke caching
            for key in ("image", "label"):
                read_volume(item[key])
        raise
