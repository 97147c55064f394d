"""A training plan from the data fingerprint and the machine, as nnU-Net's experiment planner makes one: on a GPU
nnU-Net's patch of about 128³ at batch 2 (smaller on a card under 8 GB), on the CPU a crop a step of which takes
about a second; a timed probe projects the epoch.

The plan is a flat dict of ``train.py`` settings (crop, network, batch, learning rate, batch Dice) plus what it was
decided from (the window follows from the crop in ``training.planning.plan_run``); ``train.py`` prints it, writes it to
``output/plan.json`` and into the checkpoint, and every flag overrides one entry (``--plan output/plan.json``
re-runs one).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from imaging.common import InputError
from model import anisotropic_args, autocast, axis_divisors, build_model, flat_args, model_args

CPU_CROP_VOXELS = 48 * 96 * 96  # a 3D crop on the CPU: what a step of the default network does in about a second
# A 3D crop on a GPU: nnU-Net's patch of about 128³ at batch 2, planned for its 8 GB reference GPU. A card with more
# memory gets the same plan (more memory is spent on a larger batch or wider network only where a measurement shows
# it helps, and none does here yet); one with less gets a proportionally smaller crop.
GPU_CROP_VOXELS = 128**3
GPU_REFERENCE_GB = 8.0
GPU_BATCH_3D, GPU_BATCH_2D = 2, 12
MAX_INPLANE_2D = 512  # a 2D crop covers the whole slice up to this size (nnU-Net's 2D plan: LGG at 256×256)
MIN_FEATURE_MAP = 8  # the deepest level keeps at least this many voxels along each axis that is downsampled
MAX_LEVELS = 5
PROBE_STEPS = 3


@dataclasses.dataclass(frozen=True)
class Task:
    """What a plan is for: the data's fingerprint (preprocess.py's), the prepared shapes (D, H, W) of the cases
    that train or validate, input channels, and the training volumes per epoch."""

    fingerprint: dict
    shapes: Sequence[Sequence[int]]
    in_channels: int
    cases: int


def machine(device: torch.device) -> dict[str, Any]:
    """The machine a plan is sized for, described: the device, CPU cores and on a GPU its name, memory (GB) and
    compute capability. The plan's settings follow from this description alone (``settings``)."""
    info: dict[str, Any] = {"device": device.type, "cpu_cores": len(os.sched_getaffinity(0))
                            if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
    return info


def crop_size(fingerprint: dict, spacing: Sequence[float], budget: float, upper: Sequence[float]) -> list[int]:
    """The training crop (D, H, W): 2D data takes the whole slice (largest prepared slice, up to
    ``MAX_INPLANE_2D``); 3D data the median shape, shrunk along its longest axis in mm (as nnU-Net does) until it
    fits ``budget`` voxels."""
    if fingerprint["dims"] == "2d":
        return [1, *(min(MAX_INPLANE_2D, int(math.ceil(u))) for u in upper[1:])]
    crop = [float(s) for s in fingerprint["median_shape"]]
    while math.prod(crop) > budget:
        k = max(range(3), key=lambda a: crop[a] * spacing[a])  # the longest side in mm
        crop[k] = max(8.0, crop[k] * 0.9)
    return [max(8, int(round(c))) for c in crop]


def network(crop: Sequence[int], spacing: Sequence[float], dims: str, base: int, max_width: int
            ) -> tuple[dict[str, Any], list[int]]:
    """Model arguments for ``crop``: as many levels as keep the deepest feature map at least ``MIN_FEATURE_MAP``
    along the in-plane axes (up to ``MAX_LEVELS``), widths doubling from ``base``; 2D data gets (1, 3, 3) kernels,
    anisotropic data in-plane strides first; the crop rounded up to the network's multiples."""
    levels = max(1, min(MAX_LEVELS, int(math.log2(min(crop[1:]) / MIN_FEATURE_MAP))))
    widths = [min(max_width, base * 2**k) for k in range(levels + 1)]
    margs = model_args(channels=widths, strides=[2] * levels)
    margs = flat_args(margs) if dims == "2d" else anisotropic_args(margs, list(spacing))
    if dims == "3d":  # a crop too thin for a depth stride keeps depth: in-plane strides there
        depth_levels = int(math.log2(max(1, crop[0] / 4)))
        strides = [s if isinstance(s, list) else [s] * 3 for s in margs["strides"]]
        margs["strides"] = [[1, s[1], s[2]] if k >= depth_levels else s for k, s in enumerate(strides)]
    divisors = axis_divisors(margs)
    return margs, [-(-c // d) * d for c, d in zip(crop, divisors)]


def probe(margs: dict, crop: Sequence[int], batch: int, in_channels: int, device: torch.device, amp: bool = False
          ) -> float:
    """Seconds per training step (forward, backward, optimizer) of this network on ``batch`` crops, measured
    under the autocast training uses (``amp``)."""
    net = build_model({**margs, "in_channels": in_channels}).to(device, memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(net.parameters())
    x = torch.randn(batch, in_channels, *crop, device=device).contiguous(memory_format=torch.channels_last_3d)
    times = []
    for _ in range(PROBE_STEPS + 1):  # the first warms up
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            out = net(x)
        out.float().mean().backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return float(sorted(times[1:])[len(times[1:]) // 2])


def settings(task: Task, described: dict[str, Any], crop: Sequence[int] | None = None) -> dict[str, Any]:
    """The crop (unless given), network, batch and crops per volume for ``task`` on a ``described`` machine
    (``machine``'s description): a pure function of the two, so that a plan for any card can be checked without
    one. A GPU's 3D crop is sized to ``GPU_CROP_VOXELS`` (less on a card under ``GPU_REFERENCE_GB``), not to the
    card's whole memory."""
    fingerprint = task.fingerprint
    spacing, two_d = fingerprint["median_spacing"], fingerprint["dims"] == "2d"
    gpu = described["device"] == "cuda"
    budget = GPU_CROP_VOXELS * min(1.0, described["gpu_memory_gb"] / GPU_REFERENCE_GB) if gpu else CPU_CROP_VOXELS
    upper = [max(s[k] for s in task.shapes) for k in range(3)]
    if crop is None:
        crop = crop_size(fingerprint, spacing, budget, upper)
    elif two_d:
        crop = [1, *crop[1:]]
    base, max_width = (32, 320) if gpu else (16, 256)
    margs, crop = network(crop, spacing, fingerprint["dims"], base, max_width)
    if two_d:  # whole slices: one crop per slice, several slices per step (nnU-Net: 12+ on a GPU)
        batch, samples = (GPU_BATCH_2D if gpu else 4), 1
    else:  # a GPU step takes nnU-Net's two crops; on the CPU, four small crops from each of two volumes
        batch, samples = (GPU_BATCH_3D, 1) if gpu else (2, 4)
    return {"crop": crop, "margs": margs, "batch_size": batch, "num_samples": samples}


def probed(task: Task, plan: dict[str, Any], device: torch.device, amp: bool) -> tuple[dict[str, Any], float]:
    """``plan`` and its measured seconds per step, under the mixed precision training will use; a GPU out of
    memory halves the crops per volume, then the batch, then the crop, until a step fits (or refuses in one
    line)."""
    spacing = task.fingerprint["median_spacing"]
    while True:
        try:
            step = plan["batch_size"] * plan["num_samples"]
            return plan, probe(plan["margs"], plan["crop"], step, task.in_channels, device, amp)
        except torch.cuda.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()  # here, once the failed step's tensors are out of reach
        if plan["num_samples"] > 1:
            plan = {**plan, "num_samples": plan["num_samples"] // 2}
        elif plan["batch_size"] > 1:
            plan = {**plan, "batch_size": plan["batch_size"] // 2}
        else:
            smaller = crop_size({**task.fingerprint, "dims": "3d", "median_shape": plan["crop"]}, spacing,
                                math.prod(plan["crop"]) / 2, plan["crop"])
            margs, crop = network(smaller, spacing, task.fingerprint["dims"], plan["margs"]["channels"][0],
                                  max(plan["margs"]["channels"]))
            if math.prod(crop) >= math.prod(plan["crop"]) or math.prod(plan["crop"]) <= 16**3:
                raise InputError(f"{device}: out of memory for one training step of the smallest crop "
                                 f"{plan['crop']}; pass a smaller --crop or --widths")
            plan = {**plan, "crop": crop, "margs": margs}


def make_plan(task: Task, device: torch.device, amp: bool = False, time_limit: float | None = None,
              crop: Sequence[int] | None = None) -> dict[str, Any]:
    """The plan: crop (unless given), network, batch, learning rate and loss for this data on this machine
    (``settings``), timed by a probe (``probed``) to project the epoch's seconds (and epochs within
    ``time_limit``)."""
    info = machine(device)
    chosen, seconds = probed(task, settings(task, info, crop), device, amp)
    margs, batch = chosen["margs"], chosen["batch_size"]
    plan = {
        "crop": chosen["crop"], "widths": margs["channels"], "strides": margs["strides"],
        "batch_size": batch, "num_samples": chosen["num_samples"], "lr": 1e-3,
        "batch_dice": task.fingerprint["dims"] == "2d",
        "loss": "Dice + BCE (pos_weight) for one label, Dice + cross-entropy for several",
        "machine": info, "probe_step_s": round(seconds, 3),
        "epoch_s_estimate": round(seconds * math.ceil(task.cases / batch), 1),
    }
    if time_limit:
        plan["epochs_estimate"] = int(time_limit // max(plan["epoch_s_estimate"], 1e-3))
    return plan
