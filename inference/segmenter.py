"""A checkpoint's networks (one, or an ensemble) applied to an image on its own grid: the preprocessing recorded in
the checkpoint, the sliding window with test-time flips, MONAI's ``Invertd`` back to the input's grid, the
postprocessing rules; and which checkpoints a ``--checkpoint`` names. What infer.py and serve.py share, so that a mask
from the web page is the command line's byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from dataset import FLIP_AXES, PrepParams, prepare_transforms, prepared_tissue
from evaluation.postprocess import apply_rules
from imaging.cases import case_name
from imaging.common import InputError
from imaging.readers import is_2d, label_dtype, spacing_mm
from inference.onnx_engine import OnnxNetwork
from model import (
    ENSEMBLE_KEYS,
    MODELS_RECORD,
    Sliding,
    checkpoint_sliding,
    inference_amp,
    load_checkpoint,
    model_from_checkpoint,
    model_window,
    predict_probabilities,
    resolve_device,
    to_classes,
)


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
class Given:
    """What the command line sets instead of the checkpoint (None: the checkpoint's, or the device's default)."""

    window: Sequence[int] | None = None
    overlap: float | None = None
    sw_batch_size: int | None = None
    amp: bool | None = None
    tta: bool | None = None


@dataclasses.dataclass(frozen=True)
class Segmenter:
    """A checkpoint's network (or an ensemble's networks) with its preprocessing, sliding window, test-time flips
    and postprocessing: an image on its own grid in, a mask out."""

    models: tuple[torch.nn.Module, ...]
    ckpt: dict  # the first checkpoint's (labels, preprocessing, window: an ensemble's all agree, ``check_ensemble``)
    sliding: Sliding
    flips: tuple[int, ...] = ()  # spatial axes of the test-time flips; (): none
    rules: tuple[dict, ...] = ()  # postprocessing (infer.py applies it per unit: ``postprocess_unit``)

    @property
    def model(self) -> torch.nn.Module:
        return self.models[0]

    @property
    def window(self) -> tuple[int, ...]:
        return self.sliding.window

    @classmethod
    def load(cls, paths: Path | Sequence[Path], device: torch.device, given: Given | None = None) -> Segmenter:
        """The checkpoints at ``paths`` on ``device``, refused in one line where they cannot be one ensemble; the
        rest as ``assemble``."""
        paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        ckpts = [load_checkpoint(p) for p in paths]
        check_ensemble(ckpts, paths)
        models = tuple(model_from_checkpoint(c, p).to(device, memory_format=torch.channels_last_3d).eval()
                       for c, p in zip(ckpts, paths))
        return cls.assemble(models, ckpts, given)

    @classmethod
    def assemble(cls, models: tuple, ckpts: Sequence[dict], given: Given | None = None) -> Segmenter:
        """Networks (PyTorch's, or ONNX Runtime's) with what their checkpoints say, except what is ``given``: the
        first's window and overlap; flips as the checkpoints decided on validation (``tta`` None), every axis
        training flipped (True) or none (False); the postprocessing rules every checkpoint holds."""
        given = given or Given()
        tta = given.tta
        decided = [c.get("postprocessing") or {} for c in ckpts]
        rules = tuple(r for r in decided[0].get("rules", []) if all(r in d.get("rules", []) for d in decided))
        if tta is None:  # the decision, where every network made the same one
            agreed = all(d.get("flips") == decided[0].get("flips") for d in decided)
            flips = decided[0].get("flips", []) if agreed else []
        else:
            flips = (ckpts[0].get("flip_axes") or list(FLIP_AXES)) if tta else []
        saved = checkpoint_sliding(ckpts[0])
        overlap = saved.overlap if given.overlap is None else given.overlap
        sliding = Sliding(tuple(given.window or saved.window), overlap, given.sw_batch_size, inference_amp(given.amp))
        return cls(tuple(models), ckpts[0], sliding, tuple(flips), rules)

    def __call__(self, image: MetaTensor, path: Path) -> np.ndarray:
        """Mask (X, Y, Z) in label values on the grid of ``image`` (C, X, Y, Z), as read from ``path``."""
        return self.segment([(image, path)])[0]

    def segment(self, inputs: Sequence[tuple[MetaTensor, Path]]) -> list[np.ndarray]:
        """Masks (X, Y, Z) in label values for several images (a patient's slices), from ``input_probabilities``."""
        values = np.asarray(self.ckpt["label_values"])
        return [values[to_classes(p[None])[0, 0].numpy()].astype(label_dtype(int(values.max())))
                for p in self.input_probabilities(inputs)]

    def input_probabilities(self, inputs: Sequence[tuple[MetaTensor, Path]]) -> list[torch.Tensor]:
        """Probabilities (K, X, Y, Z) on each image's own grid: each prepared by the checkpoint's chain; the 2D
        ones that one window covers go through the networks together, padded as the sliding window pads a lone
        one (the same masks as one by one: tests/test_fast_inference.py), the rest one by one."""
        params = PrepParams.from_dict(self.ckpt["prep_params"])
        chain = prepare_transforms(params, with_label=False)
        prepared = []
        for image, path in inputs:
            if image.shape[0] != self.ckpt["model_args"]["in_channels"]:
                raise InputError(f"{path}: has {image.shape[0]} channel(s), the model takes "
                                 f"{self.ckpt['model_args']['in_channels']}")
            prepared.append(chain({"image": image})["image"])
        probs: list[torch.Tensor | None] = [None] * len(prepared)
        flat = [k for k, p in enumerate(prepared) if is_2d(p.shape[1:], prepared=True)]
        if flat:
            window = model_window(self.model, self.window, np.max([prepared[k].shape[1:] for k in flat], 0))
            flat = [k for k in flat if all(np.less_equal(prepared[k].shape[1:], window))]
        for start in range(0, len(flat), SLICES_PER_PASS):
            batch = flat[start:start + SLICES_PER_PASS]
            pads = [[(d // 2, d - d // 2) for d in np.subtract(window, prepared[k].shape[1:])] for k in batch]
            x = torch.stack([_pad(prepared[k].as_tensor(), pad) for k, pad in zip(batch, pads)])
            tissue = torch.stack([_pad(prepared_tissue(prepared[k], params).to(x.dtype), pad)
                                  for k, pad in zip(batch, pads)])
            out = self.probabilities(x, dataclasses.replace(self.sliding, window=window), tissue)
            for k, pad, p in zip(batch, pads, out):
                probs[k] = p[(slice(None), *(slice(a, w - b) for (a, b), w in zip(pad, window)))]
        for k, p in enumerate(prepared):
            if probs[k] is None:
                probs[k] = self.probabilities(p[None], self.sliding, prepared_tissue(p, params)[None])[0]
        return [invert_to_original(q, p, chain) for q, p in zip(probs, prepared)]

    def probabilities(self, x: torch.Tensor, sliding: Sliding, tissue: torch.Tensor) -> torch.Tensor:
        """The networks' probabilities (B, K, D, H, W) for prepared images (B, C, D, H, W), flips averaged."""
        return predict_probabilities(self.models, x, sliding, tissue, self.flips)


SLICES_PER_PASS = 16  # 2D images segmented together: bounds the memory (16 × 4 flips × 256×256 × widths)


def _pad(x: torch.Tensor, pad: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(C, D, H, W) padded with zeros by ((before, after) per spatial axis), as ``sliding_window_inference`` pads."""
    return torch.nn.functional.pad(x, [v for before_after in reversed(pad) for v in before_after])


def check_ensemble(ckpts: Sequence[dict], paths: Sequence[Path]) -> None:
    """Refuse, in one line, checkpoints that disagree on what an ensemble averages voxel for voxel or how it reads
    inputs (``model.ENSEMBLE_KEYS``)."""
    for ckpt, path in zip(ckpts[1:], paths[1:]):
        for key, name in ENSEMBLE_KEYS.items():
            if ckpt.get(key) != ckpts[0].get(key):
                raise InputError(f"{path}: its {name} ({ckpt.get(key)}) differ from {paths[0]}'s "
                                 f"({ckpts[0].get(key)}); an ensemble needs one dataset's checkpoints")
        if ckpt["model_args"]["in_channels"] != ckpts[0]["model_args"]["in_channels"]:
            raise InputError(f"{path}: takes {ckpt['model_args']['in_channels']} input channel(s), {paths[0]} "
                             f"{ckpts[0]['model_args']['in_channels']}; an ensemble needs one dataset's checkpoints")


# What train.py writes into OUTPUT besides model.pt: the networks of an ensemble, inside OUTPUT
# (cross-validation's folds, a seed ensemble's members).
ENSEMBLE_LISTS = ("cv.json", "ensemble.json")


def checkpoint_paths(specs: Sequence[str]) -> list[Path]:
    """Checkpoint files from ``--checkpoint``: a file as it is; a train.py output folder gives the checkpoints its
    ``models.json`` lists (its ``model.pt``, a cross-validation's folds, a seed ensemble's members). A folder from
    before that record gives the one of ``model.pt``, ``cv.json``, ``ensemble.json`` it holds, and refuses to guess
    between several."""
    out: list[Path] = []
    for spec in map(Path, specs):
        if not spec.is_dir():
            out.append(spec)
        elif (spec / MODELS_RECORD).is_file():
            out += listed_checkpoints(spec / MODELS_RECORD)
        else:
            written = [p for p in (spec / "model.pt", *(spec / name for name in ENSEMBLE_LISTS)) if p.is_file()]
            if len(written) != 1:
                raise InputError(f"{spec}: holds {' and '.join(p.name for p in written) or 'no model.pt'} without "
                                 f"{MODELS_RECORD}; train first, or name the checkpoint or listing to use")
            out += written if written[0].suffix == ".pt" else listed_checkpoints(written[0])
    return out


def listed_checkpoints(listing: Path) -> list[Path]:
    """The checkpoints a ``models.json``, ``cv.json`` or ``ensemble.json`` lists, each inside its folder."""
    try:
        names = json.loads(listing.read_text())["checkpoints"]
        paths = [listing.parent / name for name in names
                 if ".." not in Path(name).parts and not Path(name).is_absolute()]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{listing}: not a {listing.name} written by train.py ({type(exc).__name__})") from None
    if not paths or len(paths) != len(names):
        raise InputError(f"{listing}: lists no checkpoints inside its folder")
    return paths


def mask_path(source: Path, out_dir: Path, suffix: str = ".nii.gz") -> Path:
    """``out_dir/<input stem>_mask<suffix>`` (a case name works too): a file name only, so it cannot point outside
    ``out_dir``."""
    return out_dir / f"{Path(case_name(source)).name}_mask{suffix}"


def postprocess_unit(masks: list[np.ndarray], affines: Sequence, rules: Sequence[dict]) -> list[np.ndarray]:
    """The checkpoint's postprocessing rules applied to one unit's masks (X, Y, Z): a volume alone, a patient's
    single-slice masks of one shape stacked along the slice axis (Z), so that components are counted in 3D."""
    if not rules:
        return masks
    mm3 = [float(np.prod(spacing_mm(np.asarray(a, dtype=np.float64)))) for a in affines]
    if len(masks) > 1 and all(m.shape == masks[0].shape and is_2d(m.shape) for m in masks):
        stack = apply_rules(np.concatenate(masks, axis=2), rules, mm3[0])
        return [stack[:, :, [z]] for z in range(len(masks))]
    return [apply_rules(m, rules, v) for m, v in zip(masks, mm3)]


def load_segmenter(paths: Sequence[Path], device: str, engine: str = "torch", given: Given | None = None
                   ) -> Segmenter:
    """The checkpoints' networks under PyTorch (``Segmenter.load``), or with ``engine="onnx"`` one exported
    ``.onnx`` file (its metadata standing in for the checkpoint) under ONNX Runtime on the CPU; the same
    preprocessing, window, flips, inverse and postprocessing."""
    if engine != "onnx":
        return Segmenter.load(paths, resolve_device(device), given)
    if len(paths) != 1:
        raise InputError(f"--engine onnx: runs one .onnx file, got {len(paths)} checkpoints")
    net = OnnxNetwork(paths[0])  # its metadata stands in for the checkpoint
    return Segmenter.assemble((net,), [net.ckpt], dataclasses.replace(given or Given(), amp=False))
