"""Pictures of a mask over its image: the planes through the largest lesion, as the web page shows them and as
``infer.py --overlays`` writes them (one place for the orientation, the intensity scaling, the cuts and the colours)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation
from scipy import ndimage

from dataset import ORIENTATION
from imaging.common import atomic_write
from imaging.readers import is_2d, spacing_mm

# One per foreground label (blue first, as the PH2 service showed lesions), RGB.
COLOURS = [(30, 90, 255), (255, 140, 0), (0, 200, 80), (230, 0, 200), (255, 230, 0), (0, 220, 230), (170, 90, 40)]
ALPHA = 0.45


def oriented(image: MetaTensor, masks: Sequence[np.ndarray | None]) -> tuple[np.ndarray, list, np.ndarray]:
    """Image (C, D, H, W) scaled to [0, 1] and each mask (D, H, W) as the network sees them (D, H, W = inferior→
    superior, anterior→posterior, right→left; a picture as displayed), and the spacing (D, H, W) in mm."""
    orient = Orientation(axcodes=ORIENTATION, labels=(("L", "R"), ("P", "A"), ("I", "S")))
    img = orient(MetaTensor(image.as_tensor(), affine=image.affine))
    grids = [None if m is None else
             np.asarray(orient(MetaTensor(torch.from_numpy(m.astype(np.int16))[None], affine=image.affine)))[0]
             for m in masks]
    pixels = np.asarray(img, dtype=np.float32)
    lo, hi = np.percentile(pixels, [0.5, 99.5], axis=(1, 2, 3), keepdims=True)
    return np.clip((pixels - lo) / np.maximum(hi - lo, 1e-6), 0, 1), grids, spacing_mm(img.affine)


def largest_lesion_centre(grid: np.ndarray) -> list[int]:
    """(d, h, w) centre of the largest connected foreground component, or of the volume when there is none."""
    components, n = ndimage.label(grid > 0)
    if n == 0:
        return [s // 2 for s in grid.shape]
    biggest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(grid), components, range(1, n + 1))))
    return [int(round(c)) for c in np.argwhere(components == biggest).mean(0)]


def cuts(shape: Sequence[int], centre: Sequence[int], spacing: Sequence[float]) -> list[tuple[str, tuple, float]]:
    """(name, index into (C, D, H, W), height stretch) of the planes through ``centre``: the axial one, and for a
    volume the coronal and sagittal ones, superior up and to scale."""
    d, h, w = centre
    every = slice(None)
    planes = [("axial", (every, d, every, every), spacing[1] / spacing[2])]
    if not is_2d(shape, prepared=True):
        planes += [("coronal", (every, slice(None, None, -1), h, every), spacing[0] / spacing[2]),
                   ("sagittal", (every, slice(None, None, -1), every, w), spacing[0] / spacing[1])]
    return planes


def rgb(pixels: np.ndarray) -> np.ndarray:
    """(C, h, w) in [0, 1] → (h, w, 3) uint8: colour pictures stay in colour, one channel is grey."""
    grey = pixels if pixels.shape[0] == 3 else np.repeat(pixels[:1], 3, axis=0)
    return (np.moveaxis(grey, 0, -1) * 255).round().astype(np.uint8)


def blend(picture: np.ndarray, labels2d: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """The picture (h, w, 3) with each foreground label as a semi-transparent colour."""
    out = picture.astype(np.float32)
    for k, value in enumerate(labels[1:]):
        where = labels2d == value
        out[where] = (1 - ALPHA) * out[where] + ALPHA * np.asarray(COLOURS[k % len(COLOURS)], np.float32)
    return out.round().astype(np.uint8)


def outline(picture: np.ndarray, labels2d: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """The picture (h, w, 3) with each foreground label's border drawn in its colour (the truth, over a prediction)."""
    out = picture.copy()
    for k, value in enumerate(labels[1:]):
        region = labels2d == value
        out[region & ~ndimage.binary_erosion(region)] = COLOURS[k % len(COLOURS)]
    return out


def stretched(picture: np.ndarray, height_scale: float = 1.0) -> PIL.Image.Image:
    """(h, w, 3) uint8 as an image stretched in height by ``height_scale`` (thick slices shown to scale)."""
    img = PIL.Image.fromarray(picture)
    if abs(height_scale - 1) > 0.01:
        img = img.resize((img.width, max(1, round(img.height * height_scale))), PIL.Image.Resampling.NEAREST)
    return img


def png(picture: np.ndarray, height_scale: float = 1.0) -> str:
    """Base64 PNG of (h, w, 3) uint8, stretched in height by ``height_scale``."""
    buf = io.BytesIO()
    stretched(picture, height_scale).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_overlay(image: MetaTensor, mask: np.ndarray, truth: np.ndarray | None, labels: Sequence[int],
                  path: Path) -> None:
    """PNG of the image (C, X, Y, Z) with the predicted mask as a translucent colour and the truth as an outline,
    side by side: the planes through the largest lesion (the prediction's, else the truth's)."""
    pixels, (grid, true_grid), spacing = oriented(image, [mask, truth])
    centre = largest_lesion_centre(grid if grid.any() or true_grid is None else true_grid)
    tiles = []
    for _, cut, scale in cuts(grid.shape, centre, spacing):
        tile = blend(rgb(pixels[cut]), grid[cut[1:]], labels)
        if true_grid is not None:
            tile = outline(tile, true_grid[cut[1:]], labels)
        tiles.append(stretched(tile, scale))
    sheet = PIL.Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), max(t.height for t in tiles)))
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        sheet.save(tmp, format="PNG")
