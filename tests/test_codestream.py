"""Tests of the codestream core (codestream/): encode, packet index, empty-packet rebuild,
region selection, JPP-stream messages and record framing.

Every decoding check compares against OpenJPEG's own decode of the *full* codestream
(through glymur, and in a few places through the opj_decompress command line), never
against our own output alone.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import tempfile
import warnings

import numpy as np
import pytest

glymur = pytest.importorskip("glymur")

from codestream import framing, jpp  # noqa: E402
from codestream.databins import BinSet, rebuild_codestream, split_databins  # noqa: E402
from codestream.encode import (LAYER_RATIOS, MAX_LOWEST_RES, EncodeError,  # noqa: E402
                               decode_full, encode_frame, numres_for)
from codestream.index import (PLT, SOP, CodestreamError, PacketIndex,  # noqa: E402
                              iter_marker_segments)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PROGS = ("LRCP", "RLCP", "RPCL", "PCRL", "CPRL")


# --------------------------------------------------------------------------- helpers
def natural(h: int, w: int, lo: int, hi: int, dtype, seed: int = 0, nc: int = 0) -> np.ndarray:
    """Smooth structure plus noise, spanning exactly lo..hi (both ends present)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = (np.sin(x / 11.0 + seed) + np.cos(y / 17.0) + np.sin((x + y) / 29.0)) / 6.0 + 0.5
    shape = (h, w) if not nc else (h, w, nc)
    if nc:
        base = base[..., None]
    a = np.clip(base + rng.normal(0, 0.06, shape), 0, 1)
    a = np.round(a * (hi - lo) + lo).astype(np.int64)
    flat = a.reshape(-1)
    flat[0], flat[-1] = lo, hi
    return a.astype(dtype)


def _tmpfile(data: bytes, suffix=".j2k") -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def opj_decode(cs: bytes, layers: int = 0, reduce: int = 0, area=None, comps=None) -> np.ndarray:
    """OpenJPEG decode (glymur) of raw stored samples; area = (y0, x0, y1, x1) on the
    reference grid (image offset included); comps = the components to decode."""
    path = _tmpfile(cs)
    try:
        jp = glymur.Jp2k(path)
        if comps is not None:
            jp.decoded_components = list(comps)
        # OpenJPEG's cp_layer: decode the first N layers; 0 (and glymur wants < nlayers) = all
        nl = next(s for s in jp.codestream.segment if s.marker_id == "COD").layers
        jp.layer = 0 if layers >= nl else layers
        s = 1 << reduce
        if area is None:
            return jp[::s, ::s]
        y0, x0, y1, x1 = area
        return jp[y0:y1:s, x0:x1:s]
    finally:
        os.unlink(path)


