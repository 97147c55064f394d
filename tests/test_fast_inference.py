"""infer.py's fast path: the inference window, windows without tissue skipped, channels-last; same answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_WIDTHS
from monai.inferers import sliding_window_inference

import model
import train
from dataset import PrepParams, prepared_tissue
from model import axis_divisors, build_model, load_checkpoint, model_args


def _net(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_args(channels=[4, 8, 16], strides=[2, 2], num_res_units=1, **kw)).eval()


def test_window_fits_the_volume_and_the_network():
    assert model.fit_window((64, 256, 256), (30, 150, 201), (4, 4, 4)) == (32, 152, 204)  # volume rounded up
    assert model.fit_window((48, 96, 96), (30, 150, 201), (4, 4, 4)) == (32, 96, 96)
    assert model.fit_window((1, 250, 250), (1, 90, 120), (1, 8, 8)) == (1, 96, 120)
    assert model.fit_window((48, 90, 96), (30, 150, 201), (4, 4, 4), shrink=False) == (48, 92, 96)
    assert axis_divisors({"strides": [[1, 2, 2], 2, [2, 2, 2]]}) == (4, 8, 8)


def test_chosen_window_covers_the_largest_volume_within_the_budget():
    shapes = [(30, 150, 201), (20, 180, 100)]
    assert model.choose_window(shapes, (16, 64, 64), (8, 8, 8)) == (32, 184, 208)
    small = model.choose_window(shapes, (16, 64, 64), (8, 8, 8), max_voxels=64 * 128 * 128)
    assert np.prod(small) <= 64 * 128 * 128 and all(s >= r for s, r in zip(small, (16, 64, 64)))
    # never below the training crop, even when the budget is smaller than the crop
    assert model.choose_window(shapes, (16, 64, 64), (8, 8, 8), max_voxels=10) == (16, 64, 64)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_fast_path_equals_the_plain_call_when_nothing_is_skipped(norm):
    """Same window, tissue everywhere: channels-last and inference_mode change nothing but speed."""
    net = _net(norm=norm)
    image = torch.randn(1, 1, 16, 40, 40)
    plain = sliding_window_inference(image, (8, 16, 16), 4, net, overlap=0.75, mode="gaussian")
    fast = model.predict_logits(net.to(memory_format=torch.channels_last_3d), image,
                                model.Sliding((8, 16, 16), 0.75, 4), tissue=torch.ones(1, 1, 16, 40, 40))
    assert torch.allclose(plain, fast, atol=1e-4)


def test_an_instance_norm_network_keeps_its_crop_on_a_smaller_volume():
    """Instance norm's statistics count the zero padding a small volume's crops had in training, as the plain
    call pads: the same answer, not that of a window shrunk to the volume. Batch norm's window shrinks."""
    image = torch.randn(1, 1, 6, 20, 40)
    net = _net(norm="instance")
    plain = sliding_window_inference(image, (8, 32, 48), 4, net, overlap=0.75, mode="gaussian")
    assert torch.allclose(model.predict_logits(net, image, model.Sliding((8, 32, 48), 0.75, 4)), plain, atol=1e-4)
    seen = []
    bn = _net(norm="batch")
    bn.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[2:])))
    model.predict_logits(bn, image, model.Sliding((8, 32, 48), 0.75, 4))
    assert set(seen) == {(8, 20, 40)}  # depth 6 rounded up to the network's multiple of 4


def test_windows_without_tissue_are_skipped_and_background():
    calls = []
    net = _net()

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return net(x)

    counting.strides, counting.parameters = net.strides, net.parameters  # what predict_logits reads
    image = torch.randn(1, 1, 8, 64, 64)
    tissue = torch.zeros(1, 1, 8, 64, 64, dtype=torch.bool)
    tissue[..., 4:20, 4:20] = True  # tissue in one corner only
    logits = model.predict_logits(counting, image, model.Sliding((8, 16, 16), 0.0, 1), tissue=tissue)
    assert len(calls) == 4  # of the 16 non-overlapping windows, only the 4 touching the corner ran
    assert torch.allclose(logits[..., 32:, 32:], torch.tensor(-model.BACKGROUND_LOGIT))
    reference = sliding_window_inference(image, (8, 16, 16), 1, net, overlap=0.0, mode="gaussian")
    assert torch.allclose(logits[..., :32, :32], reference[..., :32, :32], atol=1e-5)


def test_multiclass_skipped_windows_are_background_class():
    net = build_model(model_args(out_channels=3, channels=[4, 8], strides=[2], num_res_units=0)).eval()
    logits = model.predict_logits(net, torch.randn(1, 1, 4, 16, 16), model.Sliding((4, 8, 8), 0.0, 2),
                                  tissue=torch.zeros(1, 1, 4, 16, 16))
    assert (model.to_classes(model.probabilities(logits)) == 0).all()


def test_tissue_of_a_prepared_ct_uses_the_body_threshold_on_the_0_1_scale():
    params = PrepParams(modality="ct", window=(-1000.0, 1000.0), body_threshold_hu=-500.0)
    image = torch.zeros(1, 4, 32, 32)  # air: 0 on the [0, 1] scale
    image[:, :, 10:20, 10:20] = 0.5  # water, 0 HU
    image[:, :, 0:2, 0:2] = 0.2  # -600 HU: below the threshold
    tissue = prepared_tissue(image, params)
    assert tissue.shape == (1, 4, 32, 32)
    assert tissue[0, :, 15, 15].all() and tissue[0, :, 8, 15].all()  # dilated by 2 in-plane
    assert not tissue[0, :, 0, 0].any() and not tissue[0, :, 25, 25].any()


