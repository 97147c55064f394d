"""serve.py's HTTP API through FastAPI's TestClient: masks equal infer.py's, and every bad input or abuse is refused
with one line of JSON while the server keeps serving."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import shutil
import struct
import tempfile
import threading
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import grey_disc, one_error_line
from fastapi.testclient import TestClient
from PIL import Image

import infer
import serve
from inference import overlays


def client_for(checkpoint: Path, **overrides) -> TestClient:
    return TestClient(serve.create_app(serve.ServeConfig(checkpoint, device="cpu", **overrides)))


@pytest.fixture(scope="module")
def api_3d(trained) -> TestClient:
    return client_for(trained / "model.pt")


@pytest.fixture(scope="module")
def api_2d(trained_2d) -> TestClient:
    return client_for(trained_2d / "model.pt")


@pytest.fixture(scope="module")
def pictures(trained_2d) -> Path:
    return trained_2d.parent / "pics"


def post(client: TestClient, path: Path, name: str | None = None, fmt: str = "mask", **kwargs):
    return client.post(f"/api/segment?format={fmt}", files={"file": (name or path.name, path.read_bytes())}, **kwargs)


def infer_mask(source: Path, checkpoint: Path, out: Path) -> Path:
    """The mask infer.py writes for ``source``."""
    assert infer.main([str(source), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu"]) == 0
    (mask,) = [p for p in out.iterdir() if p.name.endswith(("_mask.nii.gz", "_mask.png"))]
    return mask


def refused(resp, status: int, *needles: str) -> str:
    """A refusal: the status, one-line JSON ``{"error": …}`` naming the problem, no traceback, no server path."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and "Traceback" not in body["error"], body
    assert "serve-" not in body["error"] and tempfile.gettempdir() not in body["error"], body
    for needle in needles:
        assert needle in body["error"], (needle, body)
    return body["error"]


# ---------------------------------------------------------------- the same masks as infer.py


def test_3d_mask_is_infer_py_s_byte_for_byte(api_3d, trained, raw_dir, tmp_path):
    source = raw_dir / "synth_000.nii.gz"
    resp = post(api_3d, source)
    assert resp.status_code == 200, resp.text
    reference = infer_mask(source, trained / "model.pt", tmp_path)
    assert resp.content == reference.read_bytes()
    mask = np.asarray(nib.load(reference).dataobj)
    voxel_ml = abs(np.linalg.det(nib.load(source).affine[:3, :3])) / 1000
    assert resp.headers["X-Segmented-Unit"] == "mL"
    assert int(resp.headers["X-Segmented-Voxels"]) == int((mask > 0).sum())
    assert float(resp.headers["X-Segmented-Size"]) == pytest.approx((mask > 0).sum() * voxel_ml, abs=1e-3)
    assert resp.headers["content-disposition"] == 'attachment; filename="synth_000_mask.nii.gz"'


def test_2d_png_mask_is_infer_py_s_byte_for_byte(api_2d, trained_2d, pictures, tmp_path):
    resp = post(api_2d, pictures / "grey3.png")
    assert resp.status_code == 200, resp.text
    assert resp.content == infer_mask(pictures / "grey3.png", trained_2d / "model.pt", tmp_path).read_bytes()
    mask = np.asarray(Image.open(io.BytesIO(resp.content)))
    assert mask.shape == (90, 120) and set(np.unique(mask)) <= {0, 255}
    assert resp.headers["X-Segmented-Unit"] == "mm2"
    assert int(resp.headers["X-Segmented-Voxels"]) == int((mask > 0).sum())


def test_zip_of_a_dicom_series_gives_infer_py_s_mask(api_3d, trained, tmp_path):
    from test_dicom import write_series

    from preprocess import synthetic_volume

    image, _ = synthetic_volume(np.random.default_rng(7), (8, 96, 96))
    write_series(image, tmp_path / "study" / "series", "1.2.826.0.1.3680043.2.1125.77")
    archive = tmp_path / "ct.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for dcm in sorted((tmp_path / "study").rglob("*.dcm")):
            zf.write(dcm, dcm.relative_to(tmp_path).as_posix())  # study/series/IM0001.dcm …
            # as macOS zips a folder: a resource fork beside each file, and an index some exports add
            zf.writestr(f"__MACOSX/study/series/._{dcm.name}", b"\x00\x05\x16\x07Mac OS X resource fork")
        zf.writestr("study/.DS_Store", b"Bud1 finder")
        zf.writestr("study/DICOMDIR", b"\x00" * 128 + b"DICM not a slice")
    resp = post(api_3d, archive)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-disposition"] == 'attachment; filename="ct_mask.nii.gz"'
    reference = infer_mask(tmp_path / "study" / "series", trained / "model.pt", tmp_path / "out")
    assert resp.content == reference.read_bytes()
    assert nib.load(reference).shape == (96, 96, 8)
    small = client_for(trained / "model.pt", max_voxels=10_000)  # the slices' headers, read before the series
    refused(post(small, archive), 422, "ct.zip", "declares 73728 voxels")


