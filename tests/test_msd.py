"""Medical Segmentation Decathlon tasks as downloaded: 4-D NIfTI images whose 4th axis holds the modalities, the
names ``dataset.json`` gives channels and labels, ``imagesTs/``; and folders of volumes, each a case of its own
(the shared hippocampus copy's ``images/`` + ``labels/``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import PIL.Image
import pytest
from conftest import SHARED, TINY_NET
from fastapi.testclient import TestClient

import infer
import preprocess
import serve
import train
from imaging import cases
from imaging.readers import declares_2d, read_volume
from model import load_checkpoint

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
BRAIN_TUMOUR = {"name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}


def _tumour_case(rng: np.random.Generator, shape=(48, 48, 8), channels=4) -> tuple[np.ndarray, np.ndarray]:
    """A (X, Y, Z, C) image, each channel a differently weighted view of nested blobs, and a {0..3} label map."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = rng.uniform(16, 32, size=2)
    r = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (2 * (z - shape[2] / 2)) ** 2)
    label = np.select([r < 4, r < 7, r < 10], [3, 2, 1], 0).astype(np.uint8)
    image = np.stack([100 + 40 * (label == k % 4) * (k + 1) + rng.normal(0, 5, shape) for k in range(channels)], -1)
    return image.astype(np.float32), label


def write_msd(root: Path, info: dict, n_train=4, n_test=1, channels=4, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    for k in range(n_train + n_test):
        image, label = _tumour_case(rng, channels=channels)
        sub = "imagesTr" if k < n_train else "imagesTs"
        nib.save(nib.Nifti1Image(image, AFFINE), root / sub / f"BRATS_{k:03d}.nii.gz")
        if k < n_train:
            nib.save(nib.Nifti1Image(label, AFFINE), root / "labelsTr" / f"BRATS_{k:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def test_a_4d_nifti_is_a_volume_whose_4th_axis_holds_the_channels(tmp_path):
    image, _ = _tumour_case(np.random.default_rng(1), channels=2)
    nib.save(nib.Nifti1Image(image, AFFINE), tmp_path / "prostate.nii.gz")
    volume = read_volume(tmp_path / "prostate.nii.gz")
    assert tuple(volume.shape) == (2, 48, 48, 8)
    assert np.array_equal(np.asarray(volume[1]), image[..., 1]) and np.allclose(volume.affine, AFFINE)
    assert np.array_equal(np.asarray(read_volume(tmp_path / "prostate.nii.gz", channel=1)[0]), image[..., 1])
    assert not declares_2d(tmp_path / "prostate.nii.gz")


def test_nnunet_v2_names_channels_and_labels_the_other_way_round(tmp_path):
    info = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "PZ": 1, "TZ": 2}}
    raw = write_msd(tmp_path / "Task05", info, n_train=3, n_test=0, channels=2)
    assert cases.dataset_names(raw) == {"channel_names": ["T2", "ADC"], "label_names": {"0": "background",
                                                                                        "1": "PZ", "2": "TZ"}}
    (raw / "dataset.json").write_text("{not json")
    with pytest.raises(cases.InputError, match="dataset.json: not a readable dataset.json"):
        cases.dataset_names(raw)


def test_msd_brain_tumour_layout_end_to_end(tmp_path):
    """4-channel 4-D images in imagesTr/labelsTr/imagesTs: prepared with 4 input channels and the names
    dataset.json gives, each case its own group; trained; imagesTs segmented on its own 3D grid; the page names
    the labels."""
    raw = write_msd(tmp_path / "Task01_BrainTumour", BRAIN_TUMOUR)
    prep, out = tmp_path / "prep", tmp_path / "out"
    assert preprocess.main([str(raw), str(prep), "--workers", "1", "--val-fraction", "0.25"]) == 0
    manifest = json.loads((prep / "dataset.json").read_text())
    assert manifest["in_channels"] == 4 and manifest["label_values"] == [0, 1, 2, 3]
    assert manifest["channel_names"] == ["FLAIR", "T1w", "t1gd", "T2w"]
    assert manifest["label_names"]["3"] == "enhancing tumour"
    assert sorted(c["split"] for c in manifest["cases"]) == ["none", "train", "train", "train", "val"]
    assert all(c["group"] == c["name"] for c in manifest["cases"])
    assert train.main(["--data", str(prep), "--output", str(out), "--epochs", "1", *TINY_NET]) == 0
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["label_names"] == manifest["label_names"] and ckpt["model_args"]["in_channels"] == 4
    assert infer.main([str(raw / "imagesTs"), "--out", str(tmp_path / "masks"), "--checkpoint", str(out)]) == 0
    mask = nib.load(tmp_path / "masks" / "BRATS_004_mask.nii.gz")
    assert mask.shape == (48, 48, 8) and np.allclose(mask.affine, AFFINE)
    api = TestClient(serve.create_app(serve.ServeConfig(out / "model.pt", device="cpu")))
    upload = raw / "imagesTs" / "BRATS_004.nii.gz"
    resp = api.post("/api/segment?format=json", files={"file": (upload.name, upload.read_bytes())})
    assert resp.status_code == 200, resp.text
    assert [entry["name"] for entry in resp.json()["legend"]] == ["edema", "non-enhancing tumor", "enhancing tumour"]


