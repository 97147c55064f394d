"""Geometry: a label through preprocessing and back through infer's inverse lands where it started."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SHARED, TINY_WIDTHS, checksums, restore_prepared_label

import model
import preprocess
import train
from dataset import PrepParams, prepare_transforms
from dice import dice_binary
from imaging import cases
from imaging.readers import read_volume, write_mask, write_nifti
from inference import segmenter
from model import anisotropic_args, build_model, load_checkpoint, model_args


def _phantom(tmp_path, affine):
    """A CT-like body (x, y, z) = 400×360×20 with a smooth ellipsoid label, written as NIfTI."""
    x, y, z = np.ogrid[:400, :360, :20]
    image = np.full((400, 360, 20), -1000, np.int16)
    image[np.broadcast_to(((x - 200) / 170.0) ** 2 + ((y - 180) / 130.0) ** 2 < 1, image.shape)] = 40
    label = ((((x - 230) / 40.0) ** 2 + ((y - 150) / 33.0) ** 2 + ((z - 9) / 5.0) ** 2) < 1).astype(np.uint8)
    write_nifti(image, affine, tmp_path / "ct.nii.gz")
    write_nifti(label, affine, tmp_path / "ct_seg.nii.gz")
    return label


def test_round_trip_returns_the_label_on_the_original_grid(tmp_path):
    # oblique-free but rotated and flipped: exercises the reorientation as well as resize and crop
    affine = np.array([[0.0, -0.7, 0.0, 10.0], [0.7, 0.0, 0.0, -20.0], [0.0, 0.0, -3.0, 5.0], [0, 0, 0, 1.0]])
    label = _phantom(tmp_path, affine)
    params = PrepParams(modality="ct")
    raw = {"image": read_volume(tmp_path / "ct.nii.gz"), "label": read_volume(tmp_path / "ct_seg.nii.gz")}
    both = prepare_transforms(params, with_label=True)(raw)
    # 400×360 in-plane scaled by 256/400 to 256×230, then cropped to the body's box (its 340×260 ellipse, 218×166
    # once scaled) with a margin; the 20 slices kept
    assert both["image"].shape == both["label"].shape == (1, 20, 225, 173)
    # infer's own path: re-run the image chain, then push the prepared label back through its inverse
    chain = prepare_transforms(params, with_label=False)
    image = chain({"image": read_volume(tmp_path / "ct.nii.gz")})["image"]
    assert torch.allclose(image.affine, both["label"].affine)
    back = segmenter.invert_to_original(both["label"].float(), image, chain)
    restored = model.to_classes(back[None])[0, 0].numpy()
    assert restored.shape == label.shape
    assert dice_binary(restored[None, None], label[None, None]).item() >= 0.98
    # the written mask carries the input's exact affine
    out = tmp_path / "ct_mask.nii.gz"
    write_mask(restored.astype(np.uint8), np.eye(4), out, binary=True, source=tmp_path / "ct.nii.gz")
    assert np.array_equal(nib.load(out).affine, nib.load(tmp_path / "ct.nii.gz").affine)


def test_nrrd_reads_like_the_same_nifti(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(-100, 100, (7, 9, 11)).astype(np.int16)  # SimpleITK order (z, y, x)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((0.8, 0.9, 2.0))
    img.SetOrigin((10.0, -5.0, 3.0))
    img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    sitk.WriteImage(img, str(tmp_path / "v.nrrd"))
    sitk.WriteImage(img, str(tmp_path / "v.nii.gz"))
    a, b = read_volume(tmp_path / "v.nrrd"), read_volume(tmp_path / "v.nii.gz")
    assert a.shape == b.shape == (1, 11, 9, 7)
    assert torch.equal(a.as_tensor().float(), b.as_tensor().float())
    assert torch.allclose(a.affine.double(), b.affine.double(), atol=1e-5)


@pytest.mark.skipif(not (SHARED / "tiny").is_dir(), reason="../shared/data/tiny is absent")
def test_real_mri_in_other_orientations_and_big_endian(tmp_path):
    """MONAI's test MRIs (big-endian, not canonical) go through preprocessing and back unchanged."""
    src = SHARED / "tiny"
    before = checksums(src)
    assert preprocess.main([str(src), str(tmp_path / "prep"), "--workers", "1"]) == 0
    assert checksums(src) == before
    manifest = json.loads((tmp_path / "prep" / "dataset.json").read_text())
    assert manifest["params"]["modality"] == "mr" and len(manifest["cases"]) == 2
    for case in manifest["cases"]:
        label = read_volume(case["label"])
        prepared = nib.load(tmp_path / "prep" / case["prepared_label"])
        assert nib.aff2axcodes(prepared.affine) == ("S", "P", "L")
        chain = prepare_transforms(PrepParams.from_dict(manifest["params"]), with_label=False)
        image = chain({"image": read_volume(case["image"])})["image"]
        assert np.allclose(prepared.affine, image.affine.numpy(), atol=1e-4)  # inference sees the same grid
        restored = restore_prepared_label(tmp_path / "prep", case, manifest["params"])
        assert restored.shape == label.shape
        assert dice_binary(restored[None], label[None] > 0).item() >= 0.98


def test_anisotropic_volumes_downsample_in_plane_first():
    args = model_args(strides=[2, 2, 2, 2])
    assert anisotropic_args(args, [6.5, 0.78, 0.78])["strides"] == [[1, 2, 2], [1, 2, 2], [1, 2, 2], [2, 2, 2]]
    assert anisotropic_args(args, [2.5, 1.56, 1.56]) == args  # ratio 1.6: left alone
    net = build_model(anisotropic_args(model_args(channels=[4, 8, 16], strides=[2, 2]), [6.5, 0.78, 0.78]))
    assert net(torch.zeros(1, 1, 4, 32, 32)).shape == (1, 1, 4, 32, 32)


@pytest.mark.skipif(not (SHARED / "nrrd").is_dir(), reason="../shared/data/nrrd is absent")
def test_anisotropic_nrrd_round_trip_and_model(tmp_path):
    """pyradiomics' brain MRI at 0.78×0.78×6.5 mm: pairs found, grid restored, in-plane-first strides chosen."""
    src = SHARED / "nrrd"
    labelled, _ = cases.find_cases(src)
    assert [c.name for c in labelled] == ["brain1", "brain2", "breast1"]
    assert preprocess.main([str(src), str(tmp_path / "prep"), "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "prep" / "dataset.json").read_text())
    brain = next(c for c in manifest["cases"] if c["name"] == "brain1")
    assert brain["prepared_spacing"][0] == pytest.approx(6.5, rel=0.01)
    label = read_volume(brain["label"])
    restored = restore_prepared_label(tmp_path / "prep", brain, manifest["params"])
    assert restored.shape == label.shape
    assert dice_binary(restored[None], label[None] > 0).item() >= 0.98
    out = tmp_path / "out"
    assert train.main(["--data", str(tmp_path / "prep"), "--output", str(out), "--epochs", "1", "--device", "cpu",
                       *TINY_WIDTHS, "--crop", "16", "64", "64"]) == 0
    assert load_checkpoint(out / "best.pt")["model_args"]["strides"][0] == [1, 2, 2]
