"""2D images (TIFF, PNG, BMP) as depth-1 volumes: readers, mask encodings, the 2D-equivalent model, real sets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHARED, TINY_WIDTHS, checksums, one_error_line, restore_prepared_label
from PIL import Image

import infer
import preprocess
import train
from dice import dice_binary
from imaging import cases
from imaging.readers import as_label_map, read_volume
from model import load_checkpoint


def _disc_image(rng: np.random.Generator, size=(90, 120)) -> tuple[np.ndarray, np.ndarray]:
    """A (rows, columns, 3) uint8 skin-like picture with a darker disc, and the disc's mask."""
    rows, cols = np.ogrid[: size[0], : size[1]]
    cy, cx, r = rng.uniform(30, 60), rng.uniform(40, 80), rng.uniform(12, 20)
    mask = ((rows - cy) ** 2 + (cols - cx) ** 2 < r * r).astype(np.uint8)
    image = np.empty((*size, 3), np.uint8)
    for c, (skin, lesion) in enumerate([(200, 90), (160, 60), (140, 50)]):
        image[..., c] = np.clip(np.where(mask > 0, lesion, skin) + rng.normal(0, 8, size), 0, 255)
    return image, mask


@pytest.fixture(scope="module")
def png_raw(tmp_path_factory) -> Path:
    """Six RGB PNG pictures; masks stored three ways: 0/255 grey PNG, 1-bit BMP, RGB 0/255 BMP."""
    root = tmp_path_factory.mktemp("png_raw")
    rng = np.random.default_rng(0)
    for i in range(6):
        image, mask = _disc_image(rng)
        Image.fromarray(image).save(root / f"pic{i}.png")
        if i % 3 == 0:
            Image.fromarray(mask * 255).save(root / f"pic{i}_mask.png")
        elif i % 3 == 1:
            Image.fromarray(mask > 0).save(root / f"pic{i}_mask.bmp")  # mode "1"
        else:
            Image.fromarray(np.repeat(mask[..., None] * 255, 3, axis=-1)).save(root / f"pic{i}_mask.bmp")
    return root


def test_a_picture_is_a_depth_1_volume_as_displayed(png_raw):
    vol = read_volume(png_raw / "pic0.png")
    picture = np.asarray(Image.open(png_raw / "pic0.png"))
    assert vol.shape == (3, 120, 90, 1)  # (C, columns, rows, 1)
    assert np.array_equal(vol[:, :, :, 0].permute(2, 1, 0).numpy(), picture.astype(np.float32))
    assert read_volume(png_raw / "pic0.png", channel=1).shape == (1, 120, 90, 1)


@pytest.mark.parametrize("name", ["pic0_mask.png", "pic1_mask.bmp", "pic2_mask.bmp"])
def test_every_mask_encoding_becomes_0_1(png_raw, name):
    mask = as_label_map(read_volume(png_raw / name), png_raw / name)
    assert mask.shape == (1, 120, 90, 1)
    assert set(mask.unique().tolist()) == {0.0, 1.0}


def test_2d_pipeline_end_to_end(png_raw, tmp_path):
    before = checksums(png_raw)
    prep, out = tmp_path / "prep", tmp_path / "out"
    assert preprocess.main([str(png_raw), str(prep), "--workers", "1"]) == 0
    manifest = json.loads((prep / "dataset.json").read_text())
    assert manifest["in_channels"] == 3 and manifest["label_values"] == [0, 1]
    assert all(c["prepared_shape"][0] == 1 for c in manifest["cases"])
    assert train.main(["--data", str(prep), "--output", str(out), "--epochs", "2", "--device", "cpu",
                       *TINY_WIDTHS, "--num-samples", "2"]) == 0
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["model_args"]["kernel_size"] == [1, 3, 3]
    assert ckpt["model_args"]["strides"] == [[1, 2, 2], [1, 2, 2]] and ckpt["model_args"]["in_channels"] == 3
    # the plan: whole slices (90 × 120, rounded up to the network's multiples of 4) as crops and as the window
    assert ckpt["config"]["crop"] == [1, 96, 120] and ckpt["inference"]["window"] == [1, 96, 120]
    assert ckpt["plan"]["planned"] == ["crop", "batch_size", "lr", "batch_dice", "train_on_val"]  # not --num-samples
    assert json.loads((out / "plan.json").read_text()) == json.loads(json.dumps(ckpt["plan"]))
    assert infer.main([str(png_raw / "pic3.png"), "--checkpoint", str(out / "best.pt"), "--out", str(out)]) == 0
    mask = np.asarray(Image.open(out / "pic3_mask.png"))  # a picture's mask is a picture: rows × columns, 0/255
    assert mask.shape == (90, 120) and set(np.unique(mask)) <= {0, 255}
    assert infer.main([str(png_raw / "pic3.png"), "--checkpoint", str(out / "best.pt"), "--out", str(out),
                       "--format", "nii.gz"]) == 0  # forced NIfTI: the (columns, rows, 1) array of the same mask
    nifti = np.asarray(nib.load(out / "pic3_mask.nii.gz").dataobj)
    assert np.array_equal(nifti[:, :, 0].T * 255, mask)
    assert checksums(png_raw) == before


