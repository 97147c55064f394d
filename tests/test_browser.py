"""serve.py's page in a real browser: Playwright driving Debian's chromium (never ``playwright install``, which
downloads a browser), through the helpers of benchmarks/serve_screenshot.py. Skipped where chromium is missing;
``.ci/run`` installs it."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

sys.path.insert(0, str(ROOT / "benchmarks"))

import serve_screenshot  # noqa: E402
from serve_screenshot import CHROMIUM, browser_page, running, segment  # noqa: E402

import serve  # noqa: E402

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
SCREENSHOT = ROOT / "output" / "serve_page.png"


def uploads(pictures: Path, folder: Path) -> dict[str, tuple[int, int] | None]:
    """Two PNGs, one single-slice NIfTI and one file that is no image; each with the (width, height) of its
    overlay (None: an error card)."""
    nifti = folder / "slice.nii.gz"
    pixels = np.asarray(Image.open(pictures / "grey4.png"), dtype=np.int16)  # rows × columns
    nib.save(nib.Nifti1Image(pixels.T[:, :, None], np.diag([0.8, 0.8, 3.0, 1.0])), nifti)
    (folder / "notes.png").write_text("not a picture")
    return {str(pictures / "grey0.png"): (120, 90), str(pictures / "grey5.png"): (120, 90), str(nifti): (120, 90),
            str(folder / "notes.png"): None}


def check_mask(path: Path, size: tuple[int, int]) -> None:
    """A downloaded mask: a 0/255 PNG of the picture's size, or a NIfTI slice of the input's shape."""
    if path.suffix == ".png":
        mask = Image.open(path)
        assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 255}
    else:
        img = nib.load(path)
        assert img.shape == (*size, 1) and set(np.unique(np.asarray(img.dataobj))) <= {0, 1}


def test_page_segments_several_files_in_chromium(trained_2d, tmp_path):
    files = uploads(trained_2d.parent / "pics", tmp_path)
    config = serve.ServeConfig(trained_2d / "model.pt", device="cpu")
    with running(config) as url, browser_page(url) as (page, requested):
        cards = segment(page, list(files))
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
    assert all(u.startswith((url, "data:", "blob:")) for u in requested), requested  # works offline


def test_page_shows_a_volume_in_three_planes_with_a_slice_slider(trained, raw_dir, tmp_path):
    source = raw_dir / "synth_002.nii.gz"
    x, y, z = nib.load(source).shape
    with running(serve.ServeConfig(trained / "model.pt", device="cpu")) as url, browser_page(url) as (page, _):
        (card,) = segment(page, [str(source)])
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


def test_page_sends_a_volume_and_two_pictures_to_the_models_that_take_them(trained, trained_2d, raw_dir, tmp_path):
    """Issue 15's done-when with the tiny models: a 3D and a 2D model side by side; the demo-like volume and two
    pictures each get a card naming the model that segmented it, and a mask to download."""
    pics, volume = trained_2d.parent / "pics", raw_dir / "synth_002.nii.gz"
    files = {str(volume): trained.name, str(pics / "grey1.png"): trained_2d.name,
             str(pics / "grey3.png"): trained_2d.name}
    config = serve.ServeConfig(models=((trained,), (trained_2d,)), device="cpu")
    with running(config) as url, browser_page(url) as (page, _):
        header = page.inner_text("#model")
        assert f"model {trained.name} (model.pt, 3D" in header and f"model {trained_2d.name} (model.pt, 2D" in header
        cards = segment(page, list(files))
        for card, (path, model) in zip(cards, files.items()):
            assert card.get_attribute("data-state") == "done", card.inner_text()
            assert card.query_selector(".which").inner_text() == f"model: {model}"
            with page.expect_download() as info:
                card.query_selector("a.download").click()
            saved = tmp_path / info.value.suggested_filename
            info.value.save_as(saved)
            if path.endswith(".png"):
                assert "mm²" in card.inner_text()
                check_mask(saved, (120, 90))
            else:
                assert "mL" in card.inner_text() and len(card.query_selector_all("img.overlay")) == 3
                assert nib.load(saved).shape == nib.load(volume).shape


def test_screenshot_command(trained, raw_dir, tmp_path, capsys):
    out = tmp_path / "page.png"
    assert serve_screenshot.main(["--checkpoint", str(trained / "model.pt"), str(raw_dir / "synth_003.nii.gz"),
                                  "--out", str(out)]) == 0
    assert Image.open(out).width == 1400 and "synth_003.nii.gz" in capsys.readouterr().out
