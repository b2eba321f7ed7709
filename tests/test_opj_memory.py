"""Decode from memory (issue 15): OpenJPEG through a ctypes memory stream gives exactly
what glymur's file path gives (same library, same parameters), for every layer count,
reduction and area, and refuses what it refuses."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from codestream import encode as enc
from codestream.encode import DecodeError, encode_frame, openjpeg_decode


def _frames():
    rng = np.random.default_rng(5)
    yield rng.integers(0, 4095, (150, 131)).astype(np.uint16), False, 12
    yield rng.integers(-2000, 2000, (130, 64)).astype(np.int16), True, 16
    yield rng.integers(0, 255, (40, 90, 3)).astype(np.uint8), False, 8


def test_the_memory_path_is_in_use():
    assert enc._memory_decode is not None


@pytest.mark.parametrize("n", range(3))
def test_bit_identical_to_glymur_file_path(n):
    a, signed, bits = list(_frames())[n]
    ef = encode_frame(a, signed=signed, bits_stored=bits)
    h, w = a.shape[:2]
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for layers in (0, 1, 3, 4, 9):
            for reduce in (0, 1, 2, 4):
                for area in (None, (7, 9, 40, 30), (0, 0, w, h), (3, 5, 1, 1)):
                    try:
                        ref = enc._glymur_file_decode(ef.codestream, layers=layers,
                                                      reduce=reduce, area=area)
                    except DecodeError:
                        with pytest.raises(DecodeError):
                            openjpeg_decode(ef.codestream, layers=layers, reduce=reduce,
                                            area=area)
                        continue
                    got = openjpeg_decode(ef.codestream, layers=layers, reduce=reduce, area=area)
                    assert got.dtype == ref.dtype and got.shape == ref.shape
                    assert np.array_equal(got, ref), (layers, reduce, area)
                    checked += 1
    assert checked >= 30
    full = openjpeg_decode(ef.codestream)
    assert np.array_equal(enc.undo_offset(full, ef.offset, signed, bits), a)


def test_damaged_codestream_is_a_decode_error():
    a = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    cs = encode_frame(a, signed=False, bits_stored=12).codestream
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DecodeError):
            openjpeg_decode(cs[:40])
        with pytest.raises(DecodeError):
            openjpeg_decode(b"not a codestream at all")


@pytest.mark.parametrize("shape,dtype", [((150, 131), np.uint16), ((64, 64), np.uint8),
                                         ((40, 90, 3), np.uint8), ((20, 33), np.uint16),
                                         ((7, 300), np.uint16),
                                         ((1100, 1000), np.uint16)])   # > the 1 MB buffer
def test_encode_from_memory_is_byte_identical_to_glymur_file(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    samples = rng.integers(0, np.iinfo(dtype).max, shape).astype(dtype)
    ef = encode_frame(samples, signed=False, bits_stored=8 * np.dtype(dtype).itemsize)
    h, w = shape[:2]
    cb = enc.CODEBLOCK if min(w, h) >= enc.CODEBLOCK else 32
    ref = enc._glymur_file_encode(samples, enc.LAYER_RATIOS, enc.numres_for(w, h),
                                  max(enc.PRECINCT, 2 * enc.CODEBLOCK), cb)
    assert enc._memory_encode is not None and ef.codestream == ref
    assert np.array_equal(openjpeg_decode(ef.codestream), samples)
