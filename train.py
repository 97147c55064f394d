"""Train the UNet on data/prep; best and last checkpoints, a Dice plot, metrics and TensorBoard logs in output/.

    python train.py --epochs 200 --device cuda [--data data/prep] [--output output] [--resume]
    python train.py --time-limit 20m --device cpu        # the plan decides what --epochs, --crop … leave open
    python train.py --folds 5 --fold all                 # cross-validation: output/fold_K/, cv.csv, cv.png
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import resource
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.data import DataLoader, ThreadDataLoader, partition_dataset
from monai.losses import DiceCELoss, DiceLoss
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.tensorboard import SummaryWriter

from cases import load_manifest
from common import ArgumentParser, InputError, atomic_write, region_arg, run_command, write_json
from crossval import Judged, assign_folds, decide_run, judge, report, write_decision
from dataset import FLIP_AXES, AugmentParams, PrepParams, make_dataset
from dice import dice_from_counts, mean_dice, overlap_counts
from model import (
    DEFAULT_MODEL_ARGS,
    WINDOW_VOXELS,
    amp_dtype,
    anisotropic_args,
    autocast,
    axis_divisors,
    build_model,
    choose_window,
    flat_args,
    flip_sets,
    inference_amp,
    load_checkpoint,
    model_args,
    model_from_checkpoint,
    predict_logits,
    probabilities,
    resolve_device,
    save_checkpoint,
    set_prior,
    to_classes,
    use_amp,
    window_independent,
    write_models_record,
)
from planner import machine, make_plan

log = logging.getLogger("train")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run was asked to do; stored in the checkpoint."""

    data: str = "data/prep"
    output: str = "output"
    epochs: int = 200
    device: str = "auto"
    batch_size: int | None = None  # None: the plan's (planner.make_plan), like every field marked "plan"
    num_samples: int | None = None  # plan
    crop: tuple[int, int, int] | None = None  # training crop (D, H, W); plan
    pos: float = 1.0
    neg: float = 1.0
    optimizer: str = "adamw"
    lr: float | None = None  # plan
    weight_decay: float = 1e-5
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    pos_weight: float = 1.0
    val_every: int = 1
    overlap: float = 0.75
    sw_batch_size: int | None = None  # None: model.default_sw_batch_size of the device
    patience: int = 0
    amp: bool | None = None
    seed: int = 0
    resume: bool = False
    cache_rate: float = 1.0
    num_workers: int = 0
    widths: tuple[int, ...] | None = None  # UNet channels per level; plan (with strides)
    strides: tuple | None = None  # plan (with widths)
    num_res_units: int | None = None
    norm: str | None = None
    dropout: float | None = None
    regions: tuple[tuple[str, tuple[int, ...]], ...] = ()  # label unions also scored, e.g. (("WT", (1, 2, 3, 4)),)
    window: tuple[int, int, int] | None = None  # inference/validation window; None: chosen from the data
    time_limit: float | None = None  # seconds of training and validation; None: --epochs alone decides
    batch_dice: bool | None = None  # plan: on for depth-1 data (nnU-Net's 2D choice), off for volumes
    plan: str | None = None  # a plan.json whose settings this run re-uses (flags still override)
    select: str = "final"  # which epoch model.pt (what infer.py uses) holds: "final" or "best" (on validation)
    postprocess: bool = True  # decide postprocessing on validation after the last epoch (postprocess.py)
    ema_epochs: float = 5.0  # horizon of the weights' moving average, in epochs; 0: no average, the raw weights
    folds: int = 0  # k-fold cross-validation (crossval.assign_folds); 0: the manifest's train/validation split
    fold: int | None = None  # the fold this run trains (its validation cases are that fold's); None: all in turn
    # The validation cases train too (see docs/experiments.md, "Validation cases that train"); None: yes, unless
    # --folds holds them out, the data's own validation folder sets them apart, or --select best picks an epoch by
    # their Dice.
    train_on_val: bool | None = None
    # Networks of a seed ensemble (seeds seed, seed + 1, ...: OUTPUT/member_K/), averaged at inference; 1: one.
    members: int = 1


# ---------------------------------------------------------------- 1. data


def split_items(manifest: dict[str, Any], data_dir: Path, folds: int = 0, fold: int | None = None, seed: int = 0
                ) -> tuple[list[dict], list[dict]]:
    """(train, val) lists of ``{"image", "label", "name", "group"}`` with paths to the prepared files: the manifest's
    split, or with ``folds`` and ``fold`` fold ``fold``'s cases for validation and the other folds' for training."""
    items: dict[str, list[dict]] = {"train": [], "val": []}
    fold_of = assign_folds(manifest, folds, seed) if folds and fold is not None else {}
    for case in manifest["cases"]:
        if case.get("split") in items:
            if fold_of:
                case = {**case, "split": "val" if fold_of[case["name"]] == fold else "train"}
            item = {"image": str(prepared_path(data_dir, case, "prepared_image")),
                    "label": str(prepared_path(data_dir, case, "prepared_label")), "name": case["name"],
                    "group": case.get("group") or case["name"]}
            for key in ("image", "label"):
                if not Path(item[key]).is_file():
                    raise InputError(f"{item[key]}: listed in the manifest but missing; run preprocess.py again")
            items[case["split"]].append(item)
    if not items["train"] or not items["val"]:
        raise InputError(f"{data_dir}: need at least one training and one validation case, got "
                         f"{len(items['train'])} and {len(items['val'])}")
    return items["train"], items["val"]


def prepared_path(data_dir: Path, case: dict, key: str) -> Path:
    """A prepared file named by the manifest: a plain file name inside ``data_dir``, never a path out of it."""
    name = case.get(key)
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise InputError(f"{data_dir / 'dataset.json'}: case {case.get('name')!r} has a bad {key} {name!r}")
    return data_dir / name


def cache_device(device: torch.device, cases: Sequence[dict], in_channels: int, cache_rate: float
                 ) -> torch.device | None:
    """The GPU when the cached volumes (float32 image, uint8 label) take at most a quarter of its free memory,
    so that crops are cut and turned where the network runs (MONAI's fast-training recipe); else None."""
    if device.type != "cuda" or cache_rate <= 0:
        return None
    need = cache_rate * sum(math.prod(c["prepared_shape"]) * (4 * in_channels + 1) for c in cases)
    free, _ = torch.cuda.mem_get_info(device)
    log.info("cache: %.0f MB of volumes, %s", need / 2**20, "on the GPU" if need < free / 4 else "in host memory")
    return device if need < free / 4 else None


# ---------------------------------------------------------------- 2. distributed (torchrun)


