"""The one transform chain (shared by preprocessing, training, validation and inference) and the training dataset:
its parameters, body and tissue masks, in-plane downsampling, crops and augmentation, ``CacheDataset``.

Arrays are channel-first ``(C, D, H, W)``: after ``Orientationd("SPL")`` axis D runs inferior→superior,
H anterior→posterior and W right→left, which is how SimpleITK/numpy users see an axial scan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, NibabelReader, PersistentDataset, get_track_meta
from monai.data.utils import pickle_hashing
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandRotate90d,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    Resize,
    Resized,
    ScaleIntensityRanged,
    SpatialPadd,
    ToDeviced,
)
from monai.transforms.spatial.functional import resize
from monai.transforms.utils import map_binary_to_indices
from monai.utils import convert_to_tensor, get_equivalent_dtype
from scipy import ndimage

from imaging.readers import read_volume

# Spatial axes (of D, H, W) that training flips at random: in-plane only, so that 2D data stays 2D. Test-time flips
# (model.predict_probabilities) use these, and the checkpoint records them.
FLIP_AXES = (1, 2)

ORIENTATION = "SPL"  # array axes (D, H, W) = inferior→superior, anterior→posterior, right→left


@dataclasses.dataclass(frozen=True)
class PrepParams:
    """How raw volumes become network input; stored in the manifest and in every checkpoint."""

    modality: str = "ct"  # "ct": HU window to [0, 1]; "mr": percentile clip then z-score; "rgb": 8-bit colour / 255
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


class ClipPercentilesd(MapTransform):
    """MONAI's ``ClipIntensityPercentilesd(channel_wise=True)`` with NumPy's percentiles at every size: below a
    million voxels MONAI takes ``torch.quantile``, which sorts (on a 2D slice as long as the network's pass); NumPy
    selects. The same linear interpolation, so the same bounds (tests/test_fast_inference)."""

    def __init__(self, keys: str | Sequence[str], lower: float, upper: float) -> None:
        super().__init__(keys)
        self.q = [lower, upper]

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            flat = np.asarray(img.detach().cpu()).reshape(img.shape[0], -1)
            lo, hi = (torch.as_tensor(b, dtype=img.dtype, device=img.device).view(-1, *[1] * (img.ndim - 1))
                      for b in np.percentile(flat, self.q, axis=1))
            d[key] = img.clamp(lo, hi)
        return d


def intensity_transforms(params: PrepParams) -> list[MapTransform]:
    """CT: clip to the HU window and scale to [0, 1]; MR: percentile clip then z-score; an 8-bit colour picture
    (``"rgb"``, only when asked for): divided by 255, as nnU-Net's ``rgb_to_0_1`` does, so that the colours keep
    their balance and absolute values (z-scoring each channel of each picture shifts the channels against each
    other). Not the default, as its gain did not hold across pictures: a choice for data whose colour carries the
    diagnosis (see docs/experiments.md, "Colour pictures divided by 255")."""
    if params.modality == "ct":
        lo, hi = params.window
        return [ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)]
    if params.modality == "rgb":
        return [ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0)]
    lo, hi = params.percentiles
    return [ClipPercentilesd("image", lower=lo, upper=hi), NormalizeIntensityd("image", channel_wise=True)]


def load_transforms(keys: Sequence[str], in_channels: int = 1) -> list[MapTransform]:
    """Read prepared NIfTI files as ``(C, D, H, W)`` MetaTensors with their affine, dtypes kept.

    Several image channels are stored last, ``(D, H, W, C)``; labels always have one.
    """
    return [LoadImaged(keys, reader=NibabelReader(), image_only=True, dtype=None),
            EnsureChannelFirstd([k for k in keys if k != "image" or in_channels == 1], channel_dim="no_channel"),
            *([EnsureChannelFirstd("image", channel_dim=-1)] if in_channels > 1 and "image" in keys else [])]


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

    crop: tuple[int, int, int] = (48, 96, 96)  # (D, H, W) voxels
    pos: float = 1.0
    neg: float = 1.0
    num_samples: int = 4
    rotate_degrees: float = 15.0  # small random in-plane rotation, on top of 90° turns
    # Random zoom by a factor in these ranges: a depth-1 crop in-plane, by nnU-Net's range; a deeper crop along every
    # axis, by a narrower one, since 3D runs of a few hundred epochs learn faster with less variety (see
    # docs/experiments.md, "nnU-Net's zoom range").
    scale_2d: tuple[float, float] = (0.7, 1.4)
    scale_3d: tuple[float, float] = (0.8, 1.2)
    intensity: bool = True  # intensity augmentation by modality (intensity_augment)


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
    small rotations and flips, and the intensity augmentation that fits ``params.modality`` (CT when not given);
    ``"val"`` adds the tissue mask when ``params`` are given. With ``device`` the
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
            SpatialPadd(keys, spatial_size=aug.crop),  # volumes smaller than the ROI
            CropCentresd("label"),
            *to_device,
            RandCropByPosNegLabeld(keys, "label", spatial_size=aug.crop, pos=aug.pos, neg=aug.neg,
                                   num_samples=aug.num_samples, fg_indices_key="label_fg",
                                   bg_indices_key="label_bg"),
            # 90° turns only where they keep the crop's shape (a batch needs one shape; flips cover 180°)
            *([RandRotate90d(keys, prob=0.5, spatial_axes=(1, 2))] if aug.crop[1] == aug.crop[2] else []),
            *spatial_augment(aug, keys),
            *[RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in FLIP_AXES],
            *(intensity_augment(aug.crop[0], (params or PrepParams()).modality) if aug.intensity else []),
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


def spatial_augment(aug: AugmentParams, keys: Sequence[str]) -> list[MapTransform]:
    """A random in-plane rotation and zoom, in one resampling. The rotation turns the (H, W) plane, about the depth
    axis: one about another axis would tilt depth into height, which empties most of a depth-1 crop; for the same
    reason a depth-1 crop is zoomed in-plane only."""
    volume = aug.crop[0] > 1
    lo, hi = aug.scale_3d if volume else aug.scale_2d
    zoom = (lo - 1.0, hi - 1.0)  # MONAI adds 1 to what it draws
    return [RandAffined(keys, prob=0.5, rotate_range=(np.deg2rad(aug.rotate_degrees), 0.0, 0.0),
                        scale_range=(zoom if volume else (0.0, 0.0), zoom, zoom), mode=["bilinear", "nearest"],
                        padding_mode="zeros")]


def intensity_augment(depth: int, modality: str) -> list[MapTransform]:
    """Random intensity changes of the normalized image, by modality. CT keeps its Hounsfield scale, the same on
    every scanner: brightness, gamma and noise. MR (z-scored; scanners and protocols differ more between patients
    than anything the spatial part covers) gets nnU-Net's whole set, its probabilities and ranges: noise, blur,
    brightness, contrast, low resolution, gamma of the image and of its inverse (both keeping mean and spread),
    plus ``RandClipBrightd``; brightness, contrast and the gammas draw for each channel apart, as nnU-Net's do.
    A colour picture (``"rgb"``, cameras and lighting differ) gets nnU-Net's set without the clip, which z-scores.
    MR's whole set lets networks trained on a few patients find tumours brighter than those they saw; on CT it
    costs accuracy (see docs/experiments.md, "Intensity augmentation"). ``depth``: the crop's; a one-slice crop is
    blurred in-plane only."""
    if modality == "ct":
        return [RandScaleIntensityd("image", factors=0.25, prob=0.15),
                RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
                RandGaussianNoised("image", std=0.1, prob=0.1)]
    sigma_z = (0.5, 1.0) if depth > 1 else (0.0, 0.0)
    return [RandGaussianNoised("image", std=0.1, prob=0.1),
            RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=sigma_z, prob=0.2),
            RandScaleIntensityd("image", factors=0.25, prob=0.15, channel_wise=True),
            RandScaleIntensityFixedMeand("image", factors=0.25, preserve_range=True, prob=0.15, channel_wise=True),
            RandSimulateLowResolutiond("image", zoom_range=(0.5, 1.0), prob=0.25),
            RandGammaPerChanneld("image", gamma=(0.7, 1.5), invert_image=True, retain_stats=True, prob=0.1),
            RandGammaPerChanneld("image", gamma=(0.7, 1.5), retain_stats=True, prob=0.3),
            *([RandClipBrightd("image", prob=0.25)] if modality == "mr" else [])]


class RandGammaPerChanneld(RandAdjustContrastd):
    """``RandAdjustContrastd`` with a gamma of its own for each channel, each channel keeping its own mean and
    spread: nnU-Net applies brightness, contrast and gamma to the channels independently
    (``synchronize_channels=False``), so that on an RGB picture they shift the colour and on MR modalities change
    each one's contrast apart. Whether to apply is drawn once per crop; one channel draws as the parent does."""

    def __call__(self, data: dict) -> dict:
        self.randomize(None)
        if not self._do_transform:
            return {**data, **{key: convert_to_tensor(data[key], track_meta=get_track_meta())
                               for key in self.key_iterator(data)}}
        d = dict(data)
        for key in self.key_iterator(d):
            image = convert_to_tensor(d[key], track_meta=get_track_meta())
            channels = []
            for c in range(image.shape[0]):
                self.adjuster.randomize(None)
                channels.append(self.adjuster(image[c:c + 1], randomize=False))
            d[key] = torch.cat(channels)
        return d


class RandClipBrightd(MapTransform, RandomizableTransform):
    """Clip the brightest voxels at a random percentile (of ``percentiles``) and z-score again: what scanners whose
    bright structures (scalp fat in FLAIR) come out no brighter than the lesion produce. No monotonic transform
    (gamma, contrast) makes the lesion the brightest thing in the image; this does, so that the network has to find
    it by its place and shape too: a network trained on patients whose scalp outshines the tumour otherwise learns
    that the brightest structure is never the tumour (see docs/experiments.md, "Intensity augmentation")."""

    def __init__(self, keys: str | Sequence[str], prob: float = 0.25,
                 percentiles: tuple[float, float] = (80.0, 99.0)) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.percentiles = percentiles
        # the MR preprocessing's own clip (its lower bound at the minimum: no clip) and z-score
        self.clip = ClipPercentilesd(keys, lower=0.0, upper=100.0)
        self.normalize = NormalizeIntensityd(keys, channel_wise=True)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.clip.q = [0.0, self.R.uniform(*self.percentiles)]

    def __call__(self, data: dict) -> dict:
        self.randomize()
        return self.normalize(self.clip(data)) if self._do_transform else data


class OwnCrops(MapTransform):
    """Keep only ``keys`` (plus the item's ``name`` and ``group``), each in memory of its own: an unturned,
    unflipped crop is a view into the cached volume, which is not copied at each draw."""

    def __call__(self, data: dict) -> dict:
        out = {k: v for k, v in data.items() if k in ("name", "group")}
        return out | {k: data[k].clone(memory_format=torch.contiguous_format) for k in self.keys}


@dataclasses.dataclass(frozen=True)
class Caching:
    """Where the deterministic prefix's output is kept: ``rate`` of the items in memory (on ``device`` when given),
    the rest read at every use; or, with a ``folder``, every item's on disk there (``BoundedCache``) and as many as
    ``memory`` bytes hold in memory as well."""

    rate: float = 1.0
    device: torch.device | str | None = None
    folder: Path | None = None
    memory: float = 0.0


def nbytes(item: Any) -> int:
    """Bytes the tensors and arrays of a (nested) item hold."""
    if isinstance(item, torch.Tensor):
        return item.element_size() * item.nelement()
    if isinstance(item, np.ndarray):
        return item.nbytes
    if isinstance(item, dict):
        return sum(nbytes(v) for v in item.values())
    if isinstance(item, list | tuple):
        return sum(nbytes(v) for v in item)
    return 0


def name_hash(item: dict) -> bytes:
    """An item's disk-cache key: its case name (the folder is the manifest's, so a name is one prepared case),
    not its paths, which differ as ``--data`` is spelled; the whole item where it has no name."""
    return pickle_hashing(item.get("name", item))


class BoundedCache(PersistentDataset):
    """Training data larger than memory: the chain's deterministic prefix computed once per item and kept on disk
    in ``folder`` (MONAI's ``PersistentDataset``: one file per item, named by its case and the prefix's
    transforms, so that later runs, folds, members and resumes on the same prepared data reuse it), and items kept
    in memory as well, in order, as long as they fit ``memory`` bytes; the others are read from disk at every
    use. Filled up front,
    as ``CacheDataset`` is, so that the first epoch costs what the others do."""

    def __init__(self, items: list[dict], transform: Compose, folder: Path, memory: float) -> None:
        super().__init__(items, transform, cache_dir=folder, hash_func=name_hash, hash_transform=pickle_hashing)
        self.memory: dict[int, Any] = {}
        self.memory_bytes = 0
        for k, item in enumerate(items):
            # what a cache hit gives (plain tensors), whether this item was computed now or read back
            out = convert_to_tensor(self._cachecheck(item), convert_numeric=False, track_meta=False)
            size = nbytes(out)
            if self.memory_bytes + size <= memory:
                self.memory[k] = out
                self.memory_bytes += size

    def _transform(self, index: int) -> Any:
        cached = self.memory.get(index)
        if cached is None:
            cached = convert_to_tensor(self._cachecheck(self.data[index]), convert_numeric=False, track_meta=False)
        return self._post_transform(cached)


def make_dataset(items: list[dict], mode: str, label_values: Sequence[int], aug: AugmentParams,
                 in_channels: int = 1, params: PrepParams | None = None, cache: Caching = Caching()) -> Dataset:
    """A dataset over prepared ``{"image", "label"}`` items whose deterministic prefix runs once, cached as
    ``cache`` says: in memory (``CacheDataset``), or on disk with some in memory (``BoundedCache``)."""
    xforms = get_transforms(mode, label_values, aug, in_channels, params, cache.device)
    if cache.folder is not None:
        return BoundedCache(items, xforms, cache.folder, cache.memory)
    if cache.rate <= 0:
        return Dataset(items, xforms)
    try:
        # copy_cache=False: the random transforms never write into the cached arrays and the crops end in memory
        # of their own (OwnCrops; tests/test_transforms.py checks), so a deep copy of each volume at each draw
        # would be wasted.
        return CacheDataset(items, xforms, cache_rate=cache.rate, num_workers=None, progress=False, copy_cache=False)
    except RuntimeError:
        for item in items:  # find and name the file that broke caching
            for key in ("image", "label"):
                read_volume(item[key])
        raise
