"""serve.py's page in a real browser: Playwright driving Debian's chromium (never ``playwright install``, which
downloads a browser). Skipped where chromium is missing; ``.ci/run`` installs it."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

import serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
SCREENSHOT = ROOT / "output" / "serve_page.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(checkpoint: Path):
    """serve.py's app under uvicorn on a free port of 127.0.0.1, in a thread; its address; stopped afterwards."""
    import uvicorn

    app = serve.create_app(serve.ServeConfig(checkpoint, device="cpu"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


@contextlib.contextmanager
def browser_page(url: str):
    """A chromium page at ``url`` (Debian's browser: ``executable_path``) and the list of addresses it requested."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent.startsWith('model ')")
        yield page, requested
        browser.close()
    assert all(u.startswith((url, "data:", "blob:")) for u in requested), requested  # works offline


def segment(page, files: list[str], cards: int) -> list:
    """Choose ``files``, press the button, wait until ``cards`` cards are finished; the cards."""
    page.set_input_files("#files", files)
    page.click("#go")
    page.wait_for_function(f"document.querySelectorAll('.card:not([data-state=working])').length === {cards}",
                           timeout=120_000)
    return page.query_selector_all(".card")


def uploads(pictures: Path, folder: Path) -> dict[str, tuple[int, int]]:
    """Two PNGs, one single-slice NIfTI and one file that is no image; each with the (width, height) of its
    overlay (None: an error card)."""
    nifti = folder / "slice.nii.gz"
    pixels = np.asarray(Image.open(pictures / "grey4.png"), dtype=np.int16)  # rows × columns
    nib.save(nib.Nifti1Image(pixels.T[:, :, None], np.diag([0.8, 0.8, 3.0, 1.0])), nifti)
    (folder / "notes.png").write_text("not a picture")
    return {str(pictures / "grey0.png"): (120, 90), str(pictures / "grey5.png"): (120, 90), str(nifti): (120, 90),
            str(folder / "notes.png"): None}


def test_page_segments_several_files_in_chromium(trained_2d, tmp_path):
    files = uploads(trained_2d.parent / "pics", tmp_path)
    with running(trained_2d / "model.pt") as url, browser_page(url) as (page, _):
        cards = segment(page, list(files), 4)
        assert [c.query_selector("h3").inner_text() for c in cards] == [Path(f).name for f in files]
        for card, (path, size) in zip(cards, files.items()):
            if size is None:  # its own card says what is wrong; the other files went through
                assert card.get_attribute("data-state") == "error"
                assert "notes.png: cannot read" in card.inner_text()
                continue
            assert card.get_attribute("data-state") == "done", card.inner_text()
            overlay = card.query_selector("img.overlay")
            assert overlay.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]") == [True, *size]
            assert "mm²" in card.query_selector(".amount").inner_text()
            with page.expect_download() as info:
                card.query_selector("a.download").click()
            saved = tmp_path / "downloads" / info.value.suggested_filename
            info.value.save_as(saved)
            assert saved.name == f"{Path(path).name.split('.')[0]}_mask{'.png' if path.endswith('.png') else '.nii.gz'}"
            check_mask(saved, size)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_page_shows_a_volume_in_three_planes_with_a_slice_slider(trained, raw_dir, tmp_path):
    source = raw_dir / "synth_002.nii.gz"
    x, y, z = nib.load(source).shape
    with running(trained / "model.pt") as url, browser_page(url) as (page, _):
        (card,) = segment(page, [str(source)], 1)
        assert card.get_attribute("data-state") == "done", card.inner_text()
        captions = [f.inner_text() for f in card.query_selector_all("figcaption")]
        assert captions[:6] == [f"{p} {k}" for p in ("axial", "coronal", "sagittal") for k in ("original", "overlay")]
        sizes = [i.evaluate("i => [i.naturalWidth, i.naturalHeight]") for i in card.query_selector_all("img.overlay")]
        assert sizes[0] == [x, y]  # axial: columns right→left (x), rows anterior→posterior (y)
        assert [s[0] for s in sizes[1:]] == [x, y]  # coronal and sagittal: as wide as the volume along x, y
        slider, slice_img = card.query_selector("input.slider"), card.query_selector("img.slice")
        assert slider.get_attribute("max") == str(z - 1)
        before = slice_img.get_attribute("src")
        slider.evaluate("(s) => { s.value = s.value === '0' ? 1 : 0; s.dispatchEvent(new Event('input')); }")
        assert slice_img.get_attribute("src") != before and "mL" in card.inner_text()
        page.screenshot(path=str(SCREENSHOT.with_name("serve_page_3d.png")), full_page=True)


def check_mask(path: Path, size: tuple[int, int]) -> None:
    """A downloaded mask: a 0/255 PNG of the picture's size, or a NIfTI slice of the input's shape."""
    if path.suffix == ".png":
        mask = Image.open(path)
        assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 255}
    else:
        img = nib.load(path)
        assert img.shape == (*size, 1) and set(np.unique(np.asarray(img.dataobj))) <= {0, 1}
