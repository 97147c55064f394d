"""train.py's command line turned into a TrainConfig: --plan files, durations, folds, ranges no run could use."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

from imaging.common import ArgumentParser, InputError, region_arg
from model import DEFAULT_MODEL_ARGS, WINDOW_VOXELS
from training.config import TrainConfig

log = logging.getLogger("train")


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


# What a plan file never sets: where the run reads and writes, whether it continues, this machine's memory.
NOT_PLANNED = ("data", "output", "resume", "overwrite", "plan", "fold", "cache_memory")


def memory_size(text: str) -> float:
    """``--cache-memory`` value: ``8G``, ``512M``, ``1.5GB`` or plain bytes → bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size such as 8G or 512M")
    return float(match[1]) * 1024 ** " kmgt".index(match[2] or " ")


def check_ranges(a: argparse.Namespace, p: ArgumentParser) -> None:
    """Refuse numbers no run could use, before any work (settings left to the plan are checked when given)."""
    batch, samples = (1 if v is None else v for v in (a.batch_size, a.num_samples))
    crop = a.crop or [1]
    if not 1 <= a.epochs <= 100_000 or min(batch, samples, a.val_every or 1, *crop) < 1:
        p.error("--epochs (up to 100000), --batch-size, --num-samples, --val-every and --crop must be at least 1")
    if batch * samples > 4096 or max(crop) > 1024 or (a.num_workers or 0) < 0 or (
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


def build_parser(description: str | None = None) -> ArgumentParser:
    """train.py's options; those left out come from the plan (``planner.make_plan``) or ``--plan FILE``."""
    d = TrainConfig()
    p = ArgumentParser(description)
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
    p.add_argument("--val-every", type=int, default=d.val_every,
                   help="validate every N epochs (default: as often as keeps validation a fifth of the time, its "
                   "overlap at most 0.5 once a validation costs more than four epochs)")
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
    p.add_argument("--deterministic", action="store_true", help="cuDNN's deterministic kernels: a GPU run repeats "
                   "bit for bit, slower (default: the fastest kernels for the crop, benchmarked once)")
    p.add_argument("--overwrite", action="store_true", help="replace the run OUTPUT holds (refused without this or "
                   "--resume)")
    p.add_argument("--cache-rate", type=float, default=d.cache_rate, help="share of volumes cached in memory")
    p.add_argument("--cache-memory", type=memory_size, default=d.cache_memory, metavar="SIZE",
                   help="memory for cached volumes, e.g. 8G (default: half of what is available); data that needs "
                   "more is cached on disk in DATA/.cache/, the first volumes in memory too")
    p.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="data loader processes (default: as many as keep a step fed, measured at the start)")
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


def parse_args(argv: list[str] | None, description: str | None = None) -> TrainConfig:
    """``argv`` as a TrainConfig: a ``--plan`` file's settings for the options not given, ranges checked."""
    p = build_parser(description)
    a = p.parse_args(argv)
    if a.plan:
        given = given_options(p, argv)
        for key, value in read_plan(Path(a.plan)).items():
            if key not in given and key not in NOT_PLANNED:
                setattr(a, key, value)
    if a.epochs is None:
        a.epochs = 100_000 if a.time_limit else TrainConfig.epochs
    check_ranges(a, p)
    for key in ("crop", "window", "widths", "strides", "regions"):  # the config is frozen: tuples, not lists
        value = getattr(a, key)
        setattr(a, key, None if value is None else tuple(tuple(v) if isinstance(v, list) else v for v in value))
    return TrainConfig(**vars(a))