def distributed() -> bool:
    """Whether this process is one of several in a torchrun job."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def torchrun_world() -> int:
    """The processes of the torchrun job this one belongs to (``WORLD_SIZE``), known before the job is joined; 1
    without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the job torchrun describes in the environment (WORLD_SIZE > 1): NCCL with one GPU per local rank,
    gloo on the CPU. Returns (rank, world size, device); (0, 1, device) without torchrun."""
    world = torchrun_world()
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def gather_counts(counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's per-case overlap counts, summed by case (a patient's slices may lie on several ranks)."""
    if not distributed():
        return counts
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: v.tolist() for k, v in counts.items()})
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.items():
            merged[k] = merged.get(k, 0) + torch.tensor(v, dtype=torch.int64)
    return merged


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) everywhere: DDP broadcasts them before each forward, so
    after an epoch's last step each rank holds its own; validation and checkpoints need one set."""
    if distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# ---------------------------------------------------------------- 3. loss


class BinaryDiceBCELoss(torch.nn.Module):
    """Dice loss on sigmoid plus ``BCEWithLogitsLoss(pos_weight)``; logits (B, 1, …), target (B, 1, …) in {0, 1}."""

    def __init__(self, dice_weight: float, bce_weight: float, pos_weight: float, batch_dice: bool = False) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, batch=batch_dice)
        self.bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight]))
        self.dice_weight, self.bce_weight = dice_weight, bce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.float()
        return self.dice_weight * self.dice(logits, target) + self.bce_weight * self.bce(logits, target)


def make_loss(n_classes: int, cfg: TrainConfig) -> torch.nn.Module:
    """Binary: Dice + weighted BCE on one logit channel; multi-class: Dice + cross-entropy on softmax.
    ``cfg.batch_dice`` pools the Dice over the batch's crops: a crop with nothing to find then no longer scores
    a Dice of ~0 whatever is predicted (with 2D slices, most crops of most slices are such crops)."""
    batch = bool(cfg.batch_dice)
    if n_classes == 2:
        return BinaryDiceBCELoss(cfg.dice_weight, cfg.bce_weight, cfg.pos_weight, batch)
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=cfg.dice_weight, lambda_ce=cfg.bce_weight,
                      batch=batch)


# ---------------------------------------------------------------- 4. one epoch


