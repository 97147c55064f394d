"""Training speed: the plain MONAI way against train.py's pipeline, same model, data, loss and crops.

    python benchmarks/bench_train.py [--epochs 5] [--json F] -- <train.py arguments>
    python benchmarks/bench_train.py --epochs 6 -- --data data/prep --device cpu --lr 3e-3 \
        --widths 8 16 32 64 --strides 2 2 2 --num-res-units 1 --crop 32 96 96

(a) plain, as the seed CT project did it: ``monai.data.Dataset`` (every file read and decompressed, every crop
    centre searched, at every epoch) + ``DataLoader``, fp32, ``loss.item()`` at every step; validation by
    ``sliding_window_inference`` at the training crop (gaussian, sw_batch_size 4, train.py's --overlap: 75%).
(b) ours, train.py's own functions: a channels-last network, ``CacheDataset`` (deterministic prefix and crop
    centres computed once, on the GPU when it fits, then ``ThreadDataLoader``), AMP (bf16) and
    ``cudnn.benchmark`` on CUDA, the loss synchronised once per epoch; validation with the run's inference
    window, windows without tissue skipped.

Both start from the same initial weights and draw crops from the same seeds; epochs alternate (a, b, a, b …) so
that machine load hits both alike. Prints each epoch's seconds, the median epoch of each and their ratio, the
time (b) spent filling its cache once, the validation Dice and seconds after the last epoch, and peak memory:
resident memory of the process while each ran (one process holds both: (b)'s cache is resident throughout, so
its size is printed too) and, on CUDA, each one's peak GPU memory. Not a test: nothing here asserts;
tests/test_benchmarks.py only smoke-runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset import AugmentParams, get_transforms  # noqa: E402
from dice import dice_per_class, mean_dice  # noqa: E402
from model import probabilities, resolve_device, to_classes, use_amp  # noqa: E402
from training.clock import cosine_lr  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import EpochOrder, Seeded, make_datasets, make_loader  # noqa: E402
from training.optim import Learner, make_training, moving_average  # noqa: E402
from training.options import parse_args  # noqa: E402
from training.planning import Run, plan_run  # noqa: E402
from training.steps import train_steps, validate  # noqa: E402


class PeakRSS:
    """Largest resident set size seen while each phase ran, sampled every 10 ms from /proc/self/statm (MB)."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._page = 4096
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def now_mb() -> float:
        """Current resident memory, MB (0 where /proc is missing)."""
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20
        except (OSError, IndexError, ValueError):
            return 0.0

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            if self.phase:
                self.peak[self.phase] = max(self.peak.get(self.phase, 0.0), self.now_mb())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_epoch(model, loader, loss_fn, optimizer, device: torch.device) -> float:
    """The seed's loop: fp32, a host synchronisation (``.item()``) per step."""
    model.train()
    total, steps = 0.0, 0
    for batch in loader:
        image, label = batch["image"].to(device), batch["label"].to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()
        total += loss.item()
        steps += 1
    return total / max(steps, 1)


def plain_validate(model, loader, roi, overlap: float, n_classes: int, device: torch.device) -> float:
    """Mean over volumes and foreground classes of the Dice, windows of the training crop."""
    model.eval()
    scores = []
    with torch.no_grad():
        for batch in loader:
            logits = sliding_window_inference(batch["image"].to(device), roi, 4, model, overlap=overlap,
                                              mode="gaussian")
            pred = to_classes(probabilities(logits)).cpu()
            scores.append(dice_per_class(pred, batch["label"], range(1, n_classes)))
    return float(torch.cat(scores).mean())


