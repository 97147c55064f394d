"""Smoke runs of the benchmark scripts on the tiny synthetic set: they run end to end and compare like with like.
Timings are never asserted: they depend on the machine and its load (benchmarks/ prints them)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY_NET, TINY_WIDTHS, unbiased_start

sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_infer  # noqa: E402
import bench_train  # noqa: E402

import infer  # noqa: E402
from imaging.cases import deal_folds  # noqa: E402

NUMBER = r"(-?[\d.]+)"


def printed(text: str, pattern: str) -> list[float]:
    """The numbers of the one printed line that ``pattern`` (``NUMBER`` for each) matches."""
    found = re.findall(pattern, text)
    assert len(found) == 1, (pattern, text)
    return [float(v) for v in (found[0] if isinstance(found[0], tuple) else [found[0]])]


def assert_infer_summary_printed(summary: dict, text: str) -> None:
    """bench_infer's JSON says what its last line printed (to the printed precision)."""
    line = printed(text, rf"total over {summary['cases']} cases: plain {NUMBER} s, ours {NUMBER} s, {NUMBER}× faster; "
                         rf"mean Dice vs truth plain {NUMBER}, ours {NUMBER} .*; masks agree {NUMBER}")
    keys = ["plain_s", "ours_s", "speedup", "plain_dice", "ours_dice", "agreement"]
    decimals = [2, 2, 1, 4, 4, 4]
    assert line == [round(summary[k], d) for k, d in zip(keys, decimals)]
    # the speedup is the ratio of the two totals
    assert summary["speedup"] == pytest.approx(summary["plain_s"] / summary["ours_s"])


