"""The plan (training/planner.py: settings from the data fingerprint and the machine), --plan re-runs, --time-limit."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import time

import pytest
import torch
from conftest import TINY_NET

import train
from imaging.common import InputError
from model import load_checkpoint
from training import planner, planning
from training.clock import Clock

SCHEDULED = [a for k, a in enumerate(TINY_NET) if "--val-every" not in TINY_NET[max(k - 1, 0):k + 1]]

FP_2D = {"dims": "2d", "median_shape": [1, 212, 181], "median_spacing": [1.0, 1.0, 1.0]}
FP_3D = {"dims": "3d", "median_shape": [150, 200, 180], "median_spacing": [1.0, 0.8, 0.8]}


def test_2d_crops_are_whole_slices_and_3d_crops_fit_the_budget():
    assert planner.crop_size(FP_2D, [1, 1, 1], 1e6, [1, 256, 240]) == [1, 256, 240]
    assert planner.crop_size(FP_2D, [1, 1, 1], 1e6, [1, 900, 700]) == [1, 512, 512]  # planner.MAX_INPLANE_2D
    crop = planner.crop_size(FP_3D, FP_3D["median_spacing"], 48 * 96 * 96, [200, 260, 240])
    assert crop[0] * crop[1] * crop[2] <= 48 * 96 * 96 < 150 * 200 * 180
    # shrunk along its longest side in mm each time: the crop ends about as long in mm along every axis
    mm = [c * s for c, s in zip(crop, FP_3D["median_spacing"])]
    assert max(mm) / min(mm) < 1.15 and crop == [65, 77, 86]


def test_the_network_fits_the_crop():
    margs, crop = planner.network([1, 256, 256], [1, 1, 1], "2d", 16, 256)
    assert margs["channels"] == [16, 32, 64, 128, 256, 256]  # 5 levels: 256 / 2**5 = 8 voxels at the bottom
    assert margs["strides"] == [[1, 2, 2]] * 5 and margs["kernel_size"] == [1, 3, 3] and crop == [1, 256, 256]
    margs, crop = planner.network([1, 250, 90], [1, 1, 1], "2d", 16, 256)
    assert margs["channels"] == [16, 32, 64, 128]  # the shorter side decides: 90 / 2**3 >= 8 > 90 / 2**4
    assert crop == [1, 256, 96]  # rounded up to multiples of 8
    margs, crop = planner.network([16, 64, 64], [1, 1, 1], "3d", 32, 320)
    assert margs["channels"] == [32, 64, 128, 256]  # 64 / 2**3 = 8
    assert margs["strides"] == [[2, 2, 2], [2, 2, 2], [1, 2, 2]]  # depth 16 takes two depth strides, not three
    assert crop == [16, 64, 64]


def test_make_plan_on_the_cpu_probes_and_projects():
    task = planner.Task(FP_2D, [[1, 100, 90], [1, 120, 80]], 1, 10)
    plan = planner.make_plan(task, torch.device("cpu"), time_limit=600.0)
    assert plan["crop"] == [1, 120, 96] and plan["batch_size"] == 4 and plan["num_samples"] == 1
    assert plan["batch_dice"] is True and plan["machine"]["device"] == "cpu"
    # 10 cases in batches of 4: 3 steps (both figures rounded as plan.json gives them: 0.1 s and 1 ms)
    assert plan["epoch_s_estimate"] == pytest.approx(plan["probe_step_s"] * 3, abs=0.05 + 3 * 0.0005)
    assert plan["epochs_estimate"] == int(600 // plan["epoch_s_estimate"])


BRATS_FP = {"dims": "3d", "median_shape": [138, 169, 138], "median_spacing": [1.0, 1.0, 1.0]}


def _card(gb: float) -> dict:
    return {"device": "cuda", "cpu_cores": 16, "gpu": f"a {gb} GB card", "gpu_memory_gb": gb,
            "compute_capability": "9.0"}


@pytest.mark.parametrize("gb", [16, 80, 141])
def test_a_gpu_plan_is_sized_to_nnunets_patch_not_to_the_cards_memory(gb):
    """On a 16, 80 or 141 GB card a BraTS-size volume gets a patch of about 128³ at batch 2 (two crops a step), as
    nnU-Net plans for its 8 GB reference GPU; the same on every card (it used to grow to the whole volume)."""
    task = planner.Task(BRATS_FP, [[138, 169, 138]] * 4, 4, 100)
    got = planner.settings(task, _card(gb))
    voxels = got["crop"][0] * got["crop"][1] * got["crop"][2]
    assert 0.7 * 128**3 < voxels < 1.4 * 128**3 and got["batch_size"] == 2 and got["num_samples"] == 1
    assert got == planner.settings(task, _card(16))
    assert got["margs"]["channels"][0] == 32 and max(got["margs"]["channels"]) <= 320  # nnU-Net's widths
    small = planner.settings(task, _card(4))  # half the reference memory: about half the crop
    assert small["crop"][0] * small["crop"][1] * small["crop"][2] < 0.7 * voxels
    flat = planner.settings(planner.Task(FP_2D, [[1, 256, 256]] * 4, 1, 100), _card(gb))
    assert flat["crop"] == [1, 256, 256] and flat["batch_size"] == 12 and flat["num_samples"] == 1


def test_a_gpu_out_of_memory_at_the_probe_halves_the_batch_then_the_crop(monkeypatch):
    """Out of memory: the batch halves, then the crop shrinks, until a step fits; where none does, one line."""
    task = planner.Task(BRATS_FP, [[138, 169, 138]] * 4, 4, 100)
    plan = planner.settings(task, _card(16))
    tried = []

    def probe(margs, crop, step, in_channels, device, amp):
        tried.append((step, crop[0] * crop[1] * crop[2]))
        if len(tried) < 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return 0.5

    monkeypatch.setattr(planner, "probe", probe)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    chosen, seconds = planner.probed(task, plan, torch.device("cuda"), True)
    assert seconds == 0.5 and [step for step, _ in tried] == [2, 1, 1, 1]
    assert tried[0][1] == tried[1][1] > tried[2][1] > tried[3][1] and chosen["batch_size"] == 1
    assert tuple(chosen["crop"]) != tuple(plan["crop"]) and chosen["margs"]["channels"][0] == 32
    monkeypatch.setattr(planner, "probe", lambda *a: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")))
    with pytest.raises(InputError, match="out of memory for one training step of the smallest crop"):
        planner.probed(task, plan, torch.device("cuda"), True)


def test_a_run_writes_its_plan_and_a_plan_reruns(prep_dir, tmp_path):
    first = tmp_path / "first"
    assert train.main(["--data", str(prep_dir), "--output", str(first), "--epochs", "1", *TINY_NET]) == 0
    plan = json.loads((first / "plan.json").read_text())
    assert plan["planned"] == ["lr", "batch_dice", "train_on_val"] and plan["settings"]["lr"] == 1e-3
    assert plan["fingerprint"]["dims"] == "3d" and plan["settings"]["crop"] == [8, 64, 64]
    cfg = train.parse_args(["--plan", str(first / "plan.json"), "--data", str(prep_dir), "--lr", "0.01"])
    for key, value in plan["settings"].items():  # every setting from the file but the one given
        got = getattr(cfg, key)
        got = json.loads(json.dumps(got))
        assert got == (0.01 if key == "lr" else value), key
    assert cfg.output == train.TrainConfig.output  # where to write is not part of a plan


def test_a_bad_plan_file_is_one_line(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"settings": {"widths": [4, 8], "colour": "blue"}}))
    with pytest.raises(InputError, match="unknown settings"):
        train.parse_args(["--plan", str(tmp_path / "p.json")])
    with pytest.raises(InputError, match="no such plan"):
        train.parse_args(["--plan", str(tmp_path / "absent.json")])


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("20m", 1200), ("2h", 7200), ("45", 45), ("1.5m", 90)])
def test_time_limits_read_as_seconds(text, seconds):
    assert train.parse_args(["--time-limit", text]).time_limit == seconds


@pytest.mark.parametrize("text", ["0", "-5m", "20 minutes", "m"])
def test_bad_time_limits_are_refused(text):
    with pytest.raises(InputError, match="time-limit"):
        train.parse_args(["--time-limit", text])


def test_the_clock_decays_validates_and_stops_within_the_budget():
    clock = Clock(100.0, time.perf_counter())
    assert clock.lr(1.0) == pytest.approx(1.0, abs=1e-3) and clock.validation_due(1)  # the first measures its cost
    clock.trained(5.0)
    clock.validated(2.0, True)
    assert not clock.validation_due(1)  # 0 s of training since: a validation would cost more than a fifth
    clock.trained(5.0)
    clock.trained(3.0)
    assert clock.validation_due(1)  # 8 s of training against 2 s of validation: a fifth of the time
    clock.start -= 60  # 60 s later: cosine at 60%, and another epoch still fits
    assert clock.lr(1.0) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(0.6 * torch.pi)).item()), abs=1e-3)
    assert not clock.no_time_for_another()
    clock.start -= 34  # 94 s: two 2 s validations and another 3 s epoch (and its writing) would pass 100 s
    assert clock.no_time_for_another() and clock.left() == pytest.approx(6, abs=0.1)


@pytest.mark.parametrize("val_s, dims, overlap, every", [
    (2.0, 3, 0.75, 2),   # 2 s against 5 s an epoch: every 4 × 2 / 5 → 2 epochs keeps it a fifth of the time
    (0.1, 3, 0.75, 1),
    (40.0, 3, 0.5, 4),   # 8 epochs' worth: at overlap 0.5, 1/8 of the windows, 5 s, every 4 epochs
    (40.0, 2, 0.5, 8),   # a 2D window slides in-plane only: 1/4 of the windows, 10 s
])
def test_validation_is_settled_from_its_measured_cost(val_s, dims, overlap, every):
    clock = Clock(None, time.perf_counter())
    for _ in range(2):  # the first validation measures warm-up too: the second settles
        assert clock.validation_due(1) and clock.validation_due(7) and clock.every is None
        clock.trained(5.0)
        clock.validated(val_s, True)
        clock.settle(0.75, dims, clock.val_s, clock.epoch_s)
    assert (clock.overlap, clock.every) == (overlap, every)
    assert [e for e in range(2, 12) if clock.validation_due(e)] == [e for e in range(2, 12) if e % every == 0]
    clock.settle(0.75, dims, 1000.0, 0.1)  # fixed once settled: a resumed run keeps last.pt's schedule
    assert (clock.overlap, clock.every) == (overlap, every)
    given = Clock(None, time.perf_counter(), validations=2)
    given.settle(0.3, dims, val_s, 5.0)  # an --overlap at or under 0.5 is kept
    assert given.overlap == 0.3
    # a run resumed without the --time-limit it had (last.pt: an overlap, no interval) settles its interval on
    # its first validation, made at that overlap: 4 × 2 s / 5 s → every 2 epochs
    unlimited = Clock(None, time.perf_counter(), overlap=overlap)
    unlimited.settle(0.75, dims, 2.0, 5.0)
    assert (unlimited.overlap, unlimited.every) == (overlap, 2)


def test_the_decision_tries_flips_only_where_their_passes_fit_the_time_left():
    from types import SimpleNamespace

    from dataset import FLIP_AXES
    from model import flip_sets
    from training.config import TrainConfig

    run = SimpleNamespace(run=SimpleNamespace(cfg=TrainConfig(overlap=0.75), window=(8, 64, 64)),
                          device=torch.device("cpu"))
    # 4 s validations at overlap 0.5: a pass at inference's 0.75 has 8× the windows, 32 s; one per combination
    # of the flipped axes (4), 128 s
    assert len(flip_sets(FLIP_AXES)) == 4
    clock = Clock(100.0, time.perf_counter(), val_s=4.0, overlap=0.5)
    assert clock.passes_s(4, 0.75, 3) == pytest.approx(128.0)
    assert train.deciding_in_time(run, clock).flips == ()  # 128 s against 100 s left: postprocessing alone
    clock.overlap = 0.75
    assert train.deciding_in_time(run, clock).flips == FLIP_AXES  # 4 × 4 s fits
    assert train.deciding_in_time(run, Clock(None, time.perf_counter(), val_s=1e4)).flips == FLIP_AXES  # no limit


def test_a_time_limited_run_ends_validated_with_a_decayed_rate(prep_dir, tmp_path, monkeypatch):
    """The run's clock made the machine's speed alone: every reading of ``time.perf_counter`` is 0.1 s later than
    the one before, so that setup, epochs and validations cost the same on a slow CPU as on a fast one."""
    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: 0.1 * next(ticks))
    out = tmp_path / "out"
    assert train.main(["--data", str(prep_dir), "--output", str(out), "--time-limit", "30s", *SCHEDULED]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) > 2, rows
    assert rows[-1]["val_dice"] != ""  # the last epoch is validated, so the best checkpoint is chosen on it
    assert float(rows[-1]["lr"]) < 0.5 * 1e-3  # past the middle of the cosine, whatever setup took
    assert float(rows[0]["lr"]) > float(rows[-1]["lr"])
    assert json.loads((out / "plan.json").read_text())["settings"]["time_limit"] == 30.0


def test_a_run_validates_on_its_measured_schedule_and_a_resumed_one_keeps_it(prep_dir, tmp_path, monkeypatch):
    """Without --val-every the first validation settles how often the others come (the clock ticks 0.1 s at
    every reading, as above); last.pt keeps that schedule, and a resumed run validates the epochs it says."""
    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: 0.1 * next(ticks))
    out = tmp_path / "out"
    assert train.main(["--data", str(prep_dir), "--output", str(out), "--epochs", "3", *SCHEDULED]) == 0
    schedule = load_checkpoint(out / "last.pt")["validation"]
    assert schedule["every"] >= 1 and schedule["overlap"] in (0.75, 0.5)
    assert train.main(["--data", str(prep_dir), "--output", str(out), "--epochs", "9", "--resume",
                       *SCHEDULED]) == 0
    assert load_checkpoint(out / "last.pt")["validation"] == schedule
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    validated = [int(r["epoch"]) for r in rows if r["val_dice"]]
    every = schedule["every"]
    assert validated == sorted({1, 2, 3, 9} | {e for e in range(1, 10) if e % every == 0})


@pytest.mark.parametrize("select", ["final", "best"])
def test_model_pt_holds_the_selected_epoch(prep_dir, tmp_path, select):
    """model.pt, what infer.py uses by default, is the final epoch (learning rate decayed) or the best one."""
    out = tmp_path / select
    assert train.main(["--data", str(prep_dir), "--output", str(out), "--epochs", "3", "--select", select,
                       *TINY_NET]) == 0
    kept, best = load_checkpoint(out / "model.pt"), load_checkpoint(out / "best.pt")
    assert kept["selected"] == select
    assert kept["epoch"] == (3 if select == "final" else best["epoch"])
    same = load_checkpoint(out / "last.pt") if select == "final" else best
    assert all(torch.equal(kept["model_state"][k], same["model_state"][k]) for k in kept["model_state"])


def test_validation_cases_train_too_unless_held_out(prep_dir, tmp_path):
    """A split preprocess.py drew at random, the final epoch kept: the validation cases train too (and are still
    validated on). --no-train-on-val, --select best, --folds and the data's own validation folder keep them out."""
    manifest = json.loads((prep_dir / "dataset.json").read_text())
    names = {s: {c["name"] for c in manifest["cases"] if c["split"] == s} for s in ("train", "val")}

    def trained(data, *flags) -> tuple[set[str], bool]:
        run = planning.plan_run(train.parse_args(["--data", str(data), "--epochs", "1", *TINY_NET, *flags]))
        if "--folds" not in flags:
            assert {item["name"] for item in run.val_items} == names["val"]
        return {item["name"] for item in run.train_items}, run.plan["settings"]["train_on_val"]

    assert names["val"] and trained(prep_dir) == (names["train"] | names["val"], True)
    assert trained(prep_dir, "--no-train-on-val") == (names["train"], False)
    assert trained(prep_dir, "--select", "best") == (names["train"], False)
    assert trained(prep_dir, "--folds", "2", "--fold", "0")[1] is False
    own = tmp_path / "own"
    shutil.copytree(prep_dir, own)
    manifest["split"]["from_folders"] = True
    (own / "dataset.json").write_text(json.dumps(manifest))
    assert trained(own) == (names["train"], False)
    assert trained(own, "--train-on-val") == (names["train"] | names["val"], True)