class Phases:
    """Which way is running now, for the memory sampler and the per-way GPU peak."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.memory, self.gpu_peak = device, PeakRSS(), {}

    def __call__(self, name: str | None) -> None:
        self.memory.phase = name
        if self.device.type == "cuda" and name:
            synchronize(self.device)
            self.gpu_peak[name] = max(self.gpu_peak.get(name, 0), torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)


def bench(epochs: int, cfg: TrainConfig) -> dict:
    """Run the comparison; returns the summary printed at the end."""
    device = resolve_device(cfg.device)
    amp = use_amp(cfg.amp, device)
    run = plan_run(cfg, device)
    cfg = run.cfg
    phase = Phases(device)
    base_mb = PeakRSS.now_mb()
    # (a) plain: the same chains, read from disk every time.
    aug = AugmentParams(crop=cfg.crop, pos=cfg.pos, neg=cfg.neg, num_samples=cfg.num_samples)
    plain = {"train": Dataset(run.train_items, get_transforms("train", run.label_values, aug, run.in_channels)),
             "val": Dataset(run.val_items, get_transforms("val", run.label_values, aug, run.in_channels))}
    plain["model"], plain["optimizer"], _, plain["loss"] = make_training(run, device, False)
    plain["model"].to(memory_format=torch.contiguous_format)  # train.py's model is channels-last; the seed's was not
    # (b) ours
    t0 = time.perf_counter()
    phase("ours")
    train_ds, val_ds, on_gpu = make_datasets(run, run.train_items, run.val_items, device)
    synchronize(device)
    cache_s, cache_mb = time.perf_counter() - t0, PeakRSS.now_mb() - base_mb
    model, optimizer, scaler, loss_fn = make_training(run, device, amp)
    # train.py's moving average of the weights: updated at every step, and what it validates
    average = moving_average(model, cfg.ema_epochs, math.ceil(len(run.train_items) / cfg.batch_size))
    ours = {"train": train_ds, "val": val_ds, "on_gpu": on_gpu, "model": model, "optimizer": optimizer,
            "scaler": scaler, "loss": loss_fn, "amp": amp, "average": average}
    phase(None)
    print(f"device {device}; {len(run.train_items)} training and {len(run.val_items)} validation volumes; crops "
          f"{cfg.crop} × {cfg.num_samples} per volume, batch {cfg.batch_size}; ours caches in {cache_s:.1f} s "
          f"({'on the GPU' if on_gpu is not None else f'{cache_mb:.0f} MB of host memory'}), AMP {amp}")
    times, losses = time_epochs(epochs, run, plain, ours, phase, device)
    val = validate_both(run, plain, ours, phase, device)
    phase.memory.stop()
    return summarize(run, Measured(epochs, times, losses, val, cache_s, cache_mb), phase, device)


def time_epochs(epochs: int, run: Run, plain: dict, ours: dict, phase: Phases, device: torch.device
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved epochs of both ways, same seeds and learning rates: (seconds, losses) per way."""
    cfg = run.cfg
    times: dict[str, list[float]] = {"plain": [], "ours": []}
    losses: dict[str, list[float]] = {"plain": [], "ours": []}
    for epoch in range(1, epochs + 1):
        lr = cosine_lr(cfg.lr, epoch, cfg.epochs)
        for name, way in (("plain", plain), ("ours", ours)):
            for group in way["optimizer"].param_groups:
                group["lr"] = lr
            phase(name)
            synchronize(device)
            t0 = time.perf_counter()
            # both draw their crops in train.py's EpochOrder (the same crops, whatever the workers), plain MONAI's
            # DataLoader and Dataset otherwise
            order = EpochOrder(len(way["train"]), True, cfg.seed + epoch)
            if name == "plain":
                loader = DataLoader(Seeded(way["train"]), batch_size=cfg.batch_size, sampler=order,
                                    num_workers=cfg.num_workers or 0)
                loss = plain_epoch(way["model"], loader, way["loss"], way["optimizer"], device)
            else:
                loader = make_loader(way["train"], cfg.batch_size, cfg.seed + epoch, way["on_gpu"], device,
                                     cfg.num_workers or 0)
                learner = Learner(way["model"], way["optimizer"], way["scaler"], way["loss"], way["average"])
                loss = train_steps(learner, loader, device, way["amp"])
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
            losses[name].append(loss)
            phase(None)
            print(f"epoch {epoch} {name:>5}: {times[name][-1]:6.2f} s, loss {loss:.4f}")
    return times, losses


