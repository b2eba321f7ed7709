"""The slide ingest: a TileSource encoded into a stored pyramid of JPEG 2000 tiles
(the layout and the reader are :mod:`imaging.pyramid`).

A level is read from the source's nearest native level when that level is at most 4×
finer; otherwise (a source with too few levels) from a reduced copy of the previous output
level, accumulated on disk while that level is written, so memory stays bounded by a few
tiles whatever the slide size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from codestream.encode import encode_frame
from imaging.files import fsync_dir, write_atomic
from imaging.pyramid import (DEFAULT_TILE, FORMAT, MANIFEST, PyramidError,
                             plan_levels)
from imaging.tilesource import BACKGROUND, TileSource, block_mean

log = logging.getLogger("medview.pathology")


# --------------------------------------------------------------------------- ingest
@dataclass
class IngestResult:
    slide_uid: str
    path: Path
    manifest: dict
    seconds: float
    tiles: int
    bytes: int


def _png_bytes(rgb: np.ndarray) -> bytes:
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", rgb, extension=".png")


class _Canvas:
    """A reduced copy of one output level, on disk (np.memmap), built tile by tile."""

    def __init__(self, tmpdir: Path, width: int, height: int) -> None:
        self.path = tmpdir / f"canvas-{uuid.uuid4().hex}.u8"
        self.arr = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.uint8,
                                             shape=(height, width, 3))
        self.arr[:] = BACKGROUND

    def put(self, x: int, y: int, rgb: np.ndarray) -> None:
        r = block_mean(rgb, 2)
        self.arr[y // 2:y // 2 + r.shape[0], x // 2:x // 2 + r.shape[1]] = r

    def read(self, x, y, w, h) -> np.ndarray:
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        sub = self.arr[y:y + h, x:x + w]
        out[:sub.shape[0], :sub.shape[1]] = sub
        return out

    def close(self) -> None:
        del self.arr
        self.path.unlink(missing_ok=True)


def build_pyramid(source: TileSource, dest_root: Path, *, slide_uid: str | None = None,
                  tile_size: int = DEFAULT_TILE, workers: int = 2, extra: dict | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  cancelled: Callable[[], bool] = lambda: False) -> IngestResult:
    """Encode ``source`` into ``dest_root/<slide_uid>/`` (staged, then renamed)."""
    if tile_size < 64 or tile_size % 2:
        raise ValueError("tile_size must be an even number of at least 64 pixels")
    t0 = time.monotonic()
    uid = slide_uid or uuid.uuid4().hex
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    final = dest_root / uid
    if final.exists():
        raise PyramidError(f"a slide folder {final} exists already")
    staging = dest_root / f".staging-{uid}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix="canvas-", dir=staging))
    levels = plan_levels(source.width, source.height, tile_size)
    writer = _LevelWriter(source, staging, tmp, levels, workers, progress, cancelled)
    try:
        manifest_levels = [writer.write(g) for g in levels]
    finally:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    assoc = _write_associated(source, staging)
    manifest = {"format": FORMAT, "slide_uid": uid, "width": source.width,
                "height": source.height, "tile_size": tile_size,
                "mpp": list(source.mpp) if source.mpp else None,
                "objective_power": source.objective_power,
                "codestream": {"layers": 4, "ratios": [50, 20, 8, 1], "precinct": 128,
                               "wavelet": "5/3 reversible", "components": 3},
                "levels": manifest_levels, "associated": assoc,
                "source": {"reader": source.name, "path": source.source_path,
                           "levels": [[lv.width, lv.height, lv.downsample] for lv in source.levels],
                           "acquired_at": source.acquired_at},
                **(extra or {})}
    write_atomic(staging / MANIFEST, json.dumps(manifest, separators=(",", ":")).encode())
    fsync_dir(staging)
    os.rename(staging, final)
    fsync_dir(dest_root)
    nbytes = sum(lv["size"] for lv in manifest_levels) + sum(a["size"] for a in assoc.values())
    return IngestResult(uid, final, manifest, time.monotonic() - t0, writer.total, nbytes)


class _LevelWriter:
    """Encodes the pyramid levels of a slide, finest first, each into one file of tile
    codestreams (fsynced). A level reduced more than 4 times from the nearest source
    level is read from a canvas the level before it filled (each of its tiles written in
    as encoded), not from the source."""

    def __init__(self, source: TileSource, staging: Path, tmp: Path, levels, workers: int,
                 progress: Callable[[int, int], None] | None,
                 cancelled: Callable[[], bool]) -> None:
        self.source = source
        self.staging = staging
        self.tmp = tmp
        self.levels = levels
        self.progress = progress
        self.cancelled = cancelled
        self.total = sum(g.count for g in levels)
        self.done = 0
        # where each output level is read from: the source, or the previous level's canvas
        self.from_canvas = []
        for g in levels:
            lvl = source.best_level_for_downsample(g.downsample)
            self.from_canvas.append(g.level > 0 and g.downsample / source.levels[lvl].downsample > 4)
        self.canvases: dict[int, _Canvas] = {}
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="slide-encode")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for c in self.canvases.values():
            c.close()

    def write(self, g) -> dict:
        """Encode pyramid level ``g`` (tiles row by row, on the pool); its manifest entry."""
        levels, canvases, source = self.levels, self.canvases, self.source
        nxt = g.level + 1
        if nxt < len(levels) and self.from_canvas[nxt]:
            canvases[nxt] = _Canvas(self.tmp, levels[nxt].width, levels[nxt].height)
        src_canvas = canvases.get(g.level)

        def read(t: int) -> np.ndarray:
            x, y, w, h = g.tile_rect(t)
            if src_canvas is not None:
                return src_canvas.read(x, y, w, h)
            return source.read_scaled(g.downsample, x, y, w, h)

        def encode(t: int):
            px = read(t)
            return px, encode_frame(px, signed=False, bits_stored=8).codestream

        fname = f"level-{g.level}.j2kp"
        tiles = []
        h = hashlib.sha256()
        off = 0
        with open(self.staging / fname, "xb") as f:
            for row in range(g.rows):
                if self.cancelled():
                    raise PyramidError("ingest cancelled")
                idx = list(range(row * g.cols, (row + 1) * g.cols))
                for t, (px, cs) in zip(idx, self.pool.map(encode, idx)):
                    f.write(cs)
                    h.update(cs)
                    tiles.append([off, len(cs), zlib.crc32(cs)])
                    off += len(cs)
                    if nxt in canvases:
                        x, y, _w, _h = g.tile_rect(t)
                        canvases[nxt].put(x, y, px)
                    self.done += 1
                    if self.progress:
                        self.progress(self.done, self.total)
            f.flush()
            os.fsync(f.fileno())
        if src_canvas is not None:
            src_canvas.close()
            del canvases[g.level]
        return {"level": g.level, "width": g.width, "height": g.height,
                "downsample": g.downsample, "cols": g.cols, "rows": g.rows,
                "file": fname, "sha256": h.hexdigest(), "size": off, "tiles": tiles}


def _write_associated(source: TileSource, staging: Path) -> dict:
    """The label / macro / thumbnail images as PNG files; their manifest entries."""
    assoc = {}
    for name, img in sorted(source.associated.items()):
        data = _png_bytes(img)
        fname = f"assoc-{name}.png"
        sha = write_atomic(staging / fname, data)
        assoc[name] = {"file": fname, "sha256": sha, "size": len(data),
                       "width": int(img.shape[1]), "height": int(img.shape[0])}
    return assoc
