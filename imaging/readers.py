"""Reading and writing volumes with their geometry: NIfTI (nibabel), NRRD/MHA/MHD and DICOM series (SimpleITK),
TIFF/PNG/BMP (Pillow) as depth-1 volumes; the checks every image and mask must pass.

A volume is a channel-first ``(C, X, Y, Z)`` MetaTensor in the file's own axis order, with its RAS affine.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import PIL.Image
import SimpleITK as sitk
import torch
from monai.data import ImageReader, MetaTensor, NibabelReader
from nibabel.filebasedimages import ImageFileError

from imaging.common import InputError, atomic_write

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_2D_SUFFIXES = (".tif", ".tiff", ".png", ".bmp")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES + IMAGE_2D_SUFFIXES  # what this pipeline reads
READ_ERRORS = (OSError, EOFError, ValueError, RuntimeError, MemoryError, zlib.error, ImageFileError)
MAX_VOXELS = 2**31  # a header declaring more is corrupt or not meant for this pipeline
GRID_TOLERANCE_MM = 1e-3  # affines closer than this describe one grid (image and mask, a case's modalities)


def volume_suffix(path: Path) -> str | None:
    """The recognised volume extension of ``path`` (``.nii.gz`` …) or None."""
    name = path.name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


def dicom_dir(folder: Path) -> Path | None:
    """The one folder at or below ``folder`` that holds ``.dcm`` files, or None when none does (hidden files, such
    as macOS's ``._*`` resource forks, and hidden folders are not slices)."""
    dirs = sorted({p.parent for p in folder.rglob("*") if is_slice_file(p, folder)})
    if len(dirs) > 1:
        raise InputError(f"{folder}: DICOM files in {len(dirs)} folders; give each case one series folder")
    return dirs[0] if dirs else None


def is_slice_file(path: Path, root: Path) -> bool:
    """A ``.dcm`` file below ``root`` that is not hidden and not inside a hidden folder."""
    return (path.suffix.lower() == ".dcm" and path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(root).parts))


def read_dicom_series(folder: Path, spacing_tolerance: float = 0.01) -> sitk.Image:
    """The single series in ``folder``: slices ordered by position along the slice normal, evenly spaced."""
    series_dir = dicom_dir(folder) or folder
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(series_dir))
    if len(ids) != 1:
        raise InputError(f"{folder}: holds {len(ids)} DICOM series; keep exactly one series per case folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir), ids[0])  # sorted by position
    n_dcm = sum(1 for p in series_dir.iterdir() if is_slice_file(p, series_dir))
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


# A mask is written in its input's format (nnU-Net does the same): NIfTI as NIfTI (with the input's header), NRRD and
# MHA/MHD through SimpleITK, PNG/BMP/TIFF as the same kind of picture; a DICOM series (or anything else) as NIfTI.
MASK_SUFFIXES = {".nii.gz": ".nii.gz", ".nii": ".nii.gz", ".nrrd": ".nrrd", ".nhdr": ".nrrd", ".mha": ".mha",
                 ".mhd": ".mha", ".png": ".png", ".bmp": ".bmp", ".tif": ".tif", ".tiff": ".tif"}
MASK_FORMATS = ("nii.gz", "nrrd", "mha", "png", "bmp", "tif")  # what --format may force


def mask_suffix(source: Path, forced: str | None = None) -> str:
    """The suffix of the mask of ``source`` (an image file or a DICOM/slice folder): its own format, or ``forced``."""
    if forced:
        return "." + forced.lstrip(".")
    return MASK_SUFFIXES.get(volume_suffix(source) or "", ".nii.gz") if not source.is_dir() else ".nii.gz"


def write_mask(mask: np.ndarray, affine: np.ndarray, path: Path, binary: bool, source: Path | None = None) -> None:
    """Write a mask (X, Y, Z) in label values, on the grid ``affine`` describes, in the format of ``path``'s suffix,
    atomically. A picture (PNG/BMP/TIFF) holds one slice as rows × columns, lined up pixel for pixel with the image
    it came from: 0/255 when ``binary``, else the label values. A NIfTI ``source`` lends its header."""
    suffix = volume_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        header = None
        if source is not None and volume_suffix(source) in NIFTI_SUFFIXES:
            ref = nib.load(str(source))
            header, affine = ref.header.copy(), ref.affine
        write_nifti(mask, affine, path, header=header)
        return
    if suffix in IMAGE_2D_SUFFIXES:
        if mask.shape[2] != 1:
            raise InputError(f"{path}: a {suffix} picture holds one slice, this mask has {mask.shape[2]}; write a "
                             "volume format (--format nii.gz, nrrd or mha)")
        pixels = mask[:, :, 0].T  # Image2DReader reads x as the column: rows × columns again
        pixels = np.where(pixels > 0, 255, 0) if binary else pixels
        if pixels.max() > (255 if suffix == ".bmp" else 65535):
            raise InputError(f"{path}: label values up to {pixels.max()} do not fit a {suffix} picture")
        img = sitk.GetImageFromArray(pixels.astype(np.uint8 if pixels.max() < 256 else np.uint16))
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)))  # SimpleITK wants (k, j, i)
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)  # RAS back to ITK's LPS
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        img.SetSpacing(spacing.tolist())
        img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
        img.SetOrigin(lps[:3, 3].tolist())
    with atomic_write(path) as tmp:
        sitk.WriteImage(img, str(tmp), True)  # compressed


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


