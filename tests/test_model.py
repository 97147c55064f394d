"""model.py: building from a dict, and checkpoints that are atomic, self-describing and safe to load."""

from __future__ import annotations

import pickle

import pytest
import torch

import model
from imaging.common import InputError
from model import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    axis_divisors,
    build_model,
    load_checkpoint,
    model_args,
    model_from_checkpoint,
    save_checkpoint,
    set_prior,
)


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
            "inference": {"window": [8, 16, 16], "overlap": 0.75, "sw_batch_size": 1}, "epoch": 1, "best_dice": 0.5}
    save_checkpoint(ckpt, tmp_path / "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind
    loaded = load_checkpoint(tmp_path / "m.pt")
    again = build_model(loaded["model_args"])
    again.load_state_dict(loaded["model_state"])
    x = torch.randn(1, 1, 8, 16, 16)
    net.eval(), again.eval()
    assert torch.equal(net(x), again(x))


def test_a_version_1_checkpoint_loads_with_todays_names(tmp_path):
    """Version 1 named the inference window "roi": such a checkpoint still loads, its window under "window"."""
    args = model_args(channels=[4, 8], strides=[2])
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "model_state": build_model(args).state_dict(),
                "model_args": args, "prep_params": {}, "label_values": [0, 1], "epoch": 1, "best_dice": 0.5,
                "inference": {"roi": [8, 16, 16], "overlap": 0.5, "sw_batch_size": None}}, tmp_path / "v1.pt")
    loaded = load_checkpoint(tmp_path / "v1.pt")
    assert loaded["inference"] == {"window": [8, 16, 16], "overlap": 0.5, "sw_batch_size": None}
    assert loaded["version"] == CHECKPOINT_VERSION


def _map_before_the_last_activation(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the last up-sampling's activation (PReLU) receives: where MONAI normalizes it (``output_norm``)."""
    seen = []
    net.model[-1][0].adn.A.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    net(x)
    return seen[0]


def test_the_logit_map_is_not_instance_normalized():
    """MONAI's residual UNet gives its one-channel logit map mean 0 and spread 1 in every image, whatever the image
    holds; without that norm (the default) the map's statistics follow the input."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 16, 16)
    x[1] *= 5.0
    args = model_args(channels=[4, 8, 16], strides=[2, 2], num_res_units=1)
    with torch.no_grad():
        monai = _map_before_the_last_activation(build_model({**args, "output_norm": True}), x)
        ours = _map_before_the_last_activation(build_model(args), x)
    stats = [(m.mean().item(), m.std().item()) for m in monai]
    assert all(abs(mean) < 1e-3 and abs(std - 1) < 1e-2 for mean, std in stats)
    assert abs(ours[0].std().item() - ours[1].std().item()) > 0.05


def test_a_checkpoint_from_before_output_norm_loads_as_it_was_trained(tmp_path):
    args = model_args(channels=[4, 8, 16], strides=[2, 2], num_res_units=1)
    old_args = {k: v for k, v in args.items() if k != "output_norm"}
    torch.manual_seed(0)
    old = build_model({**args, "output_norm": True}).eval()
    loaded = model_from_checkpoint({"model_args": old_args, "model_state": old.state_dict()}, tmp_path / "m.pt")
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), old(x))
        new = build_model(args).eval()
        new.load_state_dict(old.state_dict())  # the same weights: the norm has none
        assert not torch.allclose(new(x), old(x), atol=1e-3)  # but not the same network


@pytest.mark.parametrize("out_channels, shares", [(1, [0.02]), (3, [0.1, 0.05])])
def test_a_new_network_starts_at_the_labels_frequencies(out_channels, shares):
    """set_prior: a fresh network's mean predicted probability of each label is its share in the training
    masks (the random weights spread it around that), instead of one half."""
    torch.manual_seed(0)
    net = build_model(model_args(channels=[8, 16, 32], strides=[2, 2], num_res_units=1, out_channels=out_channels))
    set_prior(net, shares)
    with torch.no_grad():
        logits = net(torch.randn(2, 1, 16, 32, 32))
    probs = torch.sigmoid(logits) if out_channels == 1 else torch.softmax(logits, 1)[:, 1:]
    for k, share in enumerate(shares):
        assert share / 3 < probs[:, k].mean().item() < share * 3


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


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, dtype):
    """V100 (7.0) and T4 (7.5) say yes to ``is_bf16_supported`` but only emulate it: fp16 (with loss scaling) there,
    bf16 from A100 (8.0) on. Decided from the compute capability alone, so it holds without a GPU here."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert model.amp_dtype(torch.device("cuda", 0)) == dtype
    assert model.amp_dtype(torch.device("cpu")) == torch.bfloat16
