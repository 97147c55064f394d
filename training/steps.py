"""The steps of an epoch: one pass of training crops, and validation Dice over whole volumes or patients."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dice import dice_from_counts, overlap_counts
from imaging.cases import patient_of
from model import (
    Sliding,
    autocast,
    predict_logits,
    probabilities,
    to_classes,
)
from training.config import TrainConfig
from training.distributed import distributed, gather_counts
from training.optim import Learner

log = logging.getLogger("train")


def train_steps(learner: Learner, loader, device: torch.device, amp: bool) -> float:
    """One pass over the training crops; mean loss, synchronised once at the end. The weights' moving average
    (``learner.average``) follows every step."""
    model, loss_fn, optimizer, scaler, average = (learner.net, learner.loss_fn, learner.optimizer, learner.scaler,
                                                 learner.average)
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
    sliding = Sliding(tuple(window), cfg.overlap, cfg.sw_batch_size, amp)
    for batch in loader:
        logits = predict_logits(model, batch["image"], sliding, batch.get("tissue"))
        # Counted where the prediction lies: one small (targets, 3) tensor per volume comes back to the host.
        label = batch["label"].to(logits.device, non_blocking=True)
        name = batch["name"][0]
        unit = (patient_of(name, batch["group"][0]) if pool_groups else None) or name
        counts[unit] = counts.get(unit, 0) + overlap_counts(to_classes(probabilities(logits)), label, targets).cpu()
    counts = gather_counts(counts)
    dice = dice_from_counts(torch.stack(list(counts.values()))).mean(0).tolist()
    n = len(label_values) - 1
    return dict(zip(label_values[1:], dice[:n])), dict(zip((name for name, _ in cfg.regions), dice[n:]))
