"""OpenJPEG straight from and to memory: ctypes memory streams, no temp file.

:func:`decode` (bytes to pixels) and :func:`encode` (pixels to a codestream, the
parameters glymur sets for the same arguments, byte-identical to glymur writing a file).

The same libopenjp2 and the same decoder parameters glymur uses (``cp_layer``,
``cp_reduce``, the decode area in full-resolution coordinates, the thread count of
glymur's ``lib.num_threads`` option), and glymur's ctypes bindings for everything but the
stream; the samples are converted as glymur converts them (int8/uint8 up to 8 bits,
int16/uint16 up to 16). So the pixels are bit-identical to glymur's, without writing
the codestream to a file and without glymur's Python parse of every marker segment
(about 1 ms per image at reduce=2, most of the decode's fixed cost).

Only raw codestreams (J2K, not JP2) with equally sized components, as the store holds.
"""
from __future__ import annotations

import ctypes
import itertools

import numpy as np

from glymur.lib import openjp2 as opj2
from glymur.options import get_option

_LIB = opj2.OPENJP2
if _LIB is None:                                    # pragma: no cover - no libopenjp2
    raise ImportError("libopenjp2 not found")

_SIZE_T = ctypes.c_size_t
_OFF_T = ctypes.c_int64
_READ_FN = ctypes.CFUNCTYPE(_SIZE_T, ctypes.c_void_p, _SIZE_T, ctypes.c_void_p)
_SKIP_FN = ctypes.CFUNCTYPE(_OFF_T, _OFF_T, ctypes.c_void_p)
_SEEK_FN = ctypes.CFUNCTYPE(ctypes.c_int32, _OFF_T, ctypes.c_void_p)
_WRITE_FN = ctypes.CFUNCTYPE(_SIZE_T, ctypes.c_void_p, _SIZE_T, ctypes.c_void_p)

_stream_create = _LIB.opj_stream_create
_stream_create.argtypes = [_SIZE_T, ctypes.c_int32]
_stream_create.restype = ctypes.c_void_p
_set_read = _LIB.opj_stream_set_read_function
_set_read.argtypes = [ctypes.c_void_p, _READ_FN]
_set_read.restype = None
_set_skip = _LIB.opj_stream_set_skip_function
_set_skip.argtypes = [ctypes.c_void_p, _SKIP_FN]
_set_skip.restype = None
_set_seek = _LIB.opj_stream_set_seek_function
_set_seek.argtypes = [ctypes.c_void_p, _SEEK_FN]
_set_seek.restype = None
_set_write = _LIB.opj_stream_set_write_function
_set_write.argtypes = [ctypes.c_void_p, _WRITE_FN]
_set_write.restype = None
_set_user_data = _LIB.opj_stream_set_user_data
_set_user_data.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
_set_user_data.restype = None
_set_length = _LIB.opj_stream_set_user_data_length
_set_length.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
_set_length.restype = None
_stream_destroy = _LIB.opj_stream_destroy
_stream_destroy.argtypes = [ctypes.c_void_p]
_stream_destroy.restype = None

_CODEC_J2K = 0
_EOF = (1 << (8 * ctypes.sizeof(_SIZE_T))) - 1      # (OPJ_SIZE_T)-1

# per stream: [buffer, address, length, position], keyed by the user-data integer
_streams: dict[int, list] = {}
_keys = itertools.count(1)


def _read(dst, n, key):
    s = _streams[key]
    left = s[2] - s[3]
    if left <= 0:
        return _EOF
    k = min(n, left)
    ctypes.memmove(dst, s[1] + s[3], k)
    s[3] += k
    return k


def _skip(n, key):
    s = _streams[key]
    pos = s[3] + n
    if pos < 0:
        return -1
    s[3] = min(pos, s[2])
    return n


def _seek(pos, key):
    s = _streams[key]
    if pos < 0 or pos > s[2]:
        return 0
    s[3] = pos
    return 1


_READ_CB, _SKIP_CB, _SEEK_CB = _READ_FN(_read), _SKIP_FN(_skip), _SEEK_FN(_seek)

# output streams: [bytearray, position], keyed like the input ones
_outputs: dict[int, list] = {}


