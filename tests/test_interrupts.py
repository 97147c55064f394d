"""Interrupted work loses nothing: real subprocesses killed with SIGKILL or stopped with SIGINT, then resumed."""

from __future__ import annotations

import csv
import functools
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_NET, checksums

import preprocess
import train
from imaging.common import partial_path
from model import load_checkpoint

EPOCHS = 6
EPOCH_LINE = re.compile(r"epoch +(\d+)  loss ")  # train.py's log line at the end of an epoch


class _Run:
    """A script in a subprocess; a thread reads its stderr (train.py logs there) line by line, so that a test can
    wait for a log line and the pipe never fills."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     encoding="utf-8")
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def last_epoch_logged(self) -> int:
        """The last epoch this run finished and logged (0: none yet); the log line is its last act before going on to
        the next epoch."""
        return max((int(m.group(1)) for line in list(self.lines) if (m := EPOCH_LINE.match(line))), default=0)

    def wait_for(self, condition, timeout: float = 120.0, interval: float = 0.005) -> bool:
        """Check ``condition`` every ``interval`` seconds (sleeping, so the run keeps the CPU) until it holds (True)
        or the run ends (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(interval)
        self.stop(signal.SIGKILL)
        raise TimeoutError(f"the subprocess neither reached the point nor ended: {self.stderr}")

    def stop(self, sig: int) -> int:
        """Send ``sig``; the exit code once the run has ended and its stderr is read."""
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=120)
        self._reader.join(timeout=30)
        return code


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


def _assert_consistent(out: Path) -> None:
    """Whatever a kill left: checkpoints load, and last.pt is never behind metrics.csv by more than one epoch."""
    assert not (out / "best.pt").exists() or load_checkpoint(out / "best.pt")["epoch"] >= 1
    if (out / "last.pt").exists():
        last = load_checkpoint(out / "last.pt")
        assert "optimizer" in last
        assert len(_rows(out)) in (last["epoch"], last["epoch"] - 1)


def test_sigkill_at_any_moment_then_resume_matches_an_uninterrupted_run(prep_dir, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    common = ["--data", str(prep_dir), "--epochs", str(EPOCHS), *TINY_NET]
    assert train.main([*common, "--output", str(ref)]) == 0
    assert not out.exists()
    kill_points = {  # (condition, seconds between checks)
        # the output folder exists: the run has planned and is building the network or caching the volumes
        "while starting": (lambda run: out.is_dir(), 0.005),
        # the write takes milliseconds: checked every millisecond, still sleeping between checks
        "during a checkpoint write": (lambda run: partial_path(out / "last.pt").exists(), 0.001),
        # epoch 3's row is written and this run logged it: it has gone on into the next epoch
        "mid-epoch": (lambda run: len(_rows(out)) >= 3 and run.last_epoch_logged() >= 3, 0.005),
    }
    for point, (condition, interval) in kill_points.items():
        # what a user does: continue from last.pt, or (a kill before the first one) start again over the rest
        again = ["--resume"] if (out / "last.pt").exists() else ["--overwrite"]
        run = _Run("train.py", *common, "--output", str(out), *again)
        reached = run.wait_for(functools.partial(condition, run), interval=interval)
        run.stop(signal.SIGKILL)
        assert reached, f"the run ended before the kill point '{point}': {run.stderr}"
        _assert_consistent(out)
    if len(_rows(out)) < EPOCHS:
        assert train.main([*common, "--output", str(out), "--resume"]) == 0
    got, want = _rows(out), _rows(ref)
    assert [r["epoch"] for r in got] == [str(e) for e in range(1, EPOCHS + 1)]
    # same seeds per epoch: the resumed run saw the same crops and reached the same Dice, epoch by epoch
    assert [float(r["val_dice"]) for r in got] == pytest.approx([float(r["val_dice"]) for r in want], abs=1e-6)
    assert load_checkpoint(out / "best.pt")["best_dice"] == pytest.approx(load_checkpoint(ref / "best.pt")["best_dice"])


def test_ctrl_c_saves_the_epoch_and_exits_cleanly(prep_dir, tmp_path):
    out = tmp_path / "out"
    run = _Run("train.py", "--data", str(prep_dir), "--output", str(out), "--epochs", "100", *TINY_NET)
    assert run.wait_for(lambda: len(_rows(out)) >= 1), run.stderr
    assert run.stop(signal.SIGINT) == 130
    err = run.stderr
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted:")
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == len(_rows(out)) >= 1  # every file of the last epoch was finished
    assert train.main(["--data", str(prep_dir), "--output", str(out), "--epochs", str(last["epoch"] + 1),
                       "--resume", *TINY_NET]) == 0
    assert len(_rows(out)) == last["epoch"] + 1


def test_preprocess_killed_and_rerun_gives_identical_output(raw_dir, prep_dir, tmp_path):
    out = tmp_path / "prep"
    run = _Run("preprocess.py", str(raw_dir), str(out), "--workers", "1", "--val-fraction", "0.25")
    done = out / ".cases"
    def finished() -> list[Path]:  # stamps of finished cases; a hidden one is a write the kill interrupted
        return [p for p in done.glob("*.json") if not p.name.startswith(".")]

    reached = run.wait_for(lambda: done.is_dir() and len(finished()) >= 2)
    run.stop(signal.SIGKILL)
    assert reached, run.stderr
    assert not (out / "dataset.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in finished()}
    assert preprocess.main([str(raw_dir), str(out), "--workers", "1", "--val-fraction", "0.25"]) == 0
    assert checksums(out) == checksums(prep_dir)
    # the cases finished before the kill were reused, not redone
    assert all((done / name).stat().st_mtime_ns == t for name, t in stamps.items())
