"""Cross-validation and what inference does around the network: grouped folds, ensembles, test-time flips
(evaluation/crossval.py, train.py --folds, infer.py with several checkpoints or a folder of folds, --tta)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_NET, one_error_line, unbiased_start

import infer
import model as model_module
import train
from evaluation import crossval
from evaluation.crossval import STEPS, Deciding, Judged, assign_folds, judge
from evaluation.postprocess import OnDisk
from imaging.cases import deal_folds, find_inputs, group_order, load_manifest, read_case, split_cases
from imaging.common import InputError
from inference import segmenter
from model import (
    Sliding,
    flipped_probabilities,
    load_checkpoint,
    predict_logits,
    predict_probabilities,
    probabilities,
    save_checkpoint,
)
from training import ensembles, planning


def _manifest(patients: int, slices: int, test: int = 0) -> dict:
    """A manifest of ``patients`` patients' numbered slices (one group each) plus ``test`` test cases."""
    cases = [{"name": f"P{p}_{k}", "group": f"P{p}", "split": "train" if p else "val"}
             for p in range(patients) for k in range(1, slices + 1)]
    return {"cases": cases + [{"name": f"T{t}", "group": f"T{t}", "split": "test"} for t in range(test)]}


def test_folds_keep_patients_whole_are_seeded_and_leave_the_test_split_out():
    manifest = _manifest(patients=7, slices=5, test=2)
    folds = assign_folds(manifest, 3, seed=0)
    assert set(folds) == {c["name"] for c in manifest["cases"] if c["split"] != "test"}
    by_patient = {}
    for name, fold in folds.items():
        by_patient.setdefault(name.split("_")[0], set()).add(fold)
    assert all(len(f) == 1 for f in by_patient.values())  # no patient straddles two folds
    counts = [sum(fold == {k} for fold in by_patient.values()) for k in range(3)]
    assert sorted(counts) == [2, 2, 3]  # 7 patients dealt out evenly
    assert assign_folds(manifest, 3, seed=0) == folds  # seeded: the same folds again
    assert any(assign_folds(manifest, 3, seed=s) != folds for s in (1, 2, 3))
    with pytest.raises(InputError, match="need 2 to 7 folds"):
        assign_folds(manifest, 8, seed=0)


def test_every_split_by_patient_deals_from_one_order():
    """preprocess.py's validation split takes the first patients of the seeded order; train.py --folds (and
    benchmarks/holdout.py) deal the same order out in turn: with one seed, the validation patients of a 20% split
    are those that the first fold of five deals first."""
    manifest = _manifest(patients=10, slices=3)
    groups = {c["name"]: c["group"] for c in manifest["cases"]}
    order = group_order(groups.values(), seed=3)
    assert sorted(order) == sorted(set(groups.values())) and order != sorted(order)
    split = split_cases(groups, 0.2, seed=3)
    assert {groups[c] for c, side in split.items() if side == "val"} == set(order[:2])
    folds = deal_folds(groups, 5, seed=3)
    assert assign_folds(manifest, 5, seed=3) == folds
    assert {groups[c] for c, k in folds.items() if k == 0} == {order[0], order[5]}
    assert all(len({folds[c] for c in groups if groups[c] == g}) == 1 for g in order)


def test_split_items_gives_each_fold_its_own_validation_patients(prep_dir):
    manifest = load_manifest(prep_dir)
    seen = []
    for k in range(2):
        train_items, val_items = planning.split_items(manifest, prep_dir, folds=2, fold=k)
        names = {i["name"] for i in val_items}
        assert names and not names & {i["name"] for i in train_items}
        seen.append(names)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {c["name"] for c in manifest["cases"] if c["split"] in ("train", "val")}


def _tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, 1, 3, padding=1)).eval()


def test_an_ensemble_averages_the_networks_probabilities():
    image = torch.randn(1, 1, 4, 12, 12)
    nets = [_tiny_net(1), _tiny_net(2)]
    by_hand = sum(probabilities(predict_logits(n, image, Sliding((4, 8, 8), 0.5))) for n in nets) / 2
    got = predict_probabilities(nets, image, Sliding((4, 8, 8), 0.5))
    assert torch.allclose(got, by_hand, atol=1e-6)
    assert not torch.allclose(got, probabilities(predict_logits(nets[0], image, Sliding((4, 8, 8), 0.5))), atol=1e-3)