def _write(src, n, key):
    o = _outputs[key]
    buf, pos = o
    end = pos + n
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    buf[pos:end] = ctypes.string_at(src, n)
    o[1] = end
    return n


def _out_skip(n, key):
    o = _outputs[key]
    if o[1] + n < 0:
        return -1
    o[1] += n
    return n


def _out_seek(pos, key):
    if pos < 0:
        return 0
    _outputs[key][1] = pos
    return 1


_WRITE_CB, _OUT_SKIP_CB, _OUT_SEEK_CB = (_WRITE_FN(_write), _SKIP_FN(_out_skip),
                                         _SEEK_FN(_out_seek))
_LRCP = 0


def _dtype(comp) -> type:
    if comp.prec > 16:
        raise ValueError(f"unhandled precision: {comp.prec} bits")
    if comp.sgnd:
        return np.int8 if comp.prec <= 8 else np.int16
    return np.uint8 if comp.prec <= 8 else np.uint16


def decode(codestream: bytes, *, layers: int = 0, reduce: int = 0,
           area: tuple[int, int, int, int] | None = None,
           threads: int | None = None) -> np.ndarray:
    """Decode a J2K codestream from memory: the first ``layers`` layers (0: all), at
    ``reduce``, within ``area`` = (y0, x0, y1, x1) in full-resolution pixels (None: all).
    Returns (h, w) or (h, w, ncomp). Raises OSError / RuntimeError / ValueError when
    OpenJPEG cannot decode it (as glymur does)."""
    data = bytes(codestream)
    buf = ctypes.create_string_buffer(data, len(data))
    key = next(_keys)
    _streams[key] = [buf, ctypes.addressof(buf), len(data), 0]
    stream = codec = image = None
    try:
        stream = _stream_create(max(len(data), 1 << 12), 1)
        if not stream:
            raise RuntimeError("OpenJPEG could not create a stream")
        _set_read(stream, _READ_CB)
        _set_skip(stream, _SKIP_CB)
        _set_seek(stream, _SEEK_CB)
        _set_user_data(stream, key, None)
        _set_length(stream, len(data))
        codec = opj2.create_decompress(_CODEC_J2K)
        opj2.set_error_handler(codec, opj2._ERROR_CALLBACK)
        opj2.set_warning_handler(codec, opj2._WARNING_CALLBACK)
        opj2.set_info_handler(codec, None)
        dp = opj2.set_default_decoder_parameters()
        dp.decod_format = _CODEC_J2K
        dp.cp_layer = max(0, layers)
        dp.cp_reduce = reduce
        opj2.setup_decoder(codec, dp)
        opj2.codec_set_threads(codec, threads if threads is not None
                               else get_option("lib.num_threads"))
        image = opj2.read_header(ctypes.cast(stream, ctypes.c_void_p), codec)
        img = image.contents
        if area is None:
            y0, x0, y1, x1 = 0, 0, img.y1 - img.y0, img.x1 - img.x0
        else:
            y0, x0, y1, x1 = area
        opj2.set_decode_area(codec, image, x0, y0, x1, y1)
        opj2.decode(codec, ctypes.cast(stream, ctypes.c_void_p), image)
        opj2.end_decompress(codec, ctypes.cast(stream, ctypes.c_void_p))
        img = image.contents
        bands = []
        for k in range(img.numcomps):
            c = img.comps[k]
            if c.h == 0 or c.w == 0:
                raise ValueError(f"component {k} has invalid dimensions {c.h} x {c.w}")
            n = c.h * c.w
            a = np.ctypeslib.as_array((ctypes.c_int32 * n).from_address(
                ctypes.addressof(c.data.contents)))
            bands.append(a.astype(_dtype(c)).reshape(c.h, c.w))
        if len(bands) == 1:
            return bands[0]
        if any(b.shape != bands[0].shape or b.dtype != bands[0].dtype for b in bands):
            raise ValueError("components of different sizes or precisions")
        return np.stack(bands, axis=2)
    finally:
        if image is not None:
            opj2.image_destroy(image)
        if codec is not None:
            opj2.destroy_codec(codec)
        if stream:
            _stream_destroy(stream)
        _streams.pop(key, None)


