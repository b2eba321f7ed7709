"""Slide readers behind one tile-source interface (OpenSeadragon's TileSource pattern).

:class:`TileSource` holds the pyramid geometry — level sizes, downsamples, native tile
size, microns per pixel, associated images (label, macro, thumbnail) — and reads RGB
regions. Each format subclass says how well it recognises an input (:meth:`score`,
0 = not at all) and :func:`open_slide` picks the best one, naming every reader it tried
and why each declined when none fits (the pydicom pixel-backend pattern).

Readers
-------
``TiffSource``      tiled / pyramidal TIFF through tifffile: Aperio SVS (JPEG or J2K
                    tiles, label and macro), OME-TIFF (sub-IFD levels), generic
                    pyramidal TIFF, any tiled TIFF; reads only the TIFF tiles a region
                    touches. Microns per pixel from the SVS description (``MPP =``), or
                    from X/YResolution.
``DicomWsiSource``  DICOM VL Whole Slide Microscopy images (a folder of instances, one
                    per level, TILED_FULL or TILED_SPARSE), any transfer syntax pydicom
                    decodes; LABEL / OVERVIEW / THUMBNAIL instances become associated
                    images. Pixel Spacing gives the microns per pixel.
``OpenSlideSource`` vendor formats (MRXS, NDPI, SCN, VMS, BIF...) when openslide-python
                    and its library are installed; otherwise it declines with the reason.
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
    """Mean of f×f blocks (uint8 in, uint8 out); a ragged edge block averages what it has."""
    if f == 1:
        return img
    h, w = img.shape[:2]
    ph, pw = -h % f, -w % f
    a = img.astype(np.float32)
    if ph or pw:
        a = np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="edge")
    a = a.reshape(a.shape[0] // f, f, a.shape[1] // f, f, a.shape[2]).mean(axis=(1, 3))
    return (a + 0.5).astype(np.uint8)


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
        that reduced image), read from the nearest native level and block-averaged."""
        lvl = self.best_level_for_downsample(downsample)
        ds = self.levels[lvl].downsample
        f = downsample / ds
        fi = int(round(f))
        if abs(f - fi) < 1e-3 and fi >= 1:
            region = self.read_region(lvl, x * fi, y * fi, w * fi, h * fi)
            return block_mean(region, fi)
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
            self._pages.append(page)
        # some writers store the pyramid as separate series with the same aspect ratio
        if len(self._pages) == 1 and len(tif.series) > 1:
            base = self._pages[0]
            for s in tif.series[1:]:
                p = s.keyframe
                if (s.name or "").lower() in ("label", "macro", "thumbnail"):
                    continue
                if p.imagewidth < base.imagewidth and abs(
                        p.imagewidth / base.imagewidth - p.imagelength / base.imagelength) < 0.01:
                    self._pages.append(p)
        w0 = self._pages[0].imagewidth
        self.levels = [Level(p.imagewidth, p.imagelength, w0 / p.imagewidth,
                             p.tilewidth or 0, p.tilelength or 0) for p in self._pages]
        self._lock = threading.Lock()
        self._tiles: OrderedDict = OrderedDict()
        self._cache_tiles = cache_tiles
        desc = self._pages[0].description or ""
        self.properties["description"] = desc[:2000]
        if tif.is_svs or "Aperio" in desc:
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
        except Exception as e:  # noqa: BLE001
            return 0.0, f"tifffile cannot read it: {e}"
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