@pytest.mark.parametrize(("shape", "passes"), [((3, 10, 14), [1, 1, 1, 1]), ((3, 8, 8), [4])])
def test_flips_are_flipped_back(shape, passes, monkeypatch):
    """A flip-equivariant network (a 1×1×1 convolution) gives the same probabilities with flips as without; for any
    network each flipped prediction is the flipped input's prediction flipped back, and in-plane axes only. An image
    of one window takes its flipped copies in one batch; a larger one one copy at a time (memory for one)."""
    image = torch.randn(1, 1, *shape)
    pointwise = torch.nn.Conv3d(1, 1, 1).eval()
    plain = predict_probabilities([pointwise], image, Sliding((3, 8, 8), 0.5))
    flipped = predict_probabilities([pointwise], image, Sliding((3, 8, 8), 0.5), flips=(1, 2))
    assert torch.allclose(flipped, plain, atol=1e-6)
    net = _tiny_net(3)
    batches, real = [], model_module.predict_logits
    monkeypatch.setattr(model_module, "predict_logits", lambda m, x, *a: batches.append(len(x)) or real(m, x, *a))
    got = list(flipped_probabilities(net, image, Sliding((3, 8, 8), 0.5), flips=(1, 2)))
    monkeypatch.undo()
    assert len(got) == 4 and batches == passes  # none, H, W, both
    for probs, dims in zip(got, ([], [3], [4], [3, 4])):
        x = image.flip(dims) if dims else image
        direct = probabilities(predict_logits(net, x, Sliding((3, 8, 8), 0.5)))
        assert torch.allclose(probs, direct.flip(dims) if dims else direct, atol=1e-6)
    assert not torch.allclose(got[1], got[0], atol=1e-3)  # the network is not equivariant: the flip mattered


def _judge_flips(monkeypatch, flipped_dice: list[float]) -> dict:
    """``judge``'s record where each validation volume (a 10×10 square, truth of 100 voxels) scores 1.0 without flips
    and ``flipped_dice[i]`` with them (the flipped mask covers a share of the truth)."""
    truth = np.zeros((1, 10, 10), np.uint8)
    truth[0] = 1
    entries = []
    for i, d in enumerate(flipped_dice):
        flipped = np.zeros_like(truth)  # Dice 2k / (k + 100) = d  →  k = 100 d / (2 - d) voxels
        flipped.reshape(-1)[: round(100 * d / (2 - d))] = 1
        entries.append(({"name": f"c{i}", "prepared_spacing": [1.0, 1.0, 1.0]}, truth.copy(), flipped, truth))
    monkeypatch.setattr(crossval, "predict_validation", lambda *args: entries)
    manifest = {"label_values": [0, 1], "cases": [c for c, *_ in entries]}
    how = Deciding(torch.device("cpu"), False, (1, 2), postprocess=False)
    return judge([Judged((Path("model.pt"),), [])], manifest, [], how)


def test_the_decision_reads_each_mask_from_a_file_it_removes(monkeypatch, tmp_path):
    """Every validation mask waits in a scratch file (not in memory) until it is scored, and the scratch folder is
    gone once the decision is made, with the same record as masks in memory would give."""
    seen = []
    real = crossval.unit_scores
    monkeypatch.setattr(crossval, "unit_scores", lambda units, *a: seen.extend(
        (isinstance(p, OnDisk) and isinstance(t, OnDisk), np.asarray(p)) for p, t, _ in units) or real(units, *a))
    truth = np.zeros((1, 10, 10), np.uint8)
    truth[0, 2:8, 2:8] = 1
    entries = [({"name": "c0", "prepared_spacing": [1.0, 1.0, 1.0]}, truth.copy(), truth[:, ::-1].copy(), truth)]
    monkeypatch.setattr(crossval, "predict_validation", lambda *args: iter(entries))
    manifest = {"label_values": [0, 1], "cases": [c for c, *_ in entries]}
    record = judge([Judged((Path("model.pt"),), [])], manifest, [], Deciding(torch.device("cpu"), False, (1, 2),
                                                                            postprocess=False), tmp_path)
    assert seen and all(on_disk for on_disk, _ in seen)  # first without flips, then with
    assert np.array_equal(seen[0][1], truth) and np.array_equal(seen[1][1], truth[:, ::-1])
    assert list(tmp_path.iterdir()) == []
    assert record["flips_dice"]["without"] == 1.0


def test_test_time_flips_stay_unless_validation_refutes_them(monkeypatch):
    """The network trained with these flips: one validation case, however much it loses, cannot refuse them (a few
    cases' noise); losses on 5 of 5 cases can; a gain keeps them."""
    assert _judge_flips(monkeypatch, [0.8])["flips"] == [1, 2]
    assert _judge_flips(monkeypatch, [0.9, 0.95, 1.0, 1.0, 0.9, 1.0])["flips"] == [1, 2]  # 3 lowered, 3 unchanged: kept
    record = _judge_flips(monkeypatch, [0.9, 0.95, 0.9, 0.9, 0.95])
    assert record["flips"] == [] and record["flips_dice"]["without"] == 1.0
    assert record["flips_dice"]["with"] == pytest.approx(0.92, abs=0.005)


