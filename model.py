"""The MONAI 3D UNet, built from a plain dict of arguments that travels in every checkpoint; its checkpoints; the
device and mixed-precision rules; and prediction: the sliding window that validation and inference share.

Needs neither the readers nor the transform chain: a network is built, loaded and run from tensors alone.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from imaging.common import InputError, atomic_write, write_json

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
    "output_norm": False,  # MONAI's norm of the last up-sampling's output (see build_model)
}


def model_args(**overrides: Any) -> dict[str, Any]:
    """Defaults updated with ``overrides`` (``None`` values ignored), as JSON-ready lists and numbers."""
    args = dict(DEFAULT_MODEL_ARGS)
    args.update({k: v for k, v in overrides.items() if v is not None})
    args["channels"] = [int(c) for c in args["channels"]]
    args["strides"] = [[int(v) for v in s] if isinstance(s, list | tuple) else int(s) for s in args["strides"]]
    if len(args["strides"]) != len(args["channels"]) - 1:
        raise InputError(f"--widths/--strides: need one stride fewer than widths, got {args['channels']} and "
                         f"{args['strides']}")
    return args


def build_model(args: dict[str, Any]) -> torch.nn.Module:
    """A MONAI ``UNet`` mapping (B, in_channels, D, H, W) to logits (B, out_channels, D, H, W)."""
    unknown = set(args) - set(DEFAULT_MODEL_ARGS)
    if unknown:
        raise InputError(f"model: unknown arguments {sorted(unknown)}")
    a = {**DEFAULT_MODEL_ARGS, **args}
    unet = UNet(
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
    if not a["output_norm"] and a["num_res_units"] > 0:
        # With residual units MONAI's last up-sampling convolution (to out_channels) is normalized before the final
        # convolution: a binary network's logit map passes through a one-channel instance norm, which gives it the
        # same mean and spread in every image, a tumour-free slice's too, and keeps its background from growing
        # confident. That norm has no weights; without it the map is the features' plain linear read-out, as
        # nnU-Net's output layer.
        unet.model[-1][0].adn.N = torch.nn.Identity()
    return unet


def set_prior(model: torch.nn.Module, shares: Sequence[float]) -> None:
    """Start a new network's logits at the training labels' frequencies (foreground ``shares``, one per label
    value after background), as RetinaNet initializes its classifier: the bias of the output convolution set to
    the log-odds of the foreground (one sigmoid channel) or to the log share of each class (softmax), so that the
    first steps learn where the structures are instead of how rare they are. The output convolution is the UNet's
    last (its top residual unit adds an identity)."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)][-1]
    fg = [min(max(float(s), 1e-4), 0.5) for s in shares]
    with torch.no_grad():
        if head.out_channels == 1:
            head.bias.fill_(math.log(fg[0] / (1.0 - fg[0])))
        elif head.out_channels == len(fg) + 1:
            probs = [max(1.0 - sum(fg), 1e-4), *fg]
            head.bias.copy_(torch.tensor([math.log(p) for p in probs], dtype=head.bias.dtype))