class DicomWsiSource(TileSource):
    """DICOM VL Whole Slide Microscopy Image instances (a folder, or one file)."""

    name = "dicom-wsi"

    def __init__(self, path: str | Path, cache_frames: int = 256) -> None:
        super().__init__()
        import pydicom

        p = Path(path)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        vols = []
        for f in files:
            try:
                ds = pydicom.dcmread(str(f), stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - not DICOM: skipped
                continue
            if str(getattr(ds, "SOPClassUID", "")) != WSI_SOP_CLASS:
                continue
            kind = (list(getattr(ds, "ImageType", [])) + ["", "", ""])[2].upper()
            if kind in ("LABEL", "OVERVIEW", "THUMBNAIL"):
                name = {"OVERVIEW": "macro"}.get(kind, kind.lower())
                try:
                    self.associated[name] = _rgb(pydicom.dcmread(str(f)).pixel_array)
                except Exception as e:  # noqa: BLE001
                    log.warning("cannot decode the %s image %s: %s", name, f, e)
                continue
            vols.append((int(ds.TotalPixelMatrixColumns), f, ds))
        if not vols:
            raise SlideFormatError(f"no DICOM whole-slide (VOLUME) instances in {path}")
        vols.sort(key=lambda t: -t[0])
        # one instance per level (concatenations / focal planes beyond the first: ignored)
        seen = set()
        self._inst = []
        for cols, f, ds in vols:
            if cols in seen:
                continue
            seen.add(cols)
            self._inst.append((f, ds, self._frame_positions(ds)))
        w0 = int(self._inst[0][1].TotalPixelMatrixColumns)
        for f, ds, _pos in self._inst:
            self.levels.append(Level(int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows),
                                     w0 / int(ds.TotalPixelMatrixColumns), int(ds.Columns),
                                     int(ds.Rows)))
        ds0 = self._inst[0][1]
        try:
            sp = ds0.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
            self.mpp = (float(sp[1]) * 1000.0, float(sp[0]) * 1000.0)
        except (AttributeError, IndexError, KeyError):
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
                               ContainerIdentifier=str(getattr(ds0, "ContainerIdentifier", "")))
        self.source_path = str(path)
        self._lock = threading.Lock()
        self._frames: OrderedDict = OrderedDict()
        self._cache = cache_frames

    @staticmethod
    def _frame_positions(ds) -> dict[tuple[int, int], int] | None:
        """TILED_SPARSE: (tile column, tile row) → frame index; TILED_FULL: None."""
        if str(getattr(ds, "DimensionOrganizationType", "TILED_FULL")).upper() != "TILED_SPARSE":
            return None
        out = {}
        tw, th = int(ds.Columns), int(ds.Rows)
        for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
            pos = fg.PlanePositionSlideSequence[0]
            c = int(pos.ColumnPositionInTotalImagePixelMatrix) - 1
            r = int(pos.RowPositionInTotalImagePixelMatrix) - 1
            out[(c // tw, r // th)] = i
        return out

    @classmethod
    def score(cls, path: Path) -> tuple[float, str]:
        import pydicom

        cands = [path] if path.is_file() else (sorted(path.rglob("*"))[:50] if path.is_dir() else [])
        for f in cands:
            if not f.is_file():
                continue
            try:
                ds = pydicom.dcmread(str(f), stop_before_pixels=True, specific_tags=["SOPClassUID"])
            except Exception:  # noqa: BLE001
                continue
            if str(getattr(ds, "SOPClassUID", "")) == WSI_SOP_CLASS:
                return 0.95, "DICOM VL Whole Slide Microscopy Image"
        return 0.0, "no DICOM whole-slide instance"

    def _frame(self, level: int, col: int, row: int) -> np.ndarray | None:
        key = (level, col, row)
        with self._lock:
            if key in self._frames:
                self._frames.move_to_end(key)
                return self._frames[key]
        f, ds, pos = self._inst[level]
        lv = self.levels[level]
        across = -(-lv.width // lv.tile_width)
        index = pos.get((col, row)) if pos is not None else row * across + col
        arr = None
        if index is not None:
            from pydicom.pixels import pixel_array

            arr = _rgb(pixel_array(str(f), index=index))
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
    """Vendor formats through openslide-python (optional dependency)."""

    name = "openslide"
    SUFFIXES = {".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".tif", ".tiff"}

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        try:
            import openslide
        except ImportError as e:  # pragma: no cover - optional
            raise SlideFormatError("openslide-python (and the OpenSlide library) is not "
                                   "installed: pip install openslide-python openslide-bin") from e
        self._os = openslide.OpenSlide(str(path))
        self.source_path = str(path)
        for (w, h), d in zip(self._os.level_dimensions, self._os.level_downsamples):
            self.levels.append(Level(int(w), int(h), float(d)))
        pr = self._os.properties
        try:
            self.mpp = (float(pr["openslide.mpp-x"]), float(pr["openslide.mpp-y"]))
        except (KeyError, ValueError):
            self.mpp = None
        self.properties = {k: str(v) for k, v in pr.items()}
        for k, im in self._os.associated_images.items():
            self.associated[k] = _rgb(np.asarray(im))

    @classmethod
    def score(cls, path: Path) -> tuple[float, str]:
        try:
            import openslide
        except ImportError:
            return 0.0, "openslide-python is not installed"
        if path.is_file() and path.suffix.lower() in cls.SUFFIXES:
            fmt = openslide.OpenSlide.detect_format(str(path))
            if fmt:
                return (0.85 if fmt != "generic-tiff" else 0.5), f"OpenSlide: {fmt}"
        return 0.0, "OpenSlide does not recognise it"

    def _read_level(self, level, x, y, w, h):
        d = self.levels[level].downsample
        im = self._os.read_region((int(x * d), int(y * d)), level, (w, h))
        return _rgb(np.asarray(im))

    def close(self) -> None:
        self._os.close()


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