def encode(samples: np.ndarray, *, ratios: list[int], numres: int, precinct: int,
           codeblock: int, plt: bool = True, threads: int | None = None) -> bytes:
    """Encode uint8/uint16 samples, (h, w) or (h, w, 3), reversibly (5/3), into a J2K
    codestream in memory: layers at ``ratios`` (``cp_disto_alloc``), ``numres``
    resolutions, square precincts of ``precinct`` at every level, ``codeblock``
    code-blocks, LRCP order, PLT markers — the parameters glymur sets for
    ``Jp2k(path, data, cratios, numres, psizes, cbsize, prog="LRCP", plt=True,
    irreversible=False)``, so the bytes are the same as glymur's file."""
    a = np.asarray(samples)
    if a.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"samples must be uint8 or uint16, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    h, w, ncomp = a.shape
    if 0 in a.shape:
        raise ValueError(f"the image has invalid dimensions, {a.shape}")
    gray = ncomp < 3
    cp = opj2.set_default_encoder_parameters()
    cp.codec_fmt = _CODEC_J2K
    cp.irreversible = 0
    cp.cblockw_init = codeblock
    cp.cblockh_init = codeblock
    cp.tcp_numlayers = len(ratios)
    for j, r in enumerate(ratios):
        cp.tcp_rates[j] = r
    cp.cp_disto_alloc = 1
    cp.numresolution = numres
    cp.prog_order = _LRCP
    for j in range(numres):
        cp.prcw_init[j] = precinct
        cp.prch_init[j] = precinct
    cp.csty |= 0x01
    cp.res_spec = numres
    cp.tcp_mct = 0 if gray else 1
    prec = 8 if a.dtype == np.uint8 else 16
    parms = (opj2.ImageComptParmType * ncomp)()
    for j in range(ncomp):
        parms[j].dx, parms[j].dy = cp.subsampling_dx, cp.subsampling_dy
        parms[j].w, parms[j].h = w, h
        parms[j].x0, parms[j].y0 = cp.image_offset_x0, cp.image_offset_y0
        parms[j].prec = parms[j].bpp = prec
        parms[j].sgnd = 0
    key = next(_keys)
    _outputs[key] = [bytearray(), 0]
    image = codec = stream = None
    try:
        image = opj2.image_create(parms, opj2.CLRSPC_GRAY if gray else opj2.CLRSPC_SRGB)
        img = image.contents
        img.x0, img.y0 = cp.image_offset_x0, cp.image_offset_y0
        img.x1 = img.x0 + (w - 1) * cp.subsampling_dx + 1
        img.y1 = img.y0 + (h - 1) * cp.subsampling_dy + 1
        for k in range(ncomp):
            band = np.ascontiguousarray(a[:, :, k], dtype=np.int32)
            ctypes.memmove(img.comps[k].data, band.ctypes.data, band.nbytes)
        codec = opj2.create_compress(_CODEC_J2K)
        opj2.set_info_handler(codec, None)
        opj2.set_warning_handler(codec, opj2._WARNING_CALLBACK)
        opj2.set_error_handler(codec, opj2._ERROR_CALLBACK)
        opj2.setup_encoder(codec, cp, image)
        if plt:
            opj2.encoder_set_extra_options(codec, plt=True)
        stream = _stream_create(1 << 20, 0)
        if not stream:
            raise RuntimeError("OpenJPEG could not create a stream")
        _set_write(stream, _WRITE_CB)
        _set_skip(stream, _OUT_SKIP_CB)
        _set_seek(stream, _OUT_SEEK_CB)
        _set_user_data(stream, key, None)
        opj2.codec_set_threads(codec, threads if threads is not None
                               else get_option("lib.num_threads"))
        vs = ctypes.c_void_p(stream)
        opj2.start_compress(codec, image, vs)
        opj2.encode(codec, vs)
        opj2.end_compress(codec, vs)
        _stream_destroy(stream)             # flushes what the stream still buffers
        stream = None
        return bytes(_outputs[key][0])
    finally:
        if stream:
            _stream_destroy(stream)
        if codec is not None:
            opj2.destroy_codec(codec)
        if image is not None:
            opj2.image_destroy(image)
        _outputs.pop(key, None)
