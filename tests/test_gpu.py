"""The CUDA-only parts (GPU cache, AMP, inference on the device) run for real. Skipped where no GPU is present,
as on CI; run on a lent GPU with ``benchmarks/gpu.sh``."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import TINY_NET

import model
import train
import training.data
import training.steps
from model import amp_dtype, autocast, build_model, model_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_NET = [a if a != "cpu" else "cuda" for a in TINY_NET]


def test_training_on_the_gpu_caches_there_and_runs_under_amp(prep_dir, tmp_path, monkeypatch):
    """The cache goes onto the GPU (it is tiny), steps run under autocast, and the run ends with finite losses
    and a checkpoint that loads on the CPU."""
    chosen, autocasts = [], []
    real_cache_device, real_autocast = training.data.cache_device, training.steps.autocast

    def spy_cache(*args, **kwargs):
        chosen.append(real_cache_device(*args, **kwargs))
        return chosen[-1]

    def spy_autocast(device, enabled):
        autocasts.append((device.type, enabled))
        return real_autocast(device, enabled)

    monkeypatch.setattr(training.data, "cache_device", spy_cache)
    monkeypatch.setattr(training.steps, "autocast", spy_autocast)
    assert train.main(["--data", str(prep_dir), "--output", str(tmp_path), "--epochs", "3", *GPU_NET]) == 0
    assert chosen and chosen[0] is not None and chosen[0].type == "cuda"
    assert autocasts and all(a == ("cuda", True) for a in autocasts)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 3 and all(math.isfinite(float(r["train_loss"])) for r in rows)
    ckpt = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in ckpt["model_state"].values())


def test_gpu_inference_matches_the_cpu(trained):
    """Same checkpoint, same volume: fp32 on the GPU equals the CPU to rounding; under AMP (bf16/fp16) the
    mask still agrees on nearly every voxel."""
    ckpt = torch.load(trained / "best.pt", map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    image = torch.rand(1, 1, 8, 128, 128)
    roi = ckpt["inference"]["window"]
    cpu_model = build_model(ckpt["model_args"]).eval()
    cpu_model.load_state_dict(ckpt["model_state"])
    gpu_model = build_model(ckpt["model_args"]).eval().cuda()
    gpu_model.load_state_dict(ckpt["model_state"])
    ref = model.predict_logits(cpu_model, image, model.Sliding(roi, 0.75, 2))
    fp32 = model.predict_logits(gpu_model, image, model.Sliding(roi, 0.75, 4)).cpu()
    amp = model.predict_logits(gpu_model, image, model.Sliding(roi, 0.75, 4, amp=True)).cpu()
    assert fp32.shape == ref.shape == amp.shape
    torch.testing.assert_close(fp32, ref, atol=1e-3, rtol=1e-3)
    assert ((amp > 0) == (ref > 0)).float().mean() > 0.99


@pytest.mark.skipif(torch.cuda.device_count() < 1 or not torch.cuda.is_bf16_supported(), reason="needs bf16")
def test_amp_picks_bf16_where_the_gpu_has_it():
    """bf16 needs no loss scaling: the training loop and inference choose it on GPUs that support it."""
    assert amp_dtype(torch.device("cuda")) == torch.bfloat16
    model = build_model(model_args(channels=[4, 8], strides=[2])).cuda()
    with autocast(torch.device("cuda"), True):
        out = model(torch.rand(1, 1, 8, 32, 32, device="cuda"))
    assert out.dtype == torch.bfloat16

