"""Histology data for the super-resolution generator: training region and held-out tiles.

The only real histology that ships with the project's dependencies is scikit-image's
immunohistochemistry image (``skimage.data.immunohistochemistry()``: 512×512 RGB, a
real IHC slide section, bundled in the wheel, no download). It is split by columns:

* training region: columns 0–383 (the training script samples patches only there);
* held-out region: columns 384–511, cut into four 128×128 tiles that neither training
  nor model selection ever sees; :mod:`bench.sr` and the training report score them.

Low-resolution inputs are made by averaging s×s blocks (:func:`pathology.sr.area_downscale`),
which is also how the slide pyramid makes its coarser levels, so the generator learns the
degradation it meets in a low-resolution slide stored by this project.
"""
from __future__ import annotations

import numpy as np

TRAIN_COLUMNS = (0, 384)
HELDOUT_COLUMNS = (384, 512)
HELDOUT_TILE = 128


def ihc_image() -> np.ndarray:
    """The real IHC image, (512, 512, 3) uint8."""
    from skimage import data

    return data.immunohistochemistry()


def training_region() -> np.ndarray:
    a, b = TRAIN_COLUMNS
    return ihc_image()[:, a:b]


def heldout_tiles(tile: int = HELDOUT_TILE) -> list[np.ndarray]:
    """The held-out high-resolution tiles (uint8), top to bottom."""
    a, b = HELDOUT_COLUMNS
    img = ihc_image()
    out = []
    for y in range(0, img.shape[0] - tile + 1, tile):
        for x in range(a, b - tile + 1, tile):
            out.append(img[y:y + tile, x:x + tile].copy())
    return out


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
