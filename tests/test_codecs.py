"""The codec interface (codestream/codecs.py): every backend round-trips bit-exact on the
real pydicom / pydicom-data images it supports; reduced decodes have the JPEG 2000 size;
lossy encodes reach their ratio; a missing library is named."""
from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest

from codestream import codecs
from server import sample

# real images: 8/16-bit, signed/unsigned, grayscale/palette/RGB, single and multi-frame
REAL = [
    "CT_small.dcm",          # int16, BitsStored 16, signed
    "693_UNCR.dcm",          # 512x512 CT, signed, BitsStored 14
    "MR_small.dcm",          # signed 16
    "emri_small.dcm",        # 10 frames, unsigned, BitsStored 12
    "vlut_04.dcm",           # 512x512 unsigned 8-bit
    "OBXXXX1A.dcm",          # palette colour indices, 8-bit
    "US1_UNCR.dcm",          # RGB 8-bit ultrasound
    "SC_rgb_16bit.dcm",      # RGB 16-bit
]


def _frames(name):
    p = sample.find_test_file(name)
    if p is None:
        pytest.skip(f"test file {name} not installed")
    ds = pydicom.dcmread(p)
    arr = ds.pixel_array
    n = int(ds.get("NumberOfFrames", 1) or 1)
    frames = list(arr[:3]) if n > 1 else [arr]
    return frames, bool(ds.PixelRepresentation), int(ds.BitsStored)


LOSSLESS = [c for c in codecs.all_codecs() if c.lossless]


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("codec", LOSSLESS, ids=lambda c: c.transfer_syntax)
def test_lossless_round_trip_real(codec, name):
    if not codec.available:
        pytest.skip(codec.missing)
    frames, signed, bits = _frames(name)
    done = 0
    for f in frames:
        why = codec.supports(f, signed=signed, bits_stored=bits)
        if why:
            # only the documented limits may refuse an image
            assert signed and not codec.takes_signed, why
            with pytest.raises(codecs.CodecError, match="signed"):
                codec.encode(f, signed=signed, bits_stored=bits)
            continue
        data = codec.encode(f, signed=signed, bits_stored=bits)
        assert len(data) < f.nbytes
        back = codec.decode(data, signed=signed, bits_stored=bits)
        assert back.shape == f.shape and back.dtype == f.dtype, (back.shape, back.dtype)
        assert np.array_equal(back, f), f"{codec.label} not bit-exact on {name}"
        done += 1
    assert done or (signed and not codec.takes_signed)


def test_every_lossless_backend_saw_each_kind():
    """The matrix above covers signed 16-bit, unsigned 8-bit and RGB for each backend
    that takes them (guards against a parametrisation that silently skips everything)."""
    kinds = {n: _frames(n) for n in ("CT_small.dcm", "vlut_04.dcm", "US1_UNCR.dcm")}
    for c in LOSSLESS:
        for n, (frames, signed, bits) in kinds.items():
            if signed and not c.takes_signed:
                continue
            assert c.supports(frames[0], signed=signed, bits_stored=bits) == "", (c.label, n)


def test_jpegls_signed_is_twos_complement_at_the_precision():
    """JPEG-LS stores signed samples as the unsigned 16-bit two's complement pattern with
    P = 16 in its header (pydicom extends the sign at P); decoding without signed=True
    shows that pattern."""
    c = codecs.get(codecs.JPEGLS_LOSSLESS)
    a = np.array([[-2048, -1, 0, 2047]] * 4, np.int16)
    data = c.encode(a, signed=True, bits_stored=12)
    assert codecs._jls_precision(data) == 16
    raw = c.decode(data)
    assert raw.dtype == np.uint16 and raw[0].tolist() == [63488, 65535, 0, 2047]
    assert np.array_equal(c.decode(data, signed=True, bits_stored=12), a)
    b = np.array([[-128, -1, 0, 127]] * 4, np.int8)
    data = c.encode(b, signed=True, bits_stored=8)
    assert codecs._jls_precision(data) == 8
    assert np.array_equal(c.decode(data, signed=True, bits_stored=8), b)


@pytest.mark.parametrize("codec", LOSSLESS, ids=lambda c: c.transfer_syntax)
def test_reduced_decode_shape(codec):
    frames, signed, bits = _frames("693_UNCR.dcm")
    f = frames[0][:301, :257]          # odd sizes: ceil(n / 2**r)
    if codec.supports(f, signed=signed, bits_stored=bits):
        f = f.astype(np.int32).clip(0).astype(np.uint16)
        signed = False
    data = codec.encode(f, signed=signed, bits_stored=bits)
    for r in (1, 2):
        small = codec.decode(data, r, signed=signed, bits_stored=bits)
        assert small.shape == (math.ceil(301 / 2 ** r), math.ceil(257 / 2 ** r))
        # a reduced image is a picture of the same thing, not noise
        ref = f[:: 2 ** r, :: 2 ** r].astype(float)
        corr = np.corrcoef(small.astype(float).ravel(), ref.ravel())[0, 1]
        assert corr > 0.9, (codec.label, r, corr)


