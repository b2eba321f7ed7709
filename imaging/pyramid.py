"""A slide stored as a pyramid of JPEG 2000 tiles, and the ingest that builds it.

Layout of one stored slide (a folder in a tier, see :mod:`server.slide_tiers`)::

    <slide_uid>/
      manifest.json          geometry, the tile table of every level, checksums
      level-<k>.j2kp         the tile codestreams of level k, concatenated
      assoc-<name>.png       label / macro / thumbnail images, when the slide has them

Level ``k`` is the slide reduced by ``2**k``: level 0 halved ``k`` times (2×2 block mean,
rounded; the last row / column of an odd size is the mean of what it covers, never blended
with the white beyond the slide), so for a single-level source every level is bit for bit
:func:`~imaging.tilesource.block_mean` of level 0 — whether read from the source or
reduced from the previous output level; a source level used instead is halved the same
way. Each level is cut into ``tile_size`` tiles
(edge tiles are smaller: a level reassembles to exactly its size). Every tile is one
codestream written by :func:`codestream.encode.encode_frame`: RGB, reversible 5/3,
quality layers at 1:50, 1:20, 1:8 and lossless, 128×128 precincts and PLT markers — so
the packet engine (:mod:`server.packets`) can send any tile, or only the precincts
of a tile that a region touches, layer by layer. Level ``k``, tile ``(col, row)`` is JPIP
component ``row * cols + col`` of the *level target* ``<slide_uid>/<k>``.

Each tile carries a CRC-32 in the manifest (checked on every read) and each file its
SHA-256 and size (checked by tier moves and ``verify``). The manifest is written last,
so a folder without a manifest is an interrupted ingest.

Ingest (:func:`build_pyramid`) reads the source tile by tile. A level is read from the
source's nearest native level when that level is at most 4× finer; otherwise (a source
with too few levels) from a reduced copy of the previous output level, accumulated on
disk while that level is written, so memory stays bounded by a few tiles whatever the
slide size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from codestream.encode import openjpeg_decode
from codestream.index import PacketIndex
from imaging.files import fsync_dir, sha256_file, write_atomic  # noqa: F401 (re-exported)

from imaging.tilesource import BACKGROUND

log = logging.getLogger("medview.pathology")

FORMAT = 1
MANIFEST = "manifest.json"
DEFAULT_TILE = 512


class PyramidError(RuntimeError):
    """A stored pyramid is missing, incomplete or damaged (with the reason)."""



# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class LevelGeometry:
    level: int
    width: int
    height: int
    downsample: int
    tile: int

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile)

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile)

    @property
    def count(self) -> int:
        return self.cols * self.rows

    def tile_rect(self, index: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) of tile ``index`` in level pixels."""
        r, c = divmod(index, self.cols)
        x, y = c * self.tile, r * self.tile
        return x, y, min(self.tile, self.width - x), min(self.tile, self.height - y)

    def tiles_in(self, x: int, y: int, w: int, h: int) -> list[int]:
        """Indices of the tiles a level-pixel rectangle touches (row-major)."""
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        if x1 <= x0 or y1 <= y0:
            return []
        t = self.tile
        return [r * self.cols + c for r in range(y0 // t, (y1 - 1) // t + 1)
                for c in range(x0 // t, (x1 - 1) // t + 1)]


def plan_levels(width: int, height: int, tile: int) -> list[LevelGeometry]:
    """Levels 0..n: reduced by 2**k until the whole level fits in one tile."""
    out = [LevelGeometry(0, width, height, 1, tile)]
    w, h, d = width, height, 1
    while max(w, h) > tile:
        w, h, d = -(-w // 2), -(-h // 2), d * 2
        out.append(LevelGeometry(len(out), w, h, d, tile))
    return out


# --------------------------------------------------------------------------- stored
def local_read_range(folder: Path) -> Callable[[str, int, int], bytes]:
    """``read_range(name, offset, length)`` over the files of a local pyramid folder."""
    def read(name: str, offset: int, length: int) -> bytes:
        with open(Path(folder) / name, "rb") as f:
            f.seek(offset)
            return f.read(length)
    return read


@dataclass
class StoredSlide:
    """A stored pyramid, opened read-only. Thread-safe.

    ``path`` is the local folder, or a label (an object-store URL) when ``read_range``
    is given: ``read_range(name, offset, length)`` returns bytes of one of the slide's
    files (the server injects range reads from its object store; the default reads the
    files of ``path``)."""

    path: Path | str
    manifest: dict
    read_range: Callable[[str, int, int], bytes] | None = None
    levels: list[LevelGeometry] = field(init=False)

    def __post_init__(self) -> None:
        m = self.manifest
        self.levels = [LevelGeometry(lv["level"], lv["width"], lv["height"], lv["downsample"],
                                     m["tile_size"]) for lv in m["levels"]]
        self._index_cache: dict[tuple[int, int], PacketIndex] = {}
        self._lock = threading.Lock()
        self.local = self.read_range is None
        if self.local:
            self.read_range = local_read_range(Path(self.path))

    @classmethod
    def open(cls, path: str | Path) -> "StoredSlide":
        p = Path(path)
        try:
            m = json.loads((p / MANIFEST).read_text())
        except FileNotFoundError:
            raise PyramidError(f"{p} holds no slide pyramid (no {MANIFEST}: interrupted "
                               "ingest or tier move?)") from None
        except (OSError, ValueError) as e:
            raise PyramidError(f"cannot read {p / MANIFEST}: {e}") from e
        if m.get("format") != FORMAT:
            raise PyramidError(f"{p}: unknown pyramid format {m.get('format')!r}")
        return cls(p, m)

    # ------------------------------------------------------------------ facts
    @property
    def uid(self) -> str:
        return self.manifest["slide_uid"]

    @property
    def width(self) -> int:
        return self.manifest["width"]

    @property
    def height(self) -> int:
        return self.manifest["height"]

    @property
    def tile_size(self) -> int:
        return self.manifest["tile_size"]

    @property
    def mpp(self) -> float | None:
        m = self.manifest.get("mpp")
        return float(m[0]) if m else None

    def files(self) -> list[dict]:
        """Every file of the slide with its SHA-256 and size (manifest excluded)."""
        out = [{"file": lv["file"], "sha256": lv["sha256"], "size": lv["size"]}
               for lv in self.manifest["levels"]]
        out += [dict(a, name=n) for n, a in self.manifest.get("associated", {}).items()]
        return out

    def verify(self) -> list[str]:
        """Problems found (missing file, wrong size or SHA-256); empty when intact."""
        if self.local:
            return verify_folder(Path(self.path), self.manifest)
        problems = []
        for f in self.files():
            try:
                self.file_bytes(f["file"])
            except PyramidError as e:
                problems.append(f"{f['file']}: {e}")
        return problems

    # ------------------------------------------------------------------ tiles
    def tile_bytes(self, level: int, index: int) -> bytes:
        lv = self.manifest["levels"][level]
        off, n, crc = lv["tiles"][index]
        try:
            data = self.read_range(lv["file"], off, n)
        except FileNotFoundError:
            raise PyramidError(f"{self.path}/{lv['file']} of slide {self.uid} is missing") from None
        if len(data) != n or zlib.crc32(data) != crc:
            raise PyramidError(f"tile {index} of level {level} of slide {self.uid} is damaged "
                               f"(CRC-32 mismatch in {self.path}/{lv['file']})")
        return data

    def tile_index(self, level: int, index: int) -> PacketIndex:
        key = (level, index)
        with self._lock:
            ix = self._index_cache.get(key)
        if ix is None:
            ix = PacketIndex.parse(self.tile_bytes(level, index))
            with self._lock:
                if len(self._index_cache) > 4096:
                    self._index_cache.clear()
                self._index_cache[key] = ix
        return ix

    def decode_tile(self, level: int, index: int, *, layers: int = 0,
                    reduce: int = 0) -> np.ndarray:
        return openjpeg_decode(self.tile_bytes(level, index), layers=layers, reduce=reduce)

    def read_region(self, level: int, x: int, y: int, w: int, h: int, *,
                    layers: int = 0) -> np.ndarray:
        """RGB (h, w, 3) of level ``level`` decoded from the stored tiles (white outside)."""
        g = self.levels[level]
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        for t in g.tiles_in(x, y, w, h):
            tx, ty, tw, th = g.tile_rect(t)
            ax0, ay0 = max(x, tx), max(y, ty)
            ax1, ay1 = min(x + w, tx + tw), min(y + h, ty + th)
            area = (ax0 - tx, ay0 - ty, ax1 - ax0, ay1 - ay0)
            px = openjpeg_decode(self.tile_bytes(level, t), layers=layers, area=area)
            out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = px
        return out

    def associated(self, name: str) -> np.ndarray:
        import imageio.v3 as iio

        a = self.manifest.get("associated", {}).get(name)
        if a is None:
            raise KeyError(name)
        return iio.imread(self.file_bytes(a["file"]), extension=".png")

    def file_bytes(self, name: str) -> bytes:
        """A whole file of the slide (an associated image), checked against the
        manifest's size and SHA-256."""
        entry = next((f for f in self.files() if f["file"] == name), None)
        if entry is None:
            raise PyramidError(f"slide {self.uid} has no file {name!r}")
        try:
            data = self.read_range(name, 0, entry["size"])
        except FileNotFoundError:
            raise PyramidError(f"{self.path}/{name} of slide {self.uid} is missing") from None
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise PyramidError(f"{self.path}/{name} of slide {self.uid} is damaged "
                               "(size or SHA-256 differs from the manifest)")
        return data

    def level_for_downsample(self, downsample: float) -> int:
        best = 0
        for g in self.levels:
            if g.downsample <= downsample * 1.001:
                best = g.level
        return best


def verify_folder(path: Path, manifest: dict) -> list[str]:
    problems = []
    files = [(lv["file"], lv["sha256"], lv["size"]) for lv in manifest["levels"]]
    files += [(a["file"], a["sha256"], a["size"]) for a in manifest.get("associated", {}).values()]
    for name, sha, size in files:
        p = path / name
        if not p.is_file():
            problems.append(f"{name}: missing")
            continue
        have, n = sha256_file(p)
        if n != size:
            problems.append(f"{name}: {n} bytes, manifest says {size}")
        elif have != sha:
            problems.append(f"{name}: SHA-256 mismatch")
    return problems


