"""model.py: building from a dict, and checkpoints that are atomic, self-describing and safe to load."""

from __future__ import annotations

import pickle

import pytest
import torch

from common import InputError
from model import axis_divisors, build_model, load_checkpoint, model_args, save_checkpoint


def test_defaults_build_a_residual_3d_unet():
    args = model_args()
    net = build_model(args)
    assert args["channels"] == [16, 32, 64, 128, 256] and axis_divisors(args) == (16, 16, 16)
    out = net(torch.zeros(1, 1, 16, 32, 32))
    assert out.shape == (1, 1, 16, 32, 32)
    assert sum(p.numel() for p in net.parameters()) > 1_000_000


def test_the_same_dict_rebuilds_the_same_network(tmp_path):
    args = model_args(channels=[4, 8, 16], strides=[2, 2], out_channels=3, num_res_units=1)
    net = build_model(args)
    ckpt = {"model_state": net.state_dict(), "model_args": args, "prep_params": {}, "label_values": [0, 1, 2],
            "inference": {"roi": [8, 16, 16], "overlap": 0.75, "sw_batch_size": 1}, "epoch": 1, "best_dice": 0.5}
    save_checkpoint(ckpt, tmp_path / "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind
    loaded = load_checkpoint(tmp_path / "m.pt")
    again = build_model(loaded["model_args"])
    again.load_state_dict(loaded["model_state"])
    x = torch.randn(1, 1, 8, 16, 16)
    net.eval(), again.eval()
    assert torch.equal(net(x), again(x))


def test_mismatched_strides_are_refused():
    with pytest.raises(InputError, match="stride"):
        model_args(channels=[4, 8, 16], strides=[2])


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("content", [b"", b"garbage", pickle.dumps(_RunsCode())], ids=["empty", "garbage", "pickle"])
def test_untrusted_files_are_refused(tmp_path, content, capsys):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(InputError, match="x.pt"):
        load_checkpoint(path)
    assert "this must never run" not in capsys.readouterr().out


def test_a_foreign_dict_is_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a checkpoint of this pipeline"):
        load_checkpoint(tmp_path / "other.pt")
