"""Datasets and loaders of a run: the deterministic prefix cached (on the GPU when it fits), each rank's share."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.data import DataLoader, ThreadDataLoader, partition_dataset

from dataset import AugmentParams, Caching, make_dataset
from imaging.common import InputError
from training.planning import Run

log = logging.getLogger("train")


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


def make_datasets(run: Run, train_items: list[dict], val_items: list[dict], device: torch.device
                  ) -> tuple[Any, Any, torch.device | None]:
    """(train, val) datasets with their deterministic prefix cached, on the GPU when it fits (the device
    returned, else None)."""
    cfg = run.cfg
    names = {item["name"] for item in train_items + val_items}
    on_gpu = cache_device(device, [c for c in run.manifest["cases"] if c["name"] in names], run.in_channels,
                          cfg.cache_rate)
    aug = AugmentParams(crop=cfg.crop, pos=cfg.pos, neg=cfg.neg, num_samples=cfg.num_samples)
    cache = Caching(cfg.cache_rate, on_gpu)
    train_ds = make_dataset(train_items, "train", run.label_values, aug, run.in_channels, run.params, cache)
    val_ds = make_dataset(val_items, "val", run.label_values, aug, run.in_channels, run.params, cache)
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


def rank_share(run: Run, rank: int, world: int) -> tuple[list[dict], list[dict]]:
    """(train, val) items this rank works on: all of them alone; under torchrun equal training shares (short ones
    repeat a case: every rank must take the same number of steps) and any validation share (counts are summed)."""
    if world == 1:
        return run.train_items, run.val_items
    if len(run.train_items) < world:
        raise InputError(f"{run.cfg.data}: {len(run.train_items)} training case(s) cannot be shared by {world} ranks")
    train_items = partition_dataset(run.train_items, num_partitions=world, shuffle=True, seed=run.cfg.seed,
                                    even_divisible=True)[rank]
    return train_items, run.val_items[rank::world]
