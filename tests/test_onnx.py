"""infer.py --export-onnx and --engine onnx: the network in ONNX with the checkpoint's metadata, ONNX Runtime's
logits against PyTorch's, and the same masks from both engines (infer.py and serve.py)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT, SHARED, TINY_WIDTHS, one_error_line, unbiased_start
from PIL import Image

import infer
from dice import dice_binary
from inference.onnx_engine import OnnxNetwork
from model import INFERENCE_KEYS, load_checkpoint, model_from_checkpoint

TOLERANCE = 1e-4  # logits of order 1-10; float32 kernels of two libraries differ by a few 1e-6


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert infer.main(["--checkpoint", str(trained / "model.pt"), "--export-onnx", str(out)]) == 0
    return out


def test_export_reports_the_difference_and_keeps_the_metadata(trained, caplog, tmp_path):
    out = tmp_path / "again.onnx"
    with caplog.at_level("INFO", logger="infer"):
        assert infer.main(["--checkpoint", str(trained / "model.pt"), "--export-onnx", str(out)]) == 0
    line = next(r.getMessage() for r in caplog.records if "max abs difference" in r.getMessage())
    assert float(line.split("max abs difference ")[1].split()[0]) < TOLERANCE
    ckpt = load_checkpoint(trained / "model.pt")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert {k: json.loads(props[k]) for k in INFERENCE_KEYS} == json.loads(json.dumps({k: ckpt.get(k)
                                                                                      for k in INFERENCE_KEYS}))


def test_spatial_axes_are_dynamic_and_logits_match_pytorch(trained, exported):
    ckpt = load_checkpoint(trained / "model.pt")
    net = model_from_checkpoint(ckpt, trained / "model.pt").eval()
    x = torch.rand(3, 1, 16, 32, 96, generator=torch.Generator().manual_seed(1))  # not the export's window
    with torch.no_grad():
        expected = net(x)
    got = OnnxNetwork(exported)(x)
    assert got.shape == expected.shape == (3, 1, 16, 32, 96)
    assert (got - expected).abs().max().item() < TOLERANCE


def test_onnx_engine_mask_agrees_with_pytorch(trained, exported, raw_dir, tmp_path):
    source = raw_dir / "synth_001.nii.gz"
    masks = []
    for engine, checkpoint in (("torch", trained / "model.pt"), ("onnx", exported)):
        out = tmp_path / engine
        assert infer.main([str(source), "--checkpoint", str(checkpoint), "--engine", engine, "--out", str(out),
                           "--device", "cpu", "--no-amp"]) == 0  # fp32 both, as ONNX Runtime runs
        masks.append(np.asarray(nib.load(out / "synth_001_mask.nii.gz").dataobj))
    a, b = (torch.from_numpy(m > 0)[None, None] for m in masks)
    assert dice_binary(a, b).item() >= 0.999 and masks[0].any()


def test_serve_runs_the_onnx_file(exported, raw_dir, tmp_path):
    from fastapi.testclient import TestClient

    import serve

    api = TestClient(serve.create_app(serve.ServeConfig(exported, device="cpu", engine="onnx")))
    resp = api.post("/api/segment", files={"file": ("a.nii.gz", (raw_dir / "synth_001.nii.gz").read_bytes())})
    assert resp.status_code == 200, resp.text
    assert infer.main([str(raw_dir / "synth_001.nii.gz"), "--checkpoint", str(exported), "--engine", "onnx",
                       "--out", str(tmp_path)]) == 0
    assert resp.content == (tmp_path / "synth_001_mask.nii.gz").read_bytes()
    assert api.get("/api/model").json()["kind"] == "3d"


def test_bad_onnx_uses_are_one_line_errors(trained, raw_dir, tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert infer.main([str(raw_dir / "synth_000.nii.gz"), "--checkpoint", str(junk), "--engine", "onnx",
                       "--out", str(tmp_path)]) == 2
    one_error_line(capsys, "junk.onnx", "not a readable ONNX model")
    assert infer.main([str(raw_dir / "synth_000.nii.gz"), "--checkpoint", str(trained / "model.pt"), "--engine",
                       "onnx", "--out", str(tmp_path)]) == 2
    one_error_line(capsys, "model.pt", "ONNX")
    assert infer.main(["--checkpoint", str(tmp_path / "missing.pt"), "--export-onnx", str(tmp_path / "m.onnx")]) == 2
    one_error_line(capsys, "missing.pt", "checkpoint not found")
    assert infer.main([str(raw_dir / "synth_000.nii.gz"), "--export-onnx", str(tmp_path / "m.onnx")]) == 2
    one_error_line(capsys, "--export-onnx")


def test_a_2d_model_through_onnx_gives_the_same_picture_mask(trained_2d, tmp_path):
    onnx_file, pictures = tmp_path / "2d.onnx", trained_2d.parent / "pics"
    assert infer.main(["--checkpoint", str(trained_2d / "model.pt"), "--export-onnx", str(onnx_file)]) == 0
    for engine, checkpoint in (("torch", trained_2d / "model.pt"), ("onnx", onnx_file)):
        assert infer.main([str(pictures / "grey2.png"), "--checkpoint", str(checkpoint), "--engine", engine,
                           "--out", str(tmp_path / engine), "--device", "cpu", "--no-amp"]) == 0
    assert (tmp_path / "torch" / "grey2_mask.png").read_bytes() == (tmp_path / "onnx" / "grey2_mask.png").read_bytes()


def test_engine_benchmark_runs(trained, raw_dir, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_onnx

    assert bench_onnx.main(["--checkpoint", str(trained / "model.pt"), str(raw_dir / "synth_000.nii.gz"),
                            "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"max abs difference of the logits on a random window (\S+)", out)[1]) < TOLERANCE
    assert float(re.search(r"synth_000.nii.gz .*Dice between the masks ([\d.]+)", out)[1]) >= 0.999
    assert re.search(r"network pass on 2 windows .* ratio onnx/torch [\d.]+", out)


PH2 = SHARED / "ph2" / "PH2Dataset" / "PH2 Dataset images"


@pytest.mark.skipif(not PH2.is_dir(), reason="../shared/data/ph2 is absent")
def test_ph2_image_masks_agree_between_engines(tmp_path):
    """A tiny RGB 2D model (1 epoch on three PH2 images) through both engines, on a fourth PH2 image."""
    import shutil

    import preprocess
    import train

    raw = tmp_path / "raw"
    raw.mkdir()
    for case in ("IMD016", "IMD027", "IMD002"):
        shutil.copy(PH2 / case / f"{case}_Dermoscopic_Image" / f"{case}.bmp", raw)
        shutil.copy(PH2 / case / f"{case}_lesion" / f"{case}_lesion.bmp", raw)
    assert preprocess.main([str(raw), str(tmp_path / "prep"), "--workers", "1"]) == 0
    with unbiased_start():
        assert train.main(["--data", str(tmp_path / "prep"), "--output", str(tmp_path / "out"), "--epochs", "1",
                           "--device", "cpu", *TINY_WIDTHS, "--num-samples", "2", "--no-postprocess"]) == 0
    checkpoint, onnx_file = tmp_path / "out" / "model.pt", tmp_path / "model.onnx"
    assert infer.main(["--checkpoint", str(checkpoint), "--export-onnx", str(onnx_file)]) == 0
    image = next(p for p in sorted(PH2.glob("*/*_Dermoscopic_Image/*.bmp")) if p.stem not in ("IMD016", "IMD027",
                                                                                              "IMD002"))
    masks = []
    for engine, ckpt in (("torch", checkpoint), ("onnx", onnx_file)):
        assert infer.main([str(image), "--checkpoint", str(ckpt), "--engine", engine, "--out", str(tmp_path / engine),
                           "--device", "cpu"]) == 0
        masks.append(np.asarray(Image.open(tmp_path / engine / f"{image.stem}_mask.bmp")) > 0)
    a, b = (torch.from_numpy(m)[None, None] for m in masks)
    assert masks[0].shape == Image.open(image).size[::-1] and masks[0].any()  # rows × columns, something found
    assert dice_binary(a, b).item() >= 0.999