def read_volume(path: str | Path, channel: int | None = None) -> torch.Tensor:
    """One file as a (C, X, Y, Z) MetaTensor (C > 1 for colour 2D images and 4-D NIfTI, whose 4th axis holds the
    channels as MSD stores its modalities, unless ``channel`` picks one); unreadable files and files of another
    dimension raise ``InputError`` naming the file."""
    if Path(path).is_dir():
        if dicom_dir(Path(path)) is None:
            raise InputError(f"{path}: folder holds no DICOM (.dcm) files")
    elif not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")
    declared = nifti_voxels(Path(path))
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
    if meta.pop("channel_first", False):
        pass
    elif data.ndim == 4 and meta.get("original_channel_dim") == -1:  # MSD's 4-D NIfTI: channels on the 4th axis
        data = data.movedim(-1, 0)
    else:
        data = data[None]
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


def nifti_voxels(path: Path) -> int:
    """Voxel count a NIfTI header declares (0 when not NIfTI or unreadable: the full read reports that)."""
    if volume_suffix(path) not in NIFTI_SUFFIXES:
        return 0
    try:
        return int(np.prod(nib.load(str(path)).shape, dtype=np.float64))
    except READ_ERRORS:
        return 0


def declared_voxels(path: Path) -> int:
    """Voxels (pixels × channels for pictures) a file's header declares (a DICOM folder: its slices' together),
    read without decoding its data."""
    if path.is_dir():
        return sum(sitk_voxels(p) for p in path.iterdir())
    suffix = volume_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return nifti_voxels(path)
    try:
        if suffix in IMAGE_2D_SUFFIXES:
            with PIL.Image.open(path) as img:  # reads the header only
                return img.width * img.height * len(img.getbands())
    except PIL.Image.DecompressionBombError:  # Pillow's own limit, below ours: refused all the same
        raise InputError(f"header declares over {2 * PIL.Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb)"
                         ) from None
    except (OSError, ValueError):
        return 0  # unreadable: the full read names the problem
    return sitk_voxels(path)


def declares_2d(path: Path) -> bool:
    """Whether a file holds one 2D slice, from its header alone: a picture, or a volume one voxel deep (``is_2d``);
    a DICOM series folder, a volume or an unreadable file does not."""
    suffix = None if path.is_dir() else volume_suffix(path)
    if suffix in IMAGE_2D_SUFFIXES:
        return True
    try:
        if suffix in NIFTI_SUFFIXES:
            shape = nib.load(str(path)).shape[:3]
        elif suffix in SITK_SUFFIXES:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            shape = reader.GetSize()[:3]
        else:
            return False
    except READ_ERRORS:
        return False
    return len(shape) < 3 or is_2d(shape)