def train_epoch(model, loader, loss_fn, optimizer, scaler, device: torch.device, amp: bool,
                average: AveragedModel | None = None) -> float:
    """One pass over the training crops; mean loss, synchronised once at the end. ``average`` (the weights'
    moving average) follows every step."""
    model.train()
    total, steps = torch.zeros((), device=device), 0
    for batch in loader:
        image = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last_3d)
        label = batch["label"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = model(image)
        loss = loss_fn(logits.float(), label)  # the loss in fp32 whatever precision the network ran in
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if average is not None:
            average.update_parameters(model.module if isinstance(model, DDP) else model)
        total += loss.detach()
        steps += 1
    stats = torch.stack([total, torch.tensor(float(steps), device=device)])
    if distributed():
        dist.all_reduce(stats)  # mean over every rank's steps
    return float(stats[0] / stats[1].clamp_min(1))


def validate(model, loader, label_values: list[int], cfg: TrainConfig, window: tuple[int, ...],
             amp: bool, pool_groups: bool = False) -> tuple[dict[int, float], dict[str, float]]:
    """Dice (dice.py) per foreground label value and per ``cfg.regions`` union, averaged over whole validation
    volumes (sliding ``window``, skipping windows without tissue where the batch holds a ``tissue`` mask, as
    inference does); with ``pool_groups`` over patients instead, each patient's slices pooled (the
    figure the LGG literature reports; a mean over slices would be dominated by the slices with nothing to find).
    Under torchrun each rank scores its share of the volumes and the counts are summed across ranks."""
    model.eval()
    # Predictions and labels hold class indices 0..K-1; regions are given in label values.
    targets = [[c] for c in range(1, len(label_values))]
    targets += [[label_values.index(v) for v in values] for _, values in cfg.regions]
    counts: dict[str, torch.Tensor] = {}  # case (or patient) → (targets, 3)
    for batch in loader:
        logits = predict_logits(model, batch["image"], window, cfg.overlap, cfg.sw_batch_size, amp, batch.get("tissue"))
        # Counted where the prediction lies: one small (targets, 3) tensor per volume comes back to the host.
        label = batch["label"].to(logits.device, non_blocking=True)
        unit = batch["group"][0] if pool_groups else batch["name"][0]
        counts[unit] = counts.get(unit, 0) + overlap_counts(to_classes(probabilities(logits)), label, targets).cpu()
    counts = gather_counts(counts)
    dice = dice_from_counts(torch.stack(list(counts.values()))).mean(0).tolist()
    n = len(label_values) - 1
    return dict(zip(label_values[1:], dice[:n])), dict(zip((name for name, _ in cfg.regions), dice[n:]))


# ---------------------------------------------------------------- 5. outputs


def write_metrics(history: list[dict], path: Path) -> None:
    """``metrics.csv``: epoch, train_loss, val_dice (mean over foreground labels), val_dice_per_label
    (``label:dice`` pairs), val_dice_regions (``name:dice``), lr, seconds; written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["epoch", "train_loss", "val_dice", "val_dice_per_label",
                                             "val_dice_regions", "lr", "seconds"])
    writer.writeheader()
    writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in writer.fieldnames} for row in history)
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue())


def plot_dice(history: list[dict], path: Path) -> None:
    """``dice.png``: validation Dice (y) against epoch (x), best epoch marked; written atomically."""
    rows = [r for r in history if r["val_dice"] is not None]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([r["epoch"] for r in rows], [r["val_dice"] for r in rows], marker=".", label="validation Dice")
    if rows:
        best = max(rows, key=lambda r: r["val_dice"])
        ax.scatter([best["epoch"]], [best["val_dice"]], color="red", zorder=3,
                   label=f"best {best['val_dice']:.3f} (epoch {best['epoch']})")
    ax.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="Validation Dice per epoch")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    with atomic_write(path) as tmp:
        fig.savefig(tmp)


# ---------------------------------------------------------------- 6. the run


class DeferredInterrupt:
    """Hold SIGINT while the block runs, then raise ``KeyboardInterrupt`` if one came (main thread only)."""

    def __enter__(self) -> DeferredInterrupt:
        self.caught = False
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame) -> None:
        self.caught = True

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
        if self.caught:
            raise KeyboardInterrupt


def make_checkpoint(model: torch.nn.Module, run: Plan, epoch: int, best: dict, history: list[dict]) -> dict[str, Any]:
    """What inference needs (weights, model args, preprocessing, labels, window) plus the run's record."""
    cfg, manifest, margs, window = run.cfg, run.manifest, run.margs, run.window
    return {
        "model_state": model.state_dict(),
        "model_args": margs,
        "prep_params": manifest["params"],
        "label_values": manifest["label_values"],
        "channels": manifest.get("channels"),  # how infer.py finds a case's modality files
        "stack_slices": bool(manifest.get("stack_slices")),  # … or stacks a patient's 2D slices
        "regions": {name: list(values) for name, values in cfg.regions},
        "inference": {"roi": list(window), "overlap": cfg.overlap, "sw_batch_size": cfg.sw_batch_size},
        "epoch": epoch,
        "best_dice": best["dice"],
        "best_epoch": best["epoch"],
        "history": history,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "plan": run.record,
        "flip_axes": list(FLIP_AXES),  # what training flipped: the axes test-time flips may use
    }


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run trains, decided from its config and the data: cases, network, crops, validation window."""

    cfg: TrainConfig  # as given, with the crop and batch Dice settled for depth-1 data
    manifest: dict
    train_items: list[dict]
    val_items: list[dict]
    label_values: list[int]
    in_channels: int
    margs: dict
    window: tuple[int, int, int]
    pool_groups: bool  # validation Dice per patient (slices pooled) rather than per volume
    params: PrepParams
    record: dict  # the plan as plan.json has it: every setting, which the plan decided, and from what


def plan(cfg: TrainConfig, device: torch.device | None = None) -> Plan:
    """Read the manifest, fill the settings left open from the data and the machine (``settle``), and settle the
    network (anisotropic strides, 2D kernels for depth-1 data) and the inference window (the training crop for
    instance norm, ``choose_window`` for batch norm)."""
    data_dir = Path(cfg.data)
    manifest = load_manifest(data_dir)
    train_items, val_items = split_items(manifest, data_dir, cfg.folds, cfg.fold, cfg.seed)
    planned = ["train_on_val"] if cfg.train_on_val is None else []
    cfg, train_items = join_validation(cfg, manifest, train_items, val_items)
    if cfg.fold is not None:
        log.info("fold %d of %d: %d training and %d validation cases (%d patients)", cfg.fold, cfg.folds,
                 len(train_items), len(val_items), len({item["group"] for item in val_items}))
    label_values = manifest["label_values"]
    n_classes = len(label_values)
    if n_classes < 2:
        raise InputError(f"{data_dir}: labels hold only {label_values}; nothing to segment")
    in_channels = int(manifest.get("in_channels", 1))
    unknown = sorted({v for _, values in cfg.regions for v in values} - set(label_values))
    if unknown:
        raise InputError(f"--regions: label values {unknown} are not in the data's labels {label_values}")
    cfg, record = settle(cfg, manifest, len(train_items), in_channels, device or torch.device("cpu"))
    record["planned"] = [*record["planned"], *planned]
    margs = model_args(in_channels=in_channels, out_channels=1 if n_classes == 2 else n_classes, channels=cfg.widths,
                       strides=cfg.strides, num_res_units=cfg.num_res_units, norm=cfg.norm, dropout=cfg.dropout)
    window = tuple(cfg.window) if cfg.window else None
    spacings = [c["prepared_spacing"] for c in manifest["cases"] if "prepared_spacing" in c]
    if spacings:
        spacing = np.median(np.asarray(spacings), axis=0)
        isotropic, margs = margs["strides"], anisotropic_args(margs, spacing.tolist())
        if margs["strides"] != isotropic:
            log.info("anisotropic spacing %s mm: strides %s", spacing.round(2).tolist(), margs["strides"])
    flat = all(c["prepared_shape"][0] == 1 for c in manifest["cases"] if c.get("split") in ("train", "val"))
    # Slices of one patient are scored together, as one volume would be.
    pool_groups = flat and len({item["group"] for item in val_items}) < len(val_items)
    if flat:
        # Depth-1 data (2D slices): 2D-equivalent network, depth-1 crops, whole-slice inference.
        margs = flat_args(margs)
        cfg = dataclasses.replace(cfg, crop=(1, *cfg.crop[1:]),
                                  batch_dice=True if cfg.batch_dice is None else cfg.batch_dice)
        log.info("depth-1 data: kernels %s, strides %s, crops %s", margs["kernel_size"], margs["strides"], cfg.crop)
        if pool_groups:
            log.info("validation Dice per patient: %d slices of %d patients pooled", len(val_items),
                     len({item["group"] for item in val_items}))
    if window is None and window_independent(margs["norm"]):
        # Batch norm in eval mode is the same function whatever the window: a large one only saves passes.
        shapes = [c["prepared_shape"] for c in manifest["cases"] if c.get("split") in ("train", "val")]
        window = choose_window(shapes, cfg.crop, axis_divisors(margs))
    elif window is None:
        # Instance norm normalizes over the window it sees: a window unlike the training crops changes the
        # answer, on 2D slices by far (see docs/experiments.md, "The inference window for instance norm").
        window = tuple(cfg.crop)
    log.info("inference window %s (training crops %s, %s norm)", window, cfg.crop, margs["norm"])
    blank = {s: sum(bool(c.get("blank")) for c in manifest["cases"] if c.get("split") == s) for s in ("train", "val")}
    if any(blank.values()):
        log.info("blank images (constant: nothing to segment): %d training, %d validation", blank["train"],
                 blank["val"])
    # plan.json holds the network as built, so that --plan rebuilds exactly it.
    record["settings"] = {**record["settings"], "crop": list(cfg.crop), "window": list(window),
                          "batch_dice": cfg.batch_dice, "widths": list(margs["channels"]),
                          "strides": [list(s) if isinstance(s, list | tuple) else s for s in margs["strides"]]}
    return Plan(cfg, manifest, train_items, val_items, label_values, in_channels, margs, window, pool_groups,
                PrepParams.from_dict(manifest["params"]), record)


def join_validation(cfg: TrainConfig, manifest: dict, train_items: list[dict], val_items: list[dict]
                    ) -> tuple[TrainConfig, list[dict]]:
    """``cfg`` with ``train_on_val`` decided, and the training cases: with the validation ones when it says so. Left
    open, it is on where the validation cases choose no weights and nobody set them apart: the split is the one
    preprocess.py drew (no validation folder of the data's own), no ``--folds``, ``--select final``."""
    if cfg.train_on_val is None:
        own = manifest.get("split", {}).get("from_folders", False)
        cfg = dataclasses.replace(cfg, train_on_val=not (cfg.folds or own or cfg.select == "best"))
    if not cfg.train_on_val:
        return cfg, train_items
    log.info("the %d validation cases train too (--no-train-on-val: held out): their Dice, and the postprocessing "
             "and flips decided on them, come from cases seen in training", len(val_items))
    return cfg, train_items + val_items


PLANNED = ("crop", "widths", "strides", "batch_size", "num_samples", "lr", "batch_dice")


def settle(cfg: TrainConfig, manifest: dict, n_train: int, in_channels: int, device: torch.device
           ) -> tuple[TrainConfig, dict]:
    """``cfg`` with the settings it leaves open (``PLANNED``, None) taken from ``planner.make_plan``; the network
    (widths and strides) only when neither is given. Returns it and the plan record: every setting of the run,
    which of them the plan decided, the fingerprint and machine they came from."""
    open_keys = [k for k in PLANNED if getattr(cfg, k) is None]
    if open_keys:
        shapes = [c["prepared_shape"] for c in manifest["cases"] if c.get("split") in ("train", "val")]
        auto = make_plan(manifest["fingerprint"], shapes, in_channels, device, cfg.time_limit, n_train, cfg.crop)
        if cfg.widths is not None or cfg.strides is not None:  # a network given in part keeps model.py's defaults
            open_keys = [k for k in open_keys if k not in ("widths", "strides")]
        cfg = dataclasses.replace(cfg, **{k: tuple(auto[k]) if isinstance(auto[k], list) else auto[k]
                                          for k in open_keys})
        decided = {k: v for k, v in auto.items() if k not in PLANNED}
    else:
        decided = {"machine": machine(device)}
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("data", "output", "resume", "plan")}
    record = {"settings": settings, "planned": open_keys, "fingerprint": manifest["fingerprint"], **decided}
    log.info("plan: %s", ", ".join(f"{k} {settings[k]}" for k in PLANNED) + f" (from the plan: "
             f"{', '.join(open_keys) or 'none'}); {json.dumps(decided)}")
    return cfg, record


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training of one network (one process, or one rank of a torchrun job); returns ``{"best_dice",
    "best_epoch", "epochs_run", "peak_rss_mb", "train_cases", "model"}`` (the cases this rank trained on, the
    trained network)."""
    rank, world, device = init_distributed(resolve_device(cfg.device))
    if world > 1:
        log.info("rank %d of %d", rank, world)
        if rank:
            log.setLevel(logging.WARNING)  # one copy of the log, rank 0's, for the rest of this process
    try:
        result = _train(cfg, rank, world, device)
        if world > 1:
            # Rank 0 is still writing when the others finish: none may tear the group down under it (seen once:
            # the rank that left first aborted).
            dist.barrier()
        return result
    finally:
        if world > 1:
            dist.destroy_process_group()


@dataclasses.dataclass
class Session:
    """One rank's run as it goes: what it trains (``run``), with what, on which cases, and its record so far."""

    run: Plan
    device: torch.device
    amp: bool
    rank: int
    model: torch.nn.Module  # the network; ``net`` is what trains (under torchrun its DDP wrapper)
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    train_ds: Any
    val_loader: Any
    on_gpu: torch.device | None
    writer: SummaryWriter | None  # rank 0 alone writes
    start: int = 1
    best: dict = dataclasses.field(default_factory=lambda: {"dice": -1.0, "epoch": 0})
    history: list[dict] = dataclasses.field(default_factory=list)
    stale: int = 0  # validations since the best one
    average: AveragedModel | None = None  # the weights' moving average (``--ema-epochs``)

    @property
    def weights(self) -> torch.nn.Module:
        """The network that is validated and saved for inference: the moving average, when there is one."""
        return self.model if self.average is None else self.average.module


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """``train`` as rank ``rank`` of ``world``: each rank caches and trains on its share of the cases, scores its
    share of the validation cases; rank 0 alone writes outputs."""
    started = time.perf_counter()  # the budget counts setup (reading, caching) too
    s = setup(cfg, rank, world, device)
    cfg = s.run.cfg
    # Time kept for the decision after the last epoch: a validation pass per flip combination.
    clock = Clock(cfg.time_limit, started - sum(float(row["seconds"]) for row in s.history),
                  closing=float(len(flip_sets(FLIP_AXES))) if cfg.postprocess else 0.0)
    for epoch in range(s.start, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = cosine_lr(cfg.lr, epoch, cfg.epochs) if clock.limit is None else clock.lr(cfg.lr)
        loss = train_one_epoch(s, epoch, lr)
        clock.trained(time.perf_counter() - t0)
        last = epoch == cfg.epochs or agreed(clock.no_time_for_another())
        validated = agreed(clock.validation_due()) if clock.limit else epoch % cfg.val_every == 0
        t1 = time.perf_counter()
        per_label, per_region = validate(s.weights, s.val_loader, s.run.label_values, cfg, s.run.window, s.amp,
                                         s.run.pool_groups) if validated or last else ({}, {})
        clock.validated(time.perf_counter() - t1, bool(per_label))
        improved = record(s, epoch, loss, lr, per_label, per_region, time.perf_counter() - t0)
        # Every rank sees the same reduced Dice, so every rank stops at the same epoch.
        early = bool(cfg.patience) and s.stale >= cfg.patience
        if rank == 0:
            save(s, epoch, improved, final=last or early, left=clock.left())
        if early:
            log.info("early stop: no better validation Dice for %d validations", s.stale)
        if last or early:
            break
    # Folds decide together (cross_validate), and a seed ensemble's members too (train_members).
    if rank == 0 and cfg.postprocess and cfg.fold is None and cfg.members == 1:
        decide_run(Path(cfg.output), s.run.manifest, s.run.train_items, s.run.val_items, s.device,
                   use_amp(inference_amp(cfg.amp), s.device), dict(cfg.regions))
    if s.writer is not None:
        s.writer.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    log.info("peak memory: %.0f MB resident%s", peak_mb, f", {torch.cuda.max_memory_allocated(device) / 2**20:.0f}"
             " MB on the GPU" if device.type == "cuda" else "")
    return {"best_dice": s.best["dice"], "best_epoch": s.best["epoch"], "epochs_run": len(s.history),
            "peak_rss_mb": peak_mb, "train_cases": [item["name"] for item in s.train_ds.data], "model": s.weights}


def budget_share(time_limit: float | None, start: float, runs_left: int) -> float | None:
    """The seconds of the next of ``runs_left`` runs (members, folds) that share what is left of ``time_limit``
    since ``start`` (``time.perf_counter()``) equally; None without a limit."""
    return None if time_limit is None else max(1.0, (time_limit - (time.perf_counter() - start)) / runs_left)


def train_members(cfg: TrainConfig) -> dict[int, dict[str, Any]]:
    """One network, or with ``--members N`` a seed ensemble: member K trained with seed ``seed + K`` on the same
    cases into ``OUTPUT/member_K/`` (sharing ``--time-limit`` equally among those left), then the flips and
    postprocessing decided on the members' averaged validation predictions, and ``ensemble.json`` (what infer.py
    takes from ``OUTPUT``). ``OUTPUT/plan.json`` is the whole run's plan (``--plan`` re-runs it)."""
    if cfg.members == 1:
        return {0: train(cfg)}
    if torchrun_world() > 1:
        raise InputError("--members under torchrun: one network per torchrun job (--seed to vary it)")
    start, device, out = time.perf_counter(), resolve_device(cfg.device), Path(cfg.output)
    run = plan(cfg, device)
    out.mkdir(parents=True, exist_ok=True)
    write_json(run.record, out / "plan.json")
    log.info("a seed ensemble of %d networks, each in %s/member_K", cfg.members, out)
    results, checkpoints = {}, []
    for k in range(cfg.members):
        sub = out / f"member_{k}"
        results[k] = train(dataclasses.replace(run.cfg, seed=cfg.seed + k, output=str(sub),
                                               time_limit=budget_share(cfg.time_limit, start, cfg.members - k),
                                               resume=cfg.resume and (sub / "last.pt").is_file()))
        checkpoints.append(sub / "model.pt")
    record: dict[str, Any] = {}
    if cfg.postprocess:
        record = decide_run(out, run.manifest, run.train_items, run.val_items, device,
                            use_amp(inference_amp(cfg.amp), device), dict(cfg.regions), checkpoints)
    write_json({"members": cfg.members, "seeds": [cfg.seed + k for k in range(cfg.members)],
                "checkpoints": [str(p.relative_to(out)) for p in checkpoints],
                "flips": record.get("flips", []), "rules": record.get("rules", [])}, out / "ensemble.json")
    write_models_record(out, checkpoints, "members")
    return results


def train_folds(cfg: TrainConfig) -> dict[int, dict[str, Any]]:
    """k-fold cross-validation: fold ``cfg.fold`` (or every fold in turn, sharing ``--time-limit`` equally among
    those left) trained into ``OUTPUT/fold_K/``; once every fold holds a model, ``cross_validate``. The data's own
    train/validation folders, where it has them, win over folds: one run on them."""
    manifest = load_manifest(Path(cfg.data))
    if manifest.get("split", {}).get("from_folders"):
        log.warning("%s: the data comes with its own train/validation split (folders), which wins over --folds",
                    cfg.data)
        return {0: train(dataclasses.replace(cfg, folds=0, fold=None))}
    assign_folds(manifest, cfg.folds, cfg.seed)  # refuses an impossible fold count before any work
    if cfg.fold is not None and not 0 <= cfg.fold < cfg.folds:
        raise InputError(f"--fold {cfg.fold}: folds are numbered 0 to {cfg.folds - 1}")
    todo = list(range(cfg.folds)) if cfg.fold is None else [cfg.fold]
    if len(todo) > 1 and torchrun_world() > 1:  # known before the job is joined, unlike distributed()
        raise InputError("--fold all under torchrun: start one torchrun job per fold (--fold K)")
    start, results = time.perf_counter(), {}
    for i, k in enumerate(todo):
        out = Path(cfg.output) / f"fold_{k}"
        limit = budget_share(cfg.time_limit, start, len(todo) - i)
        results[k] = train(dataclasses.replace(cfg, fold=k, output=str(out), time_limit=limit,
                                               resume=cfg.resume and (out / "last.pt").is_file()))
    if not distributed() or dist.get_rank() == 0:
        cross_validate(cfg)
    return results


def cross_validate(cfg: TrainConfig) -> dict | None:
    """When every fold of ``OUTPUT`` holds its ``model.pt``: each predicts its validation cases, the flips and
    postprocessing are decided on all of them pooled and written into every fold's checkpoint; ``cv.csv``,
    ``cv.png``, ``postprocessing.json`` and ``cv.json`` (the folds that make the ensemble infer.py uses)."""
    out_dir, data_dir = Path(cfg.output), Path(cfg.data)
    checkpoints = [out_dir / f"fold_{k}" / "model.pt" for k in range(cfg.folds)]
    missing = [str(p) for p in checkpoints if not p.is_file()]
    if missing:
        log.info("cross-validation report when every fold is trained; missing %s", ", ".join(missing))
        return None
    manifest = load_manifest(data_dir)
    fold_of = assign_folds(manifest, cfg.folds, cfg.seed)
    train_items, val_items = split_items(manifest, data_dir, cfg.folds, 0, cfg.seed)
    items = train_items + val_items
    judged = [Judged((p,), [i for i in items if fold_of[i["name"]] == k], k) for k, p in enumerate(checkpoints)]
    device = resolve_device(cfg.device)
    amp = use_amp(inference_amp(cfg.amp), device)  # the networks' precision in infer.py
    record = judge(judged, manifest, items, device, amp, FLIP_AXES if cfg.postprocess else (), dict(cfg.regions),
                   cfg.postprocess)
    write_decision(record, checkpoints, out_dir)
    write_json({"folds": cfg.folds, "seed": cfg.seed, "checkpoints": [str(p.relative_to(out_dir)) for p in checkpoints],
                "flips": record["flips"], "rules": record["rules"]}, out_dir / "cv.json")
    write_models_record(out_dir, checkpoints, "folds")
    report(record, out_dir)
    return record


VALIDATION_SHARE = 0.2  # a --time-limit run validates when that keeps validation under this share of the time


@dataclasses.dataclass
class Clock:
    """A ``--time-limit`` run's budget (seconds; None: no limit). The learning rate decays (cosine) with the share of
    the budget spent, not with epochs; validation comes as often as keeps it under ``VALIDATION_SHARE`` of the time;
    the run stops when another epoch and its validation would not fit, validating its last epoch, so that a run of
    any length ends with a decayed learning rate and its best checkpoint chosen on validation."""

    limit: float | None
    start: float  # ``time.perf_counter()`` when the run began (with --resume: earlier by the epochs before)
    epoch_s: float = 0.0  # the latest epoch's training
    val_s: float = 0.0  # the latest validation
    since_val: float = 0.0  # training seconds since the latest validation
    closing: float = 0.0  # validations' worth of time kept for after the last epoch (the postprocessing decision)

    @property
    def spent(self) -> float:
        """Wall-clock seconds of the run so far: setup, training, validation, writing."""
        return time.perf_counter() - self.start

    def lr(self, base: float) -> float:
        """Cosine decay over the budget: ``base`` at the start, towards 0 at its end."""
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, self.spent / self.limit)))

    def trained(self, seconds: float) -> None:
        self.epoch_s, self.since_val = seconds, self.since_val + seconds

    def validated(self, seconds: float, done: bool) -> None:
        if done:
            self.val_s, self.since_val = seconds, 0.0

    def validation_due(self) -> bool:
        """The first validation (it measures its cost), then whenever training since the last one has taken
        (1 - share) / share times a validation."""
        return self.val_s == 0 or self.since_val * VALIDATION_SHARE >= (1 - VALIDATION_SHARE) * self.val_s

    def no_time_for_another(self) -> bool:
        """Whether validating now, another epoch (with a tenth for writing its files), its validation and what
        comes after the last (``closing``) would overrun the budget, measured from the latest of each."""
        return self.limit is not None and self.spent + (2 + self.closing) * self.val_s + 1.1 * self.epoch_s > self.limit

    def left(self) -> float | None:
        return None if self.limit is None else max(0.0, self.limit - self.spent)


