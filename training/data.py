"""Datasets and loaders of a run: the deterministic prefix cached (on the GPU when it fits), each rank's share."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset, ThreadDataLoader, partition_dataset
from torch.utils.data import Sampler

from dataset import AugmentParams, Caching, make_dataset
from imaging.common import InputError
from training.config import TrainConfig
from training.planner import machine
from training.planning import Run

log = logging.getLogger("train")


CACHE_SHARE = 0.5  # of the memory available at the start: the rest is the network's, the loaders' and validation's


def cached_bytes(cases: Sequence[dict], in_channels: int) -> float:
    """Memory the deterministic prefix's output of ``cases`` (manifest records) takes: float32 image, uint8 label,
    and the crop centres (int32, at most 2²⁰ of each class: ``dataset.CropCentresd``)."""
    return float(sum(math.prod(c["prepared_shape"]) * (4 * in_channels + 1)
                     + 4 * min(math.prod(c["prepared_shape"]), 2 * 2**20) for c in cases))


def available_memory() -> float:
    """Bytes of memory available now: Linux's MemAvailable (what can be had without swapping), else the free
    physical pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def cache_budget(cfg: TrainConfig) -> float:
    """This process's memory for cached volumes: ``--cache-memory``, else ``CACHE_SHARE`` of what is available,
    shared by the ranks of a torchrun job on this machine."""
    budget = cfg.cache_memory if cfg.cache_memory is not None else CACHE_SHARE * available_memory()
    return budget / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def disk_cache(run: Run) -> Path:
    """Where the prefix's output lives on disk, beside the prepared data it comes from: named by the manifest's
    content, so that preparing the data again starts a new cache (an item's file is named by the item and the
    prefix's transforms)."""
    digest = hashlib.sha256(json.dumps(run.manifest, sort_keys=True).encode()).hexdigest()[:16]
    return Path(run.cfg.data) / ".cache" / digest


def cache_device(device: torch.device, cases: Sequence[dict], in_channels: int, cache_rate: float
                 ) -> torch.device | None:
    """The GPU when the cached volumes take at most a quarter of its free memory, so that crops are cut and turned
    where the network runs (MONAI's fast-training recipe); else None."""
    if device.type != "cuda" or cache_rate <= 0:
        return None
    need = cache_rate * cached_bytes(cases, in_channels)
    free, _ = torch.cuda.mem_get_info(device)
    log.info("cache: %.0f MB of volumes, %s", need / 2**20, "on the GPU" if need < free / 4 else "in host memory")
    return device if need < free / 4 else None


def make_datasets(run: Run, train_items: list[dict], val_items: list[dict], device: torch.device
                  ) -> tuple[Any, Any, torch.device | None]:
    """(train, val) datasets with their deterministic prefix cached, on the GPU when it fits (the device
    returned, else None)."""
    cfg = run.cfg
    records = {c["name"]: c for c in run.manifest["cases"]}
    aug = AugmentParams(crop=cfg.crop, pos=cfg.pos, neg=cfg.neg, num_samples=cfg.num_samples)
    # validation cases that also train are cached twice, once in each chain
    need = cfg.cache_rate * cached_bytes([records[i["name"]] for i in train_items + val_items], run.in_channels)
    budget = cache_budget(cfg)
    if need > budget:  # larger than memory: on disk, training's first volumes in memory too, validation streamed
        folder = disk_cache(run)
        t0 = time.perf_counter()
        train_ds = make_dataset(train_items, "train", run.label_values, aug, run.in_channels, run.params,
                                Caching(folder=folder, memory=budget))
        val_ds = make_dataset(val_items, "val", run.label_values, aug, run.in_channels, run.params,
                              Caching(folder=folder))
        log.info("cache: %.0f MB of volumes, %.0f MB of memory for them: %d of %d training volumes in memory (%.0f "
                 "MB), the rest read from %s (filled in %.1f s)", need / 2**20, budget / 2**20,
                 len(train_ds.memory), len(train_items), train_ds.memory_bytes / 2**20, folder,
                 time.perf_counter() - t0)
        return train_ds, val_ds, None
    # each chain caches its own copy: a validation case that trains too, or a case repeated for a rank, counts twice
    on_gpu = cache_device(device, [records[i["name"]] for i in train_items + val_items], run.in_channels,
                          cfg.cache_rate)
    cache = Caching(cfg.cache_rate, on_gpu)
    train_ds = make_dataset(train_items, "train", run.label_values, aug, run.in_channels, run.params, cache)
    val_ds = make_dataset(val_items, "val", run.label_values, aug, run.in_channels, run.params, cache)
    return train_ds, val_ds, on_gpu


class EpochOrder(Sampler):
    """An epoch's items, shuffled or in order, each with the seed of its random transforms, all drawn from the
    epoch's seed (``seed``, set before each epoch): a crop is a function of the epoch and the case, not of which
    process draws it or what it drew before, so that loader workers live across epochs (``persistent_workers``)
    and a resumed run draws the crops an uninterrupted one does."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(self.n, generator=generator).tolist() if self.shuffle else range(self.n)
        seeds = torch.randint(2**31, (self.n,), generator=generator).tolist()
        return iter([(i, seeds[i]) for i in order])


class Seeded(Dataset):
    """``dataset`` read by ``EpochOrder``'s ``(index, seed)`` keys: the item's random transforms seeded first."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        self.dataset.transform.set_random_state(seed=seed)
        return self.dataset[index]


def make_loader(ds, batch_size: int, seed: int | None, on_gpu: torch.device | None, device: torch.device,
                num_workers: int = 0, shuffle: bool = True) -> DataLoader:
    """Batches of ``ds`` in ``EpochOrder`` (set its ``seed`` before each epoch: ``loader.sampler.seed``), its
    workers kept across epochs. Volumes cached on the GPU cannot go to worker processes: a thread prepares the
    next batch there instead (MONAI's ``ThreadDataLoader``); host batches are pinned for a GPU."""
    order = EpochOrder(len(ds), shuffle, seed or 0)
    if on_gpu is not None:
        return ThreadDataLoader(Seeded(ds), batch_size=batch_size, sampler=order, num_workers=0)
    return DataLoader(Seeded(ds), batch_size=batch_size, sampler=order, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=device.type == "cuda")


def loader_workers(ds, batch_size: int, step_s: float, device: torch.device) -> tuple[int, float]:
    """Loader processes for ``ds`` and the seconds one batch takes to prepare in this process (timed on a few
    items): none where the main process prepares a batch in under a fifth of a training step (``step_s``, the
    planner's probe); else as many as keep the step fed, two to spare, up to the cores left to the step (on the
    CPU, which the step itself runs on, half of them; under torchrun, this rank's share of the machine's)."""
    order, n = list(EpochOrder(len(ds), True, 0)), min(len(ds), 2 * batch_size)
    t0 = time.perf_counter()
    for key in order[:n]:
        Seeded(ds)[key]
    batch_s = (time.perf_counter() - t0) / max(n, 1) * batch_size
    cores = machine(device)["cpu_cores"] // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's ranks share them
    spare = cores // 2 if device.type == "cpu" else cores - 1
    if batch_s < 0.2 * step_s or spare < 1:
        return 0, batch_s
    return min(spare, math.ceil(batch_s / max(step_s, 1e-3)) + 2, 16), batch_s


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
