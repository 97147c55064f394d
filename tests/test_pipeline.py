"""End to end, in-process: preprocess → train 2 epochs → infer, then resume; and the user errors on the way."""

from __future__ import annotations

import csv
import json
import shutil
import time

import monai
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SYNTH_SHAPE, TINY_NET, checksums, one_error_line
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import infer
import model
import preprocess
import train
import training.data
from dice import dice_binary
from imaging import cases, readers
from imaging.cases import MANIFEST_VERSION
from model import INFERENCE_KEYS, load_checkpoint


def test_manifest_describes_every_case(raw_dir, prep_dir):
    manifest = json.loads((prep_dir / "dataset.json").read_text())
    assert manifest["version"] == MANIFEST_VERSION
    assert manifest["params"]["modality"] == "ct"  # detected from HU intensities
    assert manifest["label_values"] == [0, 1]
    cases = manifest["cases"]
    assert [c["name"] for c in cases] == [f"synth_{i:03d}" for i in range(4)]
    assert sorted(c["split"] for c in cases) == ["train", "train", "train", "val"]
    depth, side = int(SYNTH_SHAPE[0]), int(SYNTH_SHAPE[1])
    for c in cases:
        assert c["original_shape"] == [side, side, depth]  # stored (x, y, z)
        assert c["original_spacing"] == pytest.approx([0.78, 0.78, 2.5])
        assert c["inplane_factor"] == pytest.approx([1.0, side / 256, side / 256])
        box = np.asarray(c["crop_box"])
        assert (box[:, 0] >= 0).all() and (box[:, 1] <= [depth, 256, 256]).all()
        assert (box[1:, 1] - box[1:, 0] < 256).all(), "the air around the body was not cropped"
        assert c["prepared_shape"] == (box[:, 1] - box[:, 0]).tolist()
        image, label = nib.load(prep_dir / c["prepared_image"]), nib.load(prep_dir / c["prepared_label"])
        assert image.shape == label.shape == tuple(c["prepared_shape"])
        assert np.allclose(image.affine, label.affine)
        assert nib.aff2axcodes(image.affine) == ("S", "P", "L")
        # in-plane spacing grows by the factor, depth spacing is kept
        assert np.linalg.norm(image.affine[:3, :3], axis=0) == pytest.approx([2.5, 0.78 * side / 256,
                                                                              0.78 * side / 256], rel=1e-4)
        assert set(np.unique(np.asarray(label.dataobj))) == {0, 1}
        assert c["foreground_voxels"] == int((np.asarray(label.dataobj) > 0).sum()) > 0
        assert c["foreground_voxels_outside_crop"] == 0  # the targets lie inside the body


def test_preprocess_is_deterministic_and_leaves_input_alone(raw_dir, prep_dir, tmp_path):
    before = checksums(raw_dir)
    assert preprocess.main([str(raw_dir), str(tmp_path / "again"), "--workers", "1", "--val-fraction", "0.25"]) == 0
    assert checksums(raw_dir) == before
    assert checksums(tmp_path / "again") == checksums(prep_dir)


