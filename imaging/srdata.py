"""Histology data for the super-resolution generator: training regions and held-out tiles.

Two real slides, both shipped with the project (no download, ever):

* ``ihc`` — scikit-image's immunohistochemistry image (``skimage.data.immunohistochemistry()``:
  512×512 RGB, a real IHC section, bundled in the scikit-image wheel). Training:
  columns 0–383. Held out: columns 384–511, four 128×128 tiles.
* ``he`` — ``resources/pathology/samples/CMU-1-Small-Region.svs`` (Aperio, H&E skin,
  2220×2967 at 0.499 µm/px, JPEG Q30 tiles; OpenSlide test data, CC0 1.0). Training:
  rows 0–2047. Held out: rows 2304–2966 (a 256-row gap so no training patch touches
  them), cut into 128×128 tiles of which the :data:`HE_HELDOUT_COUNT` most tissue-rich
  ones (at least 60 % tissue, i.e. mean RGB < 200) are scored.

The held-out tiles are never used for training nor for choosing a checkpoint;
:mod:`bench.sr` and the training report score them.

Low-resolution inputs are made by averaging s×s blocks (:func:`imaging.sr.area_downscale`),
which is also how the slide pyramid makes its coarser levels, so the generator learns the
degradation it meets in a low-resolution slide stored by this project.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

TRAIN_COLUMNS = (0, 384)
HELDOUT_COLUMNS = (384, 512)
HELDOUT_TILE = 128
HE_SLIDE = Path(__file__).resolve().parent.parent / "resources" / "pathology" / "samples" \
    / "CMU-1-Small-Region.svs"
HE_TRAIN_ROWS = (0, 2048)
HE_HELDOUT_ROWS = (2304, 2967)
HE_HELDOUT_COUNT = 12
SETS = ("ihc", "he")


def ihc_image() -> np.ndarray:
    """The real IHC image, (512, 512, 3) uint8."""
    from skimage import data

    return data.immunohistochemistry()


@lru_cache(maxsize=1)
def _he_level0() -> np.ndarray:
    import tifffile

    a = tifffile.imread(HE_SLIDE, key=0)
    a.setflags(write=False)
    return a


def he_image() -> np.ndarray:
    """Level 0 of the real H&E slide, (2967, 2220, 3) uint8 (read-only)."""
    return _he_level0()


def training_region() -> np.ndarray:
    """The IHC training columns (kept for callers that want one array)."""
    a, b = TRAIN_COLUMNS
    return ihc_image()[:, a:b]


def training_regions() -> dict[str, np.ndarray]:
    """Every real training region by set name."""
    a, b = HE_TRAIN_ROWS
    return {"ihc": training_region(), "he": he_image()[a:b]}


def tissue_fraction(rgb: np.ndarray) -> float:
    """Share of pixels darker than the bright glass background (mean RGB < 200)."""
    return float((np.asarray(rgb, np.float32).mean(axis=2) < 200).mean())


def heldout_tiles(tile: int = HELDOUT_TILE, which: str = "ihc") -> list[np.ndarray]:
    """The held-out high-resolution tiles (uint8) of one set: ``"ihc"`` (four tiles, top
    to bottom) or ``"he"`` (the most tissue-rich tiles of the held-out rows, in raster
    order)."""
    if which == "ihc":
        a, b = HELDOUT_COLUMNS
        img = ihc_image()
        out = []
        for y in range(0, img.shape[0] - tile + 1, tile):
            for x in range(a, b - tile + 1, tile):
                out.append(img[y:y + tile, x:x + tile].copy())
        return out
    if which != "he":
        raise ValueError(f"unknown held-out set {which!r}; choose from {SETS}")
    img = he_image()
    a, b = HE_HELDOUT_ROWS
    cands = []
    for y in range(a, b - tile + 1, tile):
        for x in range(0, img.shape[1] - tile + 1, tile):
            t = img[y:y + tile, x:x + tile]
            f = tissue_fraction(t)
            if f >= 0.6:
                cands.append((f, y, x))
    best = sorted(cands, key=lambda c: (-c[0], c[1], c[2]))[:HE_HELDOUT_COUNT]
    return [img[y:y + tile, x:x + tile].copy() for _, y, x in sorted(best, key=lambda c: c[1:])]


def psnr(ref: np.ndarray, test: np.ndarray, border: int = 0) -> float:
    """PSNR in dB of uint8-range images, ignoring ``border`` pixels on every side."""
    r = np.asarray(ref, np.float64)
    t = np.asarray(test, np.float64)
    if border:
        r, t = r[border:-border, border:-border], t[border:-border, border:-border]
    mse = float(np.mean((r - t) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def ssim(ref: np.ndarray, test: np.ndarray, border: int = 0) -> float:
    """Mean SSIM over the RGB channels (scikit-image, Gaussian window as Wang et al.)."""
    from skimage.metrics import structural_similarity

    r, t = np.asarray(ref), np.asarray(test)
    if border:
        r, t = r[border:-border, border:-border], t[border:-border, border:-border]
    return float(structural_similarity(r, t, channel_axis=2, data_range=255,
                                       gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))
