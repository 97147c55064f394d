"""Train the UNet on data/prep; best and last checkpoints, a Dice plot, metrics and TensorBoard logs in output/.

    python train.py --epochs 200 --device cuda [--data data/prep] [--output output] [--resume]
    python train.py --time-limit 20m --device cpu        # the plan decides what --epochs, --crop … leave open
    python train.py --folds 5 --fold all                 # cross-validation: output/fold_K/, cv.csv, cv.png
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel
from torch.utils.tensorboard import SummaryWriter

from dataset import FLIP_AXES
from dice import mean_dice
from evaluation.crossval import Deciding, decide_run
from imaging.common import run_command, write_json
from model import (
    flip_sets,
    resolve_device,
    save_checkpoint,
    use_amp,
    write_models_record,
)
from training import options
from training.checkpoints import DeferredInterrupt, check_output, make_checkpoint, resume_from, resume_hint
from training.clock import Clock, cosine_lr
from training.config import TrainConfig
from training.data import loader_workers, make_datasets, make_loader, rank_share
from training.distributed import agreed, distributed, init_distributed, rank0, sync_buffers
from training.ensembles import train_folds, train_members
from training.optim import Learner, make_training, moving_average
from training.outputs import log_epoch, plot_dice, write_metrics
from training.planner import probe
from training.planning import Run, plan_run
from training.steps import train_steps, validate

log = logging.getLogger("train")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training of one network (one process, or one rank of a torchrun job); returns ``{"best_dice",
    "best_epoch", "epochs_run", "peak_rss_mb", "train_cases", "model"}`` (the cases this rank trained on, the
    trained network)."""
    rank, world, device = init_distributed(resolve_device(cfg.device))
    if distributed():
        log.info("rank %d of %d (%s)", rank, world, dist.get_backend())
        if rank:
            log.setLevel(logging.WARNING)  # one copy of the log, rank 0's, for the rest of this process
    try:
        result = _train(cfg, rank, world, device)
        if distributed():
            # Rank 0 is still writing when the others finish: none may tear the group down under it (seen once:
            # the rank that left first aborted).
            dist.barrier()
        return result
    finally:
        if distributed():
            dist.destroy_process_group()