def test_training_writes_checkpoints_plot_metrics_and_tensorboard(trained):
    best, last = load_checkpoint(trained / "best.pt"), load_checkpoint(trained / "last.pt")
    for ckpt in (best, last):
        assert ckpt["label_values"] == [0, 1]
        assert ckpt["prep_params"]["inplane"] == 256
        assert ckpt["config"]["crop"] == [8, 64, 64]  # training crops
        # instance norm: inference sees windows like the training crops
        assert ckpt["inference"] == {"window": [8, 64, 64], "overlap": 0.75, "sw_batch_size": None}  # device's
        assert ckpt["model_args"]["channels"] == [4, 8, 16]
    assert last["epoch"] == 2 and "optimizer" in last and "optimizer" not in best
    # every key inference takes (and an ONNX export carries) is written by training; the decision adds its own
    decided = load_checkpoint(trained / "model.pt")
    assert set(INFERENCE_KEYS) - {"postprocessing"} <= set(best) and set(INFERENCE_KEYS) <= set(decided)
    rows = list(csv.DictReader((trained / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    dices = [float(r["val_dice"]) for r in rows]
    for row in rows:  # one foreground label: the mean Dice is label 1's
        label, dice = row["val_dice_per_label"].split(":")
        assert label == "1" and float(dice) == pytest.approx(float(row["val_dice"]), abs=5e-5)
    assert [h["val_dice"] for h in last["history"]] == pytest.approx(dices, abs=1e-6)
    assert best["best_dice"] == pytest.approx(max(dices), abs=1e-6) and best["epoch"] == best["best_epoch"]
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # cosine decay
    picture = imread(trained / "dice.png")
    assert picture.shape[:2] == (400, 600) and picture.std() > 0
    events = EventAccumulator(str(trained / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/dice")] == [1, 2]
    assert [e.value for e in events.Scalars("val/dice")] == pytest.approx(dices, abs=1e-5)


def test_resume_continues_from_the_saved_epoch(trained, prep_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    first = list(csv.DictReader((out / "metrics.csv").open()))
    assert train.main(["--data", str(prep_dir), "--output", str(out), "--epochs", "3", "--resume", *TINY_NET]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert rows[:2] == first
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 3 and len(last["history"]) == 3
    before = load_checkpoint(trained / "last.pt")["model_state"]
    assert any(not torch.equal(before[k], last["model_state"][k]) for k in before)


def test_infer_writes_a_mask_on_the_input_grid(trained, raw_dir, tmp_path, capsys):
    source = raw_dir / "synth_000.nii.gz"
    assert infer.main([str(source), "--checkpoint", str(trained / "best.pt"), "--out", str(tmp_path)]) == 0
    mask, image = nib.load(tmp_path / "synth_000_mask.nii.gz"), nib.load(source)
    assert mask.shape == image.shape
    assert np.array_equal(mask.affine, image.affine)
    assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(image.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert mask.get_data_dtype() == np.uint8


def test_infer_takes_a_folder(trained, raw_dir, tmp_path):
    results = infer.run(infer.parse_args([str(raw_dir), "--checkpoint", str(trained / "best.pt"),
                                          "--out", str(tmp_path)]))
    # the four images, not the four _seg masks beside them
    assert sorted(p.name for p, _, _ in results) == [f"synth_{i:03d}_mask.nii.gz" for i in range(4)]
    for path, amount, unit in results:  # the reported size is the written mask's
        mask = nib.load(path)
        voxel_ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000
        assert unit == "mL" and amount == pytest.approx((np.asarray(mask.dataobj) > 0).sum() * voxel_ml)


def test_segmented_size_uses_the_voxel_size():
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[:5, :4] = 1  # 200 voxels
    assert readers.segmented_size(mask, np.diag([0.5, 2.0, 3.0, 1.0])) == (pytest.approx(200 * 3.0 / 1000), "mL")
    # a single slice: an area of its in-plane pixels, whatever the (meaningless) slice thickness
    assert readers.segmented_size(mask[:, :, :1], np.diag([0.5, 2.0, 3.0, 1.0])) == (pytest.approx(20 * 1.0), "mm²")


def test_image_and_label_geometry_disagree_exit_2(raw_copy, tmp_path, capsys):
    label = nib.load(raw_copy / "synth_002_seg.nii.gz")
    shifted = label.affine.copy()
    shifted[:3, 3] += 5.0  # 5 mm off
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), raw_copy / "synth_002_seg.nii.gz")
    before = checksums(raw_copy)
    assert preprocess.main([str(raw_copy), str(tmp_path / "prep"), "--workers", "1"]) == 2
    one_error_line(capsys, "synth_002", "affine")
    assert checksums(raw_copy) == before
    assert not (tmp_path / "prep" / "dataset.json").exists()


def test_image_and_label_shape_disagree_exit_2(raw_copy, tmp_path, capsys):
    label = nib.load(raw_copy / "synth_001_seg.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:, :, :-1], label.affine), raw_copy / "synth_001_seg.nii.gz")
    assert preprocess.main([str(raw_copy), str(tmp_path / "prep"), "--workers", "1"]) == 2
    one_error_line(capsys, "synth_001")


def test_label_without_image_is_an_error(raw_copy, tmp_path, capsys):
    (raw_copy / "synth_003.nii.gz").unlink()
    assert preprocess.main([str(raw_copy), str(tmp_path / "prep")]) == 2
    one_error_line(capsys, "synth_003_seg.nii.gz")


def test_msd_layout_is_found(raw_dir, tmp_path):
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp_path / sub).mkdir()
    for i in range(3):
        shutil.copy(raw_dir / f"synth_{i:03d}.nii.gz", tmp_path / "imagesTr" / f"c{i}.nii.gz")
        shutil.copy(raw_dir / f"synth_{i:03d}_seg.nii.gz", tmp_path / "labelsTr" / f"c{i}.nii.gz")
    shutil.copy(raw_dir / "synth_003.nii.gz", tmp_path / "imagesTs" / "t0.nii.gz")
    labelled, unlabelled = cases.find_cases(tmp_path)
    assert [(c.name, c.label.parent.name) for c in labelled] == [("c0", "labelsTr"), ("c1", "labelsTr"),
                                                                ("c2", "labelsTr")]
    assert [(c.name, c.label) for c in unlabelled] == [("t0", None)]


def test_missing_input_and_bad_checkpoint_exit_2(trained, raw_dir, tmp_path, capsys):
    assert infer.main([str(tmp_path / "nope.nii.gz"), "--checkpoint", str(trained / "best.pt")]) == 2
    one_error_line(capsys, "nope.nii.gz")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert infer.main([str(raw_dir / "synth_000.nii.gz"), "--checkpoint", str(bad), "--out", str(tmp_path)]) == 2
    one_error_line(capsys, "bad.pt")
    assert not list(tmp_path.glob("*_mask.nii.gz"))


def test_nan_image_exit_2(raw_copy, tmp_path, capsys):
    image = nib.load(raw_copy / "synth_000.nii.gz")
    data = np.asarray(image.dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), raw_copy / "synth_000.nii.gz")
    assert preprocess.main([str(raw_copy), str(tmp_path / "prep"), "--workers", "1"]) == 2
    one_error_line(capsys, "synth_000.nii.gz")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_without_gpu_exit_2(prep_dir, tmp_path, capsys):
    assert train.main(["--data", str(prep_dir), "--output", str(tmp_path), "--device", "cuda", "--epochs", "1"]) == 2
    assert "cuda" in one_error_line(capsys).lower()


def test_missing_manifest_exit_2(tmp_path, capsys):
    assert train.main(["--data", str(tmp_path), "--output", str(tmp_path / "o"), "--epochs", "1"]) == 2
    one_error_line(capsys, "dataset.json")


def test_modality_detection_uses_air_not_outliers():
    rng = np.random.default_rng(0)
    ct = torch.from_numpy(rng.normal(40, 20, (8, 32, 32)).astype(np.float32))
    ct[:, :6] = -1000  # air around the body
    mr = torch.from_numpy(rng.uniform(0, 1000, (8, 32, 32)).astype(np.float32))
    mr[0, 0, :3] = -610  # a few interpolation undershoots, as in real MR files
    assert preprocess.detect_modality(ct[None]) == "ct"
    assert preprocess.detect_modality(mr[None]) == "mr"


def test_rgb_divides_an_8_bit_colour_picture_by_255():
    """``--modality rgb``: three channels of whole numbers in 0..255 on one slice (a photograph as read,
    (C, X, Y, 1)) come out divided by 255, each channel at its own level (a z-score per channel would centre each
    on 0); one channel, non-whole values, values beyond 255 or a volume deeper than one slice are not such a
    picture (a warning); auto-detection keeps colour pictures MR (z-scored), the default (see docs/experiments.md,
    "Colour pictures divided by 255")."""
    from monai.transforms import Compose

    from dataset import PrepParams, intensity_transforms

    rng = np.random.default_rng(0)
    photo = torch.from_numpy(rng.integers(0, 256, (3, 40, 30, 1)).astype(np.float32))
    photo[0] = (photo[0] * 0.2 + 180).round()  # a reddish picture: the channels' levels differ
    assert preprocess.is_8bit_colour(photo)
    for odd in (photo[:1], photo + 0.5, photo * 2, photo.repeat(1, 1, 1, 4)):
        assert not preprocess.is_8bit_colour(odd)
    assert preprocess.detect_modality(photo) == "mr"
    out = Compose(intensity_transforms(PrepParams(modality="rgb")))({"image": photo.clone()})["image"]
    assert torch.allclose(torch.as_tensor(out), photo / 255.0)
    assert float(out[0].mean()) > 0.7 > 0.6 > float(out[1].mean())
    z = Compose(intensity_transforms(PrepParams(modality="mr")))({"image": photo.clone()})["image"]
    assert abs(float(z[0].mean())) < 1e-4 and abs(float(z[1].mean())) < 1e-4


def test_same_seed_same_weights(prep_dir, tmp_path):
    for name in ("a", "b"):
        assert train.main(["--data", str(prep_dir), "--output", str(tmp_path / name), "--epochs", "1",
                           "--seed", "7", *TINY_NET]) == 0
    a, b = (load_checkpoint(tmp_path / n / "last.pt")["model_state"] for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_infer_on_nrrd_writes_nrrd_on_its_grid(trained, raw_dir, tmp_path):
    image = sitk.ReadImage(str(raw_dir / "synth_002.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "scan.nrrd"))
    assert infer.main([str(tmp_path / "scan.nrrd"), "--checkpoint", str(trained / "best.pt"),
                       "--out", str(tmp_path / "out")]) == 0
    mask = sitk.ReadImage(str(tmp_path / "out" / "scan_mask.nrrd"))
    assert mask.GetSize() == image.GetSize()
    for a, b in ((mask.GetSpacing(), image.GetSpacing()), (mask.GetOrigin(), image.GetOrigin()),
                 (mask.GetDirection(), image.GetDirection())):
        assert np.allclose(a, b, atol=1e-4)
    # the same mask as the NIfTI input gets
    assert infer.main([str(raw_dir / "synth_002.nii.gz"), "--checkpoint", str(trained / "best.pt"),
                       "--out", str(tmp_path / "out")]) == 0
    nifti = np.asarray(nib.load(tmp_path / "out" / "synth_002_mask.nii.gz").dataobj)
    assert np.array_equal(sitk.GetArrayFromImage(mask).transpose(2, 1, 0), nifti)


def test_label_outside_the_body_crop_is_counted(raw_copy, tmp_path):
    label = nib.load(raw_copy / "synth_003_seg.nii.gz")
    data = np.asarray(label.dataobj).copy()
    data[:12, :12, :] = 1  # a corner of air: outside the body, so the crop cuts it away
    nib.save(nib.Nifti1Image(data, label.affine), raw_copy / "synth_003_seg.nii.gz")
    assert preprocess.main([str(raw_copy), str(tmp_path / "prep"), "--workers", "1"]) == 0
    cases = json.loads((tmp_path / "prep" / "dataset.json").read_text())["cases"]
    lost = {c["name"]: c["foreground_voxels_outside_crop"] for c in cases}
    assert lost["synth_003"] > 0 and lost["synth_000"] == 0


def test_multi_class_labels_survive_end_to_end(raw_dir, tmp_path):
    """Labels {0, 2, 5}: softmax over three classes, and masks written back with the values 2 and 5."""
    raw = tmp_path / "raw"
    shutil.copytree(raw_dir, raw)
    for path in sorted(raw.glob("*_seg.nii.gz")):
        data, affine = np.asarray(nib.load(path).dataobj), nib.load(path).affine
        multi = np.where(data > 0, 2, 0).astype(np.uint8)
        multi[:, : data.shape[1] // 2][data[:, : data.shape[1] // 2] > 0] = 5  # half of each blob is label 5
        multi[:2, :2, :] = 5  # and a corner in every case, so that every case holds both labels
        nib.save(nib.Nifti1Image(multi, affine), path)
    prep, out = tmp_path / "prep", tmp_path / "out"
    assert preprocess.main([str(raw), str(prep), "--workers", "1", "--val-fraction", "0.25"]) == 0
    assert json.loads((prep / "dataset.json").read_text())["label_values"] == [0, 2, 5]
    assert train.main(["--data", str(prep), "--output", str(out), "--epochs", "1", *TINY_NET]) == 0
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["model_args"]["out_channels"] == 3 and ckpt["label_values"] == [0, 2, 5]
    (row,) = csv.DictReader((out / "metrics.csv").open())
    per_label = dict(pair.split(":") for pair in row["val_dice_per_label"].split())
    assert sorted(per_label) == ["2", "5"]
    assert float(row["val_dice"]) == pytest.approx(sum(map(float, per_label.values())) / 2, abs=1e-4)
    logits = torch.zeros(1, 3, 2, 2, 2)
    logits[:, 2] = 1.0  # class index 2 everywhere
    assert model.to_classes(model.probabilities(logits)).unique().tolist() == [2]
    assert infer.main([str(raw / "synth_000.nii.gz"), "--checkpoint", str(out / "best.pt"), "--out", str(out)]) == 0
    values = set(np.unique(np.asarray(nib.load(out / "synth_000_mask.nii.gz").dataobj)).tolist())
    assert values <= {0, 2, 5}


def test_evaluation_csv_against_true_masks(trained, raw_dir, tmp_path):
    images = [raw_dir / f"synth_00{i}.nii.gz" for i in range(2)]
    truths = [raw_dir / f"synth_00{i}_seg.nii.gz" for i in range(2)]
    assert infer.main([*map(str, images), "--truth", *map(str, truths), "--checkpoint", str(trained / "best.pt"),
                       "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "evaluation.csv").open()))
    assert [r["case"] for r in rows] == ["synth_000", "synth_001", "mean", "median"]
    for row, truth in zip(rows, truths):
        label = nib.load(truth)
        voxel_ml = abs(np.linalg.det(label.affine[:3, :3])) / 1000
        assert float(row["true_ml_1"]) == pytest.approx(np.asarray(label.dataobj).sum() * voxel_ml, rel=1e-4)
        # the scores are those of the written mask against the truth
        mask = np.asarray(nib.load(tmp_path / f"{row['case']}_mask.nii.gz").dataobj) > 0
        dice = dice_binary(mask[None, None], np.asarray(label.dataobj)[None, None] > 0).item()
        assert float(row["dice_1"]) == pytest.approx(dice, rel=1e-5, abs=1e-6)
        assert float(row["iou_1"]) == pytest.approx(dice / (2 - dice), rel=1e-5, abs=1e-6)
    assert float(rows[2]["dice_1"]) == pytest.approx((float(rows[0]["dice_1"]) + float(rows[1]["dice_1"])) / 2,
                                                     abs=1e-5)


def test_evaluate_case_by_hand():
    truth = np.zeros((20, 20, 10), np.int64)
    truth[5:15, 5:15, 2:8] = 1
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    same = infer.evaluate_case(truth, truth, affine, [0, 1])
    assert same["dice_1"] == 1.0 and same["iou_1"] == 1.0 and same["hd95_mm_1"] == 0.0
    assert same["true_ml_1"] == same["pred_ml_1"] == pytest.approx(600 * 0.5 * 0.5 * 2.0 / 1000)
    shifted = np.roll(truth, 2, axis=0)  # 2 voxels × 0.5 mm along x
    moved = infer.evaluate_case(shifted, truth, affine, [0, 1])
    assert moved["dice_1"] == pytest.approx(2 * 480 / 1200) and moved["iou_1"] == pytest.approx(480 / 720)
    assert 0.0 < moved["hd95_mm_1"] <= 1.0
    empty = infer.evaluate_case(np.zeros_like(truth), truth, affine, [0, 1])
    assert empty["dice_1"] == 0.0 and np.isnan(empty["hd95_mm_1"])
    flat = infer.evaluate_case(truth[:, :, 4:5], truth[:, :, 4:5], affine, [0, 1])
    assert flat["true_mm2_1"] == pytest.approx(100 * 0.25)  # a single slice reports an area


def test_loader_workers_draw_the_same_crops_and_live_across_epochs(prep_dir, tmp_path, monkeypatch):
    """A crop is a function of the epoch's seed and the case (``EpochOrder``), not of the process that draws it:
    a run whose loader has a worker process, kept across its epochs, learns what a run without one does."""
    made = []
    real = training.data.DataLoader

    def counted(*args, **kwargs):
        made.append(kwargs.get("persistent_workers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(training.data, "DataLoader", counted)
    argv = ["--data", str(prep_dir), "--epochs", "3", *TINY_NET]
    assert train.main([*argv, "--output", str(tmp_path / "w0"), "--num-workers", "0"]) == 0
    assert train.main([*argv, "--output", str(tmp_path / "w1"), "--num-workers", "1"]) == 0
    assert made == [False, False, True, False]  # per run: one training loader for all epochs, one validation
    plain, workers = (list(csv.DictReader((tmp_path / d / "metrics.csv").open())) for d in ("w0", "w1"))
    assert [r["train_loss"] for r in plain] == [r["train_loss"] for r in workers]
    assert [r["val_dice"] for r in plain] == [r["val_dice"] for r in workers]


class SlowItems(torch.utils.data.Dataset):
    """Eight items that take ``seconds`` each to prepare."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.transform = seconds, monai.transforms.Compose([])

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        time.sleep(self.seconds)
        return {"image": torch.zeros(1)}


def test_loader_workers_are_measured_against_the_step(monkeypatch):
    """None where the main process prepares a batch in a fraction of a step; on a GPU as many as keep its step
    fed and two to spare, within the cores but one; on the CPU, which runs the step, within half the cores."""
    monkeypatch.setattr(training.data, "machine", lambda device: {"cpu_cores": 8})
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert training.data.loader_workers(SlowItems(0.01), 2, 1.0, gpu)[0] == 0  # 0.02 s a batch, 1 s a step
    workers, batch_s = training.data.loader_workers(SlowItems(0.05), 2, 0.05, gpu)  # ≈ 2 steps' worth
    assert batch_s >= 0.1 and 4 <= workers <= 7
    assert training.data.loader_workers(SlowItems(0.05), 2, 0.05, cpu)[0] == 4
    monkeypatch.setattr(training.data, "machine", lambda device: {"cpu_cores": 1})
    assert training.data.loader_workers(SlowItems(0.05), 2, 0.05, cpu)[0] == 0  # no core to spare


def test_device_cache_path_draws_the_same_crops(prep_dir, tmp_path, monkeypatch):
    """The GPU recipe (volumes moved to the device at the end of the cached prefix, ThreadDataLoader) exercised
    with the CPU as the device: same crops, same losses as the host path."""
    argv = ["--data", str(prep_dir), "--epochs", "2", *TINY_NET]
    assert train.main([*argv, "--output", str(tmp_path / "host")]) == 0
    calls = []

    def on_cpu(device, cases, in_channels, cache_rate):
        calls.append(len(cases))
        return torch.device("cpu")

    monkeypatch.setattr(training.data, "cache_device", on_cpu)
    loader = training.data.make_loader([0], 1, 0, torch.device("cpu"), torch.device("cpu"))
    assert isinstance(loader, training.data.ThreadDataLoader)
    assert train.main([*argv, "--output", str(tmp_path / "device")]) == 0
    splits = [c["split"] for c in json.loads((prep_dir / "dataset.json").read_text())["cases"]]
    assert calls == [splits.count("train") + 2 * splits.count("val")]  # validation cases train too: two copies
    host, device = (list(csv.DictReader((tmp_path / d / "metrics.csv").open())) for d in ("host", "device"))
    assert [r["train_loss"] for r in host] == [r["train_loss"] for r in device]
    assert [r["val_dice"] for r in host] == [r["val_dice"] for r in device]


def test_data_larger_than_the_cache_memory_trains_from_the_disk_cache(prep_dir, tmp_path, monkeypatch, caplog):
    """``--cache-memory`` below what the volumes need: the prefix's output goes to ``DATA/.cache/``, at most that
    much stays in memory, the run learns what the all-in-memory run learns (same crops, same losses), and a second
    run reads the disk copy instead of preparing the volumes again."""
    data = tmp_path / "prep"
    shutil.copytree(prep_dir, data)
    argv = ["--data", str(data), "--epochs", "2", *TINY_NET]
    assert train.main([*argv, "--output", str(tmp_path / "memory")]) == 0
    assert not (data / ".cache").exists()  # it fits: memory only, as before
    with caplog.at_level("INFO", logger="train"):
        assert train.main([*argv, "--output", str(tmp_path / "disk"), "--cache-memory", "1M"]) == 0
    assert "training volumes in memory" in caplog.text and len(list((data / ".cache").rglob("*.pt"))) >= 4
    memory, disk = (list(csv.DictReader((tmp_path / d / "metrics.csv").open())) for d in ("memory", "disk"))
    assert [r["train_loss"] for r in memory] == [r["train_loss"] for r in disk]
    assert [r["val_dice"] for r in memory] == [r["val_dice"] for r in disk]
    from dataset import BoundedCache

    monkeypatch.setattr(BoundedCache, "_pre_transform", lambda self, item: pytest.fail("prepared the volumes again"))
    assert train.main([*argv, "--output", str(tmp_path / "again"), "--cache-memory", "0"]) == 0
