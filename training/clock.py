"""Time: a --time-limit budget (learning rate, when to validate, when to stop), the share a fold or member gets,
and the epoch-wise cosine decay."""

from __future__ import annotations

import dataclasses
import logging
import math
import time

log = logging.getLogger("train")


VALIDATION_SHARE = 0.2  # validation comes as often as keeps it under this share of the time (without --val-every)
# A first validation that costs more than this many epochs of training would come every 16 epochs or less often at
# that share: later ones slide their window at FAST_OVERLAP, which in 3D has (0.25 / 0.5)³ = 1/8 of 0.75's windows.
SLOW_VALIDATION = 4.0
FAST_OVERLAP = 0.5


@dataclasses.dataclass
class Clock:
    """A run's time: its ``--time-limit`` budget (seconds; None: no limit) and what validation costs. The learning
    rate decays (cosine) with the share of the budget spent, not with epochs; validation is kept under
    ``VALIDATION_SHARE`` of the time, with a smaller overlap where it is slow (``validation_due``, ``settle``); a
    limited run stops when another epoch and its validation would not fit, validating its last epoch, so that a
    run of any length ends with a decayed learning rate and its best checkpoint chosen on validation."""

    limit: float | None
    start: float  # ``time.perf_counter()`` when the run began (with --resume: earlier by the epochs before)
    epoch_s: float = 0.0  # the latest epoch's training
    val_s: float = 0.0  # the latest validation
    since_val: float = 0.0  # training seconds since the latest validation
    closing: float = 0.0  # validations' worth of time kept for after the last epoch (the postprocessing decision)
    every: int | None = None  # a run without a limit validates every this many epochs (None: not measured yet)
    overlap: float | None = None  # validation's sliding-window overlap, once settled (None: --overlap's)
    validations: int = 0  # this process's validations so far

    @property
    def spent(self) -> float:
        """Wall-clock seconds of the run so far: setup, training, validation, writing."""
        return time.perf_counter() - self.start

    def lr(self, base: float) -> float:
        """Cosine decay over the budget: ``base`` at the start, towards 0 at its end."""
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, self.spent / self.limit)))

    def trained(self, seconds: float) -> None:
        self.epoch_s, self.since_val = seconds, self.since_val + seconds

    def validated(self, seconds: float, done: bool) -> None:
        if done:
            self.val_s, self.since_val, self.validations = seconds, 0.0, self.validations + 1

    def validation_due(self, epoch: int) -> bool:
        """The first two validations (they measure the cost); then, under a limit, whenever training since the last
        one has taken (1 - share) / share times a validation; without one, every ``every`` epochs (``settle``)."""
        if self.limit is None:
            return self.every is None or epoch % self.every == 0
        return self.val_s == 0 or self.since_val * VALIDATION_SHARE >= (1 - VALIDATION_SHARE) * self.val_s

    def settle(self, given: float, dims: int, val_s: float, epoch_s: float) -> None:
        """After the second validation, which took ``val_s`` against ``epoch_s`` of training (rank 0's, so that
        every rank settles alike; the first epoch and validation also pay for warming up: workers, kernels): the
        overlap, ``given`` or ``FAST_OVERLAP`` where that validation was slow, and the interval that keeps
        validation at that overlap (((1 - overlap) / (1 - given))^dims of the windows) under ``VALIDATION_SHARE`` of
        the time. Fixed from then on and kept in last.pt, so that a resumed run validates the epochs and at the
        overlap an uninterrupted one does (a run resumed without the limit it had settles its interval then)."""
        if (self.overlap is not None and (self.every is not None or self.limit is not None)) or (
                self.overlap is None and self.validations < 2):
            return
        cost = val_s
        if self.overlap is None:
            self.overlap = given
            if val_s > SLOW_VALIDATION * epoch_s and given > FAST_OVERLAP:
                self.overlap, cost = FAST_OVERLAP, val_s * ((1 - given) / (1 - FAST_OVERLAP)) ** dims
        if self.limit is None:
            self.every = max(1, math.ceil((1 - VALIDATION_SHARE) / VALIDATION_SHARE * cost / max(epoch_s, 1e-6)))
        log.info("validation: %.1f s against %.1f s an epoch: %s at overlap %.2f", val_s, epoch_s,
                 f"every {self.every} epochs" if self.every else "as the time limit allows", self.overlap)

    def passes_s(self, passes: int, given: float, dims: int) -> float:
        """Seconds of ``passes`` predictions of the validation cases at overlap ``given`` (inference's), from the
        latest validation's, made at ``overlap``: ((1 - overlap) / (1 - given))^dims as many windows each."""
        return passes * self.val_s * ((1 - (self.overlap or given)) / (1 - given)) ** dims

    def no_time_for_another(self) -> bool:
        """Whether validating now, another epoch (with a tenth for writing its files), its validation and what
        comes after the last (``closing``) would overrun the budget, measured from the latest of each."""
        return self.limit is not None and self.spent + (2 + self.closing) * self.val_s + 1.1 * self.epoch_s > self.limit

    def left(self) -> float | None:
        return None if self.limit is None else max(0.0, self.limit - self.spent)


def budget_share(time_limit: float | None, start: float, runs_left: int) -> float | None:
    """The seconds of the next of ``runs_left`` runs (members, folds) that share what is left of ``time_limit``
    since ``start`` (``time.perf_counter()``) equally; None without a limit."""
    return None if time_limit is None else max(1.0, (time_limit - (time.perf_counter() - start)) / runs_left)


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """Cosine decay from ``base`` at epoch 1 towards 0 after ``epochs``; a function of the epoch, so that a
    resumed run (even one given more epochs) needs no scheduler state."""
    return base * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