def model_from_checkpoint(ckpt: dict[str, Any], path: Path) -> torch.nn.Module:
    """The network a checkpoint describes, with its weights; a mismatch is an ``InputError`` naming ``path``."""
    try:
        # A checkpoint from before "output_norm" was trained with MONAI's norm there.
        model = build_model({"output_norm": True, **ckpt["model_args"]})
        model.load_state_dict(ckpt["model_state"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise InputError(f"{path}: weights do not fit the model they describe ({reason})") from None
    return model


def window_independent(norm: Any) -> bool:
    """Whether a network with this ``norm`` gives the same answer in any inference window: batch norm uses its
    running statistics in eval mode; instance norm normalizes over whatever window it is given."""
    return norm == "batch"


def axis_divisors(args: dict[str, Any]) -> tuple[int, int, int]:
    """(D, H, W) multiples an input needs to come back the same size: the product of the strides per axis."""
    out = [1, 1, 1]
    for s in args["strides"]:
        step = [int(k) for k in s] if isinstance(s, list | tuple) else [int(s)] * 3
        out = [o * k for o, k in zip(out, step)]
    return out[0], out[1], out[2]


def anisotropic_args(args: dict[str, Any], spacing: list[float], ratio: float = 3.0) -> dict[str, Any]:
    """For volumes whose slices are ``ratio`` times thicker than their pixels (spacing (D, H, W) in mm), the
    first levels downsample in-plane only, as nnU-Net does, until depth and in-plane spacing are within 2×.
    Strides already given per axis (the plan's, a plan.json's) are the network's as they stand."""
    d, h, w = spacing
    if d < ratio * min(h, w) or any(isinstance(s, list | tuple) for s in args["strides"]):
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
CHECKPOINT_VERSION = 2  # 2: the inference settings name the sliding window "window" (1: "roi")
# The one list of what a checkpoint holds for inference besides its weights: what an ONNX export carries as its
# metadata, with those every network of an ensemble must share (their names in messages), and those every
# checkpoint has.
INFERENCE_KEYS = ("model_args", "prep_params", "label_values", "channels", "stack_slices", "regions", "inference",
                  "postprocessing", "flip_axes", "epoch", "best_dice", "channel_names", "label_names")
ENSEMBLE_KEYS = {"label_values": "labels", "prep_params": "preprocessing", "channels": "modalities",
                 "stack_slices": "slice stacking"}
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
    ckpt = upgraded(ckpt)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing or ckpt["version"] != CHECKPOINT_VERSION:
        raise InputError(f"{path}: checkpoint version {ckpt.get('version')} or keys {missing} not supported")
    return ckpt


def upgraded(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint (or an ONNX export's metadata) of version 1 in today's terms: its window was named "roi"."""
    settings = ckpt.get("inference")
    if isinstance(settings, dict) and "roi" in settings:
        settings = {("window" if k == "roi" else k): v for k, v in settings.items()}
        ckpt = {**ckpt, "inference": settings, "version": max(ckpt.get("version") or 0, 2)}
    return ckpt


MODELS_RECORD = "models.json"  # in a train.py output folder: the checkpoints infer.py and serve.py load from it


def write_models_record(out_dir: Path, checkpoints: list[Path], kind: str) -> None:
    """``OUTPUT/models.json``: what ``--checkpoint OUTPUT`` means, written by every training (``kind``: "model",
    "folds" or "members"; ``checkpoints`` inside ``out_dir``), so that no file's age decides it."""
    write_json({"kind": kind, "checkpoints": [str(p.relative_to(out_dir)) for p in checkpoints]},
               out_dir / MODELS_RECORD)


# ---------------------------------------------------------------- device and mixed precision


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 on the CPU and on GPUs that compute it natively (compute capability 8.0 and later: A100, H100; no loss
    scaling needed), else fp16 with a GradScaler: ``torch.cuda.is_bf16_supported()`` also says yes on a T4 or a
    V100, which only emulate bf16, many times slower."""
    if device.type != "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX, from /proc/cpuinfo). Only there is
    bf16 faster than fp32 (about twice as fast per network pass); elsewhere oneDNN emulates it, many times
    slower."""
    try:
        flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                 for f in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def inference_amp(requested: bool | None) -> bool:
    """What inference asks ``use_amp`` for: mixed precision unless turned off (False), on the CPU too."""
    return requested is not False


def autocast(device: torch.device, enabled: bool | None) -> torch.autocast:
    """Mixed precision where ``use_amp`` allows it, else a context that changes nothing."""
    on = use_amp(enabled, device)
    return torch.autocast(device.type, dtype=amp_dtype(device) if on else torch.bfloat16, enabled=on)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def use_amp(requested: bool | None, device: torch.device) -> bool:
    """Mixed precision: on CUDA unless turned off (``requested`` False; None: the default); on the CPU only when
    asked (True) and the CPU has bf16 in hardware (``cpu_bf16``), never elsewhere, where it would be slower.
    Inference asks by default (``inference_amp``: its masks agree with fp32's); training does not: its steps are
    faster, but a network trained in bf16 scores well below an fp32 one on new patients (see docs/experiments.md,
    "Mixed precision (bf16) training on the CPU")."""
    if device.type == "cuda":
        return requested is not False
    return requested is True and device.type == "cpu" and cpu_bf16()


# ---------------------------------------------------------------- prediction: sliding windows over a prepared volume


BACKGROUND_LOGIT = 12.0  # how sure a window without tissue is of background: sigmoid(-12) ≈ 6e-6


ONEDNN_MIN_SINGLE = 20480  # PyTorch's CPU convolution takes oneDNN for a batch of one only above this N·C·D·H


class Windows(torch.nn.Module):
    """The network as ``sliding_window_inference`` calls it, (N, C, d, h, w) windows → (N, K, d, h, w) logits.

    - With ``tissue`` the input's last channel marks tissue (``prepared_tissue``): a window without any gets
      certain-background logits instead of a network pass.
    - Windows run channels-last when the model's weights are (1.14× faster on the CPU, the layout cuDNN's 3D
      kernels prefer; mixing the two layouts is slower than either).
    - On the CPU a lone small window runs as a batch of two copies: for a batch of one whose N·C·D·H is at most
      20480, PyTorch (2.13) picks its slow unfold-and-GEMM 3D convolution over oneDNN, so that two copies take a
      third of the time of one.
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


PASS_VOXELS = 4 * 256 * 256  # CPU windows per pass: as many as fit this, at least 2


def default_sw_batch_size(device: torch.device, window: Sequence[int] = (48, 96, 96)) -> int:
    """Windows per network pass: on the CPU 2 for 3D windows (more outgrow the caches and each window runs slower)
    and 4 for 2D ones (more gain little); 4 on a GPU (MONAI's tutorials' value, not tuned here)."""
    return max(2, min(4, PASS_VOXELS // math.prod(window))) if device.type == "cpu" else 4


def model_window(model: torch.nn.Module, window: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """The window ``predict_logits`` slides over an image of spatial ``shape``. A batch-norm network gives the same
    answer in any window, so a small volume is one pass of its own size. Instance norm's statistics include the
    zero padding that training crops of small volumes had, and that the plain call gives them: its window stays
    the crop."""
    divisors = axis_divisors({"strides": model.strides}) if hasattr(model, "strides") else (1, 1, 1)
    return fit_window(window, shape, divisors, shrink=window_independent(getattr(model, "norm", None)))


def fit_window(window: Sequence[int], shape: Sequence[int], divisors: Sequence[int], shrink: bool = True
               ) -> tuple[int, ...]:
    """The window for a volume of ``shape`` (D, H, W): ``window`` rounded up to the network's multiples and, with
    ``shrink``, no larger than the volume itself rounded up to them (a volume smaller than the window is one pass,
    not padded to the window)."""
    return tuple(min(-(-r // d) * d, -(-s // d) * d) if shrink else -(-r // d) * d
                 for r, s, d in zip(window, shape, divisors))


@dataclasses.dataclass(frozen=True)
class Sliding:
    """How the sliding window runs: its size (D, H, W; fitted to each image, ``fit_window``), the overlap of
    neighbouring windows, windows per network pass (None: the device's, ``default_sw_batch_size``), and whether
    the network runs in mixed precision."""

    window: tuple[int, ...]
    overlap: float = 0.75
    sw_batch_size: int | None = None
    amp: bool = False


def checkpoint_sliding(ckpt: dict[str, Any], amp: bool = False) -> Sliding:
    """The sliding window a checkpoint was validated with (its ``inference`` settings)."""
    settings = ckpt["inference"]
    return Sliding(tuple(settings["window"]), settings["overlap"], settings.get("sw_batch_size"), amp)


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, image: torch.Tensor, sliding: Sliding, tissue: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Gaussian-weighted sliding-window logits (B, K, D, H, W) for an image (B, C, D, H, W) on the model's device;
    with ``tissue`` (B, 1, D, H, W) the windows without any are skipped. Stitching happens on the model's device."""
    device = next(model.parameters()).device
    fitted = model_window(model, sliding.window, image.shape[2:])
    sw_batch_size = sliding.sw_batch_size or default_sw_batch_size(device, fitted)
    x = image.to(device, non_blocking=True)
    if tissue is not None:
        x = torch.cat([x, tissue.to(device, x.dtype)], dim=1)
    predictor = Windows(model, getattr(model, "out_channels", 1), tissue is not None)
    with autocast(device, sliding.amp):
        logits = sliding_window_inference(x, fitted, sw_batch_size, predictor, overlap=sliding.overlap,
                                          mode="gaussian")
    return logits.float()


def flip_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of the spatial ``axes`` (of D, H, W), the empty one (no flip) first: nnU-Net's mirroring."""
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(sorted(axes), r)]


def flipped_probabilities(model: torch.nn.Module, image: torch.Tensor, sliding: Sliding,
                          tissue: torch.Tensor | None = None, flips: Sequence[int] = ()) -> Iterator[torch.Tensor]:
    """Probabilities (B, K, D, H, W) of ``model`` for the image as it is, then flipped along each combination of the
    spatial axes ``flips`` (``flip_sets``), each flipped back onto the image. An image that is one window goes
    through one ``predict_logits`` with its flipped copies as one batch, so that they share network passes (on the
    CPU a lone window, a 2D slice, runs as a pair anyway, ``Windows``, and its flipped copy takes the place of the
    duplicate); a larger one is flipped one copy at a time, so that memory holds one copy of the volume and its
    probabilities, not eight."""
    dims = [[2 + a for a in combo] for combo in flip_sets(flips)]  # of (B, C, D, H, W)
    one_window = all(s <= w for s, w in zip(image.shape[2:], model_window(model, sliding.window, image.shape[2:])))
    groups = [dims] if one_window else [[d] for d in dims]
    n = len(image)
    for group in groups:
        x, t = flipped_copies(image, group), flipped_copies(tissue, group)
        probs = probabilities(predict_logits(model, x, sliding, t))
        for k, d in enumerate(group):
            yield probs[k * n:(k + 1) * n].flip(d) if d else probs[k * n:(k + 1) * n]
        del x, t, probs


def flipped_copies(a: torch.Tensor | None, group: Sequence[Sequence[int]]) -> torch.Tensor | None:
    """``a`` flipped along each of ``group``'s dims (an empty one: as it is), concatenated on the batch axis."""
    if a is None or (len(group) == 1 and not group[0]):
        return a
    return torch.cat([a.flip(list(d)) if d else a for d in group])


@torch.inference_mode()
def predict_probabilities(models: Sequence[torch.nn.Module], image: torch.Tensor, sliding: Sliding,
                          tissue: torch.Tensor | None = None, flips: Sequence[int] = ()) -> torch.Tensor:
    """Probabilities (B, K, D, H, W) averaged over ``models`` (an ensemble) and over test-time flips
    (``flipped_probabilities``). Averaged as probabilities, as nnU-Net ensembles folds, so that one overconfident
    network does not outvote the others."""
    total, n = None, 0
    for model in models:
        for p in flipped_probabilities(model, image, sliding, tissue, flips):
            total, n = p.clone() if total is None else total.add_(p), n + 1
    return total.div_(n)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid for one output channel (binary), softmax otherwise; same shape (B, K, D, H, W)."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def to_classes(probs: torch.Tensor) -> torch.Tensor:
    """Class indices (B, 1, D, H, W) from probabilities (B, K, D, H, W): threshold 0.5 or argmax."""
    if probs.shape[1] == 1:
        return (probs > 0.5).to(torch.uint8)
    return probs.argmax(dim=1, keepdim=True).to(torch.uint8)


WINDOW_VOXELS = 64 * 256 * 256  # largest inference window chosen by default: ~2 GB of activations on the CPU


def choose_window(shapes: Sequence[Sequence[int]], crop: Sequence[int], divisors: Sequence[int],
                  max_voxels: int = WINDOW_VOXELS) -> tuple[int, int, int]:
    """Inference window of a batch-norm network: the largest prepared volume (D, H, W) rounded up to the
    network's multiples, so that most volumes take a single pass (the UNet is fully convolutional; 75% overlap
    of training-sized windows computes each voxel about 20 times), shrunk along its longest axis (relative to
    ``crop``) to ``max_voxels``, never smaller than the training crop."""
    up = [-(-r // d) * d for r, d in zip(crop, divisors)]
    window = [max(u, -(-max(s[k] for s in shapes) // d) * d) for k, (u, d) in enumerate(zip(up, divisors))]
    while math.prod(window) > max_voxels:
        k = max((k for k in range(3) if window[k] > up[k]), key=lambda k: window[k] / up[k], default=None)
        if k is None:
            break
        window[k] = max(up[k], window[k] - divisors[k])
    return window[0], window[1], window[2]
