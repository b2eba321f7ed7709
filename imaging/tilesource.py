"""Slide readers behind one tile-source interface (OpenSeadragon's TileSource pattern).

:class:`TileSource` holds the pyramid geometry — level sizes, downsamples, native tile
size, microns per pixel, associated images (label, macro, thumbnail) — and reads RGB
regions. Each format subclass says how well it recognises an input (:meth:`score`,
0 = not at all) and :func:`open_slide` picks the best one, naming every reader it tried
and why each declined when none fits (the pydicom pixel-backend pattern).

Readers
-------
``TiffSource``      tiled / pyramidal TIFF through tifffile: Aperio SVS (JPEG or J2K
                    tiles; label, macro and thumbnail), OME-TIFF (sub-IFD levels),
                    generic pyramidal TIFF, any tiled TIFF; reads only the TIFF tiles a
                    region touches. As OpenSlide: only tiled images are levels (Aperio's
                    strip thumbnail is an associated image), a level's downsample is the
                    mean of its width and height ratios. Microns per pixel from the SVS
                    description (``MPP =``), or from X/YResolution. Preferred to
                    OpenSlide for SVS and OME-TIFF, so they open the same way whether
                    OpenSlide is installed or not (tests/test_pathology_real_slide.py
                    compares the two on a real Aperio slide: identical pixels).
``DicomWsiSource``  DICOM VL Whole Slide Microscopy images (a folder of instances, one
                    per level, TILED_FULL or TILED_SPARSE — tiles a sparse scan does not
                    hold read white), any transfer syntax pydicom decodes; frames are
                    located once at open, so a truncated file is refused then with a
                    :class:`SlideFormatError`; LABEL / OVERVIEW / THUMBNAIL instances
                    become associated images. Pixel Spacing gives the microns per pixel.
``OpenSlideSource`` vendor formats (MRXS, NDPI, SCN, VMS, BIF, DICOM...) when
                    openslide-python and its library are installed; otherwise it declines
                    with the reason.
``PlainImageSource`` plain images (PNG, JPEG, BMP, untiled TIFF) and numpy arrays
                    (:class:`ArraySource`): a 2× pyramid is derived on demand.

Coordinates: ``read_region(level, x, y, w, h)`` takes pixel coordinates *of that level*;
parts outside the image come back white (slide background).
"""
from __future__ import annotations

import logging
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("medview.pathology")

BACKGROUND = 255


class SlideFormatError(ValueError):
    """No reader can open the input, or the input is damaged (with the reason)."""


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float
    tile_width: int = 0          # native tile size (0: untiled / unknown)
    tile_height: int = 0


def block_mean(img: np.ndarray, f: int) -> np.ndarray:
    """Mean of f×f blocks (uint8 in, uint8 out, rounded); a ragged edge block averages
    the pixels it has. A power-of-two ``f`` is applied as repeated halving, so reducing
    by 4 in one step or by 2 twice (level by level, or through a native level) gives the
    same pixels, bit for bit."""
    if f == 1:
        return img
    if f & (f - 1) == 0:
        while f > 1:
            img = _mean_blocks(img, 2)
            f //= 2
        return img
    return _mean_blocks(img, f)