def test_json_answer_for_a_picture(api_2d, pictures):
    resp = post(api_2d, pictures / "grey1.png", fmt="json")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["file"] == "grey1.png" and body["shape"] == [120, 90, 1] and body["unit"] == "mm²"
    assert body["spacing_mm"] == [1.0, 1.0, 1.0] and body["seconds"] > 0 and body["legend"][0]["value"] == 1
    (plane,) = body["planes"]
    for key in ("original", "overlay"):  # the picture as displayed: 120 columns, 90 rows
        assert Image.open(io.BytesIO(base64.b64decode(plane[key]))).size == (120, 90)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"]))))
    assert body["sizes"]["1"]["voxels"] == int((mask > 0).sum()) == round(body["total"])
    assert "slices" not in body


def test_json_answer_for_a_volume(api_3d, raw_dir):
    body = post(api_3d, raw_dir / "synth_001.nii.gz", fmt="json").json()
    shape = list(nib.load(raw_dir / "synth_001.nii.gz").shape)
    assert body["shape"] == shape and body["unit"] == "mL"
    assert [p["name"] for p in body["planes"]] == ["axial", "coronal", "sagittal"]
    assert len(body["slices"]) == 8 and 0 <= body["slice"] < 8  # one PNG per axial slice for the slider
    mask = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(body["mask"]))).dataobj)
    assert body["sizes"]["1"]["voxels"] == int((mask > 0).sum())


def test_largest_lesion_centre_picks_the_biggest_component():
    grid = np.zeros((6, 20, 20), np.uint8)
    grid[1, 1:3, 1:3] = 1
    grid[3:6, 10:16, 12:18] = 1
    assert overlays.largest_lesion_centre(grid) == [4, 12, 14]  # (12.5 rounds to even)
    assert overlays.largest_lesion_centre(np.zeros((4, 6, 8))) == [2, 3, 4]