def agreed(flag: bool) -> bool:
    """Rank 0's answer on every rank (time differs between processes; their decisions may not)."""
    if not distributed():
        return flag
    value = torch.tensor([float(flag)])
    dist.broadcast(value, src=0)
    return bool(value.item())


def setup(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Session:
    """Plan the run, build the network (the same initial weights on every rank), resume when asked, and cache this
    rank's share of the cases (the deterministic prefix once)."""
    run = plan(cfg, device)
    out_dir = Path(run.cfg.output)
    amp = use_amp(run.cfg.amp, device)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.record, out_dir / "plan.json")
    model, optimizer, scaler, loss_fn = make_training(run, device, amp)
    train_items, val_items = rank_share(run, rank, world)
    average = moving_average(model, run.cfg.ema_epochs, math.ceil(len(train_items) / run.cfg.batch_size))
    start, best, history = 1, {"dice": -1.0, "epoch": 0}, []
    if run.cfg.resume:
        start, best, history = resume_from(out_dir / "last.pt", model, optimizer, scaler, run.margs, average)
    net = model
    if world > 1:
        net = DDP(model, device_ids=[device.index] if device.index is not None
                                                        else None)
    train_ds, val_ds, on_gpu = make_datasets(run, train_items, val_items, device)
    val_loader = make_loader(val_ds, 1, None, on_gpu, device, shuffle=False)
    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start) if rank == 0 else None
    return Session(run, device, amp, rank, model, net, optimizer, scaler, loss_fn, train_ds, val_loader, on_gpu,
                   writer, start, best, history, average=average)