def _mean_blocks(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape[:2]
    if f == 2 and img.dtype == np.uint8:
        # integer sums of the four strided quarters (about 10× faster than a float
        # reshape-mean, same pixels: floor(sum / 4 + 0.5)); an odd last row / column is
        # repeated, which for 2×2 blocks is exactly the mean of what the block holds
        if h % 2 or w % 2:
            img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        a = img.astype(np.uint16)
        s = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
        return ((s + 2) >> 2).astype(np.uint8)
    ph, pw = -h % f, -w % f
    a = img.astype(np.float32)
    if not (ph or pw):
        a = a.reshape(h // f, f, w // f, f, a.shape[2]).mean(axis=(1, 3))
        return (a + 0.5).astype(np.uint8)
    # ragged edge: sum what the block holds, divide by how many pixels that is
    a = np.pad(a, ((0, ph), (0, pw), (0, 0)))
    n = np.pad(np.ones((h, w), np.float32), ((0, ph), (0, pw)))
    s = a.reshape(a.shape[0] // f, f, a.shape[1] // f, f, a.shape[2]).sum(axis=(1, 3))
    n = n.reshape(n.shape[0] // f, f, n.shape[1] // f, f).sum(axis=(1, 3))
    return (s / n[:, :, None] + 0.5).astype(np.uint8)


def _rgb(a: np.ndarray) -> np.ndarray:
    """Any grey / RGB / RGBA array as (H, W, 3) uint8 (alpha composited on white)."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.max(initial=0) <= 1.0:
            a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
        else:
            hi = 65535 if a.dtype == np.uint16 else max(1, int(a.max(initial=1)))
            a = (a.astype(np.float64) * (255.0 / hi) + 0.5).clip(0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        a = (a[:, :, :3] * alpha + BACKGROUND * (1 - alpha) + 0.5).astype(np.uint8)
    elif a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] > 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a[:, :, :3])


class TileSource:
    """Base class: pyramid geometry plus region reads. Subclasses fill ``levels`` (level
    0 first, growing downsample), ``mpp``, ``associated`` and implement
    :meth:`_read_level`."""

    name = "base"
    levels: list[Level]
    mpp: tuple[float, float] | None = None
    objective_power: float | None = None

    def __init__(self) -> None:
        self.levels = []
        self.associated: dict[str, np.ndarray] = {}
        self.properties: dict[str, str] = {}
        self.acquired_at: str | None = None
        self.source_path: str | None = None

    # -------------------------------------------------------------- recognition
    @classmethod
    def score(cls, path: Path) -> tuple[float, str]:
        """(confidence 0..1, reason) that this reader can open ``path``."""
        return 0.0, "not implemented"

    # ---------------------------------------------------------------- geometry
    @property
    def width(self) -> int:
        return self.levels[0].width

    @property
    def height(self) -> int:
        return self.levels[0].height

    @property
    def level_count(self) -> int:
        return len(self.levels)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The most reduced level whose downsample does not exceed ``downsample``."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * 1.001:
                best = i
        return best

    def describe(self) -> dict:
        return {"reader": self.name, "width": self.width, "height": self.height,
                "levels": [[lv.width, lv.height, lv.downsample] for lv in self.levels],
                "mpp": list(self.mpp) if self.mpp else None,
                "objective_power": self.objective_power,
                "associated": sorted(self.associated), "acquired_at": self.acquired_at}

    # ------------------------------------------------------------------ reading
    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of level ``level`` at (x, y); outside = white."""
        if not 0 <= level < len(self.levels):
            raise IndexError(f"level {level} out of range (0-{len(self.levels) - 1})")
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        lv = self.levels[level]
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(lv.width, x + w), min(lv.height, y + h)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._read_level(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def read_scaled(self, downsample: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Region of the image reduced by the integer ``downsample`` (coordinates in
        that reduced image), read from the nearest native level and block-averaged
        (:func:`block_mean`: only pixels inside the level are averaged)."""
        lvl = self.best_level_for_downsample(downsample)
        ds = self.levels[lvl].downsample
        f = downsample / ds
        fi = int(round(f))
        if abs(f - fi) < 1e-3 and fi >= 1:
            if fi == 1:
                return self.read_region(lvl, x, y, w, h)
            # only the pixels inside the level are averaged: the last row / column of
            # an odd-sized level is the mean of what it covers, not blended with white
            lv = self.levels[lvl]
            out = np.full((h, w, 3), BACKGROUND, np.uint8)
            x0, y0 = max(0, x * fi), max(0, y * fi)
            x1, y1 = min(lv.width, (x + w) * fi), min(lv.height, (y + h) * fi)
            if x1 > x0 and y1 > y0:
                r = block_mean(self._read_level(lvl, x0, y0, x1 - x0, y1 - y0), fi)
                ox, oy = x0 // fi - x, y0 // fi - y
                out[oy:oy + r.shape[0], ox:ox + r.shape[1]] = r
            return out
        # non-integer ratio between levels (e.g. 4.0003 in a vendor file): resample
        from skimage.transform import resize

        sx, sy = int(math.floor(x * f)), int(math.floor(y * f))
        sw, sh = max(1, int(math.ceil((x + w) * f)) - sx), max(1, int(math.ceil((y + h) * f)) - sy)
        region = self.read_region(lvl, sx, sy, sw, sh)
        return (resize(region, (h, w), order=1, anti_aliasing=True, preserve_range=True)
                + 0.5).astype(np.uint8)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def thumbnail(self, max_side: int = 512) -> np.ndarray:
        d = 1
        while max(self.width, self.height) / d > max_side:
            d *= 2
        return self.read_scaled(d, 0, 0, -(-self.width // d), -(-self.height // d))

    def close(self) -> None:
        pass

    def __enter__(self) -> "TileSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- arrays
class ArraySource(TileSource):
    """A slide held in memory (plain images, tests); a 2× pyramid is derived lazily."""

    name = "array"

    def __init__(self, rgb: np.ndarray, mpp: float | tuple[float, float] | None = None, *,
                 associated: dict[str, np.ndarray] | None = None) -> None:
        super().__init__()
        base = _rgb(rgb)
        self._data = [base]
        h, w = base.shape[:2]
        ds = 1
        self.levels = [Level(w, h, 1.0)]
        while max(w, h) > 512:
            ds *= 2
            w, h = -(-w // 2), -(-h // 2)
            self.levels.append(Level(w, h, float(ds)))
        if mpp is not None:
            self.mpp = (float(mpp), float(mpp)) if np.isscalar(mpp) else tuple(map(float, mpp))
        self.associated = dict(associated or {})
        self._lock = threading.Lock()

    @classmethod
    def score(cls, path: Path) -> tuple[float, str]:
        return 0.0, "arrays are opened directly, not from files"

    def _level_array(self, level: int) -> np.ndarray:
        with self._lock:
            while len(self._data) <= level:
                self._data.append(block_mean(self._data[-1], 2))
            return self._data[level]

    def _read_level(self, level, x, y, w, h):
        return self._level_array(level)[y:y + h, x:x + w]


class PlainImageSource(ArraySource):
    """A plain image file (PNG, JPEG, BMP, GIF, untiled TIFF) read whole."""

    name = "image"
    SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        import imageio.v3 as iio

        try:
            img = iio.imread(str(path))
        except Exception as e:  # noqa: BLE001 - imageio raises many kinds
            raise SlideFormatError(f"cannot read image {path}: {e}") from e
        if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[2] not in (3, 4):
            img = np.moveaxis(img, 0, 2)
        super().__init__(img, mpp)
        self.source_path = str(path)

    @classmethod
    def score(cls, path: Path) -> tuple[float, str]:
        if path.is_file() and path.suffix.lower() in cls.SUFFIXES:
            return 0.2, "a plain image (read whole)"
        return 0.0, f"not a plain image file ({path.suffix or 'no suffix'})"


# --------------------------------------------------------------------------- TIFF
_SVS_MPP = re.compile(r"MPP\s*=\s*([0-9.]+)")
_SVS_MAG = re.compile(r"AppMag\s*=\s*([0-9.]+)")
_SVS_DATE = re.compile(r"Date\s*=\s*([0-9/]+)\s*\|\s*Time\s*=\s*([0-9:]+)")


class TiffSource(TileSource):
    """Tiled / pyramidal TIFF (SVS, OME-TIFF, generic) through tifffile."""

    name = "tiff"

    def __init__(self, path: str | Path, cache_tiles: int = 256) -> None:
        super().__init__()
        import tifffile

        self.source_path = str(path)
        try:
            self._tif = tifffile.TiffFile(str(path))
        except Exception as e:  # noqa: BLE001
            raise SlideFormatError(f"cannot open TIFF {path}: {e}") from e
        tif = self._tif
        series = tif.series[0]
        self._pages = []
        for lv in (series.levels if hasattr(series, "levels") else [series]):
            page = lv.keyframe if hasattr(lv, "keyframe") else lv.pages[0]
            # tifffile counts a strip image of a smaller size as a level of a generic
            # TIFF; OpenSlide reads only tiled images as levels (a strip image there is
            # a thumbnail or overview), and so does this reader
            if self._pages and self._pages[0].is_tiled and not page.is_tiled:
                continue
            self._pages.append(page)
        # some writers store the pyramid as separate series with the same aspect ratio;
        # as OpenSlide's generic TIFF reader, only tiled images can be levels: a strip
        # image of the same shape is a thumbnail / overview, not a level
        if len(self._pages) == 1 and len(tif.series) > 1 and self._pages[0].is_tiled:
            base = self._pages[0]
            for s in tif.series[1:]:
                p = s.keyframe
                if (s.name or "").lower() in ("label", "macro", "thumbnail") or not p.is_tiled:
                    continue
                if p.imagewidth < self._pages[-1].imagewidth and abs(
                        p.imagewidth / base.imagewidth - p.imagelength / base.imagelength) < 0.01:
                    self._pages.append(p)
        w0, h0 = self._pages[0].imagewidth, self._pages[0].imagelength
        # downsample as OpenSlide reports it: the mean of the width and height ratios
        self.levels = [Level(p.imagewidth, p.imagelength,
                             (w0 / p.imagewidth + h0 / p.imagelength) / 2,
                             p.tilewidth or 0, p.tilelength or 0) for p in self._pages]
        self._lock = threading.Lock()
        self._tiles: OrderedDict = OrderedDict()
        self._cache_tiles = cache_tiles
        desc = self._pages[0].description or ""
        self.properties["description"] = desc[:2000]
        if tif.is_svs or desc.startswith("Aperio"):
            # as OpenSlide: the text before the first "|" is the comment, then key = value
            for item in desc.split("|")[1:]:
                k, eq, v = item.partition("=")
                if eq and k.strip():
                    self.properties[f"aperio.{k.strip()}"] = v.strip()
            m = _SVS_MPP.search(desc)
            if m:
                self.mpp = (float(m.group(1)),) * 2
            m = _SVS_MAG.search(desc)
            if m:
                self.objective_power = float(m.group(1))
            m = _SVS_DATE.search(desc)
            if m:
                mo, d, y = m.group(1).split("/")
                y = int(y) + (2000 if int(y) < 100 else 0)
                self.acquired_at = f"{y:04d}-{int(mo):02d}-{int(d):02d}T{m.group(2)}"
        if self.mpp is None:
            self.mpp = self._resolution_mpp(self._pages[0])
        for s in tif.series:
            nm = (s.name or "").lower()
            if nm in ("label", "macro", "thumbnail"):
                try:
                    self.associated[nm] = _rgb(s.asarray())
                except Exception as e:  # noqa: BLE001
                    log.warning("cannot read the %s image of %s: %s", nm, path, e)
        if self.acquired_at is None:
            dt = self._pages[0].tags.get("DateTime")
            if dt is not None and isinstance(dt.value, str) and len(dt.value) >= 19:
                v = dt.value
                self.acquired_at = f"{v[0:4]}-{v[5:7]}-{v[8:10]}T{v[11:19]}"

    @staticmethod
    def _resolution_mpp(page) -> tuple[float, float] | None:
        try:
            xr, yr = page.tags["XResolution"].value, page.tags["YResolution"].value
            unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
        except KeyError:
            return None
        per = {2: 25400.0, 3: 10000.0}.get(unit)     # µm per inch / per cm
        if per is None:
            return None
        vals = []
        for r in (xr, yr):
            num, den = r if isinstance(r, tuple) else (r, 1)
            if not num:
                return None
            vals.append(per * den / num)
        if not all(0.01 < v < 100 for v in vals):
            return None
        return vals[0], vals[1]

    @classmethod
    def score(cls, path: Path) -> tuple[float, str]:
        if not path.is_file():
            return 0.0, "not a file"
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic[:2] not in (b"II", b"MM"):
            return 0.0, "no TIFF header"
        try:
            import tifffile

            with tifffile.TiffFile(str(path)) as t:
                p = t.pages[0]
                tiled = bool(p.is_tiled)
                levels = len(getattr(t.series[0], "levels", [None]))
                svs, ome = t.is_svs, t.is_ome
        except Exception as e:  # noqa: BLE001
            return 0.0, f"tifffile cannot read it: {e}"
        # ahead of OpenSlide (0.85) for the formats this reader knows, so the same reader
        # opens an SVS whether openslide-python is installed or not
        if tiled and svs:
            return 0.9, f"Aperio SVS ({levels} level{'s' if levels > 1 else ''})"
        if tiled and ome:
            return 0.9, f"OME-TIFF ({levels} level{'s' if levels > 1 else ''})"
        if tiled and levels > 1:
            return 0.9, "pyramidal tiled TIFF"
        if tiled:
            return 0.7, "tiled TIFF (one level)"
        return 0.4, "untiled TIFF (read by strips)"

    def _segment(self, level: int, index: int) -> np.ndarray | None:
        key = (level, index)
        with self._lock:
            if key in self._tiles:
                self._tiles.move_to_end(key)
                return self._tiles[key]
            page = self._pages[level]
            fh = self._tif.filehandle
            off, n = page.dataoffsets[index], page.databytecounts[index]
            data = None
            if n:
                fh.seek(off)
                data = fh.read(n)
        seg, _idx, _shape = page.decode(data, index, jpegtables=page.jpegtables)
        if seg is not None:
            seg = seg.reshape(seg.shape[-3:])
        return self._remember(key, seg)

    def _remember(self, key, seg):
        with self._lock:
            self._tiles[key] = seg
            while len(self._tiles) > self._cache_tiles:
                self._tiles.popitem(last=False)
        return seg

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        """One TIFF tile as RGB; separate colour planes (PlanarConfiguration 2) joined."""
        page = self._pages[level]
        if int(page.planarconfig) == 2 and page.samplesperpixel > 1:
            per = len(page.dataoffsets) // page.samplesperpixel
            planes = [self._segment(level, s * per + index) for s in range(min(3, page.samplesperpixel))]
            if any(p is None for p in planes):
                return None
            return _rgb(np.concatenate([p[..., :1] for p in planes], axis=2))
        seg = self._segment(level, index)
        return None if seg is None else _rgb(seg)

    def _read_level(self, level, x, y, w, h):
        page = self._pages[level]
        if not page.is_tiled:
            # strips: read the page once and keep it as a level array
            with self._lock:
                arr = self._tiles.get(("whole", level))
            if arr is None:
                arr = _rgb(page.asarray())
                with self._lock:
                    self._tiles[("whole", level)] = arr
            return arr[y:y + h, x:x + w]
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                seg = self._tile(level, ty * across + tx)
                if seg is None:
                    continue
                sx0, sy0 = tx * tw, ty * th
                ax0, ay0 = max(x, sx0), max(y, sy0)
                ax1 = min(x + w, sx0 + seg.shape[1], page.imagewidth)
                ay1 = min(y + h, sy0 + seg.shape[0], page.imagelength)
                if ax1 > ax0 and ay1 > ay0:
                    out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = seg[ay0 - sy0:ay1 - sy0, ax0 - sx0:ax1 - sx0]
        return out

    def close(self) -> None:
        self._tif.close()


# --------------------------------------------------------------------------- DICOM WSI
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _has_dicm(path: Path) -> bool:
    """The DICOM file preamble: "DICM" at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


class _WsiInstance:
    """One DICOM WSI instance: its header (no pixels) and where each frame lies in the
    file, found once at open by seeking over the pixel data items — so reading a tile is
    one read and one decode, and a truncated or damaged file is refused at open."""

    def __init__(self, path: Path, ds, pixel_pos: int) -> None:
        self.path, self.ds = path, ds
        try:
            self.matrix = (int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows))
            self.tile = (int(ds.Columns), int(ds.Rows))
            self.nframes = int(getattr(ds, "NumberOfFrames", 1) or 1)
            self.ts = ds.file_meta.TransferSyntaxUID
            spp = int(ds.SamplesPerPixel)
            bits = int(ds.BitsAllocated)
            self.opts = {"pixel_keyword": "PixelData", "rows": self.tile[1],
                         "columns": self.tile[0], "samples_per_pixel": spp,
                         "bits_allocated": bits, "bits_stored": int(ds.BitsStored),
                         "pixel_representation": int(getattr(ds, "PixelRepresentation", 0)),
                         "photometric_interpretation": str(ds.PhotometricInterpretation),
                         "number_of_frames": 1}
            if spp > 1:
                self.opts["planar_configuration"] = int(getattr(ds, "PlanarConfiguration", 0))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise SlideFormatError(f"{path}: an incomplete whole-slide instance ({e}); "
                                   "truncated or damaged?") from e
        if min(self.matrix + self.tile) < 1:
            raise SlideFormatError(f"{path}: empty total pixel matrix or tile size")
        self.concatenation = str(getattr(ds, "ConcatenationUID", "") or "")
        self.frame_offset = int(getattr(ds, "ConcatenationFrameOffsetNumber", 0) or 0)
        self.frames = self._locate_frames(pixel_pos)

    def _locate_frames(self, pixel_pos: int) -> list | None:
        """Native: (offset, length) of each frame. Encapsulated: the fragments
        [(offset, length), ...] of each frame. None: leave it to pydicom (deflated or
        big-endian data, several fragments per frame without an offset table)."""
        import struct

        path, ts, n = self.path, self.ts, self.nframes
        if ts.is_deflated or not ts.is_little_endian:
            return None
        size = path.stat().st_size
        with open(path, "rb") as fp:
            fp.seek(pixel_pos)
            head = fp.read(8)
            if len(head) < 8 or struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010):
                raise SlideFormatError(f"{path}: no pixel data where the header ends (byte "
                                       f"{pixel_pos} of {size}): truncated or damaged")
            if ts.is_implicit_VR:
                length, start = struct.unpack("<I", head[4:8])[0], pixel_pos + 8
            else:
                ext = fp.read(4)
                if len(ext) < 4:
                    raise SlideFormatError(f"{path}: truncated in the pixel data header")
                length, start = struct.unpack("<I", ext)[0], pixel_pos + 12
            if not ts.is_encapsulated:
                o = self.opts
                per = o["rows"] * o["columns"] * o["samples_per_pixel"] * (o["bits_allocated"] // 8)
                if o["photometric_interpretation"] == "YBR_FULL_422":
                    per = per * 2 // 3
                have = min(length, size - start)
                if length == 0xFFFFFFFF or have < n * per:
                    raise SlideFormatError(
                        f"{path}: truncated pixel data: {max(0, have)} of the {n * per} bytes "
                        f"of {n} frames of {o['columns']}×{o['rows']}")
                return [(start + i * per, per) for i in range(n)]
            items, pos = [], start
            while True:
                fp.seek(pos)
                h = fp.read(8)
                if len(h) < 8:
                    raise SlideFormatError(
                        f"{path}: truncated pixel data: the file ends after {len(items) - 1} "
                        f"fragments of {n} frames (no sequence delimiter)")
                g, e, ln = struct.unpack("<HHI", h)
                if (g, e) == (0xFFFE, 0xE0DD):
                    break
                if (g, e) != (0xFFFE, 0xE000) or ln == 0xFFFFFFFF:
                    raise SlideFormatError(f"{path}: damaged pixel data: ({g:04X},{e:04X}) at "
                                           f"byte {pos} where a fragment item should be")
                if pos + 8 + ln > size:
                    raise SlideFormatError(
                        f"{path}: truncated pixel data: fragment {len(items)} needs "
                        f"{ln} bytes at {pos + 8}, the file ends at {size}")
                items.append((pos + 8, ln))
                pos += 8 + ln
            if not items:
                raise SlideFormatError(f"{path}: damaged pixel data: no offset table item")
            bot, frags = items[0], items[1:]
            if len(frags) == n:
                return [[fr] for fr in frags]
            if n == 1 and frags:
                return [frags]
            offsets = None
            if "ExtendedOffsetTable" in self.ds:
                offsets = np.frombuffer(self.ds.ExtendedOffsetTable, "<u8").tolist()
            elif bot[1]:
                fp.seek(bot[0])
                offsets = np.frombuffer(fp.read(bot[1]), "<u4").tolist()
            if len(frags) < n or offsets is None:
                if len(frags) < n:
                    raise SlideFormatError(f"{path}: {len(frags)} fragments for {n} frames: "
                                           "truncated or damaged pixel data")
                return None
            first = frags[0][0] - 8
            starts = {first + o: i for i, o in enumerate(offsets)}
            out: list[list] = [[] for _ in range(n)]
            cur = -1
            for off, ln in frags:
                cur = starts.get(off - 8, cur)
                if cur < 0:
                    raise SlideFormatError(f"{path}: the offset table does not match the fragments")
                out[cur].append((off, ln))
            if any(not f for f in out):
                raise SlideFormatError(f"{path}: the offset table names frames without data")
            return out

    def decode(self, index: int) -> np.ndarray:
        from pydicom.pixels import get_decoder, pixel_array

        if not 0 <= index < self.nframes:
            raise SlideFormatError(f"{self.path}: frame {index} of {self.nframes} does not exist")
        try:
            if self.frames is None:
                return pixel_array(str(self.path), index=index)
            with open(self.path, "rb") as fp:
                parts = []
                for off, ln in (self.frames[index] if self.ts.is_encapsulated
                                else [self.frames[index]]):
                    fp.seek(off)
                    parts.append(fp.read(ln))
            data = b"".join(parts)
            if self.ts.is_encapsulated:
                from pydicom.encaps import encapsulate

                data = encapsulate([data])
            arr, _meta = get_decoder(self.ts).as_array(data, index=0, **self.opts)
            return arr
        except SlideFormatError:
            raise
        except Exception as e:  # noqa: BLE001 - decoders raise many kinds
            raise SlideFormatError(f"{self.path}: frame {index} cannot be decoded "
                                   f"({self.ts.name}): {e}") from e


class _WsiLevel:
    """The instances of one level (several when the level is a concatenation) and, for
    TILED_SPARSE, which frame holds each tile."""

    def __init__(self, parts: list[_WsiInstance]) -> None:
        self.parts = sorted(parts, key=lambda p: p.frame_offset)
        first = self.parts[0]
        self.width, self.height = first.matrix
        self.tw, self.th = first.tile
        self.across = -(-self.width // self.tw)
        self.down = -(-self.height // self.th)
        self.positions: dict[tuple[int, int], tuple[int, int]] | None = None
        sparse = [DicomWsiSource._frame_positions(p.ds) for p in self.parts]
        if any(s is not None for s in sparse):
            self.positions = {}
            for k, s in enumerate(sparse):
                for key, i in (s or {}).items():
                    self.positions.setdefault(key, (k, i))
            bad = [key for key in self.positions if not (0 <= key[0] < self.across
                                                         and 0 <= key[1] < self.down)]
            if bad:
                raise SlideFormatError(f"{first.path}: frames outside the total pixel matrix "
                                       f"(tile column, row {bad[0]})")
        else:
            total = sum(p.nframes for p in self.parts)
            if total < self.across * self.down:
                raise SlideFormatError(
                    f"{first.path}: TILED_FULL needs {self.across}×{self.down} = "
                    f"{self.across * self.down} frames, the instance holds {total}")

    def locate(self, col: int, row: int) -> tuple[_WsiInstance, int] | None:
        if self.positions is not None:
            at = self.positions.get((col, row))
            return None if at is None else (self.parts[at[0]], at[1])
        n = row * self.across + col
        for p in reversed(self.parts):
            if n >= p.frame_offset:
                return (p, n - p.frame_offset) if n - p.frame_offset < p.nframes else None
        return None


class DicomWsiSource(TileSource):
    """DICOM VL Whole Slide Microscopy Image instances (a folder, or one file).

    One instance per level (the parts of a concatenation are joined); TILED_FULL frames
    are in row-major tile order, TILED_SPARSE frames are placed by their position in the
    total pixel matrix, and tiles a sparse instance does not hold read as background
    (white), as OpenSlide and wsidicom read them. Several focal planes or optical paths:
    the first is read. A truncated or damaged instance raises :class:`SlideFormatError`
    naming the file, at open or (a frame that does not decode) at the read."""

    name = "dicom-wsi"

    def __init__(self, path: str | Path, cache_frames: int = 256) -> None:
        super().__init__()
        import pydicom

        p = Path(path)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        vols: list[_WsiInstance] = []
        damaged: list[str] = []
        for f in files:
            try:
                with open(f, "rb") as fp:
                    ds = pydicom.dcmread(fp, stop_before_pixels=True)
                    pixel_pos = fp.tell()
            except Exception as e:  # noqa: BLE001 - not DICOM: skipped in a folder
                if p.is_file():
                    raise SlideFormatError(f"{f}: not a readable DICOM file: {e}") from e
                if _has_dicm(f):
                    damaged.append(f"{f}: a DICOM file pydicom cannot read ({e})")
                continue
            if str(getattr(ds, "SOPClassUID", "")) != WSI_SOP_CLASS:
                if "SOPClassUID" not in ds and _has_dicm(f):
                    damaged.append(f"{f}: a DICOM file without SOP Class UID (truncated?)")
                continue
            kind = (list(getattr(ds, "ImageType", [])) + ["", "", ""])[2].upper()
            if kind in ("LABEL", "OVERVIEW", "THUMBNAIL"):
                name = {"OVERVIEW": "macro"}.get(kind, kind.lower())
                try:
                    self.associated[name] = _rgb(pydicom.dcmread(str(f)).pixel_array)
                except Exception as e:  # noqa: BLE001
                    log.warning("cannot decode the %s image %s: %s", name, f, e)
                continue
            vols.append(_WsiInstance(f, ds, pixel_pos))
        if not vols:
            raise SlideFormatError(f"no DICOM whole-slide (VOLUME) instances in {path}"
                                   + (f"; damaged: {'; '.join(damaged)}" if damaged else ""))
        vols.sort(key=lambda v: (-v.matrix[0], v.frame_offset, str(v.path)))
        # one level per matrix size: its first instance and that instance's concatenation
        # parts (further focal planes / optical paths in instances of their own: ignored)
        self._levels: list[_WsiLevel] = []
        by_size: dict[tuple[int, int], list[_WsiInstance]] = {}
        for v in vols:
            group = by_size.get(v.matrix)
            if group is None:
                by_size[v.matrix] = [v]
            elif v.concatenation and v.concatenation == group[0].concatenation:
                group.append(v)
        for matrix, group in by_size.items():
            self._levels.append(_WsiLevel(group))
        self._inst = [(lv.parts[0].path, lv.parts[0].ds) for lv in self._levels]
        w0, h0 = self._levels[0].width, self._levels[0].height
        for lv in self._levels:
            self.levels.append(Level(lv.width, lv.height, (w0 / lv.width + h0 / lv.height) / 2,
                                     lv.tw, lv.th))
        ds0 = self._inst[0][1]
        try:
            sp = ds0.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
            self.mpp = (float(sp[1]) * 1000.0, float(sp[0]) * 1000.0)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            self.mpp = None
        d, t = str(getattr(ds0, "AcquisitionDateTime", "") or ""), ""
        if not d:
            d, t = str(getattr(ds0, "ContentDate", "") or ""), str(getattr(ds0, "ContentTime", "") or "")
            d = d + t
        if len(d) >= 8:
            self.acquired_at = f"{d[0:4]}-{d[4:6]}-{d[6:8]}" + (
                f"T{d[8:10]}:{d[10:12]}:{d[12:14]}" if len(d) >= 14 else "")
        self.properties.update(PatientID=str(getattr(ds0, "PatientID", "")),
                               AccessionNumber=str(getattr(ds0, "AccessionNumber", "")),
                               ContainerIdentifier=str(getattr(ds0, "ContainerIdentifier", "")),
                               DimensionOrganizationType=str(
                                   getattr(ds0, "DimensionOrganizationType", "")),
                               TransferSyntaxUID=str(self._levels[0].parts[0].ts))
        self.source_path = str(path)
        self._lock = threading.Lock()
        self._frames: OrderedDict = OrderedDict()
        self._cache = cache_frames

    @staticmethod
    def _frame_positions(ds) -> dict[tuple[int, int], int] | None:
        """TILED_SPARSE: (tile column, tile row) → frame index; TILED_FULL: None.

        Sparse when Dimension Organization Type says TILED_SPARSE, or (as wsidicom reads
        it) when it is absent and the frames carry Plane Position (Slide). Positions are
        1-based pixel positions in the total pixel matrix and must lie on the tile grid.
        With several focal planes / optical paths the frames of the first frame's plane
        and path are kept; a repeated position keeps its first frame."""
        org = str(getattr(ds, "DimensionOrganizationType", "") or "").upper()
        if org == "TILED_FULL":
            return None
        pffg = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
        has_pos = bool(pffg) and "PlanePositionSlideSequence" in pffg[0]
        if org != "TILED_SPARSE":
            if not has_pos:
                return None          # no organisation and no positions: row-major frames
        where = getattr(ds, "filename", None) or "the instance"
        n = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if pffg is None or len(pffg) != n:
            raise SlideFormatError(
                f"{where}: TILED_SPARSE with {0 if pffg is None else len(pffg)} per-frame "
                f"functional groups for {n} frames (truncated or damaged header?)")
        tw, th = int(ds.Columns), int(ds.Rows)

        def path_of(fg) -> str | None:
            try:
                return str(fg.OpticalPathIdentificationSequence[0].OpticalPathIdentifier)
            except (AttributeError, IndexError):
                return None

        out: dict[tuple[int, int], int] = {}
        plane = None
        for i, fg in enumerate(pffg):
            try:
                pos = fg.PlanePositionSlideSequence[0]
                c = int(pos.ColumnPositionInTotalImagePixelMatrix) - 1
                r = int(pos.RowPositionInTotalImagePixelMatrix) - 1
            except (AttributeError, IndexError, TypeError, ValueError) as e:
                raise SlideFormatError(f"{where}: frame {i} has no position in the total "
                                       f"pixel matrix ({e})") from e
            z = getattr(pos, "ZOffsetInSlideCoordinateSystem", None)
            key = (None if z is None else round(float(z), 6), path_of(fg))
            if plane is None:
                plane = key
            elif key != plane:
                continue
            if c % tw or r % th or c < 0 or r < 0:
                raise SlideFormatError(f"{where}: frame {i} at column {c + 1}, row {r + 1} is "
                                       f"not on the {tw}×{th} tile grid (unsupported)")
            out.setdefault((c // tw, r // th), i)
        return out

    @classmethod
    def score(cls, path: Path) -> tuple[float, str]:
        import pydicom

        cands = [path] if path.is_file() else (sorted(path.rglob("*"))[:50] if path.is_dir() else [])
        damaged = ""
        for f in cands:
            if not f.is_file():
                continue
            try:
                ds = pydicom.dcmread(str(f), stop_before_pixels=True, specific_tags=["SOPClassUID"])
            except Exception as e:  # noqa: BLE001
                if _has_dicm(f):
                    damaged = f"{f.name}: {e}"
                continue
            if str(getattr(ds, "SOPClassUID", "")) == WSI_SOP_CLASS:
                return 0.95, "DICOM VL Whole Slide Microscopy Image"
            if "SOPClassUID" not in ds and _has_dicm(f):
                damaged = f"{f.name}: no SOP Class UID"
        if damaged:     # let the reader say what is wrong with it
            return 0.3, f"a DICOM file pydicom cannot read ({damaged})"
        return 0.0, "no DICOM whole-slide instance"

    def _frame(self, level: int, col: int, row: int) -> np.ndarray | None:
        key = (level, col, row)
        with self._lock:
            if key in self._frames:
                self._frames.move_to_end(key)
                return self._frames[key]
        at = self._levels[level].locate(col, row)
        arr = None
        if at is not None:
            inst, index = at
            arr = _rgb(inst.decode(index))
        with self._lock:
            self._frames[key] = arr
            while len(self._frames) > self._cache:
                self._frames.popitem(last=False)
        return arr

    def _read_level(self, level, x, y, w, h):
        lv = self.levels[level]
        tw, th = lv.tile_width, lv.tile_height
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                fr = self._frame(level, tx, ty)
                if fr is None:
                    continue
                sx0, sy0 = tx * tw, ty * th
                ax0, ay0, ax1, ay1 = max(x, sx0), max(y, sy0), min(x + w, sx0 + tw), min(y + h, sy0 + th)
                out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = fr[ay0 - sy0:ay1 - sy0, ax0 - sx0:ax1 - sx0]
        return out


# --------------------------------------------------------------------------- OpenSlide
class OpenSlideSource(TileSource):
    """Vendor formats through openslide-python (optional dependency; in the ``test``
    extra, since the tests compare the readers with it).

    OpenSlide places a region by its level-0 corner, so on a level whose downsample is
    not an integer (4.0003 in most vendor files) a region that does not start at 0 is
    sampled up to 0.5 / downsample px off the level's pixel grid (interpolated). Whole
    levels, and every region of integer-downsample levels, are the level's pixels."""

    name = "openslide"
    SUFFIXES = {".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".tif", ".tiff",
                ".dcm"}                 # OpenSlide 4 reads DICOM WSI too (one file of the series)

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        try:
            import openslide
        except (ImportError, OSError) as e:  # pragma: no cover - optional
            # openslide-python without the library raises ImportError (or OSError)
            raise SlideFormatError("openslide-python (and the OpenSlide library) is not "
                                   f"installed ({e}): pip install openslide-python "
                                   "openslide-bin") from e
        try:
            self._os = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError, ValueError) as e:
            # OpenSlideUnsupportedFormatError is an OpenSlideError; a damaged file too
            raise SlideFormatError(f"OpenSlide cannot open {path}: {e}") from e
        self.source_path = str(path)
        pr = self._os.properties
        self.properties = {k: str(v) for k, v in pr.items()}
        for i, ((w, h), d) in enumerate(zip(self._os.level_dimensions, self._os.level_downsamples)):
            tw = int(pr.get(f"openslide.level[{i}].tile-width", 0) or 0)
            th = int(pr.get(f"openslide.level[{i}].tile-height", 0) or 0)
            self.levels.append(Level(int(w), int(h), float(d), tw, th))
        try:
            self.mpp = (float(pr["openslide.mpp-x"]), float(pr["openslide.mpp-y"]))
        except (KeyError, ValueError):
            self.mpp = None
        try:
            self.objective_power = float(pr["openslide.objective-power"])
        except (KeyError, ValueError):
            self.objective_power = None
        self.acquired_at = _openslide_time(pr)
        for k, im in self._os.associated_images.items():
            self.associated[k] = _rgb(np.asarray(im))

    @classmethod
    def score(cls, path: Path) -> tuple[float, str]:
        try:
            import openslide
        except (ImportError, OSError) as e:
            return 0.0, f"openslide-python (or its library) is not installed: {e}"
        if path.is_file() and path.suffix.lower() in cls.SUFFIXES:
            fmt = openslide.OpenSlide.detect_format(str(path))
            if fmt:
                return (0.85 if fmt != "generic-tiff" else 0.5), f"OpenSlide: {fmt}"
        return 0.0, "OpenSlide does not recognise it"

    def _read_level(self, level, x, y, w, h):
        # OpenSlide takes the top-left corner in level-0 pixels
        d = self.levels[level].downsample
        try:
            im = self._os.read_region((int(round(x * d)), int(round(y * d))), level, (w, h))
        except Exception as e:  # noqa: BLE001 - openslide.OpenSlideError and friends
            raise SlideFormatError(f"OpenSlide cannot read level {level} at ({x}, {y}) of "
                                   f"{self.source_path}: {e}") from e
        # RGBA, not premultiplied; transparent (no tissue scanned) composited on white
        return _rgb(np.asarray(im))

    def close(self) -> None:
        self._os.close()


def _openslide_time(pr) -> str | None:
    """Acquisition time from OpenSlide properties (Aperio Date/Time, TIFF DateTime)."""
    d, t = pr.get("aperio.Date"), pr.get("aperio.Time")
    if d and re.fullmatch(r"\d{1,2}/\d{1,2}/\d{2,4}", d):
        mo, dd, y = d.split("/")
        y = int(y) + (2000 if int(y) < 100 else 0)
        return f"{y:04d}-{int(mo):02d}-{int(dd):02d}" + (f"T{t}" if t else "")
    v = pr.get("tiff.DateTime")
    if v and len(v) >= 19:
        return f"{v[0:4]}-{v[5:7]}-{v[8:10]}T{v[11:19]}"
    return None


READERS: list[type[TileSource]] = [DicomWsiSource, TiffSource, OpenSlideSource, PlainImageSource]


def open_slide(path: str | Path, *, mpp: float | None = None) -> TileSource:
    """Open ``path`` with the reader that recognises it best; ``mpp`` overrides (or
    supplies) the microns per pixel."""
    p = Path(path)
    if not p.exists():
        raise SlideFormatError(f"no such file or folder: {p}")
    scored = []
    for r in READERS:
        try:
            s, why = r.score(p)
        except Exception as e:  # noqa: BLE001 - a reader's probe must not stop the others
            s, why = 0.0, f"probe failed: {e}"
        scored.append((s, r, why))
    scored.sort(key=lambda t: -t[0])
    errors = []
    for s, r, why in scored:
        if s <= 0:
            continue
        try:
            src = r(p)
        except SlideFormatError as e:
            errors.append(f"{r.name}: {e}")
            continue
        if mpp is not None:
            src.mpp = (float(mpp), float(mpp))
        return src
    detail = "; ".join(errors + [f"{r.name}: {why}" for s, r, why in scored if s <= 0])
    raise SlideFormatError(f"no reader can open {p} ({detail})")