@pytest.fixture(scope="module")
def folds_out(prep_dir, tmp_path_factory) -> tuple[Path, dict]:
    """``train.py --folds 2 --fold all`` on the synthetic cases (2 epochs each); returns (output, per-fold result)."""
    out = tmp_path_factory.mktemp("folds")
    cfg = train.parse_args(["--data", str(prep_dir), "--output", str(out), "--epochs", "2", "--folds", "2",
                            *TINY_NET])
    with unbiased_start():
        return out, ensembles.train_folds(cfg, train.train)


def test_folds_train_apart_and_report_together(folds_out, prep_dir):
    out, results = folds_out
    fold_of = assign_folds(load_manifest(prep_dir), 2, seed=0)
    for k in range(2):
        assert {f.name for f in (out / f"fold_{k}").iterdir()} >= {"model.pt", "last.pt", "metrics.csv", "dice.png"}
        assert sorted(results[k]["train_cases"]) == sorted(n for n, f in fold_of.items() if f != k)
    cv = json.loads((out / "cv.json").read_text())
    assert cv["checkpoints"] == ["fold_0/model.pt", "fold_1/model.pt"]
    decision = json.loads((out / "postprocessing.json").read_text())
    for k in range(2):  # every fold carries the one decision, made on both folds' validation cases
        ckpt = load_checkpoint(out / f"fold_{k}" / "model.pt")
        assert ckpt["postprocessing"]["rules"] == decision["rules"] == cv["rules"]
        assert ckpt["postprocessing"]["flips"] == decision["flips"] == cv["flips"]
    assert decision["validation_units"] == len(fold_of)
    rows = list(csv.DictReader((out / "cv.csv").open()))
    assert [(r["fold"], r["step"]) for r in rows] == [(f, s) for s in STEPS for f in ("0", "1", "mean", "std",
                                                                                       "pooled")]
    assert sum(r["chosen"] == "yes" for r in rows) == 5  # one step is what inference does
    for step in STEPS:
        got = {r["fold"]: float(r["dice"]) for r in rows if r["step"] == step}
        assert got["mean"] == pytest.approx((got["0"] + got["1"]) / 2, abs=2e-4)
        assert got["std"] == pytest.approx(abs(got["0"] - got["1"]) / 2, abs=2e-4)
    assert (out / "cv.png").stat().st_size > 1000


def test_infer_takes_the_folds_ensemble_from_the_output_folder(folds_out, raw_dir, tmp_path, caplog):
    out, _ = folds_out
    source = raw_dir / "synth_000.nii.gz"
    caplog.set_level("INFO", logger="infer")
    assert infer.main([str(source), "--checkpoint", str(out), "--out", str(tmp_path / "a"), "--device", "cpu"]) == 0
    assert "ensemble of 2 networks" in caplog.text
    got = np.asarray(nib.load(tmp_path / "a" / "synth_000_mask.nii.gz").dataobj)
    folds = [out / "fold_0" / "model.pt", out / "fold_1" / "model.pt"]
    named = tmp_path / "b"
    assert infer.main([str(source), "--checkpoint", *map(str, folds), "--out", str(named), "--device", "cpu"]) == 0
    assert np.array_equal(np.asarray(nib.load(named / "synth_000_mask.nii.gz").dataobj), got)
    # by hand: the two networks' probabilities averaged, then the checkpoints' postprocessing
    ensemble = segmenter.Segmenter.load(folds, torch.device("cpu"))
    case = find_inputs([str(source)], None, False)[0]
    image = read_case(case, None)["image"]
    mask = segmenter.postprocess_unit([ensemble(image, source)], [image.affine], ensemble.rules)[0]
    assert np.array_equal(mask, got)
    alone = segmenter.Segmenter.load(folds[0], torch.device("cpu"))(image, source)
    assert not np.array_equal(alone, ensemble(image, source))  # the second network changed the answer


def test_an_ensemble_of_different_datasets_is_refused(folds_out, raw_dir, tmp_path, capsys):
    out, _ = folds_out
    other = tmp_path / "other.pt"
    ckpt = load_checkpoint(out / "fold_1" / "model.pt")
    save_checkpoint({**ckpt, "label_values": [0, 1, 2]}, other)
    before = sorted(tmp_path.iterdir())
    code = infer.main([str(raw_dir / "synth_000.nii.gz"), "--checkpoint", str(out / "fold_0" / "model.pt"),
                       str(other), "--out", str(tmp_path / "masks")])
    assert code == 2
    one_error_line(capsys, str(other), "labels", "an ensemble needs one dataset's checkpoints")
    assert sorted(tmp_path.iterdir()) == before