def sitk_voxels(path: Path) -> int:
    """Voxels an NRRD, MHA or DICOM header declares (SimpleITK reads the header only); 0 when unreadable."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return 0
    return int(np.prod(reader.GetSize(), dtype=np.float64)) * reader.GetNumberOfComponents()


def as_label_map(mask: torch.Tensor, path: Path) -> torch.Tensor:
    """(1, X, Y, Z) label map from a mask stored as grey or RGB (a picture), 0/1, 0/255 or float 0./1."""
    if mask.shape[0] > 1 and volume_suffix(Path(path)) not in IMAGE_2D_SUFFIXES:
        raise InputError(f"{path}: mask has {mask.shape[0]} channels (a 4-D file); a mask is one 3D label map")
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
        check_same_grid(v, path, first, paths[0])
    if len(volumes) == 1:
        return first
    meta = {k: v for k, v in first.meta.items() if k != "affine"}
    return MetaTensor(torch.cat([v.as_tensor() for v in volumes]), affine=first.affine, meta=meta)


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


def check_image(volume: torch.Tensor, path: str | Path) -> None:
    """An image must hold finite intensities. A constant one (a blank slice at the end of a stack) is valid: there
    is nothing in it to find, and its mask is empty."""
    if not torch.isfinite(volume).all():
        raise InputError(f"{path}: image contains NaN or Inf intensities")


def is_blank(volume: torch.Tensor) -> bool:
    """Whether an image (C, …) is constant: nothing to segment (counted in the commands' summaries)."""
    return bool(volume.min() == volume.max())


def check_same_grid(volume: torch.Tensor, path: str | Path, ref: torch.Tensor, ref_path: str | Path) -> None:
    """``volume`` (read from ``path``) must lie on ``ref``'s grid: same spatial shape, affines (spacing, origin,
    direction) within ``GRID_TOLERANCE_MM``: a mask and its image, a case's modality files."""
    if volume.shape[1:] != ref.shape[1:]:
        raise InputError(f"{path}: shape {tuple(volume.shape[1:])} differs from {ref_path}'s {tuple(ref.shape[1:])}")
    a, b = np.asarray(volume.affine), np.asarray(ref.affine)
    if not np.allclose(a, b, atol=GRID_TOLERANCE_MM, rtol=0):
        raise InputError(f"{path}: affine differs from {ref_path}'s by up to {np.abs(a - b).max():.4g} mm; "
                         "they must share one grid")


def is_2d(shape: Sequence[int], prepared: bool = False) -> bool:
    """Whether a spatial shape is one 2D slice or picture: depth 1. Depth is Z, the last axis, on an image's own grid
    (X, Y, Z: how every reader stores a picture), and D, the first, on the prepared grid (D, H, W, after
    ``dataset.ORIENTATION``): the one rule for every "is this 2D?" of the pipeline."""
    return int(shape[0 if prepared else -1]) == 1


def label_dtype(max_value: int) -> type:
    """How a label map is stored: uint8 when its values fit, else int16."""
    return np.uint8 if max_value < 256 else np.int16


def spacing_mm(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each array axis (X, Y, Z), mm."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def voxel_size(shape: Sequence[int], affine: np.ndarray) -> tuple[str, float]:
    """("mm2", pixel area) for a single slice, where an area means more than a volume; else ("ml", voxel mL)."""
    if is_2d(shape):
        return "mm2", float(np.prod(spacing_mm(affine)[:2]))
    return "ml", abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


def segmented_size(mask: np.ndarray, affine: np.ndarray) -> tuple[float, str]:
    """Foreground of a mask (X, Y, Z) as (amount, unit): mm² for a single slice, mL for a volume."""
    unit, per_voxel = voxel_size(mask.shape, affine)
    return float((mask > 0).sum() * per_voxel), {"ml": "mL", "mm2": "mm²"}[unit]
