"""Decode what has arrived: empty-packet rebuild, then OpenJPEG from memory.

:func:`decode` is the client's one decode path. It rebuilds a codestream from the
packets held (missing ones become empty packets), then asks OpenJPEG for the wanted
reduction and area. The result is in stored pixel values (the codestream offset undone,
before rescale), at ``ceil(size / 2**reduce)``.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from codestream.databins import BinSet, rebuild_codestream
from codestream.encode import DecodeError, openjpeg_decode, undo_offset  # noqa: F401 (DecodeError re-exported)
from codestream.index import CodestreamError

_threads_lock = threading.Lock()
_threads_set = False


def _set_threads() -> None:
    """Let OpenJPEG decode with several threads (once per process)."""
    global _threads_set
    with _threads_lock:
        if not _threads_set:
            import glymur
            try:
                glymur.set_option("lib.num_threads", max(1, min(4, os.cpu_count() or 1)))
            except Exception:  # older OpenJPEG without thread support
                pass
            _threads_set = True


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
    cs = rebuild_codestream(bins, max_layers=layers or None, max_res=ix.numres - 1 - reduce)
    _set_threads()
    arr = openjpeg_decode(cs, reduce=reduce, area=area)
    return undo_offset(arr, offset, signed, bits_stored), reduce