def test_tta_flag_overrides_the_checkpoints_decision(trained, raw_dir, tmp_path):
    path = trained / "model.pt"
    on = segmenter.Segmenter.load(path, torch.device("cpu"), segmenter.Given(tta=True))
    off = segmenter.Segmenter.load(path, torch.device("cpu"), segmenter.Given(tta=False))
    assert on.flips == (1, 2) and off.flips == ()
    decided = segmenter.Segmenter.load(path, torch.device("cpu"))
    assert list(decided.flips) == load_checkpoint(path)["postprocessing"]["flips"]


def test_one_fold_at_a_time_reports_when_the_last_is_trained(prep_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--data", str(prep_dir), "--output", str(out), "--epochs", "1", "--folds", "2", *TINY_NET]
    assert train.main([*args, "--fold", "1"]) == 0
    assert (out / "fold_1" / "model.pt").is_file() and not (out / "fold_0").exists()
    assert not (out / "cv.csv").exists()  # fold 0 is missing
    assert train.main([*args, "--fold", "0"]) == 0
    assert (out / "cv.csv").is_file() and (out / "cv.json").is_file()
    folds = [out / "fold_0" / "model.pt", out / "fold_1" / "model.pt"]
    assert json.loads((out / "models.json").read_text())["kind"] == "folds"
    assert segmenter.checkpoint_paths([str(out)]) == folds
    plain = ["--data", str(prep_dir), "--output", str(out), "--epochs", "1", *TINY_NET]
    assert train.main(plain) == 2  # the folds are a run: replaced only when asked
    assert train.main([*plain, "--overwrite"]) == 0
    assert segmenter.checkpoint_paths([str(out)]) == [out / "model.pt"]  # the plain run wrote its record last


@pytest.mark.parametrize("argv, needle", [
    (["--folds", "2", "--fold", "2"], "--fold 2: folds are numbered 0 to 1"),
    (["--folds", "9"], "--folds 9: need 2 to 4 folds"),
])
def test_impossible_folds_are_refused(prep_dir, tmp_path, capsys, argv, needle):
    code = train.main(["--data", str(prep_dir), "--output", str(tmp_path / "o"), "--epochs", "1", *argv, *TINY_NET])
    assert code == 2
    one_error_line(capsys, needle)
    assert not (tmp_path / "o").exists()


def test_all_folds_under_torchrun_are_refused_before_the_job_is_joined(prep_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # a fresh torchrun process: its group is not joined yet
    code = train.main(["--data", str(prep_dir), "--output", str(tmp_path / "o"), "--epochs", "1", "--folds", "2",
                       *TINY_NET])
    assert code == 2
    one_error_line(capsys, "--fold all under torchrun")
    assert not (tmp_path / "o").exists()


def test_fold_without_folds_is_a_usage_error(capsys):
    assert train.main(["--fold", "1"]) == 2
    one_error_line(capsys, "--fold needs --folds N")


def test_an_output_folder_means_what_its_models_json_lists(tmp_path):
    """infer.py --checkpoint FOLDER: the checkpoints models.json lists, whatever the files' ages; a folder without
    it means its one model.pt or listing, and refuses to guess between several; names that leave it are refused."""
    import os

    (tmp_path / "fold_0").mkdir()
    (tmp_path / "cv.json").write_text(json.dumps({"checkpoints": ["fold_0/model.pt", "fold_1/model.pt"]}))
    assert segmenter.checkpoint_paths([str(tmp_path)]) == [tmp_path / "fold_0/model.pt", tmp_path / "fold_1/model.pt"]
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(InputError, match="model.pt and cv.json without models.json"):
        segmenter.checkpoint_paths([str(tmp_path)])
    (tmp_path / "models.json").write_text(json.dumps({"kind": "folds", "checkpoints": ["fold_0/model.pt"]}))
    os.utime(tmp_path / "models.json", (0, 0))  # older than model.pt: its age does not count
    assert segmenter.checkpoint_paths([str(tmp_path)]) == [tmp_path / "fold_0/model.pt"]
    (tmp_path / "models.json").write_text(json.dumps({"checkpoints": ["../elsewhere.pt"]}))
    with pytest.raises(InputError, match="lists no checkpoints inside its folder"):
        segmenter.checkpoint_paths([str(tmp_path)])
    with pytest.raises(InputError, match="holds no model.pt without models.json"):
        segmenter.checkpoint_paths([str(tmp_path / "fold_0")])