def validate_both(run: Run, plain: dict, ours: dict, phase: Phases, device: torch.device
                  ) -> dict[str, tuple[float, float]]:
    """Validation Dice and seconds of each way: plain (its raw weights) at the training crop, ours as train.py
    validates (the moving average of the weights, in train.py's window)."""
    cfg, val = run.cfg, {}
    for name in ("plain", "ours"):
        phase(name)
        t0 = time.perf_counter()
        if name == "plain":
            dice = plain_validate(plain["model"], DataLoader(plain["val"], batch_size=1), cfg.crop, cfg.overlap,
                                  len(run.label_values), device)
        else:
            loader = make_loader(ours["val"], 1, None, ours["on_gpu"], device, shuffle=False)
            weights = ours["model"] if ours["average"] is None else ours["average"].module
            per_label, _ = validate(weights, loader, run.label_values, cfg, run.window, ours["amp"],
                                          run.pool_groups)
            dice = mean_dice(per_label.values())
        synchronize(device)
        val[name] = (dice, time.perf_counter() - t0)
        phase(None)
    return val


@dataclasses.dataclass
class Measured:
    """What the interleaved epochs measured, per way ("plain", "ours"): epoch seconds, losses, validation (Dice,
    seconds); and ours' cache (seconds to fill, MB)."""

    epochs: int
    times: dict
    losses: dict
    val: dict
    cache_s: float
    cache_mb: float


def summarize(run: Run, measured: Measured, phase: Phases, device: torch.device) -> dict:
    """The summary, printed: median epochs (the first of each warms up and is left out), validation, memory."""
    epochs, times, losses, val = measured.epochs, measured.times, measured.losses, measured.val
    cache_s, cache_mb = measured.cache_s, measured.cache_mb
    steady = {name: t[1:] if len(t) > 1 else t for name, t in times.items()}
    peak = phase.memory.peak
    summary = {
        "device": str(device), "epochs": epochs,
        "plain_epoch_s": statistics.median(steady["plain"]), "ours_epoch_s": statistics.median(steady["ours"]),
        "ours_cache_s": cache_s, "ours_cache_mb": cache_mb,
        "plain_val_dice": val["plain"][0], "ours_val_dice": val["ours"][0],
        "plain_val_s": val["plain"][1], "ours_val_s": val["ours"][1],
        "plain_peak_rss_mb": peak.get("plain", 0.0), "ours_peak_rss_mb": peak.get("ours", 0.0),
        "window": list(run.window), "plain_losses": losses["plain"], "ours_losses": losses["ours"],
    }
    summary["speedup"] = summary["plain_epoch_s"] / summary["ours_epoch_s"]
    print(f"median epoch: plain {summary['plain_epoch_s']:.2f} s, ours {summary['ours_epoch_s']:.2f} s, "
          f"{summary['speedup']:.2f}× faster (ours filled its cache once in {cache_s:.1f} s)")
    print(f"validation after {epochs} epochs: plain Dice {val['plain'][0]:.4f} in {val['plain'][1]:.2f} s (window "
          f"{tuple(run.cfg.crop)}), ours {val['ours'][0]:.4f} in {val['ours'][1]:.2f} s (window {run.window})")
    print(f"peak RSS while running: plain {summary['plain_peak_rss_mb']:.0f} MB, ours "
          f"{summary['ours_peak_rss_mb']:.0f} MB (ours' cache {cache_mb:.0f} MB is resident throughout)")
    if device.type == "cuda":
        summary.update({f"{k}_peak_gpu_mb": v / 2**20 for k, v in phase.gpu_peak.items()})
        print(f"peak GPU memory: plain {phase.gpu_peak.get('plain', 0) / 2**20:.0f} MB, "
              f"ours {phase.gpu_peak.get('ours', 0) / 2**20:.0f} MB")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5, help="epochs of each, interleaved")
    p.add_argument("--json", default=None, help="also write the summary here")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: train.py's arguments")
    args = p.parse_args(argv)
    rest = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    # train.py's --epochs sets the cosine schedule's length; the benchmark runs the first --epochs of it.
    cfg = parse_args(rest)
    summary = bench(args.epochs, cfg)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