def moving_average(model: torch.nn.Module, epochs: float, steps_per_epoch: int) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights over about ``epochs`` epochs (None for 0): validation
    on a few patients swings by ±0.1 from epoch to epoch with the raw weights; the average is what is validated
    and saved, so that the epoch chosen and the weights kept are less the luck of the last steps."""
    if epochs <= 0:
        return None
    decay = max(0.0, 1.0 - 1.0 / (epochs * steps_per_epoch))
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def rank_share(run: Plan, rank: int, world: int) -> tuple[list[dict], list[dict]]:
    """(train, val) items this rank works on: all of them alone; under torchrun equal training shares (short ones
    repeat a case: every rank must take the same number of steps) and any validation share (counts are summed)."""
    if world == 1:
        return run.train_items, run.val_items
    if len(run.train_items) < world:
        raise InputError(f"{run.cfg.data}: {len(run.train_items)} training case(s) cannot be shared by {world} ranks")
    train_items = partition_dataset(run.train_items, num_partitions=world, shuffle=True, seed=run.cfg.seed,
                                    even_divisible=True)[rank]
    return train_items, run.val_items[rank::world]


def train_one_epoch(s: Session, epoch: int, lr: float) -> float:
    """One epoch of training crops at learning rate ``lr``; returns the mean loss."""
    cfg = s.run.cfg
    # Seeding per epoch makes a resumed run draw the same crops as an uninterrupted one.
    seed = cfg.seed + epoch + 100_003 * s.rank
    s.train_ds.transform.set_random_state(seed=seed)
    loader = make_loader(s.train_ds, cfg.batch_size, seed, s.on_gpu, s.device, cfg.num_workers)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    loss = train_epoch(s.net, loader, s.loss_fn, s.optimizer, s.scaler, s.device, s.amp, s.average)
    sync_buffers(s.model)
    if s.average is not None:  # its averaged batch-norm statistics, too, followed each rank's own
        sync_buffers(s.average.module)
    return loss


def record(s: Session, epoch: int, loss: float, lr: float, per_label: dict[int, float],
           per_region: dict[str, float], seconds: float) -> bool:
    """Add the epoch's row to the history and update the best epoch; returns whether this epoch is the new best."""
    dice = mean_dice(per_label.values()) if per_label else None
    s.history.append({"epoch": epoch, "train_loss": round(loss, 6),
                      "val_dice": None if dice is None else round(dice, 6),
                      "val_dice_per_label": " ".join(f"{v}:{d:.4f}" for v, d in per_label.items()),
                      "val_dice_regions": " ".join(f"{n}:{d:.4f}" for n, d in per_region.items()),
                      "lr": lr, "seconds": round(seconds, 3)})
    improved = dice is not None and dice > s.best["dice"]
    if improved:
        s.best, s.stale = {"dice": dice, "epoch": epoch}, 0
    elif dice is not None:
        s.stale += 1
    return improved


