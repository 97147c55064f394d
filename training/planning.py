"""A run decided from its config and the data: the cases and their split, the planner's settings, the network
as built and the inference window (Run, and Run.plan: what plan.json holds)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataset import PrepParams
from evaluation.crossval import assign_folds
from imaging.cases import load_manifest, patient_units, record_group
from imaging.common import InputError
from imaging.readers import is_2d
from model import (
    anisotropic_args,
    axis_divisors,
    choose_window,
    flat_args,
    model_args,
    use_amp,
    window_independent,
)
from training.config import PLANNED, TrainConfig
from training.planner import Task, machine, make_plan

log = logging.getLogger("train")


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
                    "group": record_group(case)}
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


@dataclasses.dataclass(frozen=True)
class Run:
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
    plan: dict  # what plan.json holds: every setting, which of them the planner decided, and from what


def plan_run(cfg: TrainConfig, device: torch.device | None = None) -> Run:
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
    used = [c for c in manifest["cases"] if c.get("split") in ("train", "val")]
    flat = all(is_2d(c["prepared_shape"], prepared=True) for c in used)
    # Slices of one patient are scored together, as one volume would be.
    patients = patient_units([(item["name"], item["group"]) for item in val_items])
    pool_groups = flat and len(patients) < len(val_items)
    if flat:
        # Depth-1 data (2D slices): 2D-equivalent network, depth-1 crops, whole-slice inference.
        margs = flat_args(margs)
        cfg = dataclasses.replace(cfg, crop=(1, *cfg.crop[1:]),
                                  batch_dice=True if cfg.batch_dice is None else cfg.batch_dice)
        log.info("depth-1 data: kernels %s, strides %s, crops %s", margs["kernel_size"], margs["strides"], cfg.crop)
        if pool_groups:
            log.info("validation Dice per patient: %d slices of %d patients pooled", len(val_items), len(patients))
    if window is None and window_independent(margs["norm"]):
        # Batch norm in eval mode is the same function whatever the window: a large one only saves passes.
        window = choose_window([c["prepared_shape"] for c in used], cfg.crop, axis_divisors(margs))
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
    return Run(cfg, manifest, train_items, val_items, label_values, in_channels, margs, window, pool_groups,
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


def settle(cfg: TrainConfig, manifest: dict, n_train: int, in_channels: int, device: torch.device
           ) -> tuple[TrainConfig, dict]:
    """``cfg`` with the settings it leaves open (``PLANNED``, None) taken from ``planner.make_plan``; the network
    (widths and strides) only when neither is given. Returns it and the plan record: every setting of the run,
    which of them the plan decided, the fingerprint and machine they came from."""
    open_keys = [k for k in PLANNED if getattr(cfg, k) is None]
    if open_keys:
        shapes = [c["prepared_shape"] for c in manifest["cases"] if c.get("split") in ("train", "val")]
        task = Task(manifest["fingerprint"], shapes, in_channels, n_train)
        auto = make_plan(task, device, use_amp(cfg.amp, device), cfg.time_limit, cfg.crop)
        if cfg.widths is not None or cfg.strides is not None:  # a network given in part keeps model.py's defaults
            open_keys = [k for k in open_keys if k not in ("widths", "strides")]
        cfg = dataclasses.replace(cfg, **{k: tuple(auto[k]) if isinstance(auto[k], list) else auto[k]
                                          for k in open_keys})
        decided = {k: v for k, v in auto.items() if k not in PLANNED}
    else:
        decided = {"machine": machine(device)}
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("data", "output", "resume", "overwrite", "plan")}
    record = {"settings": settings, "planned": open_keys, "fingerprint": manifest["fingerprint"], **decided}
    log.info("plan: %s", ", ".join(f"{k} {settings[k]}" for k in PLANNED) + f" (from the plan: "
             f"{', '.join(open_keys) or 'none'}); {json.dumps(decided)}")
    return cfg, record
