"""What trains: the network on its device, the loss, the optimizer, the grad scaler and the weights' moving average."""

from __future__ import annotations

import dataclasses
import logging

import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.utils import set_determinism
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model import (
    amp_dtype,
    build_model,
    set_prior,
)
from training.config import TrainConfig
from training.planning import Run

log = logging.getLogger("train")


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


@dataclasses.dataclass
class Learner:
    """What a training step uses: the network that trains (under torchrun its DDP wrapper), its optimizer, loss
    scaler and loss, and the weights' moving average (``--ema-epochs``; None without)."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    average: AveragedModel | None = None


def make_training(run: Run, device: torch.device, amp: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                                   torch.amp.GradScaler, torch.nn.Module]:
    """(model, optimizer, scaler, loss) on ``device``; the weights depend only on ``run.cfg.seed``."""
    cfg = run.cfg
    set_determinism(cfg.seed)  # seeds, and cuDNN's deterministic mode: kept only under --deterministic
    torch.backends.cudnn.deterministic = cfg.deterministic
    # cuDNN picks the fastest kernels for the crop size once; the crops never change shape.
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.deterministic
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


def moving_average(model: torch.nn.Module, epochs: float, steps_per_epoch: int) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights over about ``epochs`` epochs (None for 0): validation
    on a few patients swings by ±0.1 from epoch to epoch with the raw weights; the average is what is validated
    and saved, so that the epoch chosen and the weights kept are less the luck of the last steps."""
    if epochs <= 0:
        return None
    decay = max(0.0, 1.0 - 1.0 / (epochs * steps_per_epoch))
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