def test_htj2k_rpcl_codestream_layout():
    """.202 requires RPCL; we also write TLM and one tile-part per resolution."""
    c = codecs.get(codecs.HTJ2K_LOSSLESS_RPCL)
    a = np.random.default_rng(1).integers(0, 4096, (256, 256)).astype(np.uint16)
    data = c.encode(a, bits_stored=12)
    cod = data.find(b"\xff\x52")
    assert data[:2] == b"\xff\x4f" and cod > 0
    assert data[cod + 5] == 2                          # progression order RPCL
    assert b"\xff\x55" in data[:cod + 200]              # TLM in the main header
    levels = data[cod + 9]
    assert data.count(b"\xff\x90") == levels + 1        # a tile-part per resolution
    assert b"\xff\x50" in data[:cod]                    # CAP: an HTJ2K codestream
    # the base resolution is at most 64 px on each side, also for a long thin image
    for shape in ((256, 256), (70, 2100), (4100, 40)):
        data = c.encode(np.ones(shape, np.uint16), bits_stored=12)
        cod = data.find(b"\xff\x52")
        levels = data[cod + 9]
        assert max(math.ceil(n / 2 ** levels) for n in shape) <= 64, (shape, levels)
        assert np.array_equal(c.decode(data), np.ones(shape, np.uint16))
        assert c.decode(data, levels).shape == tuple(math.ceil(n / 2 ** levels) for n in shape)


@pytest.mark.parametrize("ts, target", [(codecs.J2K, 20), (codecs.HTJ2K, 20),
                                        (codecs.JPEGXL, 15), (codecs.JPEGLS_NEAR_LOSSLESS, 8)])
def test_lossy_reaches_ratio(ts, target):
    frames, signed, bits = _frames("MR_small.dcm" if ts != codecs.JPEGLS_NEAR_LOSSLESS
                                   else "vlut_04.dcm")
    f = frames[0]
    c = codecs.get(ts)
    if c.supports(f, signed=signed, bits_stored=bits):
        f = (f.astype(np.int32) - f.min()).astype(np.uint16)
        signed = False
    data = c.encode(f, signed=signed, bits_stored=bits, ratio=target)
    ratio = f.nbytes / len(data)
    assert ratio >= target * 0.9, ratio
    back = c.decode(data, signed=signed, bits_stored=bits)
    assert back.shape == f.shape
    assert 20 < codecs.psnr(f, back) < math.inf


def test_jpeg_baseline_round_trip_rgb():
    frames, _, _ = _frames("US1_UNCR.dcm")
    c = codecs.get(codecs.JPEG_BASELINE)
    data = c.encode(frames[0], quality=95)
    back = c.decode(data)
    assert back.shape == frames[0].shape and codecs.psnr(frames[0], back) > 30
    with pytest.raises(codecs.CodecError, match="8 bits"):
        c.encode(np.zeros((8, 8), np.uint16), ratio=10)


def test_get_and_errors():
    assert codecs.get("1.2.840.10008.1.2.4.80").name == "jpegls"
    assert codecs.by_name("htj2k").transfer_syntax == codecs.HTJ2K_LOSSLESS_RPCL
    assert codecs.by_name("jxl", lossless=False).transfer_syntax == codecs.JPEGXL
    with pytest.raises(KeyError, match="1.2.3"):
        codecs.get("1.2.3")
    c = codecs.get(codecs.JPEGLS_LOSSLESS)
    with pytest.raises(codecs.CodecError, match="jpegls"):
        c.decode(b"\xff\xd8 not a codestream")
    with pytest.raises(codecs.CodecError, match="16 bits"):
        c.encode(np.zeros((4, 4), np.uint32))
    with pytest.raises(codecs.CodecError, match="ratio"):
        codecs.get(codecs.J2K).encode(np.zeros((8, 8), np.uint8))


def test_missing_library_is_named(monkeypatch):
    monkeypatch.setattr(codecs, "_imagecodecs", lambda: None)
    for c in codecs.all_codecs():
        assert not c.available
        assert c.library in c.missing and "imagecodecs" in c.missing
        assert c.version == ""
    c = codecs.get(codecs.HTJ2K_LOSSLESS_RPCL)
    with pytest.raises(codecs.CodecUnavailable, match="OpenJPH"):
        c.encode(np.zeros((4, 4), np.uint8))
    assert all(not s["available"] and s["missing"] for s in codecs.status())


def test_missing_backend_in_build(monkeypatch):
    import imagecodecs

    class Off:
        available = False
    monkeypatch.setattr(imagecodecs, "JPEGXL", Off)
    c = codecs.get(codecs.JPEGXL_LOSSLESS)
    assert not c.available and "libjxl" in c.missing
    with pytest.raises(codecs.CodecUnavailable, match="libjxl"):
        c.decode(b"")
    assert codecs.get(codecs.JPEGLS_LOSSLESS).available