def test_volumes_in_one_folder_are_cases_of_their_own_and_slices_a_patients(tmp_path):
    """Numbered 3D volumes side by side (``images/hippocampus_001`` …) are separate cases on both sides of the
    split and segmented one by one; numbered 2D slices in a folder stay their patient's."""
    for sub in ("images", "labels", "slices"):
        (tmp_path / sub).mkdir()
    for k in range(1, 5):
        image, label = _tumour_case(np.random.default_rng(k), channels=1)
        nib.save(nib.Nifti1Image(image[..., 0], AFFINE), tmp_path / "images" / f"hippo_{k:03d}.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), tmp_path / "labels" / f"hippo_{k:03d}.nii.gz")
        nib.save(nib.Nifti1Image(image[..., :1, 0], AFFINE), tmp_path / "slices" / f"p_{k}.nii.gz")  # depth 1
    labelled, _ = cases.find_cases(tmp_path)
    volumes = [c for c in labelled if c.image.parent.name == "images"]
    assert len(volumes) == 4 and all(c.group == "" for c in volumes)
    split = cases.split_cases({c.name: c.split_group for c in volumes}, 0.25, seed=0)
    assert sorted(split.values()) == ["train", "train", "train", "val"]
    found = cases.find_inputs([tmp_path / "images"])
    assert all(len(u) == 1 for u in cases.patient_units([(c.name, c.group) for c in found]))
    slices = cases.find_inputs(sorted((tmp_path / "slices").glob("*.nii.gz")))
    assert {c.group for c in slices} == {"slices"}
    assert [len(u) for u in cases.patient_units([(c.name, c.group) for c in slices])] == [4]
    (tmp_path / "photos" / "sub").mkdir(parents=True)  # unnumbered pictures: each its own case, as volumes are
    for name in ("mole", "naevus", "scar"):
        PIL.Image.fromarray(np.full((16, 16), 90, np.uint8)).save(tmp_path / "photos" / "sub" / f"{name}.png")
        PIL.Image.fromarray(np.pad(np.full((4, 4), 255, np.uint8), 6)).save(
            tmp_path / "photos" / "sub" / f"{name}_mask.png")
    photos, _ = cases.find_cases(tmp_path / "photos")
    assert len(photos) == 3 and {c.split_group for c in photos} == {"mole", "naevus", "scar"}


@pytest.mark.skipif(not (SHARED / "hippocampus").is_dir(), reason="../shared/data/hippocampus is absent")
def test_shared_hippocampus_splits_by_case_trains_and_segments_a_folder(tmp_path):
    """The shared copy's ``images/`` + ``labels/``: every case its own patient, so the default split has both
    sides (it put all of them on one side when the folder was their group); a few of its cases train with the
    defaults, and infer.py writes a mask for every image of a folder, each on its own grid."""
    root = SHARED / "hippocampus"
    labelled, unlabelled = cases.find_cases(root)
    assert labelled and len({c.split_group for c in labelled}) == len(labelled)
    assert all(c.label.parent.name == "labels" and c.label.name == c.image.name for c in labelled)
    split = cases.split_cases({c.name: c.split_group for c in labelled}, 0.2, seed=0)
    assert 0.15 < sum(s == "val" for s in split.values()) / len(split) < 0.25
    raw = tmp_path / "raw"
    for sub in ("images", "labels"):
        (raw / sub).mkdir(parents=True)
    for case in labelled[:6]:
        shutil.copy(case.image, raw / "images" / case.image.name)
        shutil.copy(case.label, raw / "labels" / case.label.name)
    prep, out = tmp_path / "prep", tmp_path / "out"
    assert preprocess.main([str(raw), str(prep), "--workers", "1"]) == 0
    assert train.main(["--data", str(prep), "--output", str(out), "--epochs", "1", "--device", "cpu"]) == 0
    assert infer.main([str(raw / "images"), "--out", str(tmp_path / "masks"), "--checkpoint", str(out)]) == 0
    for case in labelled[:6]:
        mask, image = nib.load(tmp_path / "masks" / f"{case.name}_mask.nii.gz"), nib.load(case.image)
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