def test_a_2d_model_costs_what_a_slice_costs():
    """The depth-1 network keeps depth 1 all the way through: no padding to a deep volume."""
    from model import build_model, flat_args, model_args

    net = build_model(flat_args(model_args(channels=[4, 8, 16], strides=[2, 2])))
    assert net(torch.zeros(1, 1, 1, 64, 64)).shape == (1, 1, 1, 64, 64)


@pytest.mark.skipif(not (SHARED / "lgg").is_dir(), reason="../shared/data/lgg is absent")
def test_lgg_slices_pair_up_and_split_by_patient(tmp_path):
    labelled, _ = cases.find_cases(SHARED / "lgg")
    assert len(labelled) > 200 and all(c.label.name == c.image.name.replace(".tif", "_mask.tif") for c in labelled)
    groups = {c.split_group for c in labelled}
    assert groups == {c.image.parent.name for c in labelled} and all(g.startswith("TCGA_") for g in groups)
    assert len(groups) > 1
    split = cases.split_cases({c.name: c.split_group for c in labelled}, 0.2, 0)
    for group in groups:  # a patient's slices all land on one side
        assert len({split[c.name] for c in labelled if c.split_group == group}) == 1
    flair = read_volume(labelled[0].image, channel=1)
    assert flair.shape == (1, 256, 256, 1)


@pytest.mark.skipif(not (SHARED / "ph2").is_dir(), reason="../shared/data/ph2 is absent")
def test_ph2_pairs_and_its_rgb_mask(tmp_path):
    labelled, _ = cases.find_cases(SHARED / "ph2")
    lesions = list((SHARED / "ph2").rglob("*_lesion.bmp"))
    assert len(labelled) == len(lesions) and all(c.label.name == f"{c.name}_lesion.bmp" for c in labelled)
    case = next(c for c in labelled if c.name == "IMD002")  # its mask is an RGB BMP
    raw = cases.read_case(case)
    assert raw["image"].shape[0] == 3 and raw["label"].shape[0] == 1
    assert set(raw["label"].unique().tolist()) == {0.0, 1.0}


