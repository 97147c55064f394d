"""A seed ensemble (train.py --members N): the members, their one decision on validation, ensemble.json, and
infer.py and serve.py taking them from the output folder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_NET, one_error_line, unbiased_start

import infer
import serve
import train
from evaluation import crossval
from inference import segmenter
from model import checkpoint_sliding, load_checkpoint, model_from_checkpoint, predict_probabilities, to_classes
from training import planning


@pytest.fixture(scope="module")
def members_out(prep_dir, tmp_path_factory) -> Path:
    """``train.py --members 2`` on the synthetic cases (2 epochs each)."""
    out = tmp_path_factory.mktemp("members")
    with unbiased_start():
        assert train.main(["--data", str(prep_dir), "--output", str(out), "--epochs", "2", "--members", "2",
                           *TINY_NET]) == 0
    return out


def test_members_train_with_their_own_seeds_and_share_one_decision(members_out):
    out = members_out
    listing = json.loads((out / "ensemble.json").read_text())
    assert listing["checkpoints"] == ["member_0/model.pt", "member_1/model.pt"] and listing["seeds"] == [0, 1]
    assert json.loads((out / "models.json").read_text()) == {"kind": "members", "checkpoints": listing["checkpoints"]}
    ckpts = [load_checkpoint(out / name) for name in listing["checkpoints"]]
    assert [c["config"]["seed"] for c in ckpts] == [0, 1] and all(c["epoch"] == 2 for c in ckpts)
    states = [c["model_state"] for c in ckpts]
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])  # two networks, not one twice
    decision = json.loads((out / "postprocessing.json").read_text())
    for ckpt in ckpts:  # the decision on the ensemble's predictions, in every member
        assert ckpt["postprocessing"]["flips"] == decision["flips"] == listing["flips"]
        assert ckpt["postprocessing"]["rules"] == decision["rules"] == listing["rules"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["settings"]["members"] == 2
    for k in range(2):
        assert (out / f"member_{k}" / "metrics.csv").is_file() and (out / f"member_{k}" / "plan.json").is_file()
    assert not (out / "model.pt").exists()


def assert_same_classes_but_for_ties(mask: np.ndarray, probs: torch.Tensor, tol: float = 1e-4) -> None:
    """``mask`` (D, H, W) equals the classes of ``probs`` (1, K, D, H, W) wherever the decision is not a tie within
    ``tol``: two paths to the same average differ in the last float bits, which flips only such voxels."""
    if probs.shape[1] == 1:
        margin = (probs[0, 0] - 0.5).abs()
    else:
        top = probs[0].topk(2, dim=0).values
        margin = top[0] - top[1]
    differ = mask != to_classes(probs)[0, 0].numpy()
    assert not differ[margin.numpy() > tol].any()


def test_the_decision_judges_the_members_averaged(members_out, prep_dir):
    """The validation masks the decision is made on are the ensemble's (probabilities averaged), not a member's."""
    paths = [members_out / f"member_{k}" / "model.pt" for k in range(2)]
    manifest = json.loads((prep_dir / "dataset.json").read_text())
    _, val_items = planning.split_items(manifest, prep_dir)
    cases = {c["name"]: c for c in manifest["cases"]}
    got = list(crossval.predict_validation(crossval.Judged(tuple(paths), val_items[:1]), cases,
                                           crossval.Deciding(torch.device("cpu"), False, (1, 2))))
    ckpts = [load_checkpoint(p) for p in paths]
    nets = [model_from_checkpoint(c, p).eval() for c, p in zip(ckpts, paths)]
    item = next(iter(crossval.make_dataset(val_items[:1], "val", ckpts[0]["label_values"],
                                           crossval.AugmentParams(crop=tuple(ckpts[0]["config"]["crop"])),
                                           cache=crossval.Caching(0.0), in_channels=1,
                                           params=crossval.PrepParams.from_dict(ckpts[0]["prep_params"]))))
    sliding = checkpoint_sliding(ckpts[0])
    for mask, flips in ((got[0][1], ()), (got[0][2], (1, 2))):
        probs = predict_probabilities(nets, item["image"][None], sliding, item["tissue"][None], flips)
        assert_same_classes_but_for_ties(mask, probs)
    alone = predict_probabilities(nets[:1], item["image"][None], sliding, item["tissue"][None])
    assert not torch.equal(to_classes(alone), to_classes(predict_probabilities(
        nets, item["image"][None], sliding, item["tissue"][None])))  # the second counts


def test_infer_and_serve_take_the_members_from_the_output_folder(members_out, raw_dir, tmp_path):
    out = members_out
    members = [out / "member_0" / "model.pt", out / "member_1" / "model.pt"]
    assert segmenter.checkpoint_paths([str(out)]) == members
    source = raw_dir / "synth_000.nii.gz"
    assert infer.main([str(source), "--checkpoint", str(out), "--out", str(tmp_path / "a"), "--device", "cpu"]) == 0
    named = tmp_path / "b"
    assert infer.main([str(source), "--checkpoint", *map(str, members), "--out", str(named), "--device", "cpu"]) == 0
    got = np.asarray(nib.load(tmp_path / "a" / "synth_000_mask.nii.gz").dataobj)
    assert np.array_equal(np.asarray(nib.load(named / "synth_000_mask.nii.gz").dataobj), got)
    # serve.py with no option: the members belong to their ensemble, not beside it
    root = tmp_path / "output"
    (root / "member_0").mkdir(parents=True)
    (root / "member_0" / "model.pt").write_bytes(b"")
    (root / "ensemble.json").write_text("{}")
    (root / "ph2").mkdir()
    (root / "ph2" / "ensemble.json").write_text("{}")
    assert serve.default_models(root) == [(root,), (root / "ph2",)]


def test_resume_continues_every_member_of_the_run(prep_dir, tmp_path):
    """--resume: each member from its last.pt."""
    out = tmp_path / "out"
    args = ["--data", str(prep_dir), "--output", str(out), "--members", "2", "--no-postprocess", *TINY_NET]
    assert train.main([*args, "--epochs", "1"]) == 0
    assert train.main([*args, "--epochs", "2", "--resume"]) == 0
    assert [load_checkpoint(out / f"member_{k}" / "last.pt")["epoch"] for k in range(2)] == [2, 2]
    assert not (out / "model.pt").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--members", "0"], "--members must lie in 1..20"),
    (["--members", "2", "--folds", "2"], "--folds trains its folds as the ensemble"),
])
def test_impossible_member_counts_are_refused(capsys, argv, needle):
    assert train.main(argv) == 2
    one_error_line(capsys, needle)


@pytest.mark.parametrize("argv, where", [
    ([], "out/last.pt holds"),
    (["--members", "2"], "out/member_K/last.pt (each member begun) hold"),
    (["--folds", "2"], "out/fold_K/last.pt (each fold begun) hold"),
])
def test_an_interrupted_run_names_the_files_resume_continues(argv, where):
    hint = train.resume_hint(train.parse_args(["--output", "out", *argv]))
    assert hint == f"{where} the last complete epoch; continue with --resume"


def test_members_under_torchrun_are_refused(prep_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = train.main(["--data", str(prep_dir), "--output", str(tmp_path / "o"), "--epochs", "1", "--members", "2",
                       *TINY_NET])
    assert code == 2
    one_error_line(capsys, "--members under torchrun")
    assert not (tmp_path / "o").exists()
