"""Masks in their input's format: each written mask is read back with a library other than the one that wrote it
(Pillow for pictures that SimpleITK wrote, SimpleITK for NIfTI that nibabel wrote, and for NRRD/MHA a reader of the
format written here from its specification) and compared with the true mask of a round trip."""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_NET
from PIL import Image

import infer
import preprocess
import train
from imaging.readers import as_label_map, mask_suffix, read_volume, write_mask

AFFINE = np.array([[-0.8, 0.0, 0.1, 40.0], [0.0, -0.7, 0.0, 20.0], [0.0, 0.05, 2.5, -30.0], [0, 0, 0, 1.0]])


def _nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array in SimpleITK's (k, j, i) order, LPS 4×4 affine) of a NRRD file, read from its text header."""
    raw = path.read_bytes()
    head, _, data = raw.partition(b"\n\n")
    fields = dict(line.split(": ", 1) for line in head.decode().splitlines()[1:] if ": " in line)
    sizes = [int(v) for v in fields["sizes"].split()]
    dtype = {"unsigned char": np.uint8, "uint8": np.uint8, "unsigned short": np.uint16, "short": np.int16,
             "uint16": np.uint16, "int16": np.int16}[fields["type"]]
    data = gzip.decompress(data) if fields["encoding"] in ("gzip", "gz") else data
    array = np.frombuffer(data, dtype=dtype).reshape(sizes[::-1])
    affine = np.eye(4)
    vectors = re.findall(r"\(([^)]*)\)", fields["space directions"])  # one per array axis: direction × spacing
    affine[:3, :3] = np.array([[float(v) for v in vector.split(",")] for vector in vectors]).T
    affine[:3, 3] = [float(v) for v in fields["space origin"].strip("()").split(",")]
    return array, affine