def test_plan_json_is_the_network_trained_and_rebuilds_it(prep_dir, tmp_path):
    """Thick slices (5 × 0.8 × 0.8 mm) and a crop only 20 deep: the planner keeps depth unstrided at the last level;
    the network built is that one, plan.json says so, and --plan plan.json builds it again."""
    data = tmp_path / "thick"
    shutil.copytree(prep_dir, data)
    manifest = json.loads((data / "dataset.json").read_text())
    for case in manifest["cases"]:
        case["prepared_spacing"], case["prepared_shape"] = [5.0, 0.8, 0.8], [20, 256, 256]
    manifest["fingerprint"].update(median_spacing=[5.0, 0.8, 0.8], median_shape=[20, 256, 256])
    (data / "dataset.json").write_text(json.dumps(manifest))
    run = planning.plan_run(train.parse_args(["--data", str(data), "--crop", "20", "64", "64", "--epochs", "1"]))
    planned, _ = planner.network([20, 64, 64], [5.0, 0.8, 0.8], "3d", 16, 256)
    assert planned["strides"] == [[1, 2, 2]] * 3  # not the [2, 2, 2] spacing alone would give the last level
    assert run.margs["strides"] == planned["strides"] and run.margs["channels"] == planned["channels"]
    assert run.plan["settings"]["strides"] == planned["strides"]
    (tmp_path / "plan.json").write_text(json.dumps(run.plan))
    again = planning.plan_run(train.parse_args(["--data", str(data), "--plan", str(tmp_path / "plan.json")]))
    assert again.margs == run.margs and again.window == run.window and again.cfg.crop == run.cfg.crop
    given = planning.plan_run(train.parse_args(["--data", str(data), "--crop", "20", "64", "64", "--epochs", "1",
                                         "--widths", "8", "16", "32", "64", "--strides", "2", "2", "2"]))
    assert given.margs["strides"] == [[1, 2, 2], [1, 2, 2], [2, 2, 2]]  # strides given per level follow the spacing
    assert given.plan["settings"]["strides"] == given.margs["strides"]


@pytest.mark.parametrize("flags, seen", [([], True), (["--no-train-on-val"], False)])
def test_the_validation_dice_is_named_for_what_it_is(prep_dir, tmp_path, caplog, flags, seen):
    """Validation cases that also train give a fit, not an estimate: the log line says so, a held-out run's not."""
    caplog.set_level("INFO", logger="train")
    assert train.main(["--data", str(prep_dir), "--output", str(tmp_path / "out"), "--epochs", "1", *TINY_NET,
                       "--no-postprocess", *flags]) == 0
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch   1")]
    assert len(epoch_lines) == 1 and ("val Dice (trained on) " in epoch_lines[0]) is seen, epoch_lines