def glymur_encode(data: np.ndarray, **kw) -> bytes:
    d = tempfile.mkdtemp(prefix="cs-test-")
    try:
        path = os.path.join(d, "x.j2k")
        glymur.Jp2k(path, data=data, **kw)
        with open(path, "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(d)


def binset_from(cs: bytes, ix: PacketIndex, nlayers=None) -> BinSet:
    """A BinSet holding, for every precinct, its first ``nlayers(c, r, p)`` packets
    (all of them when nlayers is None; precincts with 0 layers are left out)."""
    db = split_databins(cs, ix)
    prec = {}
    for c in range(ix.ncomp):
        for r in range(ix.numres):
            for p in range(ix.num_precincts(c, r)):
                b = ix.databin_id(c, r, p)
                n = ix.nlayers if nlayers is None else nlayers(c, r, p)
                if n > 0:
                    prec[b] = b"".join(db.precincts[b][:n])
    return BinSet(db.main_header, db.tile_header, prec)


def assert_same(a: np.ndarray, b: np.ndarray, what: str = ""):
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    if not np.array_equal(a, b):
        diff = np.argwhere(a != b)
        raise AssertionError(f"{what}: {len(diff)} samples differ, first at {diff[0].tolist()}")


def read_pgm(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    tokens, pos = [], 0
    while len(tokens) < 4:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        tokens.append(data[pos:end])
        pos = end
    assert tokens[0] == b"P5"
    w, h, mx = int(tokens[1]), int(tokens[2]), int(tokens[3])
    pos += 1
    dt = ">u2" if mx > 255 else "u1"
    return np.frombuffer(data, dt, count=w * h, offset=pos).reshape(h, w)


def opj_cli_decode(cs: bytes, *args: str) -> np.ndarray:
    exe = shutil.which("opj_decompress")
    if exe is None:
        pytest.skip("opj_decompress not installed")
    d = tempfile.mkdtemp(prefix="cs-cli-")
    try:
        src, out = os.path.join(d, "in.j2k"), os.path.join(d, "out.pgm")
        with open(src, "wb") as f:
            f.write(cs)
        r = subprocess.run([exe, "-i", src, "-o", out, *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        return read_pgm(out)
    finally:
        shutil.rmtree(d)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def u16_odd():
    """300x517 12-bit unsigned frame encoded by encode_frame."""
    a = natural(300, 517, 0, 4095, np.uint16, seed=1)
    return a, encode_frame(a, signed=False, bits_stored=12)


@pytest.fixture(scope="module")
def rgb_frame():
    a = natural(150, 203, 0, 255, np.uint8, seed=2, nc=3)
    return a, encode_frame(a, signed=False, bits_stored=8)


@pytest.fixture(scope="module")
def small_precincts():
    """Glymur-encoded streams with small precincts so regions select few of them."""
    g = natural(300, 517, 0, 4095, np.uint16, seed=3)
    c = natural(200, 311, 0, 255, np.uint8, seed=4, nc=3)
    return {
        "gray-RPCL": glymur_encode(g, numres=5, cratios=[30, 8, 1], psizes=[(32, 32)] * 5,
                                   cbsize=(16, 16), prog="RPCL", plt=True),
        "rgb-PCRL": glymur_encode(c, numres=4, cratios=[30, 1], psizes=[(32, 32)] * 4,
                                  cbsize=(8, 8), prog="PCRL", plt=True),
    }


# =========================================================================== encode
ROUNDTRIP = {
    "uint8": (lambda: natural(256, 256, 0, 255, np.uint8), False, 8),
    "uint16-12bit": (lambda: natural(300, 517, 0, 4095, np.uint16), False, 12),
    "uint16-16bit": (lambda: natural(97, 130, 0, 65535, np.uint16), False, 16),
    "int16-full": (lambda: natural(200, 200, -32768, 32767, np.int16), True, 16),
    "int16-12bit": (lambda: natural(37, 61, -2048, 2047, np.int16), True, 12),
    "int16-12bit-outside": (lambda: natural(70, 90, -3000, 1500, np.int16), True, 12),
    "int8": (lambda: natural(64, 80, -128, 127, np.int8), True, 8),
    "odd-37x61": (lambda: natural(37, 61, 0, 1000, np.uint16), False, 10),
    "1x1": (lambda: np.array([[1234]], np.uint16), False, 12),
    "2x3": (lambda: natural(2, 3, 0, 4095, np.uint16), False, 12),
    "1x100": (lambda: natural(1, 100, 0, 255, np.uint8), False, 8),
    "5x3000-thin": (lambda: natural(5, 3000, -1000, 3000, np.int16), True, 16),
    "2000x16-thin": (lambda: natural(2000, 16, 0, 4095, np.uint16), False, 12),
    "rgb-uint8": (lambda: natural(120, 97, 0, 255, np.uint8, nc=3), False, 8),
}


@pytest.mark.parametrize("name", list(ROUNDTRIP))
def test_encode_lossless_roundtrip(name):
    make, signed, bits = ROUNDTRIP[name]
    a = make()
    ef = encode_frame(a, signed=signed, bits_stored=bits)
    # OpenJPEG's decode of the stored samples, offset removed by hand: bit-exact
    raw = opj_decode(ef.codestream)
    assert raw.shape == a.shape
    assert np.array_equal(raw.astype(np.int64) - ef.offset, a.astype(np.int64))
    # decode_full gives the original values and dtype
    assert_same(decode_full(ef.codestream, ef.offset, signed, bits_stored=bits), a, name)
    ix = ef.index
    assert (ix.width, ix.height) == (a.shape[1], a.shape[0])
    assert ix.ncomp == (3 if a.ndim == 3 else 1)
    assert ix.nlayers == len(LAYER_RATIOS) and ix.progression == "LRCP"


def test_encode_offset_rules():
    a = natural(40, 40, -32768, 32767, np.int16)
    assert encode_frame(a, signed=True, bits_stored=16).offset == 32768
    b = natural(40, 40, -2048, 2047, np.int16)
    assert encode_frame(b, signed=True, bits_stored=12).offset == 2048
    c = natural(40, 40, 0, 4095, np.uint16)
    assert encode_frame(c, signed=False, bits_stored=12).offset == 0


def test_encode_against_opj_decompress_cli(u16_odd):
    a, ef = u16_odd
    assert_same(opj_cli_decode(ef.codestream).astype(np.uint16), a, "opj_decompress")
    # the CLI's reduce agrees with glymur's
    assert_same(opj_cli_decode(ef.codestream, "-r", "2").astype(np.uint16),
                opj_decode(ef.codestream, reduce=2), "opj_decompress -r 2")


def test_encode_dicom_testdata():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    frames = []
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG-LL.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                 "693_J2KI.dcm", "emri_small.dcm"):
        path = get_testdata_file(name)
        if path is None:
            continue
        ds = pydicom.dcmread(path)
        try:
            arr = ds.pixel_array
        except Exception as e:  # a missing decoder plugin is not our bug
            warnings.warn(f"{name}: {e}")
            continue
        nf = int(ds.get("NumberOfFrames", 1) or 1)
        arrs = [arr[i] for i in range(min(nf, 3))] if nf > 1 else [arr]
        for f in arrs:
            frames.append((name, f, bool(ds.PixelRepresentation), int(ds.BitsStored)))
    names = {f[0] for f in frames}
    assert {"CT_small.dcm", "MR_small.dcm"} <= names
    assert names & {"JPEG-LL.dcm", "SC_rgb_jpeg_dcmtk.dcm"}, "no JPEG-compressed test file"
    for name, f, signed, bits in frames:
        ef = encode_frame(f, signed=signed, bits_stored=bits)
        assert_same(decode_full(ef.codestream, ef.offset, signed, bits_stored=bits), f, name)


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((0, 5), np.uint16), "empty"),
    (np.zeros((4, 0, 3), np.uint8), "empty"),
    (np.zeros((8, 8), np.float32), "integer"),
    (np.zeros((8, 8, 3), np.float64), "integer"),
    (np.zeros((8, 8, 4), np.uint8), "shape"),
    (np.zeros((2, 8, 8), np.uint16)[None], "shape"),
    (np.array([[0, 70000]], np.int32), "16 bits"),
])
def test_encode_bad_input(bad, msg):
    with pytest.raises(EncodeError, match=msg):
        encode_frame(bad, signed=False, bits_stored=16)


def test_encode_rejects_lossy_last_layer():
    with pytest.raises(EncodeError):
        encode_frame(natural(16, 16, 0, 255, np.uint8), signed=False, bits_stored=8,
                     ratios=(50, 20))


