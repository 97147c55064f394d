"""Interrupted work loses nothing: real subprocesses killed with SIGKILL or stopped with SIGINT, then resumed."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_NET, checksums

import preprocess
import train
from common import partial_path
from model import load_checkpoint

EPOCHS = 6


def _start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll ``condition`` tightly until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
    raise TimeoutError("the subprocess neither reached the point nor ended")


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
    kill_points = {
        "while starting": lambda: time.sleep(0.5) or True,
        "during a checkpoint write": lambda: partial_path(out / "last.pt").exists(),
        "mid-epoch": lambda: len(_rows(out)) >= 3 and (time.sleep(0.2) or True),
    }
    for point, condition in kill_points.items():
        proc = _start("train.py", *common, "--output", str(out), *(["--resume"] if (out / "last.pt").exists() else []))
        reached = _wait_for(condition, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert reached, f"the run ended before the kill point '{point}': {proc.stderr.read()}"
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
    proc = _start("train.py", "--data", str(prep_dir), "--output", str(out), "--epochs", "100", *TINY_NET)
    assert _wait_for(lambda: len(_rows(out)) >= 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted:")
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == len(_rows(out)) >= 1  # every file of the last epoch was finished
    assert train.main(["--data", str(prep_dir), "--output", str(out), "--epochs", str(last["epoch"] + 1),
                       "--resume", *TINY_NET]) == 0
    assert len(_rows(out)) == last["epoch"] + 1


def test_preprocess_killed_and_rerun_gives_identical_output(raw_dir, prep_dir, tmp_path):
    out = tmp_path / "prep"
    proc = _start("preprocess.py", str(raw_dir), str(out), "--workers", "1", "--val-fraction", "0.25")
    done = out / ".cases"
    def finished() -> list[Path]:  # stamps of finished cases; a hidden one is a write the kill interrupted
        return [p for p in done.glob("*.json") if not p.name.startswith(".")]

    reached = _wait_for(lambda: done.is_dir() and len(finished()) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached, proc.stderr.read()
    assert not (out / "dataset.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in finished()}
    assert preprocess.main([str(raw_dir), str(out), "--workers", "1", "--val-fraction", "0.25"]) == 0
    assert checksums(out) == checksums(prep_dir)
    # the cases finished before the kill were reused, not redone
    assert all((done / name).stat().st_mtime_ns == t for name, t in stamps.items())
