"""Encode one frame into a layered, precinct-partitioned JPEG 2000 codestream.

The codestream is what the server stores and streams packet by packet:

* reversible 5/3 wavelet; quality layers at ``LAYER_RATIOS`` with the last one lossless,
* enough resolution levels that the smallest is at most ``MAX_LOWEST_RES`` pixels,
* explicit 128x128 precincts (64x64 code-blocks) so a region request sends only what
  covers it, LRCP order, PLT markers so every packet can be indexed.

OpenJPEG (from memory, :mod:`codestream.opj_memory`, with glymur's bindings and
parameters) writes only unsigned 8/16-bit samples, so signed data, or data
that does not fit, is shifted by an integer ``offset``: stored = pixel + offset. The
offset is returned and must be recorded; :func:`undo_offset` reverses it bit-exactly.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from .index import PacketIndex

LAYER_RATIOS = (50, 20, 8, 1)   # about 1:50, 1:20, 1:8, then lossless
MAX_LOWEST_RES = 64
PRECINCT = 128
CODEBLOCK = 64


class EncodeError(ValueError):
    """The pixels cannot be encoded (with the reason)."""


@dataclass
class EncodedFrame:
    codestream: bytes
    offset: int
    index: PacketIndex


def numres_for(width: int, height: int) -> int:
    """Resolution count so that the smallest resolution is at most MAX_LOWEST_RES px."""
    side = max(width, height, 1)
    levels = max(0, math.ceil(math.log2(side / MAX_LOWEST_RES))) if side > MAX_LOWEST_RES else 0
    # OpenJPEG refuses a tile side shorter than 2**(numres-1) ("Number of resolutions is
    # too high in comparison to the size of tiles"): a thin image gets fewer levels.
    levels = min(levels, max(1, min(width, height)).bit_length() - 1)
    return min(levels, 12) + 1


def prepare_samples(pixels: np.ndarray, *, signed: bool, bits_stored: int) -> tuple[np.ndarray, int]:
    """Shift and cast pixels to uint8/uint16 for OpenJPEG; returns (samples, offset)."""
    a = np.asarray(pixels)
    if a.size == 0:
        raise EncodeError(f"empty frame, shape {a.shape}")
    if a.ndim == 3 and a.shape[2] == 3:
        if not np.issubdtype(a.dtype, np.integer):
            raise EncodeError(f"pixels must be integers, got {a.dtype}")
        if a.dtype != np.uint8:
            if a.min() < 0 or a.max() > 65535:
                raise EncodeError("colour samples must be 8 or 16-bit unsigned")
            return a.astype(np.uint16), 0
        return a, 0
    if a.ndim != 2:
        raise EncodeError(f"expected a 2-D frame or an RGB frame, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise EncodeError(f"pixels must be integers, got {a.dtype}")
    if a.dtype == np.uint8:
        return a, 0
    lo, hi = int(a.min()), int(a.max())
    offset = 0
    if signed or lo < 0:
        offset = 1 << (max(1, bits_stored) - 1)
        if lo + offset < 0 or hi + offset > 65535:
            offset = -lo
    if hi + offset > 65535:
        raise EncodeError(f"pixel range {lo}..{hi} does not fit in 16 bits")
    if offset == 0 and hi <= 255 and bits_stored <= 8:
        return a.astype(np.uint8), 0
    return (a.astype(np.int32) + offset).astype(np.uint16), offset




def encode_frame(pixels: np.ndarray, *, signed: bool, bits_stored: int,
                 ratios: tuple[int, ...] = LAYER_RATIOS) -> EncodedFrame:
    """Encode a frame; the last layer is lossless (bit-exact after undo_offset)."""
    samples, offset = prepare_samples(pixels, signed=signed, bits_stored=bits_stored)
    h, w = samples.shape[:2]
    numres = numres_for(w, h)
    psize = max(PRECINCT, 2 * CODEBLOCK)
    cb = CODEBLOCK if min(w, h) >= CODEBLOCK else 32
    if ratios[-1] != 1:
        raise EncodeError("the last layer must be lossless (ratio 1)")
    if _memory_encode is not None:           # in memory (codestream.opj_memory)
        try:
            # on the calling thread (threads=0): callers run one encoder per core already,
            # and OpenJPEG's own pool (one thread per codec) only adds a hand-over; the
            # codestream is the same byte for byte
            cs = _memory_encode(np.ascontiguousarray(samples), ratios=list(ratios),
                                numres=numres, precinct=psize, codeblock=cb, plt=True,
                                threads=0)
        except (OSError, RuntimeError, ValueError) as e:
            raise EncodeError(f"OpenJPEG could not encode the frame: {e}") from e
    else:
        cs = _glymur_file_encode(samples, ratios, numres, psize, cb)
    return EncodedFrame(codestream=cs, offset=offset, index=PacketIndex.parse(cs))


def _glymur_file_encode(samples: np.ndarray, ratios, numres: int, psize: int, cb: int) -> bytes:
    """The former path: glymur writes files only, so through a temporary file."""
    import glymur

    with tempfile.TemporaryDirectory(prefix="mv-enc-") as tmp:
        path = os.path.join(tmp, "frame.j2k")
        glymur.Jp2k(path, data=np.ascontiguousarray(samples), cratios=list(ratios),
                    numres=numres, psizes=[(psize, psize)] * numres, cbsize=(cb, cb),
                    prog="LRCP", plt=True, irreversible=False)
        with open(path, "rb") as f:
            return f.read()


def pixel_digest(samples: np.ndarray) -> str:
    """SHA-256 of a frame's sample values, whatever their width (shape first, then the
    values as little-endian 16-bit integers, signed for a signed dtype: no copy for the
    usual 16-bit frames): the samples given to :func:`encode_frame`, as
    :func:`decode_full` gives them back (what a deferred verification compares). Values
    beyond 16 bits are refused (the encoder takes none)."""
    a = np.asarray(samples)
    if a.dtype.kind not in "ui":
        raise EncodeError(f"pixels must be integers, got {a.dtype}")
    want = np.dtype("<i2" if a.dtype.kind == "i" else "<u2")
    if a.dtype != want:
        if a.size and (int(a.min()) < np.iinfo(want).min or int(a.max()) > np.iinfo(want).max):
            raise EncodeError(f"pixel values {int(a.min())}..{int(a.max())} exceed 16 bits")
        a = a.astype(want)
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(repr(a.shape).encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def undo_offset(samples: np.ndarray, offset: int, signed: bool, bits_stored: int = 16) -> np.ndarray:
    """Stored samples back to DICOM stored pixel values (dtype of the DICOM data)."""
    if samples.ndim == 3:
        return samples
    if offset == 0 and not signed:
        return samples
    vals = samples.astype(np.int32) - offset
    if signed:
        return vals.astype(np.int16 if bits_stored > 8 else np.int8)
    return vals.astype(np.uint16 if bits_stored > 8 else np.uint8)


_TMPDIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class DecodeError(RuntimeError):
    """OpenJPEG could not decode the codestream (with its reason)."""


def openjpeg_decode(codestream: bytes, *, layers: int = 0, reduce: int = 0,
                    area: tuple[int, int, int, int] | None = None,
                    threads: int | None = None) -> np.ndarray:
    """Decode through OpenJPEG: the first ``layers`` layers (0 = all), at ``reduce``,
    restricted to ``area`` = (x, y, w, h) in full-resolution pixels. From memory
    (:mod:`codestream.opj_memory`: the library glymur binds, the same parameters, no
    temp file, no Python header parse); through glymur and a temp file in /dev/shm only
    where that cannot load."""
    if _memory_decode is not None:
        box = None if area is None else (area[1], area[0], area[1] + area[3],
                                         area[0] + area[2])
        try:
            return _memory_decode(codestream, layers=layers if layers > 0 else 0,
                                  reduce=reduce, area=box, threads=threads)
        except (OSError, RuntimeError, ValueError, IndexError) as e:
            raise DecodeError(f"OpenJPEG could not decode the image: {e}") from e
    return _glymur_file_decode(codestream, layers=layers, reduce=reduce, area=area)


def _glymur_file_decode(codestream: bytes, *, layers: int = 0, reduce: int = 0,
                        area: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The former path: glymur reads files only, so the bytes go through a temp file."""
    import glymur

    fd, path = tempfile.mkstemp(suffix=".j2k", dir=_TMPDIR)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(codestream)
        jp = glymur.Jp2k(path)
        cod = next(seg for seg in jp.codestream.segment if seg.marker_id == "COD")
        # OpenJPEG's cp_layer: decode the first N layers, 0 = all of them
        jp.layer = 0 if layers <= 0 or layers >= cod.layers else layers
        step = 1 << reduce
        if area is None:
            return jp[::step, ::step]
        x, y, w, h = area
        return jp[y:y + h:step, x:x + w:step]
    except (OSError, RuntimeError, ValueError, IndexError, StopIteration) as e:
        raise DecodeError(f"OpenJPEG could not decode the image: {e}") from e
    finally:
        os.unlink(path)


try:
    from .opj_memory import decode as _memory_decode
    from .opj_memory import encode as _memory_encode
except (ImportError, AttributeError, OSError):       # pragma: no cover - old libopenjp2
    _memory_decode = _memory_encode = None


def decode_full(codestream: bytes, offset: int, signed: bool, *, layers: int = 0, reduce: int = 0,
                area: tuple[int, int, int, int] | None = None, bits_stored: int = 16,
                threads: int | None = None) -> np.ndarray:
    """Reference decode of a stored codestream, offset undone. ``area`` is (y0, x0, y1, x1)
    in full-resolution pixels; the result is at ``reduce``. ``threads``: OpenJPEG's own
    (None: glymur's option; 0 on the calling thread, for callers that run one decoder per
    core already)."""
    xywh = None if area is None else (area[1], area[0], area[3] - area[1], area[2] - area[0])
    arr = openjpeg_decode(codestream, layers=layers, reduce=reduce, area=xywh, threads=threads)
    return undo_offset(arr, offset, signed, bits_stored)
