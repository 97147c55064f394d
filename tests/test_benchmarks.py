"""Smoke runs of the benchmark scripts on the tiny synthetic set: they run end to end and compare like with like.
Timings are never asserted (benchmarks/ prints them; the README's Performance section reports them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_NET

sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_infer  # noqa: E402
import bench_train  # noqa: E402


def test_bench_infer_smoke(prep_dir, trained, tmp_path):
    """The benchmark runs end to end on one case and reports both paths (a smoke run; timings are not asserted)."""
    out = tmp_path / "summary.json"
    assert bench_infer.main(["--prep", str(prep_dir), "--checkpoint", str(trained / "best.pt"), "--cases", "1",
                             "--repeats", "1", "--device", "cpu", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["cases"] == 1 and summary["plain_s"] > 0 and summary["ours_s"] > 0
    assert 0.0 <= summary["agreement"] <= 1.0 and 0.0 <= summary["ours_dice"] <= 1.0
    # same window as the plain call (instance norm, padded alike on volumes smaller than it): the masks agree
    assert summary["agreement"] > 0.99 or summary["plain_dice"] == summary["ours_dice"] == 0.0


def test_bench_train_smoke(prep_dir, tmp_path):
    """Both loops start from the same weights and draw the same crops: on the CPU in fp32 their first epoch's
    loss is the same (up to the rounding of channels-last kernels), so the timings compare like with like."""
    out = tmp_path / "summary.json"
    assert bench_train.main(["--epochs", "2", "--json", str(out), "--", "--data", str(prep_dir), *TINY_NET]) == 0
    summary = json.loads(out.read_text())
    assert summary["epochs"] == 2 and len(summary["plain_losses"]) == len(summary["ours_losses"]) == 2
    assert summary["plain_losses"][0] == pytest.approx(summary["ours_losses"][0], rel=1e-4)
    assert summary["plain_epoch_s"] > 0 and summary["ours_epoch_s"] > 0 and summary["speedup"] > 0
    assert 0.0 <= summary["plain_val_dice"] <= 1.0 and 0.0 <= summary["ours_val_dice"] <= 1.0
    assert summary["ours_peak_rss_mb"] > 0 and summary["ours_cache_mb"] >= 0


def test_gpu_script_smoke(tmp_path):
    """benchmarks/gpu.sh (what a lent GPU runs) end to end with the CPU standing in and tiny sizes: it makes its
    data, runs both benchmarks and leaves their summaries and a checkpoint in $OUT."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DATA": str(tmp_path / "data"), "DEVICE": "cpu",
           "PYTHON": sys.executable, "TESTS": "0", "CASES": "3", "SHAPE": "8 64 64", "TRAIN_EPOCHS": "1",
           "BENCH_EPOCHS": "1", "REPEATS": "1", "NET": " ".join(TINY_NET[:-2])}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "out"
    train_summary = json.loads((out / "bench_train.json").read_text())
    infer_summary = json.loads((out / "bench_infer.json").read_text())
    assert train_summary["device"] == "cpu" and train_summary["window"] == [8, 64, 64]  # NET's crop
    assert infer_summary["cases"] >= 1 and infer_summary["ours_s"] > 0
    assert (out / "train" / "best.pt").is_file() and not (out / "train" / "last.pt").exists()
    assert "no GPU" in (out / "machine.txt").read_text()
