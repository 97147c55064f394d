"""The MONAI 3D UNet, built from a plain dict of arguments that travels in every checkpoint."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import UNet

from dataset import InputError, atomic_write

# A serious residual UNet on a GPU (about 4.8 M parameters) that still trains on a CPU in minutes.
DEFAULT_MODEL_ARGS: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],  # or per level [1, 2, 2]: in-plane only
    "kernel_size": 3,  # or [1, 3, 3] for depth-1 (2D) data
    "up_kernel_size": 3,
    "num_res_units": 2,
    "norm": "instance",
    "dropout": 0.0,
}


def model_args(**overrides: Any) -> dict[str, Any]:
    """Defaults updated with ``overrides`` (``None`` values ignored), as JSON-ready lists and numbers."""
    args = dict(DEFAULT_MODEL_ARGS)
    args.update({k: v for k, v in overrides.items() if v is not None})
    args["channels"] = [int(c) for c in args["channels"]]
    args["strides"] = [[int(v) for v in s] if isinstance(s, list | tuple) else int(s) for s in args["strides"]]
    if len(args["strides"]) != len(args["channels"]) - 1:
        raise InputError(f"--channels/--strides: need one stride fewer than channels, got {args['channels']} and "
                         f"{args['strides']}")
    return args


def build_model(args: dict[str, Any]) -> torch.nn.Module:
    """A MONAI ``UNet`` mapping (B, in_channels, D, H, W) to logits (B, out_channels, D, H, W)."""
    unknown = set(args) - set(DEFAULT_MODEL_ARGS)
    if unknown:
        raise InputError(f"model: unknown arguments {sorted(unknown)}")
    a = {**DEFAULT_MODEL_ARGS, **args}
    return UNet(
        spatial_dims=3,
        in_channels=a["in_channels"],
        out_channels=a["out_channels"],
        channels=tuple(a["channels"]),
        strides=tuple(tuple(s) if isinstance(s, list | tuple) else s for s in a["strides"]),
        kernel_size=tuple(a["kernel_size"]) if isinstance(a["kernel_size"], list | tuple) else a["kernel_size"],
        up_kernel_size=tuple(a["up_kernel_size"]) if isinstance(a["up_kernel_size"], list | tuple)
        else a["up_kernel_size"],
        num_res_units=a["num_res_units"],
        norm=a["norm"],
        dropout=a["dropout"],
    )


def model_from_checkpoint(ckpt: dict[str, Any], path: Path) -> torch.nn.Module:
    """The network a checkpoint describes, with its weights; a mismatch is an ``InputError`` naming ``path``."""
    try:
        model = build_model(ckpt["model_args"])
        model.load_state_dict(ckpt["model_state"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise InputError(f"{path}: weights do not fit the model they describe ({reason})") from None
    return model


def window_independent(norm: Any) -> bool:
    """Whether a network with this ``norm`` gives the same answer in any inference window: batch norm uses its
    running statistics in eval mode; instance norm normalizes over whatever window it is given."""
    return norm == "batch"


def divisor(args: dict[str, Any]) -> int:
    """In-plane sizes must be multiples of this (the product of the strides) to come back the same size."""
    out = 1
    for s in args["strides"]:
        out *= int(s[-1]) if isinstance(s, list | tuple) else int(s)
    return out


def axis_divisors(args: dict[str, Any]) -> tuple[int, int, int]:
    """(D, H, W) multiples an input needs to come back the same size: the product of the strides per axis."""
    out = [1, 1, 1]
    for s in args["strides"]:
        step = [int(k) for k in s] if isinstance(s, list | tuple) else [int(s)] * 3
        out = [o * k for o, k in zip(out, step)]
    return out[0], out[1], out[2]


def anisotropic_args(args: dict[str, Any], spacing: list[float], ratio: float = 3.0) -> dict[str, Any]:
    """For volumes whose slices are ``ratio`` times thicker than their pixels (spacing (D, H, W) in mm), the
    first levels downsample in-plane only, as nnU-Net does, until depth and in-plane spacing are within 2×."""
    d, h, w = spacing
    if d < ratio * min(h, w):
        return args
    strides = []
    for s in args["strides"]:
        s = int(s[-1]) if isinstance(s, list | tuple) else int(s)
        if d >= 2 * min(h, w):
            strides.append([1, s, s])
            h, w = h * s, w * s
        else:
            strides.append([s, s, s])
            d, h, w = d * s, h * s, w * s
    return {**args, "strides": strides}


def flat_args(args: dict[str, Any]) -> dict[str, Any]:
    """The same network for depth-1 (2D) data: (1, 3, 3) kernels and in-plane strides, so a slice costs
    what a 2D UNet costs instead of being padded to a deep volume."""
    strides = [s if isinstance(s, list | tuple) else [1, s, s] for s in args["strides"]]
    return {**args, "strides": [[1, int(s[-2]), int(s[-1])] for s in strides], "kernel_size": [1, 3, 3],
            "up_kernel_size": [1, 3, 3]}


CHECKPOINT_FORMAT = "monai-seg-pipeline/checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "model_state", "model_args", "prep_params", "label_values", "inference",
                 "epoch", "best_dice")


def save_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """Write a checkpoint atomically: a temporary file beside it, then ``os.replace``."""
    with atomic_write(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **ckpt}, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True`` (no code runs) and check it is one of ours; else ``InputError``."""
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found (train first, or pass --checkpoint)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise InputError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a checkpoint of this pipeline")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing or ckpt["version"] != CHECKPOINT_VERSION:
        raise InputError(f"{path}: checkpoint version {ckpt.get('version')} or keys {missing} not supported")
    return ckpt
