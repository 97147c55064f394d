"""A corpus of bad inputs, made here: each gives exit code 2, one line naming the file and the problem,
no partial output, and inputs left untouched.

| # | input | command |
| --- | --- | --- |
| 1-22 | see PREPROCESS_CASES: broken files, geometry, intensities, masks, layouts, arguments | preprocess.py |
| 23-34 | see INFER_CASES: missing/corrupt inputs, untrusted or mismatched checkpoints, existing outputs | infer.py |
| 35-47 | see TRAIN_CASES: absurd arguments, old/corrupt/tampered manifests, resume mismatches | train.py |

A constant image (a blank slice) is not bad input: tests/test_blank.py.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_NET, checksums, one_error_line

import infer
import preprocess
import train
from imaging.cases import Case
from imaging.common import InputError
from inference import segmenter
from model import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory) -> Path:
    """Three small synthetic CT pairs: quick to break and to preprocess."""
    folder = tmp_path_factory.mktemp("small_raw")
    preprocess.make_synthetic(folder, 3, seed=3, shape=(6, 48, 48))
    return folder


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def _edit(name: str, fn: Callable[[np.ndarray], np.ndarray], affine_fn=None) -> Callable[[Path], str]:
    """A breaker that rewrites ``name`` with ``fn(data)`` (and ``affine_fn(affine)``)."""
    def breaker(folder: Path) -> str:
        data, affine = _load(folder / name)
        _save(folder / name, fn(data), affine_fn(affine.copy()) if affine_fn else affine)
        return name
    return breaker


def _bytes(name: str, content: Callable[[bytes], bytes]) -> Callable[[Path], str]:
    def breaker(folder: Path) -> str:
        path = folder / name
        path.write_bytes(content(path.read_bytes()))
        return name
    return breaker


def _huge_header(folder: Path) -> str:
    header = nib.Nifti1Header()
    header.set_data_shape((5000, 5000, 5000))
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    (folder / "synth_001.nii.gz").write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\1" * 100))
    return "synth_001.nii.gz"


def _with_nan(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def fn(data: np.ndarray) -> np.ndarray:
        data = data.astype(np.float32)
        data[1, 2, 3] = value
        return data
    return fn


def _shifted(affine: np.ndarray) -> np.ndarray:
    affine[:3, 3] += 2.0
    return affine


def _remove(name: str) -> Callable[[Path], str]:
    def breaker(folder: Path) -> str:
        (folder / name).unlink()
        return name.replace(".nii.gz", "_seg.nii.gz")
    return breaker


def _all_empty(folder: Path) -> str:
    for path in folder.glob("*_seg.nii.gz"):
        data, affine = _load(path)
        _save(path, np.zeros_like(data), affine)
    return "every mask is empty"


def _no_labels(folder: Path) -> str:
    for path in folder.glob("*_seg.nii.gz"):
        path.unlink()
    return "no image/label pairs"


def _only_jpegs(folder: Path) -> str:
    for path in list(folder.iterdir()):
        path.rename(path.with_name(path.name.replace(".nii.gz", ".jpg")))
    return "no image/label pairs"


def _unreadable(folder: Path) -> str:
    (folder / "synth_001.nii.gz").chmod(0)
    return "permission denied"


def _rgb_mask(data: np.ndarray) -> np.ndarray:
    return np.repeat(data[..., None], 3, axis=-1)


def _many_values(data: np.ndarray) -> np.ndarray:
    return np.arange(data.size, dtype=np.int32).reshape(data.shape) % 1000


def _single_voxel(folder: Path) -> str:
    for name in ("synth_001.nii.gz", "synth_001_seg.nii.gz"):
        data, affine = _load(folder / name)
        _save(folder / name, data[:1, :1, :1], affine)
    return "synth_001.nii.gz"


def _corrupt_nrrd(folder: Path) -> str:
    for name in ("synth_002.nii.gz", "synth_002_seg.nii.gz"):
        (folder / name).unlink()
    (folder / "synth_002.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 50 50 50\n"
                                            b"encoding: raw\n\n" + b"\0" * 100)
    shutil.copy(folder / "synth_000_seg.nii.gz", folder / "synth_002_seg.nii.gz")
    return "synth_002"


PREPROCESS_CASES: dict[str, tuple[Callable[[Path], str], list[str]]] = {
    "truncated nii.gz": (_bytes("synth_001.nii.gz", lambda b: b[: len(b) // 2]), []),
    "0-byte nii.gz": (_bytes("synth_001.nii.gz", lambda b: b""), []),
    "gzip, not NIfTI": (_bytes("synth_001.nii.gz", lambda b: gzip.compress(b"hello, not an image" * 50)), []),
    "huge declared dimensions": (_huge_header, []),
    "4D image": (_edit("synth_001.nii.gz", lambda d: np.stack([d, d], axis=-1)), []),
    "single voxel": (_single_voxel, []),
    "NaN intensities": (_edit("synth_001.nii.gz", _with_nan(np.nan)), []),
    "Inf intensities": (_edit("synth_001.nii.gz", _with_nan(np.inf)), []),
    "shapes differ": (_edit("synth_001_seg.nii.gz", lambda d: d[:, :, :-1]), []),
    "affines differ": (_edit("synth_001_seg.nii.gz", lambda d: d, _shifted), []),
    "mask value outside --labels": (_edit("synth_001_seg.nii.gz", lambda d: d * 2), ["--labels", "0", "1"]),
    "non-integer mask": (_edit("synth_001_seg.nii.gz", lambda d: d * 0.5), []),
    "negative mask": (_edit("synth_001_seg.nii.gz", lambda d: -d.astype(np.int16)), []),
    "RGB mask": (_edit("synth_001_seg.nii.gz", _rgb_mask), []),
    "an image given as mask": (_edit("synth_001_seg.nii.gz", _many_values), []),
    "every mask empty": (_all_empty, []),
    "label without image": (_remove("synth_001.nii.gz"), []),
    "no pairs": (_no_labels, []),
    "unsupported extension only": (_only_jpegs, []),
    "corrupt NRRD": (_corrupt_nrrd, []),
    "absurd --workers": (lambda f: "--workers", ["--workers", "0"]),
    "absurd --val-fraction": (lambda f: "--val-fraction", ["--val-fraction", "1.5"]),
}


def _no_partial_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if ".partial" in p.name]


@pytest.mark.parametrize("case", list(PREPROCESS_CASES))
def test_preprocess_refuses(case, small_raw, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(small_raw, raw)
    breaker, args = PREPROCESS_CASES[case]
    needle = breaker(raw)
    before = checksums(raw)
    assert preprocess.main([str(raw), str(tmp_path / "prep"), "--workers", "1", *args]) == 2
    one_error_line(capsys, needle)
    assert checksums(raw) == before
    assert not (tmp_path / "prep" / "dataset.json").exists()
    if (tmp_path / "prep").exists():
        _no_partial_files(tmp_path / "prep")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_preprocess_refuses_unreadable(small_raw, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(small_raw, raw)
    _unreadable(raw)
    assert preprocess.main([str(raw), str(tmp_path / "prep"), "--workers", "1"]) == 2
    one_error_line(capsys, "synth_001.nii.gz", "permission denied")


def test_missing_input_folder(tmp_path, capsys):
    assert preprocess.main([str(tmp_path / "nowhere"), str(tmp_path / "prep")]) == 2
    one_error_line(capsys, "nowhere")


def test_skip_bad_skips_one_bad_case_and_lists_it(small_raw, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(small_raw, raw)
    (raw / "synth_001.nii.gz").write_bytes(b"")
    assert preprocess.main([str(raw), str(tmp_path / "prep"), "--workers", "1", "--skip-bad"]) == 0
    manifest = json.loads((tmp_path / "prep" / "dataset.json").read_text())
    assert [c["name"] for c in manifest["cases"]] == ["synth_000", "synth_002"]
    assert len(manifest["skipped"]) == 1 and "synth_001.nii.gz" in manifest["skipped"][0]


def test_paths_with_spaces_and_non_ascii_work(small_raw, tmp_path):
    raw = tmp_path / "données brutes é"
    shutil.copytree(small_raw, raw)
    for path in list(raw.iterdir()):
        path.rename(path.with_name(path.name.replace("synth", "scan ü")))
    prep = tmp_path / "préparé 1"
    assert preprocess.main([str(raw), str(prep), "--workers", "1"]) == 0
    names = [c["name"] for c in json.loads((prep / "dataset.json").read_text())["cases"]]
    assert names == ["scan ü_000", "scan ü_001", "scan ü_002"]
    assert (prep / "scan ü_000_image.nii.gz").is_file()


# ---------------------------------------------------------------- infer


def _checkpoint_variant(trained: Path, tmp_path: Path, name: str) -> Path:
    path = tmp_path / "ckpt.pt"
    data = (trained / "best.pt").read_bytes()
    if name == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif name == "empty":
        path.write_bytes(b"")
    elif name == "code-running pickle":
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'pwned'}",))
        path.write_bytes(pickle.dumps({"format": "x", "model": Evil()}))
    elif name == "foreign dict":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif name == "other model shape":
        ckpt = torch.load(trained / "best.pt", weights_only=True)
        ckpt["model_args"] = {**ckpt["model_args"], "channels": [8, 16, 32]}
        save_checkpoint(ckpt, path)
    return path


@pytest.mark.parametrize("variant", ["truncated", "empty", "code-running pickle", "foreign dict",
                                    "other model shape"])
def test_infer_refuses_bad_checkpoints(variant, trained, small_raw, tmp_path, capsys):
    ckpt = _checkpoint_variant(trained, tmp_path, variant)
    before = checksums(tmp_path)
    out = tmp_path / "out"
    assert infer.main([str(small_raw / "synth_000.nii.gz"), "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    one_error_line(capsys, "ckpt.pt")
    assert not (tmp_path / "pwned").exists()
    assert checksums(tmp_path) == before  # nothing written, the checkpoint untouched


def _infer_input(small_raw: Path, tmp_path: Path, name: str) -> tuple[Path, str]:
    if name == "missing":
        return tmp_path / "absent.nii.gz", "absent.nii.gz"
    if name == "unsupported":
        (tmp_path / "scan.jpg").write_bytes(b"\xff\xd8\xff")
        return tmp_path / "scan.jpg", "unsupported"
    path = tmp_path / "scan.nii.gz"
    shutil.copy(small_raw / "synth_000.nii.gz", path)
    if name == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif name == "NaN":
        _edit("scan.nii.gz", _with_nan(np.nan))(tmp_path)
    elif name == "empty folder":
        path.unlink()
        return tmp_path, "no volumes"
    return path, "scan"


@pytest.mark.parametrize("name", ["missing", "unsupported", "truncated", "NaN", "empty folder"])
def test_infer_refuses_bad_inputs(name, trained, small_raw, tmp_path, capsys):
    path, needle = _infer_input(small_raw, tmp_path, name)
    before = checksums(tmp_path)
    out = tmp_path / "out"
    assert infer.main([str(path), "--checkpoint", str(trained / "best.pt"), "--out", str(out)]) == 2
    one_error_line(capsys, needle)
    assert checksums(tmp_path) == before
    assert not out.exists() or not list(out.iterdir())


def test_infer_out_that_is_a_file_is_one_line(trained, small_raw, tmp_path, capsys):
    (tmp_path / "taken").write_bytes(b"mine")
    args = [str(small_raw / "synth_000.nii.gz"), "--checkpoint", str(trained / "best.pt"), "--out",
            str(tmp_path / "taken")]
    assert infer.main(args) == 2
    one_error_line(capsys, "taken", "not a folder")
    assert (tmp_path / "taken").read_bytes() == b"mine"


def test_infer_never_overwrites_without_asking(trained, small_raw, tmp_path, capsys):
    args = [str(small_raw / "synth_000.nii.gz"), "--checkpoint", str(trained / "best.pt"), "--out", str(tmp_path)]
    (tmp_path / "synth_000_mask.nii.gz").write_bytes(b"mine")
    assert infer.main(args) == 2
    one_error_line(capsys, "synth_000_mask.nii.gz", "--overwrite")
    assert (tmp_path / "synth_000_mask.nii.gz").read_bytes() == b"mine"
    assert infer.main([*args, "--overwrite"]) == 0
    assert nib.load(tmp_path / "synth_000_mask.nii.gz").shape == (48, 48, 6)


def test_infer_never_writes_onto_an_input_or_its_truth(trained, small_raw, tmp_path, capsys):
    """The mask of ``scan`` is ``scan_mask``: in the inputs' own folder that is where an LGG-style truth lies, and it
    is refused even with --overwrite."""
    shutil.copy(small_raw / "synth_000.nii.gz", tmp_path / "synth_000.nii.gz")
    shutil.copy(small_raw / "synth_000_seg.nii.gz", tmp_path / "synth_000_mask.nii.gz")
    before = checksums(tmp_path)
    assert infer.main([str(tmp_path / "synth_000.nii.gz"), "--truth", str(tmp_path / "synth_000_mask.nii.gz"),
                       "--checkpoint", str(trained / "best.pt"), "--out", str(tmp_path), "--overwrite"]) == 2
    one_error_line(capsys, "synth_000_mask.nii.gz", "would overwrite an input or truth file")
    assert checksums(tmp_path) == before


def test_infer_resume_keeps_the_masks_written_and_does_the_rest(trained, small_raw, tmp_path):
    inputs = [str(small_raw / f"synth_00{k}.nii.gz") for k in range(3)]
    args = [*inputs, "--checkpoint", str(trained / "best.pt"), "--out", str(tmp_path)]
    assert infer.main(args) == 0
    (tmp_path / "synth_000_mask.nii.gz").write_bytes(b"kept")  # a mask left by the interrupted run
    (tmp_path / "synth_002_mask.nii.gz").unlink()  # the one it never reached
    assert infer.main(args) == 2  # without --resume or --overwrite: refused
    with pytest.raises(InputError, match="--resume keeps the masks written"):  # keep or replace; keep or score
        infer.parse_args([*args, "--resume", "--overwrite"])
    assert infer.main([*args, "--resume"]) == 0
    assert (tmp_path / "synth_000_mask.nii.gz").read_bytes() == b"kept"
    assert nib.load(tmp_path / "synth_002_mask.nii.gz").shape == (48, 48, 6)


def test_mask_targets_of_many_same_named_inputs_keep_their_folders(tmp_path):
    """Thousands of inputs, some sharing a name: each keeps the folders that tell it apart, in one pass."""
    inputs = [Case("scan", tmp_path / f"p{k}" / "scan.nii.gz") for k in range(3000)]
    inputs += [Case(f"s{k}", tmp_path / "flat" / f"s{k}.nii.gz") for k in range(3000)]
    targets = infer.mask_targets(inputs, tmp_path / "out")
    assert len(set(targets)) == len(targets)
    assert targets[7] == tmp_path / "out" / "p7" / "scan_mask.nii.gz"
    assert targets[-1] == tmp_path / "out" / "s2999_mask.nii.gz"


def test_mask_names_stay_inside_the_output_folder(tmp_path):
    assert segmenter.mask_path(Path("/data/../../etc/evil.nii.gz"), tmp_path).parent == tmp_path


# ---------------------------------------------------------------- train


def test_train_never_replaces_a_run_without_asking(prep_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pt").write_bytes(b"last week's model")
    args = ["--data", str(prep_dir), "--output", str(out), "--epochs", "1", *TINY_NET]
    assert train.main(args) == 2
    one_error_line(capsys, "holds a run (model.pt)", "--resume", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["model.pt"] and (out / "model.pt").read_bytes() == b"last week's model"
    assert train.main([*args, "--overwrite"]) == 0
    assert load_checkpoint(out / "model.pt")["epoch"] == 1


def _manifest_variant(prep_dir: Path, tmp_path: Path, name: str) -> tuple[Path, str]:
    data = tmp_path / "prep"
    shutil.copytree(prep_dir, data)
    manifest_path = data / "dataset.json"
    manifest = json.loads(manifest_path.read_text())
    if name == "older version":
        manifest["version"] = 0
    elif name == "path traversal":
        manifest["cases"][0]["prepared_image"] = "../../outside.nii.gz"
    elif name == "prepared file missing":
        (data / manifest["cases"][0]["prepared_label"]).unlink()
    elif name == "truncated prepared volume":
        path = data / manifest["cases"][1]["prepared_image"]
        path.write_bytes(path.read_bytes()[:2000])
        return data, path.name
    elif name == "corrupt JSON":
        manifest_path.write_text("{not json")
        return data, "dataset.json"
    manifest_path.write_text(json.dumps(manifest))
    return data, {"prepared file missing": "_label.nii.gz"}.get(name, "dataset.json")


@pytest.mark.parametrize("name", ["older version", "path traversal", "prepared file missing", "corrupt JSON",
                                  "truncated prepared volume"])
def test_train_refuses_bad_manifests(name, prep_dir, tmp_path, capsys):
    data, needle = _manifest_variant(prep_dir, tmp_path, name)
    before = checksums(data)
    assert train.main(["--data", str(data), "--output", str(tmp_path / "out"), "--epochs", "1", *TINY_NET]) == 2
    one_error_line(capsys, needle)
    assert checksums(data) == before
    assert not (tmp_path / "out" / "last.pt").exists()


ABSURD = [["--epochs", "0"], ["--epochs", "-5"], ["--epochs", "100000000"], ["--lr", "-1"], ["--crop", "0", "96", "96"],
          ["--overlap", "1.0"], ["--batch-size", "0"], ["--strides", "2"]]


@pytest.mark.parametrize("args", ABSURD, ids=lambda a: " ".join(a))
def test_train_refuses_absurd_arguments(args, prep_dir, tmp_path, capsys):
    # the last occurrence of an option wins, so args override TINY_NET's
    assert train.main(["--data", str(prep_dir), "--output", str(tmp_path / "out"), *TINY_NET, *args]) == 2
    one_error_line(capsys, args[0])
    assert not (tmp_path / "out").exists()


def test_resume_needs_a_matching_last_checkpoint(trained, prep_dir, tmp_path, capsys):
    base = ["--data", str(prep_dir), "--output", str(tmp_path), "--epochs", "3", "--resume"]
    assert train.main([*base, *TINY_NET]) == 2
    one_error_line(capsys, "last.pt", "not found")
    shutil.copy(trained / "last.pt", tmp_path / "last.pt")
    wider = [a if a != "4" else "6" for a in TINY_NET]  # channels 6 8 16: another model
    assert train.main([*base, *wider]) == 2
    one_error_line(capsys, "last.pt", "was trained with model")


@pytest.mark.parametrize("case", ["truncated nii.gz", "corrupt NRRD", "affines differ"])
def test_the_real_command_prints_one_line(case, small_raw, tmp_path):
    """Out of process, so that nothing (library warnings, log lines) hides from pytest's capture."""
    raw = tmp_path / "raw"
    shutil.copytree(small_raw, raw)
    PREPROCESS_CASES[case][0](raw)
    proc = subprocess.run([sys.executable, str(ROOT / "preprocess.py"), str(raw), str(tmp_path / "prep"),
                           "--workers", "1"], cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr


def test_permission_denied_is_reported_even_as_root(small_raw, tmp_path, capsys, monkeypatch):
    """Root reads any file, so the refusal itself is exercised by denying access to one path."""
    from imaging import readers

    raw = tmp_path / "raw"
    shutil.copytree(small_raw, raw)
    denied = raw / "synth_001.nii.gz"
    real_access = os.access
    monkeypatch.setattr(readers.os, "access", lambda p, mode: Path(p) != denied and real_access(p, mode))
    assert preprocess.main([str(raw), str(tmp_path / "prep"), "--workers", "1"]) == 2
    one_error_line(capsys, "synth_001.nii.gz", "permission denied")


def test_evaluation_needs_one_mask_per_input(trained, small_raw, tmp_path, capsys):
    args = [str(small_raw / "synth_000.nii.gz"), str(small_raw / "synth_001.nii.gz"), "--truth",
            str(small_raw / "synth_000_seg.nii.gz"), "--checkpoint", str(trained / "best.pt"), "--out", str(tmp_path)]
    assert infer.main(args) == 2
    one_error_line(capsys, "--truth")
    assert not list(tmp_path.iterdir())
