"""Blank (constant) images are ordinary input: LGG stacks start and end with them. They are prepared, trained on and
segmented into empty masks, and each command counts them; NaN/Inf stay errors (tests/test_bad_inputs.py)."""

from __future__ import annotations

import logging

import numpy as np
from conftest import TINY_WIDTHS
from PIL import Image

import infer
import preprocess
import train
from imaging import cases


def _patient(folder, name, rng, n=6):
    """Numbered slices of one patient: the first and last blank (constant 0), a bright disc on the others."""
    folder.mkdir(parents=True)
    rows, cols = np.ogrid[:48, :48]
    for k in range(1, n + 1):
        disc = ((rows - rng.uniform(18, 30)) ** 2 + (cols - rng.uniform(18, 30)) ** 2) < 49
        image = np.where(disc, 200, 80) + rng.normal(0, 4, disc.shape)
        blank = k in (1, n)
        Image.fromarray(np.zeros((48, 48), np.uint8) if blank else np.clip(image, 0, 255).astype(np.uint8)).save(
            folder / f"{name}_{k}.png")
        Image.fromarray((disc & (not blank)).astype(np.uint8) * 255).save(folder / f"{name}_{k}_mask.png")


def test_blank_slices_go_through_every_command(tmp_path, caplog):
    rng = np.random.default_rng(3)
    raw = tmp_path / "raw"
    for name in ("pa", "pb", "pc"):
        _patient(raw / name, name, rng)
    with caplog.at_level(logging.INFO):
        assert preprocess.main([str(raw), str(tmp_path / "prep"), "--workers", "1", "--val-fraction", "0.34"]) == 0
    manifest = cases.load_manifest(tmp_path / "prep")
    blank = sorted(c["name"] for c in manifest["cases"] if c["blank"])
    assert blank == ["pa_1", "pa_6", "pb_1", "pb_6", "pc_1", "pc_6"] and manifest["fingerprint"]["blank"] == 6
    assert "6 blank images" in caplog.text
    out = tmp_path / "out"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert train.main(["--data", str(tmp_path / "prep"), "--output", str(out), "--epochs", "1", "--device", "cpu",
                           *TINY_WIDTHS, "--crop", "1", "32", "32", "--num-samples", "1"]) == 0
    assert "blank images (constant: nothing to segment): 4 training, 2 validation" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):  # the dataset root as it is: every patient's slices, blank ones too
        assert infer.main([str(raw), "--checkpoint", str(out / "best.pt"), "--out", str(out / "masks")]) == 0
    assert "segmented 18 cases" in caplog.text and "6 blank images" in caplog.text
    for name in blank:
        mask = np.asarray(Image.open(out / "masks" / f"{name}_mask.png"))
        assert mask.shape == (48, 48) and not mask.any()


def test_a_constant_volume_is_prepared(raw_copy, tmp_path):
    """A constant 3D volume among others (a phantom, a failed scan) is prepared like the rest, flagged blank."""
    import nibabel as nib

    path = raw_copy / "synth_001.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.full(img.shape, -1000, np.int16), img.affine), path)
    assert preprocess.main([str(raw_copy), str(tmp_path / "prep"), "--workers", "1"]) == 0
    records = {c["name"]: c for c in cases.load_manifest(tmp_path / "prep")["cases"]}
    assert records["synth_001"]["blank"] and not records["synth_000"]["blank"]