def test_bench_infer_smoke(prep_dir, trained, tmp_path, capsys):
    """The benchmark runs end to end on one case and reports both paths (a smoke run; timings are not asserted)."""
    out = tmp_path / "summary.json"
    assert bench_infer.main(["--prep", str(prep_dir), "--checkpoint", str(trained / "best.pt"), "--cases", "1",
                             "--repeats", "1", "--device", "cpu", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["cases"] == 1
    assert_infer_summary_printed(summary, capsys.readouterr().out)
    # same window as the plain call (instance norm, padded alike on volumes smaller than it): the masks agree
    assert summary["agreement"] > 0.99 or summary["plain_dice"] == summary["ours_dice"] == 0.0
    # "ours" is infer.py's path: infer.py scores the same Dice on that case
    (case,) = [c for c in json.loads((prep_dir / "dataset.json").read_text())["cases"] if c["split"] == "val"]
    assert infer.main([case["image"], "--truth", case["label"], "--checkpoint", str(trained / "best.pt"),
                       "--out", str(tmp_path / "infer"), "--device", "cpu", "--no-amp"]) == 0  # fp32, as the bench
    (row, *_) = csv.DictReader((tmp_path / "infer" / "evaluation.csv").open())
    assert float(row["dice_1"]) == pytest.approx(summary["ours_dice"], rel=1e-5, abs=1e-6)


def test_bench_train_smoke(prep_dir, trained, tmp_path, capsys):
    """Both loops start from the same weights and draw the same crops: on the CPU in fp32 their first epoch's
    loss is the same (up to the rounding of channels-last kernels), so the timings compare like with like."""
    out = tmp_path / "summary.json"
    # train.py's arguments of the ``trained`` run, its start too: "ours" is train.py's loop, so it reaches that
    # run's numbers
    with unbiased_start():
        assert bench_train.main(["--epochs", "2", "--json", str(out), "--", "--data", str(prep_dir), "--epochs", "2",
                                 *TINY_NET]) == 0
    summary = json.loads(out.read_text())
    assert summary["epochs"] == 2 and len(summary["plain_losses"]) == len(summary["ours_losses"]) == 2
    assert summary["plain_losses"][0] == pytest.approx(summary["ours_losses"][0], rel=1e-4)
    assert summary["device"] == "cpu" and summary["window"] == [8, 64, 64]  # TINY_NET's crop
    rows = list(csv.DictReader((trained / "metrics.csv").open()))
    assert summary["ours_losses"] == pytest.approx([float(r["train_loss"]) for r in rows], abs=1e-6)
    assert summary["ours_val_dice"] == pytest.approx(float(rows[-1]["val_dice"]), abs=1e-6)
    # the JSON says what was printed (to the printed precision); the speedup is the ratio of the medians
    text = capsys.readouterr().out
    for epoch in (1, 2):
        for way in ("plain", "ours"):
            (loss,) = printed(text, rf"epoch {epoch} +{way}: +[\d.]+ s, loss {NUMBER}")
            assert loss == round(summary[f"{way}_losses"][epoch - 1], 4)
    assert printed(text, rf"median epoch: plain {NUMBER} s, ours {NUMBER} s, {NUMBER}× faster") == [
        round(summary["plain_epoch_s"], 2), round(summary["ours_epoch_s"], 2), round(summary["speedup"], 2)]
    assert summary["speedup"] == pytest.approx(summary["plain_epoch_s"] / summary["ours_epoch_s"])
    assert printed(text, rf"validation after 2 epochs: plain Dice {NUMBER} in [\d.]+ s .*, ours {NUMBER} in") == [
        round(summary["plain_val_dice"], 4), round(summary["ours_val_dice"], 4)]
    assert printed(text, rf"peak RSS while running: plain {NUMBER} MB, ours {NUMBER} MB") == [
        round(summary["plain_peak_rss_mb"]), round(summary["ours_peak_rss_mb"])]


def test_gpu_script_smoke(tmp_path):
    """benchmarks/gpu.sh (what a lent GPU runs) end to end with the CPU standing in and tiny sizes: it makes its
    data, runs both benchmarks, a one-process torchrun job (gloo here, NCCL on a GPU) and serve.py under load, and
    leaves their summaries and a checkpoint in $OUT, each step's status in steps.txt."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DATA": str(tmp_path / "data"), "DEVICE": "cpu",
           "PYTHON": sys.executable, "TESTS": "0", "CASES": "3", "SHAPE": "8 64 64", "TRAIN_EPOCHS": "1",
           "BENCH_EPOCHS": "1", "REPEATS": "1", "NET": " ".join(TINY_NET[:-2]), "BUDGET_S": "1800", "CAP_SCALE": "5"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "out"
    train_summary = json.loads((out / "bench_train.json").read_text())
    infer_summary = json.loads((out / "bench_infer.json").read_text())
    assert train_summary["device"] == "cpu" and train_summary["window"] == [8, 64, 64]  # NET's crop
    assert train_summary["epochs"] == 1  # BENCH_EPOCHS
    # every labelled validation case of the data it made, and the summary it printed
    manifest = json.loads((tmp_path / "data" / "prep" / "dataset.json").read_text())
    assert infer_summary["cases"] == sum(c["split"] == "val" for c in manifest["cases"]) >= 1
    assert_infer_summary_printed(infer_summary, (out / "bench_infer.txt").read_text())
    assert (out / "train" / "best.pt").is_file() and not (out / "train" / "last.pt").exists()
    assert "no GPU" in (out / "machine.txt").read_text()
    steps = (out / "steps.txt").read_text()
    for name in ("preprocess", "bench_train", "train", "bench_infer", "torchrun", "bench_serve"):
        assert re.search(rf"^{name}: exit 0 in \d+ s", steps, re.M), steps
    assert "rank 0 of 1 (gloo)" in (out / "torchrun.txt").read_text()
    serve = json.loads((out / "bench_serve.json").read_text())
    assert [(r["clients"], r["status"]) for r in serve["rounds"]] == [(1, {"200": 4}), (4, {"200": 4})]


def test_gpu_script_stops_at_its_budget(tmp_path):
    """A step that would overrun the budget is stopped, the steps after it are not run, and the script fails
    naming them."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DATA": str(tmp_path / "data"), "DEVICE": "cpu",
           "PYTHON": sys.executable, "TESTS": "0", "CASES": "3", "SHAPE": "8 64 64", "BUDGET_S": "6"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=300)
    assert done.returncode == 1
    steps = (tmp_path / "out" / "steps.txt").read_text()
    assert "bench_serve: not run, the budget is spent" in steps and "failed:" in done.stderr


def test_holdout_scores_patients_the_run_never_saw(tmp_path):
    """benchmarks/holdout.py deals patients into folds as train.py --folds does, trains on the others only (none of
    the held-out patient's slices reach the prepared data) and scores each held-out patient on its pooled slices."""
    import holdout
    from test_blank import _patient

    rng = np.random.default_rng(1)
    raw = tmp_path / "raw"
    for name in ("pa", "pb", "pc", "pd"):
        _patient(raw / name, name, rng, n=4)
    out = tmp_path / "result.json"
    assert holdout.main([str(raw), "--folds", "2", "--fold", "1", "--work", str(tmp_path / "work"), "--json", str(out),
                         "--train-args", "--epochs 1 --device cpu " + " ".join(TINY_WIDTHS) + " --crop 1 32 32"]) == 0
    result = json.loads(out.read_text())
    fold_of = deal_folds({name: name for name in ("pa", "pb", "pc", "pd")}, 2, seed=0)
    held = sorted(name for name, k in fold_of.items() if k == 1)
    assert sorted(result["output"]["patients"]) == held and len(held) == 2
    prepared = {c["group"] for c in json.loads((tmp_path / "work" / "fold_1" / "prep" / "dataset.json").read_text())
                ["cases"]}
    assert prepared == {"pa", "pb", "pc", "pd"} - set(held)
    for key in ("output", "output --no-tta --no-postprocess", "output --tta"):
        scores = result[key]["patients"].values()
        assert result[key]["mean_dice"] == pytest.approx(np.mean([p["dice"] for p in scores]))
        assert all(p["cases"] == 4 and p["empty"] == 2 for p in scores)  # blank first and last
    # --redecide: the same network decided again (by the same code: the same decision and masks), no training
    decision = tmp_path / "work" / "fold_1" / "output" / "postprocessing.json"
    before = json.loads(decision.read_text())
    decision.unlink()
    again = tmp_path / "again.json"
    assert holdout.main([str(raw), "--folds", "2", "--fold", "1", "--work", str(tmp_path / "work"), "--json",
                         str(again), "--redecide"]) == 0
    redone = json.loads(again.read_text())
    assert "train" not in redone["seconds"] and "redecide" in redone["seconds"]
    assert {k: v for k, v in json.loads(decision.read_text()).items() if k != "seconds"} == {
        k: v for k, v in before.items() if k != "seconds"}
    assert all(redone[key] == result[key] for key in ("output", "output --no-tta --no-postprocess", "output --tta"))
    # probe_holdout.py on the same run: at scale 1 and threshold 0.5 it reproduces infer.py's masks' Dice; the run
    # listed twice averages two equal networks (the ensemble scores as either)
    import probe_holdout

    work, probed = tmp_path / "work", tmp_path / "probe.json"
    assert probe_holdout.main([str(raw), "--runs", str(work), str(work), "--scales", "1", "2", "--thresholds", "0.5",
                               "--fill-holes", "--json", str(probed)]) == 0
    probes = json.loads(probed.read_text())
    alone, ensemble = probes[f"{work} scales=1.0 t=0.5"], probes["ensemble scales=1.0 t=0.5"]
    assert sorted(alone) == held
    assert alone == pytest.approx({n: s["dice"] for n, s in result["output"]["patients"].items()}, abs=1e-3)
    assert ensemble == pytest.approx(alone, abs=1e-6)
    assert {f"{work} scales=2.0 t=0.5", f"{work} scales=1.0 t=0.5 filled"} < set(probes)


def test_bench_scale_smoke(tmp_path, capsys):
    """Two tiny cases against a 1 KB cache budget: training reads the disk cache, the second run the first's."""
    import bench_scale

    out = tmp_path / "scale.json"
    assert bench_scale.main(["--cases", "2", "--shape", "40", "40", "8", "--time-limit", "20s", "--cache-memory",
                             "1K", "--workers", "1", "--work", str(tmp_path / "work"), "--json", str(out),
                             "--ratios", "1", "4"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["cases"] == 2 and row["train_first"]["from_disk"] and row["train_second"]["from_disk"]
    # 1×: every volume fits the budget, in memory; 4×: a quarter of it, the rest read from the disk cache
    assert not row["train_ratio1"]["from_disk"] and row["train_ratio4"]["from_disk"]
    assert row["prepared_mb"] > 0 and len(list((tmp_path / "work" / "n2" / "masks").glob("*_mask.nii.gz"))) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row
