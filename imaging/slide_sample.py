"""A demonstration slide made of real histology (scikit-image's IHC image).

:func:`make_ihc_slide` lays the real immunohistochemistry image (mirrored so that it
tiles without seams) into an irregular tissue section on off-white glass, and adds a
label and a macro image, as a scanner would. Tests use it, and so does
``python -m commands.slide_cli demo``. :func:`variants` derives the QC test cases: blurred,
colour-shifted, folded, with an air bubble.
"""
from __future__ import annotations

import numpy as np

from imaging.srdata import ihc_image
from imaging.tilesource import ArraySource

GLASS = 242


def _tissue_mask(h: int, w: int, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h / 2, w / 2
    ang = np.arctan2(yy - cy, xx - cx)
    rng = np.random.default_rng(seed)
    wob = 1 + sum(rng.uniform(0.03, 0.08) * np.sin(k * ang + rng.uniform(0, 6.3))
                  for k in (2, 3, 5))
    r = np.hypot((yy - cy) / (0.42 * h), (xx - cx) / (0.45 * w))
    return r < wob


def make_ihc_slide(width: int = 1600, height: int = 1200, *, seed: int = 0,
                   mpp: float = 0.5, label: str = "S26-0042 IHC") -> tuple[np.ndarray, dict]:
    """(RGB slide, associated images) built from the real IHC image."""
    ihc = ihc_image()
    reps_y, reps_x = -(-height // ihc.shape[0]) + 1, -(-width // ihc.shape[1]) + 1
    rows = []
    for i in range(reps_y):
        row = [ihc if j % 2 == 0 else ihc[:, ::-1] for j in range(reps_x)]
        r = np.concatenate(row, axis=1)
        rows.append(r if i % 2 == 0 else r[::-1])
    tissue = np.concatenate(rows, axis=0)[:height, :width]
    mask = _tissue_mask(height, width, seed)
    img = np.full((height, width, 3), GLASS, np.uint8)
    img[mask] = tissue[mask]
    assoc = {"label": _label_image(label), "macro": _macro(img, label)}
    return img, assoc


def _label_image(text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (240, 160), (250, 250, 245))
    d = ImageDraw.Draw(im)
    d.rectangle([4, 4, 235, 155], outline=(40, 40, 40), width=2)
    d.text((14, 20), "MedView pathology", fill=(0, 0, 0))
    d.text((14, 50), text, fill=(0, 0, 0))
    for i in range(20):                      # a bar-code-like pattern
        x = 14 + i * 9
        d.rectangle([x, 100, x + (3 if i % 3 else 6), 140], fill=(0, 0, 0))
    return np.asarray(im)


def _macro(slide: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image

    h, w = slide.shape[:2]
    scale = 200 / h
    body = Image.fromarray(slide).resize((max(1, int(w * scale)), 200))
    lab = Image.fromarray(_label_image(text)).resize((120, 200))
    out = Image.new("RGB", (body.width + 120, 200), (230, 230, 230))
    out.paste(lab, (0, 0))
    out.paste(body, (120, 0))
    return np.asarray(out)


def ihc_slide_source(width: int = 1600, height: int = 1200, **kw) -> ArraySource:
    img, assoc = make_ihc_slide(width, height, **kw)
    src = ArraySource(img, mpp=kw.get("mpp", 0.5), associated=assoc)
    src.source_path = "generated:ihc-slide"
    return src


VARIANTS = ("blurred", "colour-shifted", "folded", "bubble")


def variants(img: np.ndarray, names=VARIANTS) -> dict[str, np.ndarray]:
    """QC test cases of a slide image: blurred, colour-shifted, folded, with a bubble
    (``names``: only those)."""
    from skimage.filters import gaussian

    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    out = {}
    if "blurred" in names:
        out["blurred"] = (gaussian(img, sigma=2.0, channel_axis=2, preserve_range=True)
                          + 0.5).astype(np.uint8)
    if "colour-shifted" in names:
        cast = img.astype(np.float32) * np.array([1.0, 0.97, 0.8], np.float32)
        out["colour-shifted"] = np.clip(cast + 0.5, 0, 255).astype(np.uint8)
    if "folded" in names:
        out["folded"] = _folded(img)
    if "bubble" in names:
        out["bubble"] = _bubble(img)
    return out


def _folded(img: np.ndarray) -> np.ndarray:
    fold = img.copy()
    h, w = img.shape[:2]
    band = slice(int(h * 0.45), int(h * 0.55))
    # tissue folded over: the light goes through twice the tissue (optical density x2)
    t = fold[band].astype(np.float32) / 255.0
    fold[band] = np.clip(t * t * 255.0 + 0.5, 0, 255).astype(np.uint8)
    glass = img[band] >= GLASS - 1
    fold[band][glass] = img[band][glass]
    return fold


def _bubble(img: np.ndarray) -> np.ndarray:
    # an air bubble under the coverslip: a clear disc in the tissue with a dark rim
    h, w = img.shape[:2]
    bub = img.copy()
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - h * 0.5, xx - w * 0.42)
    rad = min(h, w) * 0.08
    bub[r < rad] = GLASS
    bub[(r >= rad) & (r < rad + 4)] = (70, 70, 75)
    return bub
