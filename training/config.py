"""TrainConfig: everything a run was asked to do (stored in the checkpoint), and the settings a plan may fill."""

from __future__ import annotations

import dataclasses
import logging

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
    val_every: int | None = None  # None: as often as keeps validation a fifth of the time (training.clock)
    overlap: float = 0.75
    sw_batch_size: int | None = None  # None: model.default_sw_batch_size of the device
    patience: int = 0
    amp: bool | None = None
    seed: int = 0
    resume: bool = False
    deterministic: bool = False  # cuDNN's deterministic kernels (slower) instead of the fastest for the crop
    overwrite: bool = False  # replace the run OUTPUT holds (without it or --resume, a run there is refused)
    cache_rate: float = 1.0
    cache_memory: float | None = None  # bytes of memory for cached volumes (None: half of what is available)
    num_workers: int | None = None  # loader processes (None: measured, ``training.data.loader_workers``)
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


PLANNED = ("crop", "widths", "strides", "batch_size", "num_samples", "lr", "batch_dice")
