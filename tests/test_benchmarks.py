"""Smoke runs of the benchmark scripts on the tiny synthetic set: they run end to end and compare like with like.
Timings are never asserted (benchmarks/ prints them; the README's Performance section reports them)."""

from __future__ import annotations

import json
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