def save(s: Session, epoch: int, improved: bool, final: bool, left: float | None = None) -> None:
    """The epoch's files: ``best.pt`` when improved, ``model.pt`` when this epoch is the one ``--select`` keeps for
    inference (the final one, or the best), ``last.pt``, ``metrics.csv``, ``dice.png``, the log line."""
    out_dir = Path(s.run.cfg.output)
    ckpt = make_checkpoint(s.weights, s.run, epoch, s.best, s.history)
    with DeferredInterrupt():  # Ctrl-C waits until this epoch's files are all written
        if improved:
            save_checkpoint(ckpt, out_dir / "best.pt")
        keep = final if s.run.cfg.select == "final" else improved
        if keep:
            save_checkpoint({**ckpt, "selected": s.run.cfg.select}, out_dir / "model.pt")
            write_models_record(out_dir, [out_dir / "model.pt"], "model")
        resume = {"optimizer": s.optimizer.state_dict(), "scaler": s.scaler.state_dict()}
        if s.average is not None:  # model_state holds the average; training goes on from the raw weights
            resume |= {"train_state": s.model.state_dict(), "average_steps": int(s.average.n_averaged)}
        save_checkpoint({**ckpt, **resume}, out_dir / "last.pt")
        write_metrics(s.history, out_dir / "metrics.csv")
        plot_dice(s.history, out_dir / "dice.png")
    log_epoch(s.writer, s.history[-1], s.best, left)


def make_training(run: Plan, device: torch.device, amp: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                                   torch.amp.GradScaler, torch.nn.Module]:
    """(model, optimizer, scaler, loss) on ``device``; the weights depend only on ``run.cfg.seed``."""
    cfg = run.cfg
    set_determinism(cfg.seed)
    # cuDNN picks the fastest kernels for the crop size once; the crops never change shape.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    # Channels-last: 1.5× faster steps on the CPU (benchmarks/bench_train.py), and cuDNN's preferred 3D layout.
    model = build_model(run.margs)
    labels = run.manifest.get("fingerprint", {}).get("labels", {})
    if all(str(v) in labels for v in run.label_values[1:]):
        set_prior(model, [labels[str(v)]["share"] for v in run.label_values[1:]])
    model = model.to(device, memory_format=torch.channels_last_3d)
    for param in model.parameters():
        if param.ndim == 5 and param.shape[2:] == (1, 1, 1):
            # A 1×1×1 kernel is channels-last either way; its gradient comes contiguous, and DDP's buckets
            # (which copy the parameter's strides) would otherwise warn of a mismatch.
            param.data = param.data.reshape(len(param), -1).clone().view(param.shape)
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Loss scaling only for fp16; bf16 has fp32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype(device) == torch.float16)
    return model, optimizer, scaler, make_loss(len(run.label_values), cfg).to(device)


