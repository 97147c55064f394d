"""Shared fixtures: tiny synthetic CT cases, prepared once, trained once (CPU, seconds)."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Real datasets beside the checkout (../shared/data); the tests that read them are skipped where it is absent.
SHARED = ROOT.parent / "shared" / "data"

import preprocess  # noqa: E402
import train  # noqa: E402
import training.optim  # noqa: E402

# 320×320 in-plane so that the downsampling to 256 really happens; depth 8 so that crops are padded.
SYNTH_SHAPE = ["8", "320", "320"]
# The tiny network (train.py's arguments): three levels of 4, 8, 16 channels; validated after every epoch and
# without loader processes (by default both follow from the machine's timings: tests/test_plan.py and
# tests/test_pipeline.py test that).
TINY_WIDTHS = ["--widths", "4", "8", "16", "--strides", "2", "2"]
TINY_NET = [*TINY_WIDTHS, "--num-res-units", "1", "--crop", "8", "64", "64", "--num-samples", "2", "--batch-size", "2",
            "--val-every", "1", "--num-workers", "0", "--device", "cpu"]


@contextlib.contextmanager
def unbiased_start() -> Iterator[None]:
    """Networks trained for a test's one or two epochs start with their output bias at 0 instead of at the labels'
    rarity (``model.set_prior``, tested in test_model.py): from there they would still mark nothing, and the tests
    that use them compare the masks they make (ensemble against one network, ONNX against PyTorch, the server)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.optim, "set_prior", lambda model, shares: None)
        yield


def one_error_line(capsys, *needles: str) -> str:
    """What a refused input prints: exactly one stderr line, ``error: …`` and no traceback, holding every needle
    (the file's name, the problem); returns the line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0], err[0]
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def checksums(folder: Path) -> dict[str, str]:
    """md5 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory) -> Path:
    """Four synthetic CT pairs, written once."""
    folder = tmp_path_factory.mktemp("raw")
    preprocess.make_synthetic(folder, 4, seed=1, shape=tuple(int(s) for s in SYNTH_SHAPE))
    return folder


@pytest.fixture(scope="session")
def prep_dir(raw_dir, tmp_path_factory) -> Path:
    """``raw_dir`` through preprocess.py (two worker processes)."""
    out = tmp_path_factory.mktemp("prep")
    assert preprocess.main([str(raw_dir), str(out), "--workers", "2", "--val-fraction", "0.25"]) == 0
    return out


@pytest.fixture(scope="session")
def trained(prep_dir, tmp_path_factory) -> Path:
    """Output folder of a 2-epoch training run on ``prep_dir``."""
    out = tmp_path_factory.mktemp("output")
    with unbiased_start():
        assert train.main(["--data", str(prep_dir), "--output", str(out), "--epochs", "2", *TINY_NET]) == 0
    return out


@pytest.fixture()
def raw_copy(raw_dir, tmp_path) -> Path:
    """A private copy of the raw cases that a test may alter."""
    dst = tmp_path / "raw"
    shutil.copytree(raw_dir, dst)
    return dst


def restore_prepared_label(prep_dir: Path, case: dict, params_dict: dict):
    """A case's prepared label pushed back through infer's inverse onto its raw image's grid: (1, X, Y, Z)."""
    import nibabel as nib
    import numpy as np
    import torch

    from dataset import PrepParams, prepare_transforms
    from imaging.readers import read_volume
    from inference import segmenter
    from model import to_classes

    params = PrepParams.from_dict(params_dict)
    chain = prepare_transforms(params, with_label=False)
    image = chain({"image": read_volume(case["image"], params.channel)})["image"]
    label = np.asarray(nib.load(prep_dir / case["prepared_label"]).dataobj) > 0
    back = segmenter.invert_to_original(torch.from_numpy(label).float()[None], image, chain)
    return to_classes(back[None])[0]


def grey_disc(rng, size=(90, 120)):
    """A (rows, columns) uint8 grey picture with a darker disc, and the disc's 0/1 mask."""
    import numpy as np

    rows, cols = np.ogrid[: size[0], : size[1]]
    cy, cx, r = rng.uniform(30, 60), rng.uniform(40, 80), rng.uniform(12, 20)
    mask = ((rows - cy) ** 2 + (cols - cx) ** 2 < r * r).astype(np.uint8)
    return np.clip(np.where(mask > 0, 70, 190) + rng.normal(0, 8, size), 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="session")
def trained_2d(tmp_path_factory) -> Path:
    """Output folder of a 1-epoch run of the tiny 2D network on six grey PNG pictures (one channel, so that a
    single-slice NIfTI suits it too); the pictures are in ``<output>/../pics``."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("grey2d")
    pics, prep, out = root / "pics", root / "prep", root / "output"
    pics.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        image, mask = grey_disc(rng)
        Image.fromarray(image).save(pics / f"grey{i}.png")
        Image.fromarray(mask * 255).save(pics / f"grey{i}_mask.png")
    assert preprocess.main([str(pics), str(prep), "--workers", "1"]) == 0
    assert train.main(["--data", str(prep), "--output", str(out), "--epochs", "1", "--device", "cpu",
                       *TINY_WIDTHS, "--num-samples", "2"]) == 0
    return out
