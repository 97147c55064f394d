"""imaging/cases.py: one finder for preprocess.py and infer.py (which files are images, which are labels, which
form a case)."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
from conftest import SHARED, SYNTH_SHAPE

import preprocess
from imaging import cases
from imaging.common import InputError
from imaging.readers import VOLUME_SUFFIXES, write_nifti


def _nifti(path, shape=(8, 8, 4), value=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(np.full(shape, value, np.float32), np.eye(4), path)


def _slices(folder, patient, n):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(1, n + 1):
        PIL.Image.fromarray(np.full((8, 8), 10 * k, np.uint8)).save(folder / f"{patient}_{k}.tif")
        PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"{patient}_{k}_mask.tif")


def test_infer_finds_the_images_preprocess_finds(tmp_path):
    """A dataset root of patient folders (LGG) and a folder of pairs: infer's inputs are preprocess's cases, labels
    never among them."""
    _slices(tmp_path / "lgg" / "pA", "pA", 3)
    _slices(tmp_path / "lgg" / "pB", "pB", 2)
    labelled, unlabelled = cases.find_cases(tmp_path / "lgg")
    found = cases.find_inputs([tmp_path / "lgg"])
    assert [c.image for c in found] == [c.image for c in labelled + unlabelled]
    assert len(found) == 5 and all(c.label is None for c in found)
    assert {c.group for c in found} == {"pA", "pB"}
    # a model trained on stacked slices takes each patient folder as one case, in slice order
    stacked = cases.find_inputs([tmp_path / "lgg"], stacked=True)
    assert [(c.name, [p.name for p in c.slices]) for c in stacked] == [
        ("pA", ["pA_1.tif", "pA_2.tif", "pA_3.tif"]), ("pB", ["pB_1.tif", "pB_2.tif"])]
    # and one patient's folder given alone
    assert [c.name for c in cases.find_inputs([tmp_path / "lgg" / "pB"], stacked=True)] == ["pB"]
    # whose slices are still one patient's (infer.py postprocesses them as one stack), as they are given as files
    alone = cases.find_inputs([tmp_path / "lgg" / "pA"])
    assert [c.group for c in alone] == ["pA"] * 3
    units = cases.patient_units([(c.name, c.group) for c in alone])
    assert [[alone[k].name for k in u] for u in units] == [["pA_1", "pA_2", "pA_3"]]
    files = cases.find_inputs(sorted((tmp_path / "lgg" / "pA").glob("pA_?.tif")))
    assert [c.group for c in files] == ["pA"] * 3


def test_hidden_files_skipped_folders_and_label_suffixes_are_one_rule(tmp_path):
    _nifti(tmp_path / "a.nii.gz")
    _nifti(tmp_path / "a_SEG.nii.gz")  # a label suffix in any case
    _nifti(tmp_path / ".partial-b.nii.gz")  # hidden: a write in progress
    _nifti(tmp_path / "out" / "a_mask.nii.gz")  # an earlier run's masks, in the output folder
    _nifti(tmp_path / "prep" / "a_image.nii.gz")  # a prepared folder: it holds .cases/
    (tmp_path / "prep" / ".cases").mkdir()
    labelled, unlabelled = cases.find_cases(tmp_path, skip=[tmp_path / "out"])
    assert [(c.name, c.label.name) for c in labelled] == [("a", "a_SEG.nii.gz")] and unlabelled == []
    assert [c.name for c in cases.find_inputs([tmp_path], skip=[tmp_path / "out"])] == ["a"]
    with pytest.raises(InputError, match="also used by"):  # without the skip, the old masks are a second label
        cases.find_cases(tmp_path)


def test_unsupported_file_names_every_readable_suffix(tmp_path):
    (tmp_path / "scan.jpg").write_bytes(b"not read")
    with pytest.raises(InputError) as err:
        cases.find_inputs([tmp_path / "scan.jpg"])
    assert all(s in str(err.value) for s in VOLUME_SUFFIXES)


def test_nnunet_files_in_a_plain_folder_are_one_case_each(tmp_path):
    for case in ("p1", "p2"):
        for k in ("0000", "0001"):
            _nifti(tmp_path / f"{case}_{k}.nii.gz")
    found = cases.find_inputs([tmp_path], modalities=["0000", "0001"])
    assert [(c.name, [p.name for p in c.sources]) for c in found] == [
        ("p1", ["p1_0000.nii.gz", "p1_0001.nii.gz"]), ("p2", ["p2_0000.nii.gz", "p2_0001.nii.gz"])]
    # a file names its case, which brings its other modality; the same case named twice is one case
    one = cases.find_inputs([tmp_path / "p2_0001.nii.gz", tmp_path / "p2_0000.nii.gz"], modalities=["0000", "0001"])
    assert [c.name for c in one] == ["p2"]


def test_output_inside_the_input_can_be_prepared_again(tmp_path):
    """``preprocess.py data data/prep`` twice: the second run does not read the prepared files as raw cases."""
    data = tmp_path / "data"
    preprocess.make_synthetic(data, 3, seed=2, shape=tuple(int(s) // 4 if i else int(s) for i, s in
                                                          enumerate(SYNTH_SHAPE)))
    for _ in range(2):
        assert preprocess.main([str(data), str(data / "prep"), "--workers", "1", "--val-fraction", "0.34"]) == 0
    manifest = cases.load_manifest(data / "prep")
    assert sorted(c["name"] for c in manifest["cases"]) == ["synth_000", "synth_001", "synth_002"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_infer_takes_the_real_dataset_roots():
    """What a user points infer.py at: the LGG and PH2 roots as downloaded, BraTS's test folder, a DICOM-free
    NRRD folder: the images, never their masks."""
    lgg = cases.find_inputs([SHARED / "lgg" / "kaggle_3m"])
    slices = [p for p in (SHARED / "lgg" / "kaggle_3m").rglob("*.tif") if not p.stem.endswith("_mask")]
    assert sorted(c.image for c in lgg) == sorted(slices)  # every slice once, no mask among them
    assert {c.group for c in lgg} == {p.parent.name for p in slices}  # a patient's slices are one group
    ph2 = cases.find_inputs([SHARED / "ph2"])
    pictures = list((SHARED / "ph2").rglob("*_Dermoscopic_Image/*.bmp"))
    assert sorted(c.image for c in ph2) == sorted(pictures)
    brats = cases.find_inputs([SHARED / "brats" / "brats2015TrainingData" / "test"], modalities=["Flair", "T1c"])
    assert len(brats) == 2 and all([p.name.split("_")[0] for p in c.modalities] == ["Flair", "T1c"] for c in brats)
    nrrd = cases.find_inputs([SHARED / "nrrd"])
    assert sorted(c.name for c in nrrd) == ["brain1", "brain2", "breast1"]


def test_evaluate_checks_the_manifest_version_like_train(prep_dir, trained, tmp_path, capsys):
    """One manifest loader: infer --evaluate refuses an old manifest with the same line as train.py."""
    import shutil

    from conftest import one_error_line

    import infer
    import train

    old = tmp_path / "prep"
    shutil.copytree(prep_dir, old)
    manifest = json.loads((old / "dataset.json").read_text())
    (old / "dataset.json").write_text(json.dumps({**manifest, "version": cases.MANIFEST_VERSION - 1}))
    assert infer.main(["--evaluate", str(old), "--checkpoint", str(trained / "best.pt"), "--out", str(tmp_path)]) == 2
    line = one_error_line(capsys, "dataset.json", "run preprocess.py again")
    assert train.main(["--data", str(old), "--output", str(tmp_path / "o"), "--epochs", "1"]) == 2
    assert one_error_line(capsys) == line


def test_patient_units_are_one_rule_on_the_raw_grid_and_the_prepared_one(tmp_path):
    """What is segmented, postprocessed and scored as one unit: a patient's numbered slices, in slice order (10
    before 9), found raw as infer.py finds them or read back from the manifest as training and the postprocessing
    decision do; a volume and a picture of its own stand alone."""
    raw = tmp_path / "raw"
    (raw / "pA").mkdir(parents=True)
    for k in (10, 9, 2):
        PIL.Image.fromarray(np.full((16, 16), 5 * k, np.uint8)).save(raw / "pA" / f"pA_{k}.png")
        PIL.Image.fromarray(np.pad(np.ones((4, 4), np.uint8) * 255, 6)).save(raw / "pA" / f"pA_{k}_mask.png")
    _nifti(raw / "vol.nii.gz", (16, 16, 6), 3.0)
    write_nifti(np.pad(np.ones((4, 4, 2), np.uint8), ((6, 6), (6, 6), (2, 2))), np.eye(4), raw / "vol_seg.nii.gz")
    PIL.Image.fromarray(np.full((16, 16), 90, np.uint8)).save(raw / "pic.png")
    PIL.Image.fromarray(np.pad(np.ones((4, 4), np.uint8) * 255, 6)).save(raw / "pic_mask.png")

    def named(pairs):
        return sorted([pairs[k][0] for k in unit] for unit in cases.patient_units(pairs))

    found = cases.find_inputs([raw])
    expected = [["pA_2", "pA_9", "pA_10"], ["pic"], ["vol"]]
    assert named([(c.name, c.group) for c in found]) == expected
    assert [[found[k].name for k in u] for u in cases.patient_units([(c.name, c.group) for c in found])
            if len(u) > 1] == [["pA_2", "pA_9", "pA_10"]]  # in slice order
    assert preprocess.main([str(raw), str(tmp_path / "prep"), "--workers", "1"]) == 0
    records = json.loads((tmp_path / "prep" / "dataset.json").read_text())["cases"]
    assert named([(r["name"], r.get("group", "")) for r in records]) == expected


@pytest.mark.parametrize("shape", [(16, 16, 1), (16, 16, 5), (1, 16, 16), (16, 1, 16)])
def test_is_2d_is_one_rule_on_the_raw_grid_and_the_prepared_one(shape):
    """A volume is 2D on its own grid (X, Y, Z) exactly when the prepared chain makes it depth 1 (D, H, W): a
    picture, or a one-slice volume; a sagittal or coronal single slice is depth 16 and thin another way."""
    from monai.data import MetaTensor

    from dataset import PrepParams, prepare_transforms
    from imaging.readers import is_2d

    image = MetaTensor(np.random.default_rng(0).random((1, *shape), dtype=np.float32), affine=np.eye(4))
    prepared = prepare_transforms(PrepParams(), with_label=False)({"image": image})["image"]
    assert is_2d(shape) == is_2d(prepared.shape[1:], prepared=True) == (shape[2] == 1)