def make_datasets(run: Plan, train_items: list[dict], val_items: list[dict], device: torch.device
                  ) -> tuple[Any, Any, torch.device | None]:
    """(train, val) datasets with their deterministic prefix cached, on the GPU when it fits (the device
    returned, else None)."""
    cfg = run.cfg
    names = {item["name"] for item in train_items + val_items}
    on_gpu = cache_device(device, [c for c in run.manifest["cases"] if c["name"] in names], run.in_channels,
                          cfg.cache_rate)
    aug = AugmentParams(crop=cfg.crop, pos=cfg.pos, neg=cfg.neg, num_samples=cfg.num_samples)
    train_ds = make_dataset(train_items, "train", run.label_values, aug, cfg.cache_rate, in_channels=run.in_channels,
                            params=run.params, device=on_gpu)
    val_ds = make_dataset(val_items, "val", run.label_values, aug, cfg.cache_rate, in_channels=run.in_channels,
                          params=run.params, device=on_gpu)
    return train_ds, val_ds, on_gpu


def make_loader(ds, batch_size: int, seed: int | None, on_gpu: torch.device | None, device: torch.device,
                num_workers: int = 0, shuffle: bool = True) -> DataLoader:
    """Batches of ``ds``, shuffled by ``seed``. Volumes cached on the GPU cannot go to worker processes: a thread
    prepares the next batch there instead (MONAI's ``ThreadDataLoader``); host batches are pinned for a GPU."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if on_gpu is not None:
        return ThreadDataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
                      pin_memory=device.type == "cuda")


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """Cosine decay from ``base`` at epoch 1 towards 0 after ``epochs``; a function of the epoch, so that a
    resumed run (even one given more epochs) needs no scheduler state."""
    return base * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def resume_from(path: Path, model, optimizer, scaler, margs: dict, average: AveragedModel | None = None
                ) -> tuple[int, dict, list[dict]]:
    """Restore model/optimizer/scaler (and the moving average) from ``last.pt``; returns (next epoch, best,
    history)."""
    ckpt = load_checkpoint(path)
    if ckpt["model_args"] != margs:
        raise InputError(f"{path}: was trained with model {ckpt['model_args']}, not {margs}")
    if "optimizer" not in ckpt or "scaler" not in ckpt:
        raise InputError(f"{path}: holds no optimizer state; resume from last.pt")
    saved = model_from_checkpoint(ckpt, path).state_dict()
    if (average is not None) != ("train_state" in ckpt):
        raise InputError(f"{path}: was trained {'with' if 'train_state' in ckpt else 'without'} a moving average "
                         f"of the weights; resume with the same --ema-epochs")
    if average is not None:
        average.module.load_state_dict(saved)
        average.n_averaged.fill_(int(ckpt["average_steps"]))
        saved = ckpt["train_state"]
    model.load_state_dict(saved)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"{path}: optimizer state does not fit this run ({exc})") from None
    log.info("resuming after epoch %d (best Dice %.4f at epoch %d)", ckpt["epoch"], ckpt["best_dice"],
             ckpt["best_epoch"])
    return ckpt["epoch"] + 1, {"dice": ckpt["best_dice"], "epoch": ckpt["best_epoch"]}, list(ckpt["history"])


def log_epoch(writer: SummaryWriter, row: dict, best: dict, left: float | None = None) -> None:
    """One log line and the TensorBoard scalars for an epoch (with ``left``: the time left of a budget, seconds)."""
    writer.add_scalar("train/loss", row["train_loss"], row["epoch"])
    writer.add_scalar("train/lr", row["lr"], row["epoch"])
    dice = "" if row["val_dice"] is None else f"  val Dice {row['val_dice']:.4f}"
    if row.get("val_dice_per_label", "").count(":") > 1:
        dice += f" ({row['val_dice_per_label']})"
    if row.get("val_dice_regions"):
        dice += f" regions {row['val_dice_regions']}"
    if row["val_dice"] is not None:
        writer.add_scalar("val/dice", row["val_dice"], row["epoch"])
    writer.flush()
    best_text = f"best {best['dice']:.4f} (epoch {best['epoch']})" if best["epoch"] else "no validation yet"
    left_text = "" if left is None else f"  {int(left) // 60}m{int(left) % 60:02d}s left"
    log.info("epoch %3d  loss %.4f%s  %s  %.1fs%s", row["epoch"], row["train_loss"], dice, best_text, row["seconds"],
             left_text)


def build_parser() -> ArgumentParser:
    """train.py's options; those left out come from the plan (``planner.make_plan``) or ``--plan FILE``."""
    d = TrainConfig()
    p = ArgumentParser(__doc__)
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="re-run a plan.json: its settings for every option not given here")
    p.add_argument("--data", default=d.data, help="prepared folder with dataset.json")
    p.add_argument("--output", default=d.output, help="where checkpoints, plots and logs go")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs to train (default: {d.epochs}; with --time-limit, as many as fit)")
    p.add_argument("--time-limit", type=duration, default=None, metavar="T",
                   help="train and validate within T (90s, 20m, 2h): the learning rate decays over T, validations "
                        "take at most a fifth of it, the last epoch is validated")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    p.add_argument("--batch-size", type=int, default=None, help="volumes per step (default: the plan's)")
    p.add_argument("--num-samples", type=int, default=None, help="crops per volume per step (default: the plan's)")
    p.add_argument("--crop", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="training crop (default: the plan's; for 2D slices D becomes 1)")
    p.add_argument("--pos", type=float, default=d.pos, help="weight of crops centred on foreground")
    p.add_argument("--neg", type=float, default=d.neg, help="weight of crops centred on background")
    p.add_argument("--optimizer", choices=["adamw", "adam"], default=d.optimizer)
    p.add_argument("--lr", type=float, default=None, help="initial learning rate, cosine decay (default: the plan's)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--dice-weight", type=float, default=d.dice_weight)
    p.add_argument("--bce-weight", type=float, default=d.bce_weight, help="BCE (binary) or CE (multi-class) weight")
    p.add_argument("--pos-weight", type=float, default=d.pos_weight, help="BCE pos_weight for binary targets")
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--overlap", type=float, default=d.overlap, help="sliding-window overlap in validation")
    p.add_argument("--sw-batch-size", type=int, default=d.sw_batch_size,
                   help="validation windows per network pass (default: 2 on the CPU, 4 on a GPU)")
    p.add_argument("--select", choices=["best", "final"], default=d.select, help="the epoch model.pt keeps for "
                   "inference: the final one (as nnU-Net's checkpoint_final) or the best on validation (as best.pt)")
    p.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=d.postprocess, help="decide "
                   "postprocessing on validation after the last epoch (postprocessing.json); infer.py applies it")
    p.add_argument("--train-on-val", action=argparse.BooleanOptionalAction, default=None, help="train on the "
                   "validation cases too (default: yes, unless --folds, a validation folder, or --select best)")
    p.add_argument("--ema-epochs", type=float, default=d.ema_epochs, help="validate and save a moving average of "
                   "the weights over about this many epochs; 0: the raw weights")
    p.add_argument("--folds", type=int, default=d.folds, help="k-fold cross-validation by patient: OUTPUT/fold_K/ "
                   "per fold, then cv.csv and cv.png; infer.py takes the folds' ensemble; 0: the manifest's split")
    p.add_argument("--members", type=int, default=d.members, metavar="N", help="a seed ensemble: N networks "
                   "(seeds SEED … SEED+N-1) on the same cases into OUTPUT/member_K/, sharing --time-limit; infer.py "
                   "averages them")
    p.add_argument("--fold", type=fold_arg, default=None, metavar="K|all",
                   help="with --folds: the fold to train (0 … N-1), or all in turn (default), sharing --time-limit")
    p.add_argument("--patience", type=int, default=d.patience, help="stop after N validations without gain; 0: off")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on CUDA; --amp: also bf16 on a CPU that has it in hardware)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")
    p.add_argument("--cache-rate", type=float, default=d.cache_rate, help="share of volumes cached in memory")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="data loader processes")
    add_network_options(p)
    p.add_argument("--batch-dice", action=argparse.BooleanOptionalAction, default=None,
                   help="Dice loss pooled over the batch's crops (default: on for 2D slices, off for volumes)")
    p.add_argument("--regions", type=region_arg, nargs="+", default=[], metavar="NAME=V,V",
                   help="label unions also scored in validation (BraTS: WT=1,2,3,4 TC=1,3,4 ET=4)")
    return p


