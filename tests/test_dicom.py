"""DICOM series (written here by SimpleITK): read in slice-position order, paired with a NIfTI mask, segmented
back onto the series' grid; missing or corrupt slices and mixed series are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import one_error_line, restore_prepared_label

import infer
import preprocess
from dice import dice_binary
from imaging.readers import read_volume
from preprocess import synthetic_volume

SPACING = (0.8, 0.8, 2.5)


def write_series(volume: np.ndarray, folder: Path, series_uid: str, origin=(-100.0, -120.0, 40.0)) -> sitk.Image:
    """Write a (D, H, W) int16 volume as one CT DICOM series; file names run against slice order."""
    folder.mkdir(parents=True)
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing(SPACING)
    img.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = img.GetDirection()
    tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.9", "0020|000e": series_uid,
            "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))}
    for k in range(img.GetDepth()):
        piece = img[:, :, k]
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        piece.SetMetaData("0020|0032", "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        piece.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"IM{img.GetDepth() - k:04d}.dcm"))  # reverse of position order
        writer.Execute(piece)
    return img


@pytest.fixture(scope="module")
def dicom_raw(tmp_path_factory) -> Path:
    """Two cases ``case0/series/*.dcm`` with masks ``case0.nii.gz`` named after the case folder."""
    root = tmp_path_factory.mktemp("dicom_raw")
    for i in range(2):
        image, label = synthetic_volume(np.random.default_rng(i), (10, 96, 96))
        ref = write_series(image, root / f"case{i}" / "series", f"1.2.826.0.1.3680043.2.1125.{100 + i}")
        mask = sitk.GetImageFromArray(label)
        mask.CopyInformation(ref)
        sitk.WriteImage(mask, str(root / f"case{i}.nii.gz"))
    return root


def test_series_reads_in_position_order_with_its_geometry(dicom_raw, tmp_path):
    series = read_volume(dicom_raw / "case0")
    mask = read_volume(dicom_raw / "case0.nii.gz")
    assert series.shape == mask.shape == (1, 96, 96, 10)
    assert torch.allclose(series.affine.double(), mask.affine.double(), atol=1e-4)
    image, _ = synthetic_volume(np.random.default_rng(0), (10, 96, 96))
    assert np.array_equal(series[0].numpy(), image.transpose(2, 1, 0).astype(np.float32))


def test_dicom_cases_go_through_preprocess_and_infer(dicom_raw, trained, tmp_path):
    assert preprocess.main([str(dicom_raw), str(tmp_path / "prep"), "--workers", "1"]) == 0
    cases = {c["name"]: c for c in json.loads((tmp_path / "prep" / "dataset.json").read_text())["cases"]}
    assert sorted(cases) == ["case0", "case1"] and cases["case0"]["label"].endswith("case0.nii.gz")
    assert cases["case0"]["original_shape"] == [96, 96, 10]
    assert infer.main([str(dicom_raw / "case1"), "--checkpoint", str(trained / "best.pt"),
                       "--out", str(tmp_path / "out")]) == 0
    mask = nib.load(tmp_path / "out" / "case1_mask.nii.gz")
    assert mask.shape == (96, 96, 10)
    assert np.allclose(mask.affine, nib.load(dicom_raw / "case1.nii.gz").affine, atol=1e-4)


def _missing_slice(folder: Path) -> str:
    (folder / "case0" / "series" / "IM0005.dcm").unlink()
    return "spacing"


def _corrupt_slice(folder: Path) -> str:
    path = folder / "case0" / "series" / "IM0004.dcm"
    path.write_bytes(path.read_bytes()[:300])
    return "case0"


def _mixed_series(folder: Path) -> str:
    image, _ = synthetic_volume(np.random.default_rng(5), (10, 96, 96))
    write_series(image, folder / "other", "1.2.826.0.1.3680043.2.1125.999", origin=(0.0, 0.0, 0.0))
    for f in (folder / "other").iterdir():
        shutil.move(f, folder / "case0" / "series" / f"X{f.name}")
    return "2 DICOM series"


@pytest.mark.parametrize("breaker", [_missing_slice, _corrupt_slice, _mixed_series], ids=lambda f: f.__name__[1:])
def test_bad_series_are_refused(breaker, dicom_raw, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(dicom_raw, raw)
    needle = breaker(raw)
    assert preprocess.main([str(raw), str(tmp_path / "prep"), "--workers", "1"]) == 2
    one_error_line(capsys, needle, "case0")
    assert not (tmp_path / "prep" / "dataset.json").exists()


def test_dicom_round_trip(dicom_raw, tmp_path):
    assert preprocess.main([str(dicom_raw), str(tmp_path / "prep"), "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "prep" / "dataset.json").read_text())
    for case in manifest["cases"]:
        restored = restore_prepared_label(tmp_path / "prep", case, manifest["params"])
        truth = read_volume(case["label"])
        assert restored.shape == truth.shape
        assert dice_binary(restored[None], truth[None] > 0).item() >= 0.98
