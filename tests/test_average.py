"""The moving average of the weights (``--ema-epochs``): what is validated, saved and resumed."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TINY_NET, one_error_line

import train
from model import load_checkpoint


def test_average_spans_the_asked_epochs():
    """Over ``epochs`` × ``steps_per_epoch`` steps: decay 1 − 1/(2·4) = 0.875; the first update copies the weights,
    the next one moves the average an eighth of the way; 0 epochs: no average."""
    net = torch.nn.Linear(1, 1, bias=False)
    assert train.moving_average(net, 0, 4) is None
    average = train.moving_average(net, 2, 4)
    with torch.no_grad():
        net.weight.fill_(1.0)
        average.update_parameters(net)
        net.weight.fill_(9.0)
        average.update_parameters(net)
    assert average.module.weight.item() == pytest.approx(1.0 + (9.0 - 1.0) / 8)


def test_checkpoints_hold_the_average_and_resume_from_the_raw_weights(trained, prep_dir, tmp_path, capsys):
    """best/last/model.pt hold the average (what infer.py loads); last.pt also the raw weights training goes on
    from, and the average's step count; a resume that asks for no average is refused with one line."""
    last = load_checkpoint(trained / "last.pt")
    assert last["config"]["ema_epochs"] > 0 and last["average_steps"] > 0
    averaged, raw = last["model_state"], last["train_state"]
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw)
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    args = ["--data", str(prep_dir), "--output", str(out), "--epochs", "3", "--resume", *TINY_NET]
    assert train.main([*args, "--ema-epochs", "0"]) == 2
    one_error_line(capsys, "last.pt", "moving average", "--ema-epochs")
    assert train.main(args) == 0
    resumed = load_checkpoint(out / "last.pt")
    assert resumed["average_steps"] > last["average_steps"]


def test_no_average_saves_the_raw_weights(prep_dir, tmp_path):
    out = tmp_path / "out"
    assert train.main(["--data", str(prep_dir), "--output", str(out), "--epochs", "1", "--ema-epochs", "0",
                       *TINY_NET]) == 0
    last = load_checkpoint(out / "last.pt")
    assert "train_state" not in last and "average_steps" not in last
