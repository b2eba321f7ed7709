"""Decode what has arrived: empty-packet rebuild, then OpenJPEG through glymur.

:func:`decode` is the client's one decode path. It rebuilds a codestream from the
packets held (missing ones become empty packets), then asks OpenJPEG for the wanted
reduction and area. The result is in stored pixel values (the codestream offset undone,
before rescale), at ``ceil(size / 2**reduce)``.
"""
from __future__ import annotations

import os
import tempfile
import threading

import numpy as np

from codestream.databins import BinSet, rebuild_codestream
from codestream.encode import undo_offset
from codestream.index import CodestreamError

_TMPDIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
_threads_lock = threading.Lock()
_threads_set = False


class DecodeError(RuntimeError):
    """Decoding failed (with OpenJPEG's reason)."""


def _set_threads() -> None:
    global _threads_set
    with _threads_lock:
        if not _threads_set:
            import glymur
            try:
                glymur.set_option("lib.num_threads", max(1, min(4, os.cpu_count() or 1)))
            except Exception:  # older OpenJPEG without thread support
                pass
            _threads_set = True


def decode_codestream(cs: bytes, *, reduce: int = 0, layers: int = 0,
                      area: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """OpenJPEG decode of codestream bytes. ``area`` = (x, y, w, h) in full-res pixels."""
    import glymur

    _set_threads()
    fd, path = tempfile.mkstemp(suffix=".j2k", dir=_TMPDIR)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cs)
        jp = glymur.Jp2k(path)
        nl = jp.codestream.segment[2].layers
        jp.layer = 0 if layers <= 0 or layers >= nl else layers
        step = 1 << reduce
        if area is None:
            return jp[::step, ::step]
        x, y, w, h = area
        return jp[y:y + h:step, x:x + w:step]
    except (OSError, RuntimeError, ValueError, IndexError) as e:
        raise DecodeError(f"OpenJPEG could not decode the image: {e}") from e
    finally:
        os.unlink(path)


def decode(bins: BinSet, *, offset: int, signed: bool, bits_stored: int = 16,
           reduce: int | None = None, layers: int = 0,
           area: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, int]:
    """Decode the packets held; returns (pixels, reduce used).

    With ``reduce=None`` the highest resolution held is used (never more than has
    arrived, so the image is never upsampled from empty packets).
    """
    ix = bins.index
    if ix is None:
        raise CodestreamError("no headers for this image yet")
    if reduce is None:
        _, res = bins.levels_in_region(area) if area else bins.levels()
        if res < 0:
            raise CodestreamError("nothing decodable has arrived yet")
        reduce = ix.numres - 1 - res
    reduce = max(0, min(reduce, ix.numres - 1))
    cs = rebuild_codestream(bins, max_layers=layers or None)
    arr = decode_codestream(cs, reduce=reduce, area=area)
    return undo_offset(arr, offset, signed, bits_stored), reduce
