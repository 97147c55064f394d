"""Dataset layouts with several modalities per case (nnU-Net ``_0000`` files, BraTS case folders), ``--layout``,
the dataset's own split folders, label unions (regions) and overlay pictures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import SHARED, TINY_NET, checksums, one_error_line
from monai.data import MetaTensor

import infer
import preprocess
import train
from imaging import cases
from imaging.readers import write_nifti
from inference.overlays import write_overlay
from model import load_checkpoint

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def mr_case(seed: int, shape=(6, 48, 48)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two MR-like channels (X, Y, Z) float32 and a 3-value label map stored as float, as BraTS stores it."""
    image, label = preprocess.synthetic_volume(np.random.default_rng(seed), shape)
    image, label = image.transpose(2, 1, 0).astype(np.float32), label.transpose(2, 1, 0)
    flair = (image - image.mean()) / image.std()
    t1c = np.sqrt(np.clip(image + 1000, 0, None)) / 10
    label = label.astype(np.float32) * np.where(np.arange(shape[2])[:, None, None] < shape[2] // 2, 1, 2)
    return flair, t1c, label


def write_brats_like(root: Path) -> Path:
    """root/{train,validation,test}/<case>/{Flair_…,T1c_…,OTMultiClass,brainmask}.nii.gz."""
    for k, split in enumerate(["train", "train", "validation", "test"]):
        folder = root / split / f"case{k}"
        folder.mkdir(parents=True)
        flair, t1c, label = mr_case(k)
        write_nifti(flair, AFFINE, folder / "Flair_subtrMeanDivStd.nii.gz")
        write_nifti(t1c, AFFINE, folder / "T1c_subtrMeanDivStd.nii.gz")
        write_nifti(label, AFFINE, folder / "OTMultiClass.nii.gz")
        write_nifti((flair > flair.min()).astype(np.float64), AFFINE, folder / "brainmask.nii.gz")
    return root


@pytest.fixture(scope="module")
def brats_like(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(raw, prepared, trained output) for a BraTS-like set: two channels, labels {0, 1, 2}, split folders."""
    raw = write_brats_like(tmp_path_factory.mktemp("brats_raw"))
    prep, out = tmp_path_factory.mktemp("brats_prep"), tmp_path_factory.mktemp("brats_out")
    assert preprocess.main([str(raw), str(prep), "--modalities", "Flair,T1c", "--workers", "1"]) == 0
    assert train.main(["--data", str(prep), "--output", str(out), "--epochs", "2", "--regions", "WT=1,2",
                       *TINY_NET]) == 0
    return raw, prep, out


def test_case_folders_take_their_channels_labels_and_split(brats_like):
    raw, prep, _ = brats_like
    manifest = json.loads((prep / "dataset.json").read_text())
    assert manifest["in_channels"] == 2 and manifest["channels"] == ["Flair", "T1c"]
    assert manifest["label_values"] == [0, 1, 2]
    assert {c["name"]: c["split"] for c in manifest["cases"]} == {
        "case0": "train", "case1": "train", "case2": "val", "case3": "test"}
    case = manifest["cases"][0]
    assert [Path(p).name for p in case["images"]] == ["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]
    assert Path(case["label"]).name == "OTMultiClass.nii.gz"  # not brainmask, not an input channel
    prepared = nib.load(prep / case["prepared_image"]).get_fdata()
    assert prepared.shape[-1] == 2 and not np.allclose(prepared[..., 0], prepared[..., 1])


def test_regions_are_scored_in_training_and_kept_in_the_checkpoint(brats_like, tmp_path):
    _, prep, out = brats_like
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows[-1]["val_dice_regions"].startswith("WT:")
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["regions"] == {"WT": [1, 2]} and ckpt["channels"] == ["Flair", "T1c"]
    # the best epoch's region Dice is the one an evaluation of its checkpoint reports on the validation case
    wt = float(rows[ckpt["epoch"] - 1]["val_dice_regions"].split(":")[1])
    assert infer.main(["--evaluate", str(prep), "--split", "val", "--checkpoint", str(out / "best.pt"),
                       "--out", str(tmp_path), "--device", "cpu", "--no-amp"]) == 0  # fp32, as training validates
    (case, *_) = csv.DictReader((tmp_path / "evaluation.csv").open())
    assert case["case"] == "case2" and float(case["dice_WT"]) == pytest.approx(wt, abs=5e-5)


def test_evaluate_the_test_split_with_regions_and_overlays(brats_like, tmp_path):
    raw, prep, out = brats_like
    before = checksums(raw)
    dest = tmp_path / "eval"
    assert infer.main(["--evaluate", str(prep), "--split", "test", "--checkpoint", str(out / "best.pt"),
                       "--out", str(dest), "--overlays", "--device", "cpu"]) == 0
    rows = list(csv.DictReader((dest / "evaluation.csv").open()))
    assert [r["case"] for r in rows] == ["case3", "mean", "median"]
    assert {"dice_1", "dice_2", "dice_WT", "hd95_mm_WT", "pred_ml_WT"} <= set(rows[0])
    mask = np.asarray(nib.load(dest / "case3_mask.nii.gz").dataobj)
    truth = np.asarray(nib.load(raw / "test" / "case3" / "OTMultiClass.nii.gz").dataobj)
    union = infer.evaluate_case(mask, truth.astype(int), AFFINE, [0, 1, 2], {"WT": [1, 2]})
    assert float(rows[0]["dice_WT"]) == pytest.approx(union["dice_WT"], abs=1e-5)
    picture = np.asarray(PIL.Image.open(dest / "overlays" / "case3.png"))
    assert picture.ndim == 3 and picture.shape[1] > 2 * picture.shape[0]  # three planes side by side
    assert checksums(raw) == before


def test_a_case_folder_is_one_input(brats_like, tmp_path):
    raw, _, out = brats_like
    dest = tmp_path / "seg"
    assert infer.main([str(raw / "test"), "--checkpoint", str(out / "best.pt"), "--out", str(dest),
                       "--device", "cpu"]) == 0
    mask = nib.load(dest / "case3_mask.nii.gz")
    assert mask.shape == nib.load(raw / "test" / "case3" / "Flair_subtrMeanDivStd.nii.gz").shape
    assert np.allclose(mask.affine, AFFINE)


def test_case_folders_need_channels_named(tmp_path, capsys):
    raw = write_brats_like(tmp_path / "raw")
    assert preprocess.main([str(raw), str(tmp_path / "p")]) == 2
    one_error_line(capsys, "--modalities", "holds 3 images")
    assert preprocess.main([str(raw), str(tmp_path / "p"), "--modalities", "Flair,DWI"]) == 2
    one_error_line(capsys, "no file for modality 'DWI'")
    assert not (tmp_path / "p" / "dataset.json").exists()


def test_nnunet_channels_end_to_end(tmp_path, capsys):
    raw = tmp_path / "nnunet"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True)
    for k in range(3):
        flair, t1c, label = mr_case(10 + k)
        sub = "imagesTs" if k == 2 else "imagesTr"
        write_nifti(flair, AFFINE, raw / sub / f"pat{k}_0000.nii.gz")
        write_nifti(t1c, AFFINE, raw / sub / f"pat{k}_0001.nii.gz")
        if k < 2:
            write_nifti((label > 0).astype(np.uint8), AFFINE, raw / "labelsTr" / f"pat{k}.nii.gz")
    prep, out = tmp_path / "prep", tmp_path / "out"
    assert preprocess.main([str(raw), str(prep), "--val-fraction", "0.5"]) == 0
    manifest = json.loads((prep / "dataset.json").read_text())
    assert manifest["channels"] == ["0000", "0001"] and manifest["in_channels"] == 2
    assert sorted(c["name"] for c in manifest["cases"]) == ["pat0", "pat1", "pat2"]
    assert next(c for c in manifest["cases"] if c["name"] == "pat2")["split"] == "none"
    assert train.main(["--data", str(prep), "--output", str(out), "--epochs", "1", *TINY_NET]) == 0
    # Naming one channel file brings the others; both names give one case, one mask.
    assert infer.main([str(raw / "imagesTs" / "pat2_0000.nii.gz"), str(raw / "imagesTs" / "pat2_0001.nii.gz"),
                       "--checkpoint", str(out / "best.pt"), "--out", str(out), "--device", "cpu"]) == 0
    assert nib.load(out / "pat2_mask.nii.gz").shape == mr_case(12)[2].shape
    (raw / "imagesTs" / "pat2_0001.nii.gz").unlink()
    capsys.readouterr()
    assert infer.main([str(raw / "imagesTs" / "pat2_0000.nii.gz"), "--checkpoint", str(out / "best.pt"),
                       "--out", str(tmp_path / "o2"), "--device", "cpu"]) == 2
    one_error_line(capsys, "pat2_0001.nii.gz: no such file")


def test_layout_can_be_forced(tmp_path, capsys):
    raw = tmp_path / "mixed"
    raw.mkdir()
    image = (np.random.default_rng(0).random((40, 40)) * 200).astype(np.uint8)
    PIL.Image.fromarray(image).save(raw / "slice_1.tif")
    PIL.Image.fromarray(((image > 100) * 255).astype(np.uint8)).save(raw / "slice_1_mask.tif")
    flair, _, label = mr_case(0)
    write_nifti(flair, AFFINE, raw / "vol.nii.gz")
    write_nifti((label > 0).astype(np.uint8), AFFINE, raw / "vol_seg.nii.gz")
    assert [c.name for c in cases.find_cases(raw)[0]] == ["slice_1", "vol"]
    assert [c.name for c in cases.find_cases(raw, "lgg")[0]] == ["slice_1"]
    assert cases.find_cases(raw, "ph2")[0] == []
    assert preprocess.main([str(raw), str(tmp_path / "p"), "--layout", "msd"]) == 2
    one_error_line(capsys, "needs an imagesTr folder")


def test_overlay_colours_the_predicted_mask_only(tmp_path):
    rng = np.random.default_rng(0)
    image = MetaTensor(torch.from_numpy(rng.random((1, 64, 64, 1), dtype=np.float32)), affine=torch.eye(4))
    mask = np.zeros((64, 64, 1), np.uint8)
    mask[10:30, 20:50] = 1

    def coloured(m: np.ndarray, truth=None) -> int:
        path = tmp_path / "o.png"
        write_overlay(image, m, truth, [0, 1], path)
        rgb = np.asarray(PIL.Image.open(path).convert("RGB")).astype(int)
        return int(((np.abs(rgb[..., 0] - rgb[..., 1]) > 30) | (np.abs(rgb[..., 1] - rgb[..., 2]) > 30)).sum())

    assert coloured(np.zeros_like(mask)) == 0  # grey image, nothing predicted: no colour at all
    assert coloured(mask) == mask.sum()  # every predicted pixel, and only those
    assert coloured(np.zeros_like(mask), truth=mask) == 2 * (20 + 30) - 4  # the truth is an outline, not a fill


@pytest.mark.skipif(not (SHARED / "brats").is_dir(), reason="../shared/data/brats is absent")
def test_real_brats_prepares_with_its_own_split(tmp_path):
    out = tmp_path / "prep"
    assert preprocess.main([str(SHARED / "brats"), str(out), "--modalities", "Flair,T1c", "--workers", "2"]) == 0
    manifest = json.loads((out / "dataset.json").read_text())
    splits = [c["split"] for c in manifest["cases"]]
    assert sorted(splits) == ["test", "test", "train", "train", "val", "val"]
    assert manifest["in_channels"] == 2 and manifest["label_values"] == [0, 1, 2, 3, 4]
    assert manifest["params"]["modality"] == "mr"
    for case in manifest["cases"]:
        assert case["foreground_voxels_outside_crop"] == 0  # the brain crop keeps every tumour voxel
        assert max(case["prepared_shape"][1:]) <= 256 and case["prepared_shape"][0] < 155  # cropped to the head