@dataclasses.dataclass
class Session:
    """One rank's run as it goes: what it trains (``run``), with what, on which cases, and its record so far."""

    run: Run
    device: torch.device
    amp: bool
    rank: int
    model: torch.nn.Module  # the network; ``net`` is what trains (under torchrun its DDP wrapper)
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    train_ds: Any
    train_loader: Any
    val_loader: Any
    on_gpu: torch.device | None
    writer: SummaryWriter | None  # rank 0 alone writes
    start: int = 1
    best: dict = dataclasses.field(default_factory=lambda: {"dice": -1.0, "epoch": 0})
    history: list[dict] = dataclasses.field(default_factory=list)
    stale: int = 0  # validations since the best one
    validation: dict = dataclasses.field(default_factory=dict)  # a resumed run's Clock.every and Clock.overlap
    average: AveragedModel | None = None  # the weights' moving average (``--ema-epochs``)

    @property
    def weights(self) -> torch.nn.Module:
        """The network that is validated and saved for inference: the moving average, when there is one."""
        return self.model if self.average is None else self.average.module


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """``train`` as rank ``rank`` of ``world``: each rank caches and trains on its share of the cases, scores its
    share of the validation cases; rank 0 alone writes outputs."""
    started = time.perf_counter()  # the budget counts setup (reading, caching) too
    s = setup(cfg, rank, world, device)
    cfg = s.run.cfg
    # Time kept for the decision after the last epoch: a validation pass per flip combination.
    clock = Clock(cfg.time_limit, started - sum(float(row["seconds"]) for row in s.history),
                  closing=float(len(flip_sets(FLIP_AXES))) if cfg.postprocess else 0.0, **s.validation)
    for epoch in range(s.start, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = cosine_lr(cfg.lr, epoch, cfg.epochs) if clock.limit is None else clock.lr(cfg.lr)
        loss = train_epoch(s, epoch, lr)
        clock.trained(time.perf_counter() - t0)
        last = epoch == cfg.epochs or agreed(clock.no_time_for_another())
        validated = epoch % cfg.val_every == 0 if cfg.val_every else agreed(clock.validation_due(epoch))
        t1 = time.perf_counter()
        at = dataclasses.replace(cfg, overlap=clock.overlap or cfg.overlap)
        per_label, per_region = validate(s.weights, s.val_loader, s.run.label_values, at, s.run.window, s.amp,
                                         s.run.pool_groups) if validated or last else ({}, {})
        clock.validated(time.perf_counter() - t1, bool(per_label))
        if (validated or last) and not cfg.val_every:
            clock.settle(cfg.overlap, 2 if s.run.window[0] == 1 else 3, *rank0(clock.val_s, clock.epoch_s))
        improved = record_epoch(s, epoch, loss, lr, per_label, per_region, time.perf_counter() - t0)
        # Every rank sees the same reduced Dice, so every rank stops at the same epoch.
        early = bool(cfg.patience) and s.stale >= cfg.patience
        if rank == 0:
            save(s, epoch, improved, final=last or early, clock=clock)
        if early:
            log.info("early stop: no better validation Dice for %d validations", s.stale)
        if last or early:
            break
    train_cases = [item["name"] for item in s.train_ds.data]
    # the cached volumes, and the workers that hold copies of them, go before the decision predicts whole volumes
    s.train_ds = s.train_loader = s.val_loader = None
    gc.collect()
    # Folds decide together (cross_validate), and a seed ensemble's members too (train_members).
    if rank == 0 and cfg.postprocess and cfg.fold is None and cfg.members == 1:
        decide_run(Path(cfg.output), s.run.manifest, s.run.train_items, s.run.val_items,
                   deciding_in_time(s, clock))
    if s.writer is not None:
        s.writer.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    log.info("peak memory: %.0f MB resident%s", peak_mb, f", {torch.cuda.max_memory_allocated(device) / 2**20:.0f}"
             " MB on the GPU" if device.type == "cuda" else "")
    return {"best_dice": s.best["dice"], "best_epoch": s.best["epoch"], "epochs_run": len(s.history),
            "peak_rss_mb": peak_mb, "train_cases": train_cases, "model": s.weights}


def deciding_in_time(s: Session, clock: Clock) -> Deciding:
    """The post-training decision as inference will run: test-time flips tried only where their passes over the
    validation cases fit what is left of ``--time-limit`` (each pass at inference's overlap, from the latest
    validation's time); else postprocessing alone, decided on one plain pass."""
    cfg = s.run.cfg
    how = Deciding.as_inferred(s.device, cfg.amp, dict(cfg.regions))
    passes = len(flip_sets(how.flips))
    need = clock.passes_s(passes, cfg.overlap, 2 if s.run.window[0] == 1 else 3)
    left = clock.left()
    if left is not None and passes > 1 and need > left:
        log.info("decision: test-time flips not tried: their %d passes over the validation cases (about %.0f s) do "
                 "not fit the %.0f s left of --time-limit", passes, need, left)
        how = dataclasses.replace(how, flips=())
    return how


def setup(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Session:
    """Run the run, build the network (the same initial weights on every rank), resume when asked, and cache this
    rank's share of the cases (the deterministic prefix once)."""
    run = plan_run(cfg, device)
    out_dir = Path(run.cfg.output)
    amp = use_amp(run.cfg.amp, device)
    model, optimizer, scaler, loss_fn = make_training(run, device, amp)
    train_items, val_items = rank_share(run, rank, world)
    average = moving_average(model, run.cfg.ema_epochs, math.ceil(len(train_items) / run.cfg.batch_size))
    start, best, history, validation = 1, {"dice": -1.0, "epoch": 0}, [], {}
    if run.cfg.resume:
        start, best, history, validation = resume_from(out_dir / "last.pt", model, optimizer, scaler, run.margs,
                                                       average)
    net = model
    if distributed():
        net = DDP(model, device_ids=[device.index] if device.index is not None
                                                        else None)
    train_ds, val_ds, on_gpu = make_datasets(run, train_items, val_items, device)
    run, workers = with_workers(run, train_ds, on_gpu, device, amp)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.plan, out_dir / "plan.json")
    train_loader = make_loader(train_ds, run.cfg.batch_size, None, on_gpu, device, workers)
    val_loader = make_loader(val_ds, 1, None, on_gpu, device, shuffle=False)
    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start) if rank == 0 else None
    # validations since the best one, as an uninterrupted run counts them for --patience
    stale = sum(1 for row in history if row["val_dice"] not in (None, "") and row["epoch"] > best["epoch"])
    return Session(run, device, amp, rank, model, net, optimizer, scaler, loss_fn, train_ds, train_loader,
                   val_loader, on_gpu, writer, start, best, history, stale, validation, average)


def with_workers(run: Run, train_ds, on_gpu: torch.device | None, device: torch.device, amp: bool
                 ) -> tuple[Run, int]:
    """The run with its loader workers in the plan record: ``--num-workers``, or measured against the probe's
    step time (``loader_workers``; probed now where the plan did not)."""
    cfg = run.cfg
    if cfg.num_workers is not None or on_gpu is not None:
        return run, cfg.num_workers or 0
    step_s = run.plan.get("probe_step_s") or probe(run.margs, cfg.crop, cfg.batch_size * cfg.num_samples,
                                                   run.in_channels, device, amp)
    workers, batch_s = loader_workers(train_ds, cfg.batch_size, step_s, device)
    log.info("loader: %.2f s to prepare a batch against %.2f s a step: %d worker process(es)", batch_s, step_s,
             workers)
    plan = {**run.plan, "settings": {**run.plan["settings"], "num_workers": workers},
            "loader": {"batch_s": round(batch_s, 3), "step_s": round(step_s, 3), "workers": workers}}
    return dataclasses.replace(run, plan=plan), workers