# =========================================================================== numres / layers
@pytest.mark.parametrize("w, h", [(1, 1), (64, 64), (65, 64), (128, 129), (512, 512),
                                  (517, 300), (3000, 5), (16, 2000), (4096, 4096)])
def test_numres_rule(w, h):
    n = numres_for(w, h)
    # OpenJPEG needs 2**(numres-1) <= the shorter side
    assert 1 << (n - 1) <= min(w, h)
    smallest = max(-(-w // (1 << (n - 1))), -(-h // (1 << (n - 1))))
    can_add = (1 << n) <= min(w, h)
    assert smallest <= MAX_LOWEST_RES or not can_add
    if n > 1:  # minimal: one level fewer would leave the smallest above the limit
        prev = max(-(-w // (1 << (n - 2))), -(-h // (1 << (n - 2))))
        assert prev > MAX_LOWEST_RES


def test_resolution_sizes_match_openjpeg(u16_odd):
    a, ef = u16_odd
    ix = ef.index
    assert ix.numres == numres_for(517, 300) == 5
    assert max(ix.res_size(0)) <= MAX_LOWEST_RES < max(ix.res_size(1))
    for r in range(ix.numres):
        w, h = ix.res_size(r)
        assert opj_decode(ef.codestream, reduce=ix.reduce_for(r)).shape == (h, w)
        assert ix.res_for_size(w, h) == r


def test_layers_progression_plt(u16_odd):
    a, ef = u16_odd
    ix = ef.index
    cs = ef.codestream
    assert ix.nlayers == 4 and ix.progression == "LRCP"
    assert any(m == PLT for m, _, _ in iter_marker_segments(cs, *ix.tile_header))
    cum = [ix.bytes_at(q, ix.numres - 1) for q in range(1, 5)]
    assert all(x < y for x, y in zip(cum, cum[1:])), cum
    # quality grows with layers, the last is lossless
    errs = [np.abs(opj_decode(cs, layers=q).astype(np.int64) - a).mean() for q in (1, 2, 3, 4)]
    assert errs[0] > errs[1] > errs[2] > errs[3] == 0, errs


def test_first_layer_ratio_dicom():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("JPEG-LL.dcm")
    if path is None:
        pytest.skip("pydicom test file missing")
    ds = pydicom.dcmread(path)
    a = ds.pixel_array
    ef = encode_frame(a, signed=bool(ds.PixelRepresentation), bits_stored=int(ds.BitsStored))
    ix = ef.index
    raw = a.size * 2  # 16-bit samples as written in SIZ
    cum = [ix.bytes_at(q, ix.numres - 1) for q in range(1, 5)]
    ratios = [raw / c for c in cum]
    assert 40 <= ratios[0] <= 62, ratios
    assert 16 <= ratios[1] <= 24, ratios
    assert all(x < y for x, y in zip(cum, cum[1:])), cum


# =========================================================================== PacketIndex
def _check_index(ix: PacketIndex, cs: bytes):
    pk = ix.packets
    expected = ix.nlayers * sum(ix.num_precincts(c, r)
                                for c in range(ix.ncomp) for r in range(ix.numres))
    assert len(pk) == expected
    keys = {tuple(k) for k in pk[:, :4].tolist()}
    assert keys == {(c, l, r, p) for c in range(ix.ncomp) for l in range(ix.nlayers)
                    for r in range(ix.numres) for p in range(ix.num_precincts(c, r))}
    # contiguous packets filling the tile body exactly, body followed by EOC
    assert pk[0, 4] == ix.body[0]
    assert np.array_equal(pk[1:, 4], pk[:-1, 4] + pk[:-1, 5])
    assert int(pk[:, 5].sum()) == ix.body[1] - ix.body[0]
    assert cs[ix.body[0] - 2:ix.body[0]] == b"\xff\x93"
    assert cs[ix.body[1]:] == b"\xff\xd9"


def test_packet_index_basic(u16_odd, rgb_frame):
    for _a, ef in (u16_odd, rgb_frame):
        _check_index(ef.index, ef.codestream)


def test_packet_index_json_roundtrip(rgb_frame):
    _a, ef = rgb_frame
    ix = ef.index
    s = ix.to_json()
    json.loads(s)
    ix2 = PacketIndex.from_json(s)
    assert np.array_equal(ix2.packets, ix.packets)
    for k in ("width", "height", "x0", "y0", "ncomp", "subsampling", "precision", "signed",
              "numres", "nlayers", "progression", "sop", "eph", "cblk", "precinct_exp",
              "main_header_end", "tile_header", "body", "total_bytes"):
        assert getattr(ix2, k) == getattr(ix, k), k
    assert PacketIndex.from_json(s.encode()).to_json() == s
    d = json.loads(s)
    d["version"] = 99
    with pytest.raises(CodestreamError):
        PacketIndex.from_json(json.dumps(d))


def test_from_headers_matches_parse(u16_odd, rgb_frame, small_precincts):
    streams = [u16_odd[1].codestream, rgb_frame[1].codestream, *small_precincts.values()]
    for cs in streams:
        ix = PacketIndex.parse(cs)
        db = split_databins(cs, ix)
        assert db.main_header[:2] == b"\xff\x4f" and len(db.main_header) == ix.main_header_end
        hx = PacketIndex.from_headers(db.main_header, db.tile_header)
        assert np.array_equal(hx.packets[:, :4], ix.packets[:, :4])
        assert np.array_equal(hx.packets[:, 5], ix.packets[:, 5])
        assert np.array_equal(hx.packets[:, 4] - hx.body[0], ix.packets[:, 4] - ix.body[0])
        assert hx.packet_lengths_by_bin() == ix.packet_lengths_by_bin()
        assert hx.numres == ix.numres and hx.nlayers == ix.nlayers


def test_parse_memoryview_slice(u16_odd):
    cs = u16_odd[1].codestream
    ix = PacketIndex.parse(memoryview(b"junk" + cs + b"tail")[4:4 + len(cs)])
    assert np.array_equal(ix.packets, u16_odd[1].index.packets)


def test_precinct_rects_tile_the_image(u16_odd, rgb_frame, small_precincts):
    indexes = [u16_odd[1].index, rgb_frame[1].index,
               *(PacketIndex.parse(cs) for cs in small_precincts.values())]
    for ix in indexes:
        for c in range(ix.ncomp):
            for r in range(ix.numres):
                cover = np.zeros((ix.height, ix.width), np.int32)
                for p in range(ix.num_precincts(c, r)):
                    x0, y0, x1, y1 = ix.precinct_rect(c, r, p)
                    assert 0 <= x0 < x1 <= ix.width and 0 <= y0 < y1 <= ix.height
                    cover[y0:y1, x0:x1] += 1
                assert cover.min() == 1 and cover.max() == 1, (c, r)


def test_databin_ids(rgb_frame, small_precincts):
    for ix in (rgb_frame[1].index, PacketIndex.parse(small_precincts["gray-RPCL"])):
        ids = []
        for c in range(ix.ncomp):
            for r in range(ix.numres):
                for p in range(ix.num_precincts(c, r)):
                    b = ix.databin_id(c, r, p)
                    assert ix.databin_key(b) == (c, r, p)
                    ids.append(b)
        assert sorted(ids) == list(range(len(ids)))
        # in-class id = c + s*C with s counted from resolution 0 up
        assert ix.databin_id(0, 1, 0) == ix.num_precincts(0, 0) * ix.ncomp
        with pytest.raises(CodestreamError):
            ix.databin_key(len(ids))


# =========================================================================== progressions
PROG_CASES = [(p, nc, off) for p in PROGS for nc in (1, 3) for off in (None, (5, 3))]


@pytest.fixture(scope="module")
def prog_streams():
    cache = {}

    def get(prog, nc, offset):
        key = (prog, nc, offset)
        if key not in cache:
            a = natural(150, 230, 0, 255, np.uint8, seed=7, nc=nc if nc > 1 else 0)
            kw = dict(prog=prog, plt=True, numres=4, cratios=[40, 10, 1], cbsize=(16, 16),
                      psizes=[(64, 64), (64, 64), (32, 32), (32, 32)])
            if offset:
                kw["grid_offset"] = offset
            cache[key] = glymur_encode(a, **kw)
        return cache[key]
    return get


@pytest.mark.parametrize("prog, nc, offset", PROG_CASES,
                         ids=[f"{p}-{nc}c-{'off' if o else '0'}" for p, nc, o in PROG_CASES])
def test_progression_partial_rebuilds(prog_streams, prog, nc, offset):
    cs = prog_streams(prog, nc, offset)
    ix = PacketIndex.parse(cs)
    assert ix.progression == prog and ix.ncomp == nc and ix.nlayers == 3 and ix.numres == 4
    _check_index(ix, cs)
    # all packets
    full = binset_from(cs, ix)
    assert_same(opj_decode(rebuild_codestream(full)), opj_decode(cs), "all packets")
    # first k layers
    for k in (1, 2):
        rb = rebuild_codestream(binset_from(cs, ix, lambda c, r, p: k))
        assert_same(opj_decode(rb, layers=k), opj_decode(cs, layers=k), f"{k} layers")
        assert_same(opj_decode(rebuild_codestream(full, max_layers=k), layers=k),
                    opj_decode(cs, layers=k), f"max_layers={k}")
    # resolutions <= r
    for red in (1, 2, 3):
        rmax = ix.numres - 1 - red
        rb = rebuild_codestream(binset_from(cs, ix, lambda c, r, p: ix.nlayers * (r <= rmax)))
        assert_same(opj_decode(rb, reduce=red), opj_decode(cs, reduce=red), f"reduce {red}")
    # both at once
    rb = rebuild_codestream(binset_from(cs, ix, lambda c, r, p: 1 if r <= ix.numres - 2 else 0))
    assert_same(opj_decode(rb, layers=1, reduce=1), opj_decode(cs, layers=1, reduce=1),
                "1 layer, reduce 1")
    # precinct-selective sets (a wrong precinct order within a resolution shows only here)
    _region_check(cs, seed=len(prog) * nc + PROGS.index(prog), n=4, layers=(0, 1))
    if nc == 3:  # one component only: decoded alone by OpenJPEG
        rb = rebuild_codestream(binset_from(cs, ix, lambda c, r, p: ix.nlayers * (c == 1)))
        assert_same(opj_decode(rb, comps=[1]), opj_decode(cs, comps=[1]), "component 1 only")


@pytest.mark.parametrize("prog", PROGS)
def test_progression_subsampled(prog):
    a = natural(120, 176, 0, 255, np.uint8, seed=8, nc=3)
    cs = glymur_encode(a, prog=prog, plt=True, numres=3, cratios=[20, 1], cbsize=(16, 16),
                       psizes=[(64, 64), (32, 32), (32, 32)], subsam=(2, 2))
    ix = PacketIndex.parse(cs)
    assert ix.subsampling[0] == (2, 2)
    for k, red in ((1, 0), (2, 1)):
        rmax = ix.numres - 1 - red
        rb = rebuild_codestream(binset_from(cs, ix, lambda c, r, p: k * (r <= rmax)))
        assert_same(opj_decode(rb, layers=k, reduce=red), opj_decode(cs, layers=k, reduce=red),
                    f"{prog} layers {k} reduce {red}")


# =========================================================================== SOP / EPH
@pytest.mark.parametrize("sop, eph", [(True, False), (False, True), (True, True)])
def test_sop_eph_rebuild(sop, eph):
    a = natural(140, 190, 0, 4095, np.uint16, seed=9)
    cs = glymur_encode(a, prog="RLCP", plt=True, numres=3, cratios=[30, 10, 1],
                       cbsize=(16, 16), psizes=[(64, 64)] * 3, sop=sop, eph=eph)
    ix = PacketIndex.parse(cs)
    assert (ix.sop, ix.eph) == (sop, eph)
    _check_index(ix, cs)
    if sop:  # every indexed packet starts with its own SOP marker and sequence number
        for seq, (_c, _l, _r, _p, off, _ln) in enumerate(ix.packets.tolist()):
            assert cs[off:off + 6] == struct.pack(">HHH", SOP, 4, seq & 0xFFFF)
    ep = ix.empty_packet(7)
    assert ep.endswith(b"\x00\xff\x92" if eph else b"\x00")
    assert ep.startswith(b"\xff\x91\x00\x04\x00\x07") == sop
    for k, red in ((1, 0), (2, 0), (1, 1), (3, 2)):
        rmax = ix.numres - 1 - red
        rb = rebuild_codestream(binset_from(cs, ix, lambda c, r, p: k * (r <= rmax)))
        assert_same(opj_decode(rb, layers=k, reduce=red), opj_decode(cs, layers=k, reduce=red),
                    f"layers {k} reduce {red}")


# =========================================================================== regions
def _regions(rng, w, h, n, max_side=90, ox=0, oy=0):
    out = []
    while len(out) < n:
        x0 = int(rng.integers(0, w - 1))
        y0 = int(rng.integers(0, h - 1))
        x1 = int(rng.integers(x0 + 1, min(w, x0 + max_side) + 1))
        y1 = int(rng.integers(y0 + 1, min(h, y0 + max_side) + 1))
        red = int(rng.integers(0, 3))
        s = 1 << red
        if (-(-(x1 + ox) // s) > -(-(x0 + ox) // s)
                and -(-(y1 + oy) // s) > -(-(y0 + oy) // s)):  # non-empty at the reduction
            out.append((x0, y0, x1, y1, red))
    return out


def _region_check(cs: bytes, seed: int, n: int, layers=(0,)):
    """Rebuild from only the precincts precincts_for_region selects (all components,
    resolutions up to the decoded one, the first k layers) and compare OpenJPEG's area
    decode with its area decode of the full codestream."""
    ix = PacketIndex.parse(cs)
    db = split_databins(cs, ix)
    rng = np.random.default_rng(seed)
    for i, (x0, y0, x1, y1, red) in enumerate(_regions(rng, ix.width, ix.height, n,
                                                               ox=ix.x0, oy=ix.y0)):
        k = layers[i % len(layers)] or ix.nlayers
        rmax = ix.numres - 1 - red
        sel = {}
        for c in range(ix.ncomp):
            for r in range(rmax + 1):
                for p in ix.precincts_for_region(c, r, x0, y0, x1, y1):
                    assert 0 <= p < ix.num_precincts(c, r)
                    b = ix.databin_id(c, r, p)
                    sel[b] = b"".join(db.precincts[b][:k])
        rb = rebuild_codestream(BinSet(db.main_header, db.tile_header, sel))
        area = (y0 + ix.y0, x0 + ix.x0, y1 + ix.y0, x1 + ix.x0)  # glymur: reference grid
        assert_same(opj_decode(rb, layers=k, reduce=red, area=area),
                    opj_decode(cs, layers=k, reduce=red, area=area),
                    f"region {(x0, y0, x1, y1)} reduce {red} layers {k}")


def test_region_product_stream(u16_odd):
    _region_check(u16_odd[1].codestream, seed=11, n=25)


@pytest.mark.parametrize("name", ["gray-RPCL", "rgb-PCRL"])
def test_region_small_precincts(small_precincts, name):
    _region_check(small_precincts[name], seed=12, n=40)


def test_region_selection_is_selective(small_precincts, u16_odd):
    for cs in (small_precincts["gray-RPCL"], u16_odd[1].codestream):
        ix = PacketIndex.parse(cs)
        total = sum(ix.num_precincts(0, r) for r in range(ix.numres))
        small = sum(len(ix.precincts_for_region(0, r, 10, 10, 20, 20)) for r in range(ix.numres))
        whole = sum(len(ix.precincts_for_region(0, r, 0, 0, ix.width, ix.height))
                    for r in range(ix.numres))
        assert small < total and whole == total
        top = ix.numres - 1
        assert ix.precincts_for_region(0, top, 10, 10, 20, 20) == [0]


# =========================================================================== bad input
def test_bad_input_messages(u16_odd):
    cs = u16_odd[1].codestream
    ix = u16_odd[1].index
    body_mid = (ix.body[0] + ix.body[1]) // 2
    cases = {
        "empty": (b"", "not a JPEG 2000"),
        "zeros": (bytes(100), "not a JPEG 2000"),
        "png": (b"\x89PNG\r\n\x1a\n" + bytes(50), "not a JPEG 2000"),
        "cut in tile body": (cs[:body_mid], "truncated"),
        "cut before EOC-1": (cs[:ix.body[1] - 1], "truncated"),
        "cut in SIZ": (cs[:20], "runs past the end"),
        "cut in main header": (cs[:ix.main_header_end - 3], "runs past the end"),
        "cut after main header": (cs[:ix.main_header_end], "no tile"),
        "cut in tile header": (cs[:ix.tile_header[0] + 7], "0xff58 .* runs past the end"),
        "cut before SOD": (cs[:ix.tile_header[1] + 1], "truncated"),
    }
    for name, (data, msg) in cases.items():
        with pytest.raises(CodestreamError, match=msg):
            PacketIndex.parse(data)


def test_bad_input_jp2_and_no_plt():
    a = natural(64, 64, 0, 255, np.uint8)
    d = tempfile.mkdtemp(prefix="cs-jp2-")
    try:
        path = os.path.join(d, "x.jp2")
        glymur.Jp2k(path, data=a, numres=2, plt=True)
        with open(path, "rb") as f:
            jp2 = f.read()
    finally:
        shutil.rmtree(d)
    with pytest.raises(CodestreamError, match="not a JPEG 2000 codestream"):
        PacketIndex.parse(jp2)
    no_plt = glymur_encode(a, numres=2, cratios=[10, 1])
    with pytest.raises(CodestreamError, match="no PLT"):
        PacketIndex.parse(no_plt)


def test_truncation_anywhere_raises_codestream_error(rgb_frame):
    cs = rgb_frame[1].codestream
    ix = rgb_frame[1].index
    cuts = list(range(0, ix.body[0] + 3)) + list(range(ix.body[0] + 3, ix.body[1], 101))
    for n in cuts:
        with pytest.raises(CodestreamError):
            PacketIndex.parse(cs[:n])
    # only EOC missing: every packet is there, that still indexes
    assert len(PacketIndex.parse(cs[:-2]).packets) == len(ix.packets)


def test_corrupt_headers_raise_only_codestream_error(u16_odd):
    cs = u16_odd[1].codestream
    hdr_end = u16_odd[1].index.body[0]
    rng = np.random.default_rng(5)
    for _ in range(1500):
        b = bytearray(cs[:hdr_end + 300])
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, hdr_end))] = int(rng.integers(0, 256))
        try:
            PacketIndex.parse(bytes(b) + cs[hdr_end + 300:])
        except CodestreamError:
            pass
    # a truncated tile-header bin on the client side
    db = split_databins(cs, u16_odd[1].index)
    with pytest.raises(CodestreamError):
        PacketIndex.from_headers(db.main_header, db.tile_header[:-3])


# =========================================================================== BinSet
def test_binset_levels(u16_odd):
    a, ef = u16_odd
    cs, ix = ef.codestream, ef.index
    assert BinSet().levels() == (0, -1)
    db = split_databins(cs, ix)
    assert BinSet(db.main_header, db.tile_header).levels() == (0, -1)
    assert binset_from(cs, ix).levels() == (ix.nlayers, ix.numres - 1)
    for k in (1, 3):
        for rmax in (0, 2, ix.numres - 1):
            bs = binset_from(cs, ix, lambda c, r, p: k if r <= rmax else 0)
            assert bs.levels() == (k, rmax)
            red = ix.numres - 1 - rmax
            assert_same(opj_decode(rebuild_codestream(bs), layers=k, reduce=red),
                        opj_decode(cs, layers=k, reduce=red), f"levels {(k, rmax)}")
    # mixed: res 0 has all layers, res 1 two, res 2 one, nothing above
    bs = binset_from(cs, ix, lambda c, r, p: {0: 4, 1: 2, 2: 1}.get(r, 0))
    assert bs.levels() == (1, 2)
    # one precinct of res 1 missing: only res 0 counts
    gap = ix.databin_id(0, 1, 0)
    bs = binset_from(cs, ix, lambda c, r, p: 0 if ix.databin_id(c, r, p) == gap else 4)
    assert bs.levels() == (4, 0)


def test_binset_levels_in_region(u16_odd):
    a, ef = u16_odd
    cs, ix = ef.codestream, ef.index
    region = (20, 30, 40, 25)  # x, y, w, h
    x, y, w, h = region
    wanted = {(0, r, p) for r in range(ix.numres)
              for p in ix.precincts_for_region(0, r, x, y, x + w, y + h)}
    bs = binset_from(cs, ix, lambda c, r, p: 4 if (c, r, p) in wanted else 0)
    assert bs.levels_in_region(region) == (4, ix.numres - 1)
    assert bs.levels()[1] < ix.numres - 1
    bs = binset_from(cs, ix, lambda c, r, p: (2 if r < 3 else 1) if (c, r, p) in wanted else 0)
    assert bs.levels_in_region(region) == (1, ix.numres - 1)
    area = (y, x, y + h, x + w)
    assert_same(opj_decode(rebuild_codestream(bs), layers=1, area=area),
                opj_decode(cs, layers=1, area=area), "region at levels_in_region")
    assert BinSet().levels_in_region(region) == (0, -1)


def test_partial_packet_ignored(u16_odd):
    a, ef = u16_odd
    cs, ix = ef.codestream, ef.index
    db = split_databins(cs, ix)
    lengths = ix.packet_lengths_by_bin()
    whole = binset_from(cs, ix, lambda c, r, p: 2)
    cut = BinSet(db.main_header, db.tile_header, dict(whole.precincts))
    for b, pk in db.precincts.items():
        if len(pk[2]) > 1:
            cut.precincts[b] = b"".join(pk[:2]) + pk[2][:len(pk[2]) // 2]
            assert cut.layers_in_bin(b) == 2
            assert cut.layers_in_bin(b, lengths[b]) == 2
    assert any(len(v) > len(whole.precincts[b]) for b, v in cut.precincts.items())
    assert cut.levels() == (2, ix.numres - 1)
    rb = rebuild_codestream(cut)
    assert rb == rebuild_codestream(whole)
    assert_same(opj_decode(rb), opj_decode(cs, layers=2), "partial packets dropped")
    # a bin cut inside its first packet holds no layer
    b0 = ix.databin_id(0, ix.numres - 1, 0)
    one = BinSet(db.main_header, db.tile_header, {b0: db.precincts[b0][0][:-1]})
    assert one.layers_in_bin(b0) == 0 and one.levels() == (0, -1)


def test_rebuild_needs_headers():
    with pytest.raises(CodestreamError):
        rebuild_codestream(BinSet())


def test_rebuild_via_opj_decompress_cli(u16_odd):
    """Independent decoder path: the CLI decodes a 2-layer rebuild like the full file -l 2."""
    a, ef = u16_odd
    rb = rebuild_codestream(binset_from(ef.codestream, ef.index, lambda c, r, p: 2))
    assert_same(opj_cli_decode(rb), opj_cli_decode(ef.codestream, "-l", "2"), "CLI -l 2")
    # and the glymur helper's layer count means the same as the CLI's -l
    assert_same(opj_cli_decode(ef.codestream, "-l", "1").astype(np.uint16),
                opj_decode(ef.codestream, layers=1), "glymur layer=1 vs CLI -l 1")


# =========================================================================== jpp
@pytest.mark.parametrize("v, enc", [(0, b"\x00"), (127, b"\x7f"), (128, b"\x81\x00"),
                                    (16383, b"\xff\x7f"), (16384, b"\x81\x80\x00")])
def test_vbas_known_encodings(v, enc):
    assert jpp.vbas(v) == enc
    assert jpp.read_vbas(enc + b"zz", 0) == (v, len(enc))


@pytest.mark.parametrize("v", [0, 1, 127, 128, 255, 2**20, 2**32, 2**32 - 1, 2**62, 2**63 - 1])
def test_vbas_roundtrip(v):
    e = jpp.vbas(v)
    assert all(b & 0x80 for b in e[:-1]) and not e[-1] & 0x80
    assert e[0] != 0x80 or len(e) == 1  # minimal length: no leading zero group
    assert jpp.read_vbas(b"\x05" + e, 1) == (v, 1 + len(e))
    with pytest.raises(IndexError):
        jpp.read_vbas(e[:-1], 0)


def test_vbas_errors():
    with pytest.raises(jpp.JppError):
        jpp.vbas(-1)
    with pytest.raises(jpp.JppError):
        jpp.read_vbas(b"\x81" * 9 + b"\x00", 0)


def test_jpp_known_bytes():
    """Hand-assembled per ISO/IEC 15444-9 A.2: BB, C bit, 4 id bits in the first byte."""
    w = jpp.JppWriter()
    m1 = w.message(jpp.JppMessage(jpp.MAIN_HEADER, 0, 0, 0, b"abc", is_last=True))
    assert m1 == b"\x70\x06\x00\x00\x03abc"          # BB=3, C=1, class 6, CSn 0
    m2 = w.message(jpp.JppMessage(jpp.PRECINCT, 0, 200, 5, b"xy"))
    assert m2 == b"\xc1\x48\x00\x05\x02xy"           # BB=2, id 200 = 1|0x48, class 0
    m3 = w.message(jpp.JppMessage(jpp.PRECINCT, 0, 3, 0, b""))
    assert m3 == b"\x23\x00\x00"                      # BB=1: no class, no CSn
    m4 = w.message(jpp.JppMessage(jpp.PRECINCT, 2, 3, 0, b"q", is_last=True))
    assert m4 == b"\x73\x00\x02\x00\x01q"            # BB=3: class and CSn
    eor = jpp.JppWriter.eor(jpp.EOR_WINDOW_DONE)
    assert eor == b"\x00\x02\x00"
    msgs = jpp.parse_all(m1 + m2 + m3 + m4 + eor)
    assert msgs[1] == jpp.JppMessage(0, 0, 200, 5, b"xy", False)
    assert msgs[-1] == jpp.EorMessage(jpp.EOR_WINDOW_DONE, b"")


def _sample_messages():
    rng = random.Random(4)
    out = []
    plan = [(jpp.MAIN_HEADER, 0, 0), (jpp.TILE_HEADER, 0, 0), (jpp.PRECINCT, 0, 0),
            (jpp.PRECINCT, 0, 15), (jpp.PRECINCT, 0, 16), (jpp.PRECINCT, 0, 2047),
            (jpp.PRECINCT, 0, 2**20 + 5), (jpp.PRECINCT, 1, 2**20 + 5),
            (jpp.PRECINCT, 1, 2**35 + 3), (jpp.MAIN_HEADER, 1, 0), (jpp.METADATA, 1, 0),
            (jpp.EXT_PRECINCT, 1, 77), (jpp.PRECINCT, 300, 9), (jpp.PRECINCT, 300, 10),
            (jpp.TILE_HEADER, 2**21, 0), (jpp.PRECINCT, 2**21, 2**40)]
    for i, (cls, csn, bid) in enumerate(plan):
        data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 5, 300])))
        aux = rng.choice([0, 3, 2**33]) if cls & 1 else None
        out.append(jpp.JppMessage(cls, csn, bid, rng.choice([0, 1, 200, 2**32]), data,
                                  is_last=bool(i % 3 == 0), aux=aux))
    return out


def test_jpp_writer_parser_roundtrip():
    msgs = _sample_messages()
    w = jpp.JppWriter()
    parts = [w.message(m) for m in msgs]
    # BB compression: the first byte tells what follows
    prev = None
    for m, part in zip(msgs, parts):
        bb = (part[0] >> 5) & 3
        if prev is None or prev.csn != m.csn:
            assert bb == 3
        elif prev.cls != m.cls:
            assert bb == 2
        else:
            assert bb == 1
        assert bool(part[0] & 0x10) == m.is_last
        prev = m
    stream = b"".join(parts[:8]) + w.eor(jpp.EOR_WINDOW_CHANGE, b"why") + b"".join(parts[8:])
    stream += w.eor(jpp.EOR_IMAGE_DONE)
    expect = msgs[:8] + [jpp.EorMessage(jpp.EOR_WINDOW_CHANGE, b"why")] + msgs[8:] + \
        [jpp.EorMessage(jpp.EOR_IMAGE_DONE, b"")]
    got = jpp.parse_all(stream)
    assert got == expect
    # incremental: one byte at a time, then random chunks
    p = jpp.JppParser()
    one = [m for i in range(len(stream)) for m in p.feed(stream[i:i + 1])]
    assert one == expect and p.pending == 0
    rng = random.Random(9)
    for _ in range(5):
        p, pos, got = jpp.JppParser(), 0, []
        while pos < len(stream):
            n = rng.randint(1, 400)
            got += list(p.feed(stream[pos:pos + n]))
            pos += n
        assert got == expect


def test_jpp_truncated_and_reserved():
    msgs = _sample_messages()[:6]
    w = jpp.JppWriter()
    parts = [w.message(m) for m in msgs] + [w.eor(jpp.EOR_BYTE_LIMIT, b"xx")]
    stream = b"".join(parts)
    bounds = set(np.cumsum([len(p) for p in parts]).tolist()) | {0}
    for n in range(len(stream)):
        if n in bounds:
            assert len(jpp.parse_all(stream[:n])) == sorted(bounds).index(n)
        else:
            with pytest.raises(jpp.JppError):
                jpp.parse_all(stream[:n])
    with pytest.raises(jpp.JppError):
        jpp.parse_all(b"\x80\x01\x00\x00")  # BB = 0 is reserved


def test_databins_over_jpp_and_framing(rgb_frame):
    """Server-side split -> JPP messages in small pieces -> framing -> client reassembly
    -> rebuild: decodes like the original."""
    a, ef = rgb_frame
    cs, ix = ef.codestream, ef.index
    db = split_databins(cs, ix)
    w = jpp.JppWriter()
    body = bytearray()
    bins = [(jpp.MAIN_HEADER, 0, db.main_header), (jpp.TILE_HEADER, 0, db.tile_header)]
    bins += [(jpp.PRECINCT, b, b"".join(v[:2])) for b, v in sorted(db.precincts.items())]
    for cls, bid, data in bins:
        for off in range(0, max(len(data), 1), 700):
            chunk = data[off:off + 700]
            body += w.message(jpp.JppMessage(cls, 5, bid, off, chunk,
                                             is_last=off + 700 >= len(data) and cls != 0))
    body += w.eor(jpp.EOR_WINDOW_DONE)
    stream = bytearray()
    for i in range(0, len(body), 1000):
        stream += framing.record(framing.DATA, bytes(body[i:i + 1000]))
        if i == 0:
            stream += framing.control({"type": "announce", "n": 1})
    stream += framing.control({"type": "end"})
    # the repeats and the gap a real stream can hold: the first precinct message again,
    # and a piece of a bin beyond what has arrived
    first_bin = min(db.precincts)
    body2 = w.message(jpp.JppMessage(jpp.PRECINCT, 5, first_bin, 0, db.precincts[first_bin][0]))
    body2 += w.message(jpp.JppMessage(jpp.PRECINCT, 5, first_bin, 10 ** 6, b"gap"))
    stream += framing.record(framing.DATA, body2)
    reader, bs, controls, added, dirty = framing.PacketStreamReader(), BinSet(), [], 0, {}
    for i in range(0, len(stream), 333):
        for rtype, payload in reader.feed(bytes(stream[i:i + 333])):
            if rtype == framing.CONTROL:
                controls.append(payload["type"])
                continue
            for m in payload:
                assert m.csn == 5
                n, key, data = bs.absorb(m)
                added += n
                if key is not None:
                    dirty[key] = data
    assert controls == ["announce", "end"]
    assert added == sum(len(d) for _c, _b, d in bins)            # repeats and gaps add nothing
    assert dirty[(jpp.MAIN_HEADER, 0)] == db.main_header
    assert dirty[(jpp.PRECINCT, first_bin)] == bs.precincts[first_bin]
    assert bs.levels() == (2, ix.numres - 1)
    assert_same(opj_decode(rebuild_codestream(bs), layers=2), opj_decode(cs, layers=2), "jpp")


# =========================================================================== framing
def test_framing_random_chunks():
    rng = random.Random(3)
    recs = [(framing.DATA, b""), (framing.CONTROL, {"type": "announce", "images": [1, 2]}),
            (framing.DATA, bytes(range(256)) * 400), (framing.DATA, b"x"),
            (framing.CONTROL, {"type": "end", "ok": True, "s": "\u00e9"})]
    stream = b"".join(framing.record(t, p) if t == framing.DATA else framing.control(p)
                      for t, p in recs)
    assert stream[:5] == b"\x01\x00\x00\x00\x00"
    for trial in range(20):
        rr, pos, got = framing.RecordReader(), 0, []
        while pos < len(stream):
            n = 1 if trial == 0 else rng.randint(1, 5000)
            got += list(rr.feed(stream[pos:pos + n]))
            pos += n
        assert got == recs and rr.pending == 0
    rr = framing.RecordReader()
    assert list(rr.feed(stream[:7])) == [(framing.DATA, b"")] and rr.pending == 2


@pytest.mark.parametrize("data", [
    b"\x03\x00\x00\x00\x01x",                            # unknown type
    b"\x00\x00\x00\x00\x00",                             # type 0
    b"\x01" + struct.pack(">I", framing.MAX_RECORD + 1),  # absurd length
    framing.record(framing.CONTROL, b"{not json"),
    framing.record(framing.CONTROL, b"\xff\xfe"),         # not UTF-8
])
def test_framing_bad_header(data):
    with pytest.raises(framing.FramingError):
        list(framing.RecordReader().feed(data))
