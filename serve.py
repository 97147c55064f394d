"""A web page and an HTTP API in front of infer.py's segmentation: a file in, its mask out in the file's format.

    python serve.py [--checkpoint output] [--host 127.0.0.1] [--port 8000]
    python serve.py                                       # every model train.py wrote into output/ and its folders
    python serve.py --model output --model output_ph2     # several models side by side (a 3D and a 2D one)

``GET /`` is the page (one static file, no internet needed); ``POST /api/segment`` takes one file in the multipart
field ``file`` and answers the mask infer.py would write (or JSON with ``?format=json``); ``GET /api/model``,
``GET /api/health``, ``GET /openapi.json``. With several ``--model``, each upload goes to the first model that
takes its kind (2D or 3D) and channel count.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import hmac
import logging
import re
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from monai.data import MetaTensor
from starlette.exceptions import HTTPException as StarletteHTTPException

from dataset import PrepParams
from imaging.cases import Case, read_case
from imaging.common import ArgumentParser, InputError, run_command
from imaging.readers import (
    IMAGE_2D_SUFFIXES,
    NIFTI_SUFFIXES,
    SITK_SUFFIXES,
    declared_voxels,
    is_2d,
    mask_suffix,
    spacing_mm,
    volume_suffix,
    voxel_size,
    write_mask,
)
from inference import overlays, segmenter

log = logging.getLogger("serve")
STATIC = Path(__file__).resolve().parent / "static"
# .nhdr and .mhd headers name a separate data file: a path chosen by the client, so they are not accepted.
UPLOAD_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".mha", *IMAGE_2D_SUFFIXES, ".zip")
DETACHED_DATA = re.compile(rb"^(data ?file|ElementDataFile)[ \t]*[:=][ \t]*(?=\S)(?!LOCAL\b)", re.I | re.M)
ZIP_MAX_MEMBERS = 2000  # a DICOM series of more slices than this is not what a web upload is for
ZIP_MAX_RATIO = 100  # DICOM compresses 2-10×; 100× and more is a zip bomb


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    checkpoint: Path | tuple[Path, ...] = Path("output")  # as infer.py's --checkpoint: files, or train.py's folder
    device: str = "auto"
    max_upload_mb: float = 512
    max_voxels: int = 2**28  # 1 GiB as float32: a header declaring more is refused before its data is read
    queue_timeout: float = 60.0
    token: str | None = None
    engine: str = "torch"  # onnx: the checkpoint is an infer.py --export-onnx file, run by ONNX Runtime
    # Several models side by side, each as ``checkpoint`` (an upload goes to the first that takes it); when given,
    # ``checkpoint`` is not used.
    models: tuple[tuple[Path, ...], ...] = ()


class RequestError(Exception):
    """A refused request: HTTP ``status`` and a one-line message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- uploads: checked before anything is decoded


def upload_suffix(name: str) -> str:
    """The upload's type from the client's file name (only its suffix is used, never the name as a path)."""
    lower = name.lower()
    suffix = next((s for s in UPLOAD_SUFFIXES if lower.endswith(s)), None)
    if suffix is None:
        raise RequestError(415, f"{name}: unsupported file type (use {', '.join(UPLOAD_SUFFIXES)})")
    return suffix


def check_attached(path: Path) -> None:
    """An NRRD or MHA header may name a separate data file (``data file:``, ``ElementDataFile = other.raw``): a
    path chosen by the client, which SimpleITK would open. Only data inside the upload is accepted."""
    if path.is_dir() or volume_suffix(path) not in SITK_SUFFIXES:
        return
    with path.open("rb") as f:
        header = f.read(64 << 10).split(b"\n\n")[0]  # NRRD: the header ends at a blank line; MHA's is short
    if DETACHED_DATA.search(header):
        raise InputError("header names a separate data file; upload a self-contained .nrrd or .mha")