def train_epoch(s: Session, epoch: int, lr: float) -> float:
    """One epoch of training crops at learning rate ``lr``; returns the mean loss."""
    cfg = s.run.cfg
    # Seeding per epoch makes a resumed run draw the same crops as an uninterrupted one; seeds a million apart, so
    # that seed K + 1 (the next ensemble member) does not repeat seed K's next epoch.
    seed = cfg.seed * 1_000_003 + epoch + 100_003 * s.rank
    s.train_loader.sampler.seed = seed
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    loss = train_steps(Learner(s.net, s.optimizer, s.scaler, s.loss_fn, s.average), s.train_loader, s.device,
                       s.amp)
    sync_buffers(s.model)
    if s.average is not None:  # its averaged batch-norm statistics, too, followed each rank's own
        sync_buffers(s.average.module)
    return loss


def record_epoch(s: Session, epoch: int, loss: float, lr: float, per_label: dict[int, float],
           per_region: dict[str, float], seconds: float) -> bool:
    """Add the epoch's row to the history and update the best epoch; returns whether this epoch is the new best."""
    dice = mean_dice(per_label.values()) if per_label else None
    s.history.append({"epoch": epoch, "train_loss": round(loss, 6),
                      "val_dice": None if dice is None else round(dice, 6),
                      "val_dice_per_label": " ".join(f"{v}:{d:.4f}" for v, d in per_label.items()),
                      "val_dice_regions": " ".join(f"{n}:{d:.4f}" for n, d in per_region.items()),
                      "lr": lr, "seconds": round(seconds, 3)})
    improved = dice is not None and dice > s.best["dice"]
    if improved:
        s.best, s.stale = {"dice": dice, "epoch": epoch}, 0
    elif dice is not None:
        s.stale += 1
    return improved


def save(s: Session, epoch: int, improved: bool, final: bool, clock: Clock) -> None:
    """The epoch's files: ``best.pt`` when improved, ``model.pt`` when this epoch is the one ``--select`` keeps for
    inference (the final one, or the best), ``last.pt`` (with the validation schedule, ``clock``'s), ``metrics.csv``,
    ``dice.png``, the log line."""
    out_dir = Path(s.run.cfg.output)
    ckpt = make_checkpoint(s.weights, s.run, epoch, s.best, s.history)
    with DeferredInterrupt():  # Ctrl-C waits until this epoch's files are all written
        if improved:
            save_checkpoint(ckpt, out_dir / "best.pt")
        keep = final if s.run.cfg.select == "final" else improved
        if keep:
            save_checkpoint({**ckpt, "selected": s.run.cfg.select}, out_dir / "model.pt")
            write_models_record(out_dir, [out_dir / "model.pt"], "model")
        resume = {"optimizer": s.optimizer.state_dict(), "scaler": s.scaler.state_dict(),
                  "validation": {"every": clock.every, "overlap": clock.overlap}}
        if s.average is not None:  # model_state holds the average; training goes on from the raw weights
            resume |= {"train_state": s.model.state_dict(), "average_steps": int(s.average.n_averaged)}
        save_checkpoint({**ckpt, **resume}, out_dir / "last.pt")
        write_metrics(s.history, out_dir / "metrics.csv")
        plot_dice(s.history, out_dir / "dice.png", bool(s.run.cfg.train_on_val))
    log_epoch(s.writer, s.history[-1], s.best, bool(s.run.cfg.train_on_val), clock.left())


def parse_args(argv: list[str] | None) -> TrainConfig:
    """train.py's command line (``training.options``) as a config, with this module's usage as ``--help``'s text."""
    return options.parse_args(argv, __doc__)


def main(argv: list[str] | None = None) -> int:
    # Slices with nothing to segment are expected (most LGG slices); MONAI warns once per such crop otherwise.
    warnings.filterwarnings("ignore", message="Num foregrounds 0", category=UserWarning)
    given: list[TrainConfig] = []  # the config, once parsed: Ctrl-C may come before

    def work() -> None:
        given.append(parse_args(argv))
        check_output(given[0])
        if given[0].folds:
            for k, result in train_folds(given[0], train).items():
                log.info("fold %d: best validation Dice %.4f at epoch %d", k, result["best_dice"], result["best_epoch"])
            return
        results = train_members(given[0], train)
        for k, result in results.items():
            log.info("%sbest validation Dice %.4f at epoch %d", f"member {k}: " if len(results) > 1 else "",
                     result["best_dice"], result["best_epoch"])

    try:
        return run_command(work)
    except KeyboardInterrupt:
        where = resume_hint(given[0]) if given else "before training started"
        print(f"interrupted: {where}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
