"""A run's record as files and lines: metrics.csv, dice.png, the epoch's log line and TensorBoard scalars."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from imaging.common import atomic_write

log = logging.getLogger("train")


def write_metrics(history: list[dict], path: Path) -> None:
    """``metrics.csv``: epoch, train_loss, val_dice (mean over foreground labels), val_dice_per_label
    (``label:dice`` pairs), val_dice_regions (``name:dice``), lr, seconds; written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["epoch", "train_loss", "val_dice", "val_dice_per_label",
                                             "val_dice_regions", "lr", "seconds"])
    writer.writeheader()
    writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in writer.fieldnames} for row in history)
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue())


def dice_name(seen: bool) -> str:
    """What the validation Dice is: on cases the network also trains on (``seen``: a fit, not an estimate of
    accuracy on new cases, which ``--folds`` or benchmarks/holdout.py give), or on held-out cases."""
    return "validation Dice (cases also trained on)" if seen else "validation Dice (held out)"


def plot_dice(history: list[dict], path: Path, seen: bool) -> None:
    """``dice.png``: validation Dice (y) against epoch (x), best epoch marked, named for what it is (``seen``:
    ``dice_name``); written atomically."""
    rows = [r for r in history if r["val_dice"] is not None]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([r["epoch"] for r in rows], [r["val_dice"] for r in rows], marker=".", label=dice_name(seen))
    if rows:
        best = max(rows, key=lambda r: r["val_dice"])
        ax.scatter([best["epoch"]], [best["val_dice"]], color="red", zorder=3,
                   label=f"best {best['val_dice']:.3f} (epoch {best['epoch']})")
    ax.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title=f"{dice_name(seen).capitalize()} per epoch")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    with atomic_write(path) as tmp:
        fig.savefig(tmp)


def log_epoch(writer: SummaryWriter, row: dict, best: dict, seen: bool, left: float | None = None) -> None:
    """One log line and the TensorBoard scalars for an epoch (``seen``: the validation cases also train; with
    ``left``: the time left of a budget, seconds)."""
    writer.add_scalar("train/loss", row["train_loss"], row["epoch"])
    writer.add_scalar("train/lr", row["lr"], row["epoch"])
    dice = "" if row["val_dice"] is None else f"  val Dice{' (trained on)' if seen else ''} {row['val_dice']:.4f}"
    if row.get("val_dice_per_label", "").count(":") > 1:
        dice += f" ({row['val_dice_per_label']})"
    if row.get("val_dice_regions"):
        dice += f" regions {row['val_dice_regions']}"
    if row["val_dice"] is not None:
        writer.add_scalar("val/dice", row["val_dice"], row["epoch"])
    writer.flush()
    best_text = f"best {best['dice']:.4f} (epoch {best['epoch']})" if best["epoch"] else "no validation yet"
    left_text = "" if left is None else f"  {int(left) // 60}m{int(left) % 60:02d}s left"
    log.info("epoch %3d  loss %.4f%s  %s  %.1fs%s", row["epoch"], row["train_loss"], dice, best_text, row["seconds"],
             left_text)