def extract_series(archive: Path, folder: Path, max_bytes: int) -> Path:
    """The members of a zip of one DICOM series, written as ``folder/00000.dcm`` …: member names are never paths.
    Refuses thousands of members, ``..`` or absolute names and bombs before extracting anything."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir() and not zip_clutter(m.filename)]
            check_zip_members(members, max_bytes)
            folder.mkdir()
            for k, member in enumerate(members):
                with zf.open(member) as src:
                    data = src.read(member.file_size + 1)  # a member longer than it declares is caught here
                if len(data) > member.file_size:
                    raise InputError(f"{member.filename}: longer than its zip entry declares")
                (folder / f"{k:05d}.dcm").write_bytes(data)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as exc:
        raise InputError(f"not a readable zip ({type(exc).__name__}: {str(exc)[:120]})") from None
    return folder


def zip_clutter(name: str) -> bool:
    """A zip member that is no slice: what macOS's Archive Utility adds (``__MACOSX/``, ``._*`` resource forks,
    ``.DS_Store``) and a DICOMDIR index, which names the files rather than holding one."""
    parts = re.split(r"[/\\]", name)
    return "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] in (".DS_Store", "DICOMDIR")


def check_zip_members(members: list[zipfile.ZipInfo], max_bytes: int) -> None:
    """The zip's table of contents against the limits: member count, names, total and ratio of sizes."""
    if not members:
        raise InputError("zip holds no files; zip one DICOM series")
    if len(members) > ZIP_MAX_MEMBERS:
        raise InputError(f"zip holds {len(members)} files, more than {ZIP_MAX_MEMBERS}")
    bad = next((m.filename for m in members
                if m.filename.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", m.filename)), None)
    if bad:
        raise InputError(f"zip member {bad!r} points outside the archive")
    size, packed = sum(m.file_size for m in members), sum(m.compress_size for m in members)
    if size > max_bytes:
        raise InputError(f"zip unpacks to {size} bytes, more than {max_bytes}")
    if size > ZIP_MAX_RATIO * max(packed, 1) and size > 1 << 20:
        raise InputError(f"zip unpacks {size / max(packed, 1):.0f}:1, more than {ZIP_MAX_RATIO}:1 (a zip bomb?)")


def save_upload(src, target: Path, max_bytes: int) -> None:
    """Copy the uploaded stream to ``target``, refusing more than ``max_bytes`` (413)."""
    written = 0
    with target.open("wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > max_bytes:
                raise RequestError(413, f"upload larger than --max-upload-mb ({max_bytes >> 20} MB)")
            out.write(chunk)


# ---------------------------------------------------------------- segmenting one upload


@dataclasses.dataclass
class Result:
    """One segmented upload: the mask file's bytes and name, what the page shows, the model that segmented it."""

    mask_bytes: bytes
    mask_name: str
    mask: np.ndarray  # (X, Y, Z) label values
    affine: np.ndarray
    image: MetaTensor  # (C, X, Y, Z) as the model took it
    seconds: float
    model: Model


class Model:
    """One model (a checkpoint, or an ensemble's checkpoints), loaded once; ``name`` is what clients see of it
    (its files' or folders' names, never a server path)."""

    def __init__(self, specs: Sequence[Path], name: str, config: ServeConfig) -> None:
        self.name = name
        self.paths = segmenter.checkpoint_paths(list(specs))
        self.segmenter = segmenter.load_segmenter(self.paths, config.device, config.engine)
        digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in self.paths]  # an ensemble: of its files'
        self.sha256 = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
        self.labels = [int(v) for v in self.segmenter.ckpt["label_values"]]
        self.in_channels = int(self.segmenter.ckpt["model_args"]["in_channels"])
        self.channel = PrepParams.from_dict(self.segmenter.ckpt["prep_params"]).channel  # of a colour picture

    @property
    def kind(self) -> str:
        """``2d`` for a model of single slices, else ``3d`` (from the data fingerprint, or the window's depth)."""
        ckpt = self.segmenter.ckpt
        dims = ((ckpt.get("plan") or {}).get("fingerprint") or {}).get("dims")
        return dims or ("2d" if is_2d(ckpt["inference"]["window"], prepared=True) else "3d")

    def takes(self) -> str:
        """What the model takes, for messages: ``a 2D model that takes 1 channel(s) (channel 0 of a colour image)``."""
        picked = f" (channel {self.channel} of a colour image)" if self.channel is not None else ""
        return f"a {self.kind.upper()} model that takes {self.in_channels} channel(s){picked}"

    def fit(self, image: MetaTensor) -> MetaTensor | None:
        """``image`` (C, X, Y, Z), read with every channel, as this model reads it (its channel picked, as
        ``read_volume`` picks it); None when the model does not take images of its kind or channels."""
        if image_kind(image) != self.kind:
            return None
        if self.channel is not None:
            if not 0 <= self.channel < image.shape[0]:
                return None
            meta = {k: v for k, v in image.meta.items() if k != "affine"}
            image = MetaTensor(image.as_tensor()[self.channel : self.channel + 1], affine=image.affine, meta=meta)
        return image if image.shape[0] == self.in_channels else None

    def info(self) -> dict:
        """What ``GET /api/model`` answers about this model."""
        ckpt = self.segmenter.ckpt
        return {"name": self.name, "checkpoint": ", ".join(p.name for p in self.paths), "networks": len(self.paths),
                "sha256": self.sha256, "kind": self.kind, "labels": self.labels, "modalities": ckpt.get("channels"),
                "in_channels": self.in_channels, "channel": self.channel, "window": list(self.segmenter.window),
                "overlap": self.segmenter.sliding.overlap,
                "best_dice": ckpt.get("best_dice"), "epoch": ckpt.get("epoch"),
                # validated on cases it also trained on (train.py --train-on-val): a fit, not a held-out figure
                "best_dice_seen": bool(ckpt.get("config", {}).get("train_on_val")),
                "postprocessing": list(self.segmenter.rules), "flips": list(self.segmenter.flips)}

    def write(self, image: MetaTensor, mask: np.ndarray, source: Path, seconds: float, workdir: Path, name: str
              ) -> Result:
        """Postprocess and write the mask exactly as ``infer.run`` does, and read the bytes back."""
        affine = np.asarray(image.affine, dtype=np.float64)
        mask = segmenter.postprocess_unit([mask], [image.affine], list(self.segmenter.rules))[0]
        out = segmenter.mask_path(source, workdir / "out", mask_suffix(source))
        out.parent.mkdir()
        write_mask(mask, affine, out, binary=self.labels == [0, 1], source=source)
        stem = Path(name[:-4] if name.lower().endswith(".zip") else name)
        named = segmenter.mask_path(stem, out.parent, mask_suffix(source)).name  # named after the client's file
        return Result(out.read_bytes(), named, mask, affine, image, seconds, self)


def image_kind(image: MetaTensor) -> str:
    """``2d`` for an image (C, X, Y, Z) one voxel deep (a picture, a single slice), else ``3d``."""
    return "2d" if is_2d(image.shape[1:]) else "3d"


def model_names(specs: Sequence[Sequence[Path]]) -> list[str]:
    """Each model's name: its files' or folders' names (``output``, ``model.pt, best.pt``; never the path, which
    is the server's business), numbered where two would read the same."""
    names = [", ".join(Path(p).resolve().name for p in spec) for spec in specs]
    return [f"{n} ({k + 1})" if names.count(n) > 1 else n for k, n in enumerate(names)]


class Server:
    """The models side by side, each upload routed to the first that takes it; one model pass at a time."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        specs = config.models or ((config.checkpoint,) if isinstance(config.checkpoint, str | Path)
                                  else tuple(config.checkpoint),)
        self.models = [Model(tuple(map(Path, s)), n, config) for s, n in zip(specs, model_names(specs))]
        self.lock = threading.Lock()  # one for all models: one model pass at a time on this machine

    def info(self) -> dict:
        """``GET /api/model``: the first model's fields (as when one model is served), and ``models``: every one."""
        return {**self.models[0].info(), "models": [m.info() for m in self.models]}

    def receive(self, upload, name: str, workdir: Path) -> Path:
        """Save and check one upload inside ``workdir`` (a zip: extracted); the path to read."""
        suffix = upload_suffix(name)
        max_bytes = int(self.config.max_upload_mb * (1 << 20))
        source = workdir / f"upload{suffix}"
        save_upload(upload, source, max_bytes)
        if suffix == ".zip":
            source = extract_series(source, workdir / "series", max_bytes * 4)
        check_attached(source)
        if (declared := declared_voxels(source)) > self.config.max_voxels:
            raise InputError(f"header declares {declared} voxels, more than the server's {self.config.max_voxels}")
        return source

    def route(self, image: MetaTensor) -> tuple[Model, MetaTensor]:
        """The first model that takes ``image`` (C, X, Y, Z), and the image as that model reads it."""
        for model in self.models:
            if (fitted := model.fit(image)) is not None:
                return model, fitted
        what = f"a {image_kind(image).upper()} image of shape {tuple(image.shape[1:])} with {image.shape[0]} channel(s)"
        if len(self.models) == 1:
            raise InputError(f"{what}, for {self.models[0].takes()}")
        raise InputError(f"{what} fits none of the models ({'; '.join(f'{m.name}: {m.takes()}' for m in self.models)})")

    def segment(self, upload, name: str, workdir: Path) -> Result:
        """Save, check and read one upload inside ``workdir``, segment it with the model that takes it; the mask
        as infer.py writes it."""
        source = self.receive(upload, name, workdir)
        model, image = self.route(read_case(Case("upload", source))["image"])  # read once, with every channel
        if not self.lock.acquire(timeout=self.config.queue_timeout):
            raise RequestError(503, f"busy: no model pass free within --queue-timeout {self.config.queue_timeout} s")
        try:
            t0 = time.perf_counter()
            mask = model.segmenter(image, source)
            seconds = time.perf_counter() - t0
        finally:
            self.lock.release()
        return model.write(image, mask, source, seconds, workdir, name)


# ---------------------------------------------------------------- pictures for the page


def sizes(mask: np.ndarray, affine: np.ndarray, labels: list[int]) -> tuple[str, dict[str, dict]]:
    """Unit (``mL`` or ``mm²``) and per foreground label: voxels and amount."""
    unit, per_voxel = voxel_size(mask.shape, affine)
    counts = {v: int((mask == v).sum()) for v in labels[1:]}
    return ({"ml": "mL", "mm2": "mm²"}[unit],
            {str(v): {"voxels": n, "amount": round(n * per_voxel, 4)} for v, n in counts.items()})


def views(image: MetaTensor, mask: np.ndarray, labels: list[int]) -> dict:
    """What a card shows: ``planes`` (original and overlay PNGs through the largest lesion: one for a picture,
    axial, coronal and sagittal for a volume) and for a volume ``slices`` (every axial slice, for the slider)."""
    pixels, (grid,), spacing = overlays.oriented(image, [mask])
    d, h, w = overlays.largest_lesion_centre(grid)
    planes = [{"name": name, "original": overlays.png(overlays.rgb(pixels[cut]), scale),
               "overlay": overlays.png(overlays.blend(overlays.rgb(pixels[cut]), grid[cut[1:]], labels), scale)}
              for name, cut, scale in overlays.cuts(grid.shape, [d, h, w], spacing)]
    out = {"planes": planes, "centre": [d, h, w]}
    if not is_2d(grid.shape, prepared=True):
        out["slices"] = [overlays.png(overlays.blend(overlays.rgb(pixels[:, k]), grid[k], labels))
                         for k in range(grid.shape[0])]
        out["slice"] = d
    return out


def summary(result: Result, name: str, with_views: bool = True) -> dict:
    """``?format=json``'s answer: the model's name, sizes per label, shape, spacing, seconds, overlays, the mask file
    in base64."""
    labels = result.model.labels
    unit, per_label = sizes(result.mask, result.affine, labels)
    names = result.model.segmenter.ckpt.get("label_names") or {}
    legend = [{"value": v, "name": names.get(str(v), f"label {v}"),
               "colour": "#{:02x}{:02x}{:02x}".format(*overlays.COLOURS[k % len(overlays.COLOURS)])}
              for k, v in enumerate(labels[1:])]
    out = {"file": name, "model": result.model.name, "shape": list(result.mask.shape),
           "spacing_mm": spacing_mm(result.affine).round(4).tolist(), "unit": unit, "sizes": per_label,
           "total": round(sum(s["amount"] for s in per_label.values()), 4),
           "seconds": round(result.seconds, 3), "legend": legend, "mask_name": result.mask_name,
           "mask": base64.b64encode(result.mask_bytes).decode("ascii")}
    if with_views:
        out.update(views(result.image, result.mask, labels))
    return out


# ---------------------------------------------------------------- the web application


def display_name(name: str | None) -> str:
    """The client's file name as it may appear in messages and headers: its last part, printable ASCII only."""
    last = re.split(r"[/\\]", name or "upload")[-1]
    return re.sub(r"[^A-Za-z0-9._ -]", "_", last)[:100] or "upload"


def error(status: int, message: str) -> JSONResponse:
    """A refused request: ``{"error": "<one line>"}`` with its status."""
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def create_app(config: ServeConfig):
    """The FastAPI application, with the model loaded (``InputError`` when the checkpoint is not usable)."""
    server = Server(config)
    app = FastAPI(title="MONAI segmentation", version="1", docs_url=None, redoc_url=None)  # Swagger needs a CDN
    app.state.server = server
    limit = int(config.max_upload_mb * (1 << 20))
    app.add_middleware(BodyLimit, limit=limit + (64 << 10))  # a little room for the form around the file
    add_guards(app, config, limit)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/health")
    async def health() -> dict:  # async: answered even while every worker thread waits
        """Liveness: the model is loaded."""
        return {"status": "ok", "busy": server.lock.locked()}

    @app.get("/api/model")
    async def model_info() -> dict:  # async: answered even while every worker thread waits
        """The checkpoint: labels, modalities, 2D or 3D, window, training Dice, its SHA-256."""
        return server.info()

    @app.post("/api/segment", responses={200: {"content": {"application/octet-stream": {}}}})
    def segment(file: Annotated[UploadFile, File()], format: str = "mask"):
        """One image in the field ``file``; the mask in its format (size headers), or JSON with ``?format=json``."""
        return segment_response(server, file, format)

    return app


def add_guards(app, config: ServeConfig, limit: int) -> None:
    """The token and the upload size checked before a body is read; every refusal and failure as one line of
    JSON (a traceback stays in the server's log)."""
    @app.middleware("http")
    async def guard(request: Request, call_next):
        if config.token and not authorised(request, config.token):
            return error(401, "missing or wrong bearer token (Authorization: Bearer …)")
        if int(request.headers.get("content-length") or 0) > limit + (64 << 10):  # refused before it is sent
            return error(413, f"upload larger than --max-upload-mb ({config.max_upload_mb:g} MB)")
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def refused(_request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return error(422, f"{'.'.join(map(str, first.get('loc', [])))}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error(500, f"internal error ({type(exc).__name__})")


def segment_response(server: Server, file: UploadFile, format: str):
    """``POST /api/segment``: the upload segmented in a temporary folder (removed also on error); the mask's bytes
    with size headers, the JSON summary, or a one-line refusal naming the client's file (never a server path)."""
    name = display_name(file.filename)
    if format not in ("mask", "json"):
        return error(422, f"format: {format!r} is not mask or json")
    with tempfile.TemporaryDirectory(prefix="serve-") as tmp:
        try:
            result = server.segment(file.file, name, Path(tmp))
        except RequestError as exc:
            return error(exc.status, str(exc))
        except InputError as exc:  # messages name the temporary file: show the client's name instead
            text = re.sub(re.escape(tmp) + r"[^\s:'\"]*", name, str(exc))
            return error(422, text if text.startswith(name) else f"{name}: {text}")
    if format == "json":
        return summary(result, name)
    unit, per_label = sizes(result.mask, result.affine, result.model.labels)
    total = sum(s["amount"] for s in per_label.values())
    headers = {"Content-Disposition": f'attachment; filename="{result.mask_name}"',
               "X-Segmented-Size": f"{total:.4f}", "X-Segmented-Unit": "mm2" if unit == "mm²" else unit,
               "X-Segmented-Voxels": str(sum(s["voxels"] for s in per_label.values())),
               "X-Model": display_name(result.model.name)}  # which model segmented it
    return Response(result.mask_bytes, media_type="application/octet-stream", headers=headers)


class BodyLimit:
    """ASGI middleware: a body that grows past ``limit`` bytes (a chunked upload has no Content-Length) ends in 413
    while it is being received, before it is all spooled to disk."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise StarletteHTTPException(413, f"upload larger than --max-upload-mb ({self.limit >> 20} MB)")
            return message

        await self.app(scope, limited if scope["type"] == "http" else receive, send)


def authorised(request, token: str) -> bool:
    """``Authorization: Bearer <token>``; the page may also be opened as ``/?token=…`` (a browser cannot send a
    header when it opens an address), and then sends the header itself."""
    given = request.headers.get("authorization", "")
    given = given[7:] if given.lower().startswith("bearer ") else ""
    if not given and request.url.path == "/":
        given = request.query_params.get("token", "")
    return hmac.compare_digest(given.encode(), token.encode())


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(__doc__)
    p.add_argument("--checkpoint", nargs="+", default=None, metavar="CKPT",
                   help="one model, as infer.py's --checkpoint: checkpoint files, or train.py's output folder (its "
                   "model.pt, or the networks cv.json or ensemble.json lists); several are an ensemble "
                   "(default: output)")
    p.add_argument("--model", action="append", type=model_arg, default=None, metavar="CKPT[,CKPT...]",
                   help="instead of --checkpoint, several models side by side: each --model is one model, its "
                   "comma-separated items as --checkpoint's (a,b: an ensemble); an upload goes to the first model "
                   "that takes its kind (2D/3D) and channels, e.g. --model output --model output_ph2")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--engine", choices=["torch", "onnx"], default="torch",
                   help="onnx: --checkpoint is a .onnx file from infer.py --export-onnx, run by ONNX Runtime")
    p.add_argument("--max-upload-mb", type=float, default=512, help="larger uploads are refused (413)")
    p.add_argument("--max-voxels", type=int, default=2**28, help="images whose header declares more are refused")
    p.add_argument("--queue-timeout", type=float, default=60.0,
                   help="seconds a request waits for the model before 503 (one model pass at a time)")
    p.add_argument("--token", default=None, help="require Authorization: Bearer TOKEN on the page and the API")
    p.add_argument("--token-file", default=None, help="… the token read from this file's first line")
    args = p.parse_args(argv)
    if args.model and args.checkpoint:
        p.error("give --checkpoint (one model) or --model (one or several), not both")
    if not args.model and not args.checkpoint:
        args.model = default_models(Path("output"))
    args.checkpoint = args.checkpoint or ["output"]
    if args.token_file:
        try:
            args.token = Path(args.token_file).read_text().strip().splitlines()[0]
        except (OSError, IndexError):
            raise InputError(f"{args.token_file}: cannot read a token from it") from None
    if args.max_upload_mb <= 0 or args.queue_timeout < 0 or args.max_voxels < 1:
        p.error("--max-upload-mb and --max-voxels must be positive, --queue-timeout not negative")
    return args


def default_models(root: Path) -> list[tuple[Path, ...]] | None:
    """What ``python serve.py`` serves with neither option: ``root`` (train.py's default output) and each folder
    right inside it that train.py wrote into (``model.pt``, ``cv.json`` or ``ensemble.json``, e.g. ``output/ph2``),
    side by side, so that the demo's 3D model and a 2D one trained beside it answer the same page; a
    cross-validation's ``fold_K`` and a seed ensemble's ``member_K`` folders belong to their ensemble, not beside
    it. None where ``root`` holds one model or none."""
    def trained(folder: Path) -> bool:
        names = (segmenter.MODELS_RECORD, "model.pt", *segmenter.ENSEMBLE_LISTS)
        return any((folder / name).is_file() for name in names)

    inside = sorted(f for f in root.glob("*") if f.is_dir() and not re.fullmatch(r"(fold|member)_\d+", f.name)
                    and trained(f))
    models = ([(root,)] if trained(root) else []) + [(f,) for f in inside]
    return models if len(models) > 1 else None


def model_arg(text: str) -> tuple[Path, ...]:
    """``--model`` ``a.pt,b.pt`` → its checkpoint files or folders."""
    items = tuple(Path(t) for t in text.split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} names no checkpoint")
    return items


def config_from(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(tuple(map(Path, args.checkpoint)), args.device, args.max_upload_mb, args.max_voxels,
                       args.queue_timeout, args.token, args.engine, tuple(args.model or ()))


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    app = create_app(config_from(args))
    for model in app.state.server.models:
        log.info("model %s: %s (%s)", model.name, " ".join(map(str, model.paths)), model.takes())
    log.info("serving on http://%s:%d/", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