def _mha(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array in (k, j, i) order, LPS 4×4 affine) of a MetaImage file, read from its text header."""
    raw = path.read_bytes()
    end = raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    fields = dict(line.split(" = ", 1) for line in raw[:end].decode().splitlines())
    sizes = [int(v) for v in fields["DimSize"].split()]
    dtype = {"MET_UCHAR": np.uint8, "MET_USHORT": np.uint16, "MET_SHORT": np.int16}[fields["ElementType"]]
    data = zlib.decompress(raw[end:]) if fields.get("CompressedData") == "True" else raw[end:]
    array = np.frombuffer(data, dtype=dtype).reshape(sizes[::-1])
    spacing = np.array([float(v) for v in fields["ElementSpacing"].split()])
    affine = np.eye(4)
    affine[:3, :3] = np.array([float(v) for v in fields["TransformMatrix"].split()]).reshape(3, 3).T * spacing
    affine[:3, 3] = [float(v) for v in fields["Offset"].split()]
    return array, affine


def _volume_mask(rng) -> np.ndarray:
    mask = np.zeros((20, 16, 6), np.uint8)  # (X, Y, Z), not symmetric in any axis
    mask[3:9, 2:12, 1:4] = 1
    mask[14:17, 10:15, 4:6] = 2
    return mask


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_masks_keep_array_and_geometry(tmp_path, suffix):
    mask = _volume_mask(np.random.default_rng(0))
    write_mask(mask, AFFINE, tmp_path / f"m{suffix}", binary=False)
    array, lps = (_nrrd if suffix == ".nrrd" else _mha)(tmp_path / f"m{suffix}")
    assert np.array_equal(array.transpose(2, 1, 0), mask)
    assert np.allclose(np.diag([-1, -1, 1, 1]) @ lps, AFFINE, atol=1e-6)  # back to RAS: the grid we wrote
    # and our own reader gives back the same volume on the same grid
    back = read_volume(tmp_path / f"m{suffix}")
    assert np.array_equal(back[0].numpy(), mask) and np.allclose(np.asarray(back.affine), AFFINE, atol=1e-6)


def test_nifti_mask_reads_the_same_in_simpleitk(tmp_path):
    mask = _volume_mask(np.random.default_rng(1))
    write_mask(mask, AFFINE, tmp_path / "m.nii.gz", binary=False)
    img = sitk.ReadImage(str(tmp_path / "m.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), mask)
    assert np.allclose(np.asarray(img.GetSpacing()), np.linalg.norm(AFFINE[:3, :3], axis=0), atol=1e-5)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_picture_masks_line_up_with_their_picture(tmp_path, suffix):
    """A mask picture read as our reader reads it, written back: Pillow shows the same pixels, rows × columns."""
    rows, cols = np.ogrid[:30, :45]
    truth = (((rows - 8) ** 2 + (cols - 30) ** 2) < 36).astype(np.uint8) * 255  # off-centre: transposes show
    Image.fromarray(truth).save(tmp_path / f"true{suffix}")
    mask = as_label_map(read_volume(tmp_path / f"true{suffix}"), tmp_path / f"true{suffix}")[0].numpy()  # 0/1
    write_mask(mask.astype(np.uint8), np.eye(4), tmp_path / f"pred{suffix}", binary=True)
    written = np.asarray(Image.open(tmp_path / f"pred{suffix}"))
    assert written.shape == (30, 45) and np.array_equal(written, truth)
    # several labels keep their values
    write_mask((mask * 3).astype(np.uint8), np.eye(4), tmp_path / f"multi{suffix}", binary=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / f"multi{suffix}")), (truth > 0) * 3)


def test_mask_format_follows_the_input(tmp_path):
    (tmp_path / "series").mkdir()
    got = {name: mask_suffix(tmp_path / name) for name in ["a.nii", "a.nii.gz", "a.NRRD", "a.nhdr", "a.mhd", "a.mha",
                                                           "a.png", "a.BMP", "a.tiff", "series"]}
    assert got == {"a.nii": ".nii.gz", "a.nii.gz": ".nii.gz", "a.NRRD": ".nrrd", "a.nhdr": ".nrrd", "a.mhd": ".mha",
                   "a.mha": ".mha", "a.png": ".png", "a.BMP": ".bmp", "a.tiff": ".tif", "series": ".nii.gz"}
    assert mask_suffix(tmp_path / "a.png", "nii.gz") == ".nii.gz"


def test_a_volume_cannot_be_a_picture(tmp_path, capsys):
    with pytest.raises(Exception, match="holds one slice"):
        write_mask(np.zeros((4, 4, 3), np.uint8), np.eye(4), tmp_path / "m.png", binary=True)


def test_infer_writes_each_input_in_its_format(prep_dir, trained, raw_dir, tmp_path):
    """NIfTI in, NIfTI out; the same volume as NRRD and MHA gives those formats, on the input's grid, with the mask
    the NIfTI input gets; two inputs of one name in two folders keep their folders instead of colliding."""
    src = raw_dir / "synth_002.nii.gz"
    image = sitk.ReadImage(str(src))
    for name in ("a/scan.nrrd", "b/scan.nrrd", "c/scan.mha"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(tmp_path / name))
    out = tmp_path / "out"
    inputs = [str(src), *(str(tmp_path / n) for n in ("a/scan.nrrd", "b/scan.nrrd", "c/scan.mha"))]
    assert infer.main([*inputs, "--checkpoint", str(trained / "best.pt"), "--out", str(out)]) == 0
    ref = np.asarray(nib.load(out / "synth_002_mask.nii.gz").dataobj)
    nrrd, lps = _nrrd(out / "a" / "scan_mask.nrrd")
    assert np.array_equal(nrrd.transpose(2, 1, 0), ref)
    assert np.allclose(np.diag([-1, -1, 1, 1]) @ lps, nib.load(src).affine, atol=1e-4)
    assert np.array_equal(_nrrd(out / "b" / "scan_mask.nrrd")[0], nrrd)
    assert np.array_equal(_mha(out / "scan_mask.mha")[0], nrrd)  # a unique name stays at the top
    assert infer.main([str(src), "--checkpoint", str(trained / "best.pt"), "--out", str(out), "--format", "mha"]) == 0
    assert np.array_equal(_mha(out / "synth_002_mask.mha")[0], nrrd)


def test_pictures_in_pictures_out(tmp_path):
    """PNG and BMP pictures are segmented into PNG and BMP masks of their own rows × columns, 0/255."""
    rng = np.random.default_rng(5)
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(4):
        rows, cols = np.ogrid[:40, :56]
        disc = ((rows - rng.uniform(12, 28)) ** 2 + (cols - rng.uniform(15, 40)) ** 2) < 64
        image = np.where(disc, 60, 190) + rng.normal(0, 5, disc.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(raw / f"p{i}.{'png' if i % 2 else 'bmp'}")
        Image.fromarray(disc.astype(np.uint8) * 255).save(raw / f"p{i}_mask.png")
    assert preprocess.main([str(raw), str(tmp_path / "prep"), "--workers", "1", "--val-fraction", "0.25"]) == 0
    out = tmp_path / "out"
    assert train.main(["--data", str(tmp_path / "prep"), "--output", str(out), "--epochs", "1", *TINY_NET[:-2],
                       "--device", "cpu"]) == 0
    assert infer.main([str(raw / "p0.bmp"), str(raw / "p1.png"), "--checkpoint", str(out / "best.pt"),
                       "--out", str(out / "masks")]) == 0
    for name in ("p0_mask.bmp", "p1_mask.png"):
        mask = np.asarray(Image.open(out / "masks" / name))
        assert mask.shape == (40, 56) and set(np.unique(mask)) <= {0, 255}