def test_a_batch_norm_model_infers_whole_volumes_an_instance_norm_model_its_crops(prep_dir, tmp_path):
    """Batch norm is window-independent: its checkpoint records a window covering the largest prepared volume.
    Instance norm normalizes over the window, so its window stays the training crop."""
    shapes = np.array([c["prepared_shape"] for c in json.loads((prep_dir / "dataset.json").read_text())["cases"]])
    net = [*TINY_WIDTHS, "--num-res-units", "0", "--crop", "8", "32", "32"]
    for norm in ("batch", "instance"):
        out = tmp_path / norm
        assert train.main(["--data", str(prep_dir), "--output", str(out), "--epochs", "1", "--device", "cpu",
                           "--norm", norm, *net]) == 0
        window = load_checkpoint(out / "best.pt")["inference"]["window"]
        expected = [int(-(-s // 4) * 4) for s in shapes.max(0)] if norm == "batch" else [8, 32, 32]
        assert window == expected


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_a_lone_small_window_runs_in_a_pair_with_the_same_answer(norm):
    """PyTorch's CPU convolution takes a slow path for a batch of one small window: it runs as two copies."""
    net, sizes = _net(norm=norm), []
    net.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    x = torch.randn(1, 1, 8, 32, 32)
    windows = model.Windows(net, 1, tissue=False)
    with torch.inference_mode():
        assert torch.allclose(windows(x), net(x), atol=1e-5)
        assert sizes == [2, 1]  # the pair, then the reference call
        big = torch.randn(1, 1, 32, 1024, 8)  # C·D·H above 20480: oneDNN takes it alone
        windows(big)
        assert sizes[-1] == 1


def test_percentile_clip_matches_monai():
    """ClipPercentilesd (NumPy's percentiles) clips to MONAI's ClipIntensityPercentilesd bounds, channel by channel,
    and keeps the MetaTensor's affine (the inverse needs it)."""
    from monai.data import MetaTensor
    from monai.transforms import ClipIntensityPercentilesd

    from dataset import ClipPercentilesd

    torch.manual_seed(0)
    for shape in [(1, 1, 220, 190), (3, 1, 50, 40), (2, 12, 40, 30)]:
        x = MetaTensor(torch.randn(*shape) ** 3 * 50 + torch.arange(shape[0]).view(-1, 1, 1, 1) * 100,
                       affine=torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0])))
        ref = ClipIntensityPercentilesd("image", 0.5, 99.5, channel_wise=True)({"image": x})["image"]
        got = ClipPercentilesd("image", 0.5, 99.5)({"image": x})["image"]
        assert torch.allclose(torch.as_tensor(got), torch.as_tensor(ref), rtol=1e-5, atol=1e-3)
        assert not torch.equal(torch.as_tensor(got), torch.as_tensor(x))  # it clipped something
        assert isinstance(got, MetaTensor) and torch.equal(got.affine, x.affine)


@pytest.mark.parametrize("tta", [False, True])
def test_slices_segmented_together_match_one_by_one(trained_2d, tmp_path, tta, monkeypatch):
    """Segmenter.segment pads 2D slices of different sizes as the sliding window pads a lone one and runs them as one
    batch: the masks are those of segmenting each alone; a slice larger than the window goes on its own."""
    from conftest import grey_disc
    from PIL import Image

    from imaging.readers import read_volume
    from inference import segmenter

    rng = np.random.default_rng(3)
    paths = []
    for k, size in enumerate([(90, 120), (61, 97), (77, 80), (250, 250)]):
        paths.append(tmp_path / f"p{k}.png")
        Image.fromarray(grey_disc(rng, size)[0]).save(paths[-1])
    seg = segmenter.Segmenter.load(trained_2d / "model.pt", torch.device("cpu"), segmenter.Given(tta=tta, amp=False))
    images = [(read_volume(p), p) for p in paths]
    alone = [seg(image, path) for image, path in images]
    calls = []
    real = segmenter.predict_probabilities
    monkeypatch.setattr(segmenter, "predict_probabilities", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    together = seg.segment(images)
    assert max(seg.window[1:]) < 200  # the plan's window is the tiny training pictures' size: p3 is larger
    assert calls == [3, 1]  # p0–p2 in one pass of the networks, p3 alone
    for a, b in zip(alone, together):
        assert a.shape == b.shape and (a == b).mean() >= 0.999
    assert any(m.any() for m in together) and not all(m.all() for m in together)


def test_mixed_precision_on_the_cpu_only_for_inference_and_only_with_hardware_bf16(monkeypatch, trained):
    """bf16 on the CPU: for inference (the Segmenter asks by default) where the CPU has it in hardware; never for
    training by default; CUDA keeps its default (on)."""
    from inference import segmenter

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for hardware in (True, False):
        monkeypatch.setattr(model, "cpu_bf16", lambda hardware=hardware: hardware)
        assert model.use_amp(True, cpu) is hardware
        assert model.use_amp(None, cpu) is False and model.use_amp(False, cpu) is False
    assert model.use_amp(None, cuda) and not model.use_amp(False, cuda)
    assert segmenter.Segmenter.load(trained / "model.pt", cpu).sliding.amp is True
    assert segmenter.Segmenter.load(trained / "model.pt", cpu, segmenter.Given(amp=False)).sliding.amp is False