def test_bmp_round_trip_through_downsampling(tmp_path):
    """A 400×300 BMP (downsampled to 256 wide) and its 1-bit mask come back on the original pixel grid."""
    rng = np.random.default_rng(3)
    rows, cols = np.ogrid[:300, :400]
    mask = (((rows - 150) / 70.0) ** 2 + ((cols - 210) / 90.0) ** 2 < 1).astype(np.uint8)
    image = np.clip(np.where(mask[..., None] > 0, [90, 60, 50], [200, 160, 140]) + rng.normal(0, 8, (300, 400, 3)),
                    0, 255).astype(np.uint8)  # skin fills the frame: nothing to crop
    Image.fromarray(image).save(tmp_path / "skin.bmp")
    Image.fromarray(mask > 0).save(tmp_path / "skin_lesion.bmp")
    assert preprocess.main([str(tmp_path), str(tmp_path / "prep"), "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "prep" / "dataset.json").read_text())
    (case,) = manifest["cases"]
    assert case["prepared_shape"] == [1, 192, 256]  # 300×400 scaled to 256 wide, not cropped to the lesion
    restored = restore_prepared_label(tmp_path / "prep", case, manifest["params"])
    truth = as_label_map(read_volume(tmp_path / "skin_lesion.bmp"), tmp_path / "skin_lesion.bmp")
    assert restored.shape == truth.shape == (1, 400, 300, 1)
    assert dice_binary(restored[None], truth[None] > 0).item() >= 0.98


def test_per_patient_dice_stacks_the_slices(png_raw, tmp_path):
    """Two slices of one patient: the patient's Dice pools the voxels, unlike the mean of the slice Dice."""
    pd = infer.PatientDice([0, 1])
    a_pred, a_true = np.zeros((10, 10, 1), np.int64), np.zeros((10, 10, 1), np.int64)
    a_pred[:5], a_true[:5] = 1, 1  # 50 voxels, perfect
    b_pred, b_true = np.zeros_like(a_pred), np.zeros_like(a_true)
    b_pred[0, 0] = 1  # one false positive voxel on an empty slice: slice Dice 0
    pd.add("patient", a_pred, a_true)
    pd.add("patient", b_pred, b_true)
    pd.add("alone", a_pred, a_true)  # one slice only: no per-patient row
    assert pd.rows() == {"patient": {"slices": 2.0, "dice_1": pytest.approx(100 / 101)}}


def test_infer_writes_per_patient_evaluation_for_slices(png_raw, tmp_path):
    prep, out = tmp_path / "prep", tmp_path / "out"
    assert preprocess.main([str(png_raw), str(prep), "--workers", "1"]) == 0
    assert train.main(["--data", str(prep), "--output", str(out), "--epochs", "1", "--device", "cpu",
                       *TINY_WIDTHS, "--num-samples", "2"]) == 0
    masks = [png_raw / "pic0_mask.png", png_raw / "pic1_mask.bmp", png_raw / "pic2_mask.bmp"]
    pictures = [png_raw / f"pic{i}.png" for i in range(3)]
    assert infer.main([*map(str, pictures), "--truth", *map(str, masks), "--checkpoint", str(out / "best.pt"),
                       "--out", str(out / "pictures")]) == 0
    assert not (out / "pictures" / "evaluation_patients.csv").exists()  # pictures of one folder: no patient
    (tmp_path / "p7").mkdir()
    images = [tmp_path / "p7" / f"p7_{i + 1}.png" for i in range(3)]  # a patient's numbered slices
    for picture, image in zip(pictures, images):
        shutil.copy(picture, image)
    assert infer.main([*map(str, images), "--truth", *map(str, masks), "--checkpoint", str(out / "best.pt"),
                       "--out", str(out / "eval")]) == 0
    rows = (out / "eval" / "evaluation_patients.csv").read_text().splitlines()
    assert rows[0] == "case,slices,dice_1" and rows[1].startswith("p7,3,")
    # the patient's Dice is that of its three written masks stacked against its three true masks
    pred = np.stack([np.asarray(Image.open(out / "eval" / f"p7_{i + 1}_mask.png")) for i in range(3)])
    truth = np.stack([as_label_map(read_volume(m), m)[0, :, :, 0].numpy().T for m in masks])  # rows × columns
    pooled = dice_binary(pred[None, None] > 0, truth[None, None] > 0).item()
    assert float(rows[1].split(",")[2]) == pytest.approx(pooled, rel=1e-5, abs=1e-6)
    assert "true_mm2_1" in (out / "eval" / "evaluation.csv").read_text().splitlines()[0]


def _write_patients(root: Path, n_patients: int = 3, n_slices: int = 12) -> Path:
    """Patient folders of numbered grey PNG slices ``p<k>_<n>.png`` (1 … 12: name order is not slice order)
    with ``_mask.png``; a slice's corner pixel holds 10 + 5n, so the stacking order can be read back."""
    rng = np.random.default_rng(5)
    for k in range(n_patients):
        folder = root / f"p{k}"
        folder.mkdir(parents=True)
        for n in range(1, n_slices + 1):
            rows, cols = np.ogrid[:48, :48]
            mask = ((rows - 24) ** 2 + (cols - 20 - k) ** 2 < (3 + n % 5) ** 2).astype(np.uint8)
            image = np.clip(60 + 120 * mask + rng.normal(0, 6, (48, 48)), 0, 255).astype(np.uint8)
            image[:2, :2] = 10 + 5 * n
            Image.fromarray(image).save(folder / f"p{k}_{n}.png")
            Image.fromarray(mask * 255).save(folder / f"p{k}_{n}_mask.png")
    return root


def test_stack_slices_rebuilds_one_volume_per_patient_in_slice_order(tmp_path, capsys):
    raw = _write_patients(tmp_path / "raw")
    labelled, _ = cases.find_cases(raw, stack=True)
    assert [c.name for c in labelled] == ["p0", "p1", "p2"]
    assert [p.name for p in labelled[0].slices[:3]] == ["p0_1.png", "p0_2.png", "p0_3.png"]
    volume = cases.read_case(labelled[0])
    assert volume["image"].shape == (1, 48, 48, 12) and volume["label"].shape == (1, 48, 48, 12)
    assert volume["image"][0, 0, 0].tolist() == [10 + 5 * n for n in range(1, 13)]

    prep, out = tmp_path / "prep", tmp_path / "out"
    assert preprocess.main([str(raw), str(prep), "--stack-slices", "--workers", "1", "--val-fraction", "0.34"]) == 0
    manifest = json.loads((prep / "dataset.json").read_text())
    assert manifest["stack_slices"] and all(c["prepared_shape"][0] == 12 for c in manifest["cases"])
    assert train.main(["--data", str(prep), "--output", str(out), "--epochs", "1", "--device", "cpu",
                       *TINY_WIDTHS, "--crop", "8", "32", "32"]) == 0
    assert load_checkpoint(out / "best.pt")["stack_slices"] is True
    # A patient's folder is one input; its masks folder gives the truth, scored per patient.
    assert infer.main([str(raw / "p1"), "--truth", str(raw / "p1"), "--checkpoint", str(out / "best.pt"),
                       "--out", str(out / "eval")]) == 0
    assert nib.load(out / "eval" / "p1_mask.nii.gz").shape == (48, 48, 12)
    rows = (out / "eval" / "evaluation.csv").read_text().splitlines()
    assert rows[1].startswith("p1,") and "pred_ml_1" in rows[0]

    (raw / "p2" / "p2_7.png").unlink()
    (raw / "p2" / "p2_7_mask.png").unlink()
    capsys.readouterr()
    assert preprocess.main([str(raw), str(tmp_path / "prep2"), "--stack-slices"]) == 2
    one_error_line(capsys, "slice 7 is missing", "p2")


class _Echo(torch.nn.Module):
    """A 'network' whose logits are its input rescaled: predicts exactly the mask it is given as image."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) * self.scale


def test_validation_pools_a_patients_slices():
    """Training's validation Dice for slices is the patient's Dice over its slices stacked, not a slice mean."""
    rng = np.random.default_rng(5)
    pred = rng.random((6, 1, 1, 1, 16, 16)) > 0.6
    truth = rng.random((6, 1, 1, 1, 16, 16)) > 0.6
    truth[0] = pred[0] = False  # nothing to find, nothing found: Dice 1.0 on its own
    groups = ["a", "a", "a", "b", "b", "b"]
    loader = [{"image": torch.from_numpy(p).float(), "label": torch.from_numpy(t).float(), "name": [f"{g}_{i}"],
               "group": [g]} for i, (p, t, g) in enumerate(zip(pred, truth, groups))]
    cfg = train.TrainConfig(overlap=0.0)
    per_slice, _ = train.validate(_Echo(), loader, [0, 1], cfg, (1, 16, 16), amp=False)
    pooled, _ = train.validate(_Echo(), loader, [0, 1], cfg, (1, 16, 16), amp=False, pool_groups=True)
    slice_dice = dice_binary(pred[:, 0], truth[:, 0])[:, 0]
    assert per_slice[1] == pytest.approx(float(slice_dice.mean()))
    patients = [dice_binary(np.concatenate(list(pred[s]), 2), np.concatenate(list(truth[s]), 2)).item()
                for s in (slice(0, 3), slice(3, 6))]
    assert pooled[1] == pytest.approx(np.mean(patients)) and pooled[1] != pytest.approx(per_slice[1])
