"""torchrun: joining the job, and what every rank must agree on (counts, buffers, decisions)."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger("train")


def distributed() -> bool:
    """Whether this process has joined a torchrun job (of one process or more: ``init_distributed``)."""
    return dist.is_available() and dist.is_initialized()


def torchrun_world() -> int:
    """The processes of the torchrun job this one belongs to (``WORLD_SIZE``), known before the job is joined; 1
    without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_torchrun() -> bool:
    """Whether torchrun started this process (a job of one process too), known before the job is joined."""
    return torchrun_world() > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def torchrun_rank() -> int:
    """This process's rank in its torchrun job (``RANK``), known before it joins and after it leaves; 0 without."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the job torchrun describes in the environment: NCCL with one GPU per local rank, gloo on the CPU. A
    job of one process joins too (``torchrun --nproc_per_node 1``), so that every collective runs on one GPU as
    it does on several (``benchmarks/gpu.sh``). Returns (rank, world size, device); (0, 1, device) without
    torchrun."""
    if not under_torchrun():
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


def collective_device() -> torch.device:
    """Where a collective's tensors must be: NCCL moves CUDA tensors only (a CPU tensor fails at the first call,
    after a whole epoch), gloo CPU ones. Every tensor this module makes for a collective is made here."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agreed(flag: bool) -> bool:
    """Rank 0's answer on every rank (time differs between processes; their decisions may not)."""
    return bool(rank0(float(flag))[0])


def rank0(*values: float) -> list[float]:
    """Rank 0's ``values`` on every rank (alone: the values)."""
    if not distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.broadcast(tensor, src=0)
    return tensor.tolist()