def add_network_options(p: ArgumentParser) -> None:
    """The UNet and its sliding window (left out: the plan's)."""
    p.add_argument("--widths", type=int, nargs="+", default=None,
                   help="UNet channels per level (default: the plan's; with --strides only: "
                        f"{' '.join(map(str, DEFAULT_MODEL_ARGS['channels']))})")
    p.add_argument("--strides", type=int, nargs="+", default=None,
                   help="UNet strides, one fewer than widths (default: the plan's; with --widths only: 2 each)")
    p.add_argument("--num-res-units", type=int, default=None)
    p.add_argument("--norm", default=None, help="instance | batch")
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--window", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="sliding window of validation and inference (default: the training crop; with --norm "
                        f"batch the largest prepared volume, up to {WINDOW_VOXELS} voxels)")


def parse_args(argv: list[str] | None) -> TrainConfig:
    p = build_parser()
    a = p.parse_args(argv)
    if a.plan:
        given = given_options(p, argv)
        for key, value in read_plan(Path(a.plan)).items():
            if key not in given and key not in ("data", "output", "resume", "plan", "fold"):
                setattr(a, key, value)
    if a.epochs is None:
        a.epochs = 100_000 if a.time_limit else TrainConfig.epochs
    check_ranges(a, p)
    for key in ("crop", "window", "widths", "strides", "regions"):  # the config is frozen: tuples, not lists
        value = getattr(a, key)
        setattr(a, key, None if value is None else tuple(tuple(v) if isinstance(v, list) else v for v in value))
    return TrainConfig(**vars(a))


def given_options(p: ArgumentParser, argv: list[str] | None) -> set[str]:
    """The settings ``argv`` gives explicitly (parsed again with every default suppressed)."""
    saved = [(action, action.default) for action in p._actions]
    for action, _ in saved:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(p.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default


def read_plan(path: Path) -> dict[str, Any]:
    """The settings of a plan.json that train.py wrote; anything else is an ``InputError`` naming the file."""
    try:
        settings = json.loads(path.read_text())["settings"]
    except FileNotFoundError:
        raise InputError(f"{path}: no such plan file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a plan written by train.py ({type(exc).__name__}: {exc})") from None
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(TrainConfig)}) if isinstance(
        settings, dict) else ["(not a mapping)"]
    if unknown:
        raise InputError(f"{path}: not a plan written by train.py (unknown settings {unknown})")
    return settings


def fold_arg(text: str) -> int | None:
    """``--fold`` value: a fold number, or ``all`` (None)."""
    if text == "all":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fold number nor 'all'")
    return int(text)


def duration(text: str) -> float:
    """``--time-limit`` value: ``90s``, ``20m``, ``2h`` or plain seconds → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text.lower())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 20m or 2h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def check_ranges(a: argparse.Namespace, p: ArgumentParser) -> None:
    """Refuse numbers no run could use, before any work (settings left to the plan are checked when given)."""
    batch, samples = (1 if v is None else v for v in (a.batch_size, a.num_samples))
    crop = a.crop or [1]
    if not 1 <= a.epochs <= 100_000 or min(batch, samples, a.val_every, *crop) < 1:
        p.error("--epochs (up to 100000), --batch-size, --num-samples, --val-every and --crop must be at least 1")
    if batch * samples > 4096 or max(crop) > 1024 or a.num_workers < 0 or (
            a.sw_batch_size is not None and a.sw_batch_size < 1):
        p.error("--batch-size × --num-samples above 4096, --crop above 1024, negative --num-workers or "
                "--sw-batch-size below 1")
    if (a.lr is not None and a.lr <= 0) or not 0 <= a.overlap < 1 or not 0 <= a.cache_rate <= 1 or a.patience < 0 or (
            not 0 <= a.ema_epochs <= 1000):
        p.error("need --lr > 0, 0 <= --overlap < 1, 0 <= --cache-rate <= 1, --patience >= 0, "
                "0 <= --ema-epochs <= 1000")
    if a.fold is not None and not a.folds:
        p.error("--fold needs --folds N")
    if not 1 <= a.members <= 20 or a.folds and a.members > 1:
        p.error("--members must lie in 1..20, and --folds trains its folds as the ensemble (no --members)")
    if a.folds and not 2 <= a.folds <= 100:
        p.error("--folds must lie in 2..100 (0: the manifest's split)")
    if a.window and (min(a.window) < 1 or max(a.window) > 1024):
        p.error("--window sizes must lie in 1..1024")


def resume_hint(cfg: TrainConfig) -> str:
    """What Ctrl-C tells: where ``--resume`` finds the last complete epoch (``OUTPUT/last.pt``, or a fold's or a
    member's own)."""
    out = Path(cfg.output)
    if cfg.folds:
        where = f"{out / 'fold_K' / 'last.pt'} (each fold begun) hold"
    elif cfg.members > 1:
        where = f"{out / 'member_K' / 'last.pt'} (each member begun) hold"
    else:
        where = f"{out / 'last.pt'} holds"
    return f"{where} the last complete epoch; continue with --resume"


def main(argv: list[str] | None = None) -> int:
    # Slices with nothing to segment are expected (most LGG slices); MONAI warns once per such crop otherwise.
    warnings.filterwarnings("ignore", message="Num foregrounds 0", category=UserWarning)
    given: list[TrainConfig] = []  # the config, once parsed: Ctrl-C may come before

    def work() -> None:
        given.append(parse_args(argv))
        if given[0].folds:
            for k, result in train_folds(given[0]).items():
                log.info("fold %d: best validation Dice %.4f at epoch %d", k, result["best_dice"], result["best_epoch"])
            return
        results = train_members(given[0])
        for k, result in results.items():
            log.info("%sbest validation Dice %.4f at epoch %d", f"member {k}: " if len(results) > 1 else "",
                     result["best_dice"], result["best_epoch"])

    try:
        return run_command(work)
    except KeyboardInterrupt:
        where = resume_hint(given[0]) if given else "before training started"
        print(f"interrupted: {where}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