def test_four_parallel_requests_all_get_the_right_mask(api_3d, raw_dir):
    sources = [raw_dir / f"synth_{i:03d}.nii.gz" for i in (0, 1, 2, 3)]
    expected = {s.name: post(api_3d, s).content for s in sources}
    answers: dict[str, bytes] = {}

    def ask(source: Path) -> None:
        resp = post(api_3d, source)
        answers[source.name] = resp.content if resp.status_code == 200 else resp.text.encode()

    threads = [threading.Thread(target=ask, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == expected and len(set(expected.values())) == 4


# ---------------------------------------------------------------- the other endpoints


def test_model_health_and_openapi(api_3d, trained):
    info = api_3d.get("/api/model").json()
    assert info["kind"] == "3d" and info["labels"] == [0, 1] and info["in_channels"] == 1
    assert info["sha256"] == hashlib.sha256((trained / "model.pt").read_bytes()).hexdigest()
    assert len(info["window"]) == 3 and isinstance(info["best_dice"], float)
    assert info["best_dice_seen"] is True  # trained with the default: its validation cases trained too
    assert api_3d.get("/api/health").json() == {"status": "ok", "busy": False}
    assert "/api/segment" in api_3d.get("/openapi.json").json()["paths"]
    page = api_3d.get("/")
    assert page.status_code == 200 and "<script>" in page.text and "http" not in page.text.split("<script>")[1]


def test_page_and_api_need_the_token_when_one_is_set(trained, raw_dir):
    api = client_for(trained / "model.pt", token="s3cret")
    refused(api.get("/api/model"), 401, "token")
    refused(api.get("/api/model", headers={"Authorization": "Bearer wrong"}), 401)
    refused(api.get("/"), 401)
    refused(post(api, raw_dir / "synth_000.nii.gz"), 401)
    assert api.get("/api/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert api.get("/?token=s3cret").status_code == 200  # a browser opens the page with the token in the address
    refused(api.get("/api/model?token=s3cret"), 401)  # the API wants the header


def test_busy_model_answers_503_after_the_queue_timeout(trained, raw_dir):
    api = client_for(trained / "model.pt", queue_timeout=0.1)
    lock = api.app.state.server.lock
    lock.acquire()
    try:
        refused(post(api, raw_dir / "synth_000.nii.gz"), 503, "busy")
    finally:
        lock.release()
    assert post(api, raw_dir / "synth_000.nii.gz").status_code == 200


def test_client_file_names_are_never_paths(api_2d, pictures, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resp = post(api_2d, pictures / "grey2.png", name="../../etc/evil\r\nX-Bad: 1.png")
    assert resp.status_code == 200
    assert "\n" not in resp.headers["content-disposition"] and "/" not in resp.headers["content-disposition"]
    assert "x-bad" not in resp.headers and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- bad input and abuse


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` × ``height`` grey pixels and holds only one row's worth of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
            + chunk(b"IEND", b""))


def nifti_declaring(shape: tuple[int, ...]) -> bytes:
    """A NIfTI header declaring ``shape`` (float32) followed by a few bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    return header.binaryblock + b"\0" * 4 + b"\0" * 64


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def truncated_nifti(raw_dir: Path) -> bytes:
    data = gzip.decompress((raw_dir / "synth_000.nii.gz").read_bytes())
    return gzip.compress(data[: len(data) // 3])


def rgb_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# (name, file name, content(raw_dir, pictures), status, words the error holds) for the 2D model
BAD_2D = [
    ("not an image", "notes.png", lambda r, p: b"my notes, not a picture\n", 422, ["notes.png", "cannot read"]),
    ("unsupported type", "report.pdf", lambda r, p: b"%PDF-1.4", 415, ["report.pdf", "unsupported file type"]),
    ("wrong channel count", "colour.png", lambda r, p: rgb_png(), 422, ["colour.png", "3 channel", "takes 1"]),
    ("3D volume to a 2D model", "vol.nii.gz", lambda r, p: (r / "synth_000.nii.gz").read_bytes(), 422,
     ["vol.nii.gz", "3D image", "2D model"]),
    ("PNG decompression bomb", "bomb.png", lambda r, p: png_header(40000, 40000), 422,
     ["bomb.png", "declares over", "decompression bomb"]),
    ("NIfTI declaring too many voxels", "huge.nii", lambda r, p: nifti_declaring((4000, 4000, 4000)), 422,
     ["huge.nii", "declares 64000000000"]),
    ("truncated NIfTI", "cut.nii.gz", lambda r, p: truncated_nifti(r), 422, ["cut.nii.gz", "cannot read"]),
    ("zip of thousands of files", "many.zip", lambda r, p: zip_of({f"{k}.dcm": b"x" for k in range(2500)}), 422,
     ["many.zip", "2500 files"]),
    ("zip with ../ names", "escape.zip", lambda r, p: zip_of({"ok.dcm": b"x", "../../escape.dcm": b"x"}), 422,
     ["escape.zip", "outside the archive"]),
    ("zip bomb", "bomb.zip", lambda r, p: zip_of({"a.dcm": b"\0" * (40 << 20)}), 422, ["bomb.zip", "zip bomb"]),
    ("NRRD naming a separate data file", "detached.nrrd",
     lambda r, p: b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: ../../etc/passwd\n\n",
     422, ["detached.nrrd", "separate data file"]),
    ("MHA naming a separate data file", "detached.mha",
     lambda r, p: b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
                  b"ElementDataFile = /etc/passwd\n", 422, ["detached.mha", "separate data file"]),
    ("detached header type", "scan.mhd", lambda r, p: b"ObjectType = Image\n", 415, ["scan.mhd", "unsupported"]),
    ("zip that is not a zip", "junk.zip", lambda r, p: b"PK\x03\x04 not really", 422, ["junk.zip", "not a readable"]),
]


@pytest.mark.parametrize("case", BAD_2D, ids=[c[0] for c in BAD_2D])
def test_bad_input_is_refused_and_the_server_keeps_serving(case, api_2d, raw_dir, pictures, tmp_path, monkeypatch):
    _, name, content, status, needles = case
    data = content(raw_dir, pictures)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # every temporary file of the request lands here
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("extracted a refused zip"))
    if "declar" in " ".join(needles):
        monkeypatch.setattr(serve, "read_case", lambda *a, **k: pytest.fail("decoded a refused image"))
    resp = api_2d.post("/api/segment", files={"file": (name, data)})
    refused(resp, status, *needles)
    monkeypatch.undo()
    assert post(api_2d, pictures / "grey0.png").status_code == 200  # the next good request succeeds
    assert not list(tmp_path.iterdir())  # temporary files removed, also on error


def test_self_contained_nrrd_and_mha_are_accepted(api_3d, trained, raw_dir, tmp_path):
    """A volume re-saved as NRRD and MHA (data inside the file) is segmented as infer.py segments it."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(raw_dir / "synth_003.nii.gz"))
    for suffix in (".nrrd", ".mha"):
        source = tmp_path / f"scan{suffix}"
        sitk.WriteImage(image, str(source), True)
        resp = post(api_3d, source)
        assert resp.status_code == 200, resp.text
        assert infer.main([str(source), "--checkpoint", str(trained / "model.pt"), "--out", str(tmp_path / "out"),
                           "--device", "cpu"]) == 0
        assert resp.content == (tmp_path / "out" / f"scan_mask{suffix}").read_bytes()


def test_a_2d_picture_to_a_3d_model(api_3d, pictures):
    refused(post(api_3d, pictures / "grey0.png"), 422, "grey0.png", "2D image", "3D model")


def test_upload_over_the_limit_is_413(trained, raw_dir):
    api = client_for(trained / "model.pt", max_upload_mb=0.05)
    refused(api.post("/api/segment", files={"file": ("big.nii.gz", b"\0" * (200 << 10))}), 413, "max-upload-mb")

    def chunked():  # no Content-Length: counted as it arrives
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.nii"\r\n\r\n'
        for _ in range(40):
            yield b"\0" * (10 << 10)
    resp = api.post("/api/segment", content=chunked(), headers={"Content-Type": "multipart/form-data; boundary=x"})
    refused(resp, 413, "max-upload-mb")
    assert post(api, raw_dir / "synth_000.nii.gz").status_code == 413  # 1.3 MB: over this server's 0.05 MB
    assert api.get("/api/health").status_code == 200


def test_missing_file_field_and_bad_format(api_2d, pictures):
    refused(api_2d.post("/api/segment", files={"other": ("a.png", b"x")}), 422, "file")
    refused(post(api_2d, pictures / "grey0.png", fmt="xml"), 422, "format")


def test_grey_disc_fixture_matches_its_mask():
    """The 2D test pictures: the disc is darker than the background (what the tiny model learns)."""
    image, mask = grey_disc(np.random.default_rng(0))
    assert image[mask > 0].mean() < 100 < image[mask == 0].mean()


def test_command_line_errors_are_one_line(capsys, tmp_path):
    assert serve.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    one_error_line(capsys, "missing.pt", "checkpoint not found")
    assert serve.main(["--max-upload-mb", "0"]) == 2
    one_error_line(capsys, "--max-upload-mb")


def test_an_ensemble_is_served_as_infer_py_runs_it(trained, raw_dir, tmp_path):
    """An ensemble of two checkpoints (model.pt and best.pt) gives the mask infer.py gives with both."""
    ckpts = (trained / "model.pt", trained / "best.pt")
    api = TestClient(serve.create_app(serve.ServeConfig(ckpts, device="cpu")))
    info = api.get("/api/model").json()
    assert info["networks"] == 2 and info["checkpoint"] == "model.pt, best.pt"
    resp = post(api, raw_dir / "synth_002.nii.gz")
    assert resp.status_code == 200, resp.text
    assert infer.main([str(raw_dir / "synth_002.nii.gz"), "--checkpoint", *map(str, ckpts), "--out", str(tmp_path),
                       "--device", "cpu"]) == 0
    assert resp.content == (tmp_path / "synth_002_mask.nii.gz").read_bytes()


def test_token_file_and_options_make_the_config(tmp_path, capsys):
    token = tmp_path / "token.txt"
    token.write_text("s3cret\n")
    config = serve.config_from(serve.parse_args(["--token-file", str(token), "--max-upload-mb", "8", "--engine",
                                                 "onnx", "--queue-timeout", "5"]))
    assert (config.token, config.max_upload_mb, config.engine, config.queue_timeout) == ("s3cret", 8, "onnx", 5)
    (tmp_path / "empty.txt").write_text("")
    assert serve.main(["--token-file", str(tmp_path / "empty.txt")]) == 2
    one_error_line(capsys, "empty.txt", "cannot read a token")


# ---------------------------------------------------------------- several models side by side


@pytest.fixture(scope="module")
def api_both(trained, trained_2d) -> TestClient:
    """The tiny 3D model and the tiny 2D one in one server, as ``--model <3D folder> --model <2D folder>``."""
    return TestClient(serve.create_app(serve.ServeConfig(models=((trained,), (trained_2d,)), device="cpu")))


def test_each_upload_goes_to_the_model_that_takes_it(api_both, trained, trained_2d, raw_dir, pictures, tmp_path):
    """A volume to the 3D model and a picture to the 2D one, each mask infer.py's with that model's checkpoint."""
    for source, ckpt, name in ((raw_dir / "synth_001.nii.gz", trained, trained.name),
                               (pictures / "grey2.png", trained_2d, trained_2d.name)):
        resp = post(api_both, source)
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-Model"] == name
        assert resp.content == infer_mask(source, ckpt / "model.pt", tmp_path / name).read_bytes()
        assert post(api_both, source, fmt="json").json()["model"] == name


def test_model_info_lists_every_model(api_both, trained, trained_2d):
    info = api_both.get("/api/model").json()
    assert [(m["name"], m["kind"], m["in_channels"]) for m in info["models"]] == [
        (trained.name, "3d", 1), (trained_2d.name, "2d", 1)]
    assert {k: v for k, v in info.items() if k != "models"} == info["models"][0]  # the first, as with one model
    assert info["sha256"] == hashlib.sha256((trained / "model.pt").read_bytes()).hexdigest()


def test_a_file_that_fits_no_model_is_refused(api_both, trained, trained_2d, pictures, tmp_path):
    source = tmp_path / "colour.png"
    source.write_bytes(rgb_png())
    refused(post(api_both, source), 422, "colour.png", "2D image", "3 channel(s) fits none of the models",
            f"{trained.name}: a 3D model that takes 1", f"{trained_2d.name}: a 2D model that takes 1")
    assert post(api_both, pictures / "grey0.png").status_code == 200  # the next good request succeeds


def test_each_model_reads_its_own_channel(trained, trained_2d, pictures, tmp_path):
    """A model trained on one channel of colour pictures (``--channel 0``) takes an RGB picture, read as infer.py
    reads it with that checkpoint; a grey picture still goes to the first model that takes it."""
    ckpt = torch.load(trained_2d / "model.pt", map_location="cpu", weights_only=True)
    ckpt["prep_params"]["channel"] = 0
    (tmp_path / "red").mkdir()
    torch.save(ckpt, tmp_path / "red" / "model.pt")
    models = ((trained,), (trained_2d / "model.pt",), (tmp_path / "red",))
    api = TestClient(serve.create_app(serve.ServeConfig(models=models, device="cpu")))
    colour = tmp_path / "colour.png"
    colour.write_bytes(rgb_png())
    resp = post(api, colour)
    assert resp.status_code == 200 and resp.headers["X-Model"] == "red", resp.text
    assert resp.content == infer_mask(colour, tmp_path / "red" / "model.pt", tmp_path / "out").read_bytes()
    assert post(api, pictures / "grey1.png").headers["X-Model"] == "model.pt"
    assert api.get("/api/model").json()["models"][2]["channel"] == 0


def test_model_option_makes_models_and_excludes_checkpoint(tmp_path, capsys):
    config = serve.config_from(serve.parse_args(["--model", "output", "--model", "a.pt,b.pt"]))
    assert config.models == ((Path("output"),), (Path("a.pt"), Path("b.pt")))
    assert serve.config_from(serve.parse_args([])).checkpoint == (Path("output"),) and not serve.parse_args([]).model
    assert serve.main(["--model", "output", "--checkpoint", "output"]) == 2
    one_error_line(capsys, "--checkpoint", "--model", "not both")
    assert serve.main(["--model", ","]) == 2
    one_error_line(capsys, "--model", "names no checkpoint")
    assert serve.model_names([(Path("a/output"),), (Path("b/output"),), (Path("x.pt"), Path("y.pt"))]) == [
        "output (1)", "output (2)", "x.pt, y.pt"]


def test_plain_serve_takes_every_model_train_py_wrote_into_output(tmp_path, monkeypatch):
    """``python serve.py`` with no option: output/ and the folders inside it that hold a trained model (the demo's
    3D model and a PH2 model in output/ph2, say) side by side; a cross-validation's folds stay its ensemble."""
    root = tmp_path / "output"
    for folder in ("", "ph2", "fold_0", "notes"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for folder in ("", "ph2", "fold_0"):
        (root / folder / "model.pt").write_bytes(b"")
    (root / "bench").mkdir()
    (root / "bench" / "cv.json").write_text("{}")
    assert serve.default_models(root) == [(root,), (root / "bench",), (root / "ph2",)]
    monkeypatch.chdir(tmp_path)
    args = serve.parse_args([])
    assert args.model == [(Path("output"),), (Path("output/bench"),), (Path("output/ph2"),)]
    assert serve.parse_args(["--checkpoint", "output"]).model is None  # one model, as asked
    for folder in ("ph2", "bench"):
        shutil.rmtree(root / folder)
    assert serve.default_models(root) is None and serve.parse_args([]).checkpoint == ["output"]
