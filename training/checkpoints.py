"""Checkpoints: what one holds, resuming from last.pt, and Ctrl-C that waits for an epoch's files."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from dataset import FLIP_AXES
from imaging.common import InputError
from model import (
    load_checkpoint,
    model_from_checkpoint,
)
from training.config import TrainConfig
from training.planning import Run

log = logging.getLogger("train")


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


# What a run leaves that is worth keeping: a checkpoint, or the record of which checkpoints make the model (a run
# killed before its first checkpoint has only its plan, and may simply run again).
RUN_FILES = ("models.json", "model.pt", "best.pt", "last.pt", "cv.json", "ensemble.json")


def check_output(cfg: TrainConfig) -> None:
    """Refuse, before any work, an ``--output`` that is a file, or that holds a run (in it, or in its folds' and
    members' folders; with ``--fold K`` in that fold's), unless ``--resume`` continues it or ``--overwrite``
    replaces it (its checkpoints and records removed first): a finished run is never lost to a command repeated by
    mistake."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --output is a file, not a folder")
    folders = [out / f"fold_{cfg.fold}"] if cfg.fold is not None else [out, *sorted(out.glob("fold_*")),
                                                                        *sorted(out.glob("member_*"))]
    found = [str((folder / name).relative_to(out)) for folder in folders for name in RUN_FILES
             if (folder / name).exists()]
    if cfg.resume and cfg.overwrite:
        raise InputError("--resume continues the run in --output, --overwrite replaces it: give one of them")
    if cfg.overwrite:  # gone before the new run starts, so that no file of the old one is taken for the new one's
        for name in found:
            (out / name).unlink(missing_ok=True)
    elif found and not cfg.resume:
        listed = ", ".join(found[:3]) + (" …" if len(found) > 3 else "")
        raise InputError(f"{out}: holds a run ({listed}); pass --resume to continue it, --overwrite to replace it, "
                         "or choose another --output")


def make_checkpoint(model: torch.nn.Module, run: Run, epoch: int, best: dict, history: list[dict]) -> dict[str, Any]:
    """What inference needs (weights, model args, preprocessing, labels, window) plus the run's record."""
    cfg, manifest, margs, window = run.cfg, run.manifest, run.margs, run.window
    return {
        "model_state": model.state_dict(),
        "model_args": margs,
        "prep_params": manifest["params"],
        "label_values": manifest["label_values"],
        "channels": manifest.get("channels"),  # how infer.py finds a case's modality files
        "stack_slices": bool(manifest.get("stack_slices")),  # … or stacks a patient's 2D slices
        "channel_names": manifest.get("channel_names"),  # what the input channels and labels are called (MSD)
        "label_names": manifest.get("label_names"),
        "regions": {name: list(values) for name, values in cfg.regions},
        "inference": {"window": list(window), "overlap": cfg.overlap, "sw_batch_size": cfg.sw_batch_size},
        "epoch": epoch,
        "best_dice": best["dice"],
        "best_epoch": best["epoch"],
        "history": history,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "plan": run.plan,
        "flip_axes": list(FLIP_AXES),  # what training flipped: the axes test-time flips may use
    }


def resume_from(path: Path, model, optimizer, scaler, margs: dict, average: AveragedModel | None = None
                ) -> tuple[int, dict, list[dict], dict]:
    """Restore model/optimizer/scaler (and the moving average) from ``last.pt``; returns (next epoch, best,
    history, the validation schedule: ``training.clock.Clock``'s ``every`` and ``overlap``)."""
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
    return (ckpt["epoch"] + 1, {"dice": ckpt["best_dice"], "epoch": ckpt["best_epoch"]}, list(ckpt["history"]),
            dict(ckpt.get("validation") or {}))


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
