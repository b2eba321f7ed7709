"""WADO-RS in the final copies' transfer syntaxes (SPEC H1): JPEG-LS, HTJ2K and JPEG XL
through the codec interface, the final copy's bytes as stored when there is one, and HTTP
Range requests on frame and instance resources (H3's "range request": the first bytes of
an RPCL HTJ2K frame decode at a reduced resolution). Against a real uvicorn server on
loopback; values compared with pydicom's decode of the original files."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

from codestream import codecs

dicomweb_client = pytest.importorskip("dicomweb_client")
from dicomweb_client.api import DICOMwebClient  # noqa: E402

JLS, HT, HT_RPCL, JXL = (codecs.JPEGLS_LOSSLESS, codecs.HTJ2K_LOSSLESS,
                         codecs.HTJ2K_LOSSLESS_RPCL, codecs.JPEGXL_LOSSLESS)
MEDIA = {JLS: "image/jls", HT: "image/jphc", HT_RPCL: "image/jphc", JXL: "image/jxl"}

POLICY = """
[[codec.overrides]]
modality = "MR"
small_grayscale = "htj2k"

[[codec.overrides]]
modality = "CT"
size_threshold = 256
"""


def _copy(src, dst: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from server.sample import make_sample_ct

    d = tmp_path_factory.mktemp("csfiles")
    return {
        # no final copy: served by transcoding
        "signed": _copy(get_testdata_file("MR_small.dcm"), d / "mr.dcm"),         # int16
        "ct": Path(make_sample_ct(d / "ct", slices=1, size=96, seed=3)[0]),      # unsigned
        "rgb": _copy(get_testdata_file("SC_rgb.dcm"), d / "rgb.dcm"),             # RGB 8-bit
        # with a final copy: HTJ2K RPCL (MR override; CT >= 256 px), JPEG XL (colour)
        "signed_copy": _copy(get_testdata_file("MR_small.dcm"), d / "mr2.dcm"),
        "big_copy": Path(make_sample_ct(d / "big", slices=1, size=512, seed=4)[0]),
        "rgb_copy": _copy(get_testdata_file("SC_rgb.dcm"), d / "rgb2.dcm"),
    }


def _uids(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


@pytest.fixture(scope="module")
def dw(corpus, tmp_path_factory):
    from server.embedded import EmbeddedServer
    from server.ingest import ingest_paths
    from server.policy_copies import PolicyCopies, convert_store
    from server.store import Store

    root = tmp_path_factory.mktemp("csstore")
    (root / "policy.toml").write_text(POLICY)
    with Store(root) as st:
        rep = ingest_paths(list(corpus.values()), st, workers=1)
        assert len(rep.imported) == len(corpus), rep.summary()
        sops = [_uids(corpus[k])[2] for k in ("signed_copy", "big_copy", "rgb_copy")]
        conv = convert_store(st, sops=sops)
        assert conv.ok and conv.count("converted") == 3, conv.summary()
        # mark each copy (a comment in its header, checksum recorded): an answer that
        # holds the mark came from the copy, not from transcoding the original (which
        # gives the same bytes otherwise)
        pc = PolicyCopies(st)
        for r in pc.rows():
            from server.convert import register_transfer_syntaxes
            from server.store import sha256_hex

            register_transfer_syntaxes()
            ds = pydicom.dcmread(st.abspath(r["relpath"]))
            ds.ImageComments = "MARKED final copy"
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            st.atomic_write(r["relpath"], buf.getvalue())
            with pc.db.transaction():
                pc.db.execute("UPDATE policy_copy SET sha256 = ?, size = ? WHERE sop = ?",
                              (sha256_hex(buf.getvalue()), len(buf.getvalue()), r["sop"]))
        copies = {r["sop"]: r for r in pc.rows()}
        pc.close()
    assert {copies[s]["transfer_syntax"] for s in sops} == {HT_RPCL, JXL}
    srv = EmbeddedServer(str(root)).start()
    sid = requests.post(f"{srv.url}/api/login", json={"username": "local"}).json()["session"]
    srv.h = {"Authorization": f"Bearer {sid}"}
    srv.client = DICOMwebClient(url=f"{srv.url}/dicomweb", headers=srv.h)
    srv.copies = copies
    srv.root = root
    yield srv
    srv.stop()


def _url(dw, path, frames: str | None = None) -> str:
    st, se, sop = _uids(path)
    u = f"{dw.url}/dicomweb/studies/{st}/series/{se}/instances/{sop}"
    return u + (f"/frames/{frames}" if frames else "")


def _ref(path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def _parts(r: requests.Response) -> list[tuple[dict, bytes]]:
    from server.dicomweb import parse_multipart

    return parse_multipart(r.content, r.headers["content-type"])[1]


def _signed(path) -> tuple[bool, int]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.PixelRepresentation == 1, int(ds.BitsStored)


def _instance(dw, path, ts) -> requests.Response:
    return requests.get(_url(dw, path), headers={
        **dw.h, "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ts}'})


def _frame(dw, path, ts, frames="1", **extra) -> requests.Response:
    return requests.get(_url(dw, path, frames), headers={
        **dw.h, **extra, "Accept": f'multipart/related; type="{MEDIA[ts]}"; transfer-syntax={ts}'})


@pytest.mark.parametrize("role", ["signed", "ct", "rgb"])
def test_transcoded_in_every_codec(dw, corpus, role):
    """No final copy: each syntax made through the codec interface; the values decode
    equal to pydicom's decode of the original (signed stays signed)."""
    path = corpus[role]
    st, se, sop = _uids(path)
    ref = _ref(path)
    signed, bits = _signed(path)
    # JPEG-LS: the standard client, and pydicom decodes what it gets
    ds = dw.client.retrieve_instance(st, se, sop, media_types=(("application/dicom", JLS),))
    assert ds.file_meta.TransferSyntaxUID == JLS
    np.testing.assert_array_equal(ds.pixel_array, ref)
    (frame,) = dw.client.retrieve_instance_frames(st, se, sop, [1],
                                                  media_types=(("image/jls", JLS),))
    got = codecs.get(JLS).decode(frame, signed=signed, bits_stored=bits)
    np.testing.assert_array_equal(got, ref)
    # HTJ2K, both syntaxes: pydicom decodes the instance, our codec the frame
    for ts in (HT, HT_RPCL):
        r = _instance(dw, path, ts)
        assert r.status_code == 200, r.text
        ((h, body),) = _parts(r)
        assert f"transfer-syntax={ts}" in h["content-type"]
        back = pydicom.dcmread(io.BytesIO(body))
        assert back.file_meta.TransferSyntaxUID == ts
        np.testing.assert_array_equal(back.pixel_array, ref)
        assert back.PixelRepresentation == int(signed)
        r = _frame(dw, path, ts)
        ((h, frag),) = _parts(r)
        assert h["content-type"].startswith("image/jphc")
        assert got.dtype.kind == ref.dtype.kind
        np.testing.assert_array_equal(codecs.get(ts).decode(frag), ref)
    # JPEG XL holds unsigned samples only: signed is refused with the reason, never
    # sent in another syntax
    r = _instance(dw, path, JXL)
    if signed:
        assert r.status_code == 406 and "signed" in r.text
        assert _frame(dw, path, JXL).status_code == 406
        return
    ((h, body),) = _parts(r)
    from server.convert import register_transfer_syntaxes

    register_transfer_syntaxes()
    back = pydicom.dcmread(io.BytesIO(body))
    assert back.file_meta.TransferSyntaxUID == JXL
    frag = next(generate_frames(back.PixelData, number_of_frames=1))
    np.testing.assert_array_equal(codecs.get(JXL).decode(frag), ref)
    ((h, frag2),) = _parts(_frame(dw, path, JXL))
    np.testing.assert_array_equal(codecs.get(JXL).decode(frag2), ref)


@pytest.mark.parametrize("role", ["signed_copy", "big_copy", "rgb_copy"])
def test_final_copy_served_as_stored(dw, corpus, role):
    path = corpus[role]
    sop = _uids(path)[2]
    row = dw.copies[sop]
    ts = row["transfer_syntax"]
    stored = (dw.root / row["relpath"]).read_bytes()
    ref = _ref(path)
    # the instance: the copy's bytes, exactly
    r = _instance(dw, path, ts)
    ((h, body),) = _parts(r)
    assert body == stored and b"MARKED final copy" in body
    # the frame: the copy's fragment, exactly (an RPCL copy also serves .4.201)
    from server.convert import register_transfer_syntaxes

    register_transfer_syntaxes()
    frag = next(generate_frames(pydicom.dcmread(io.BytesIO(stored)).PixelData,
                                number_of_frames=1))
    for want_ts in ((HT_RPCL, HT) if ts == HT_RPCL else (ts,)):
        ((h, got),) = _parts(_frame(dw, path, want_ts))
        assert got == frag and f"transfer-syntax={want_ts}" in h["content-type"]
    np.testing.assert_array_equal(codecs.get(ts).decode(frag), ref)
    # another syntax is still transcoded from the original, equal values
    ds = dw.client.retrieve_instance(*_uids(path), media_types=(("application/dicom", JLS),))
    np.testing.assert_array_equal(ds.pixel_array, ref)


def test_range_preview_of_an_rpcl_frame(dw, corpus):
    """A viewer asks for the first bytes of an RPCL HTJ2K frame (single part, Range) and
    decodes them at a reduced resolution: the same pixels as the whole frame decoded at
    that reduction."""
    from server.http_ranges import parse_byteranges

    path = corpus["big_copy"]
    ref = _ref(path)
    url = _url(dw, path, "1")
    accept = {**dw.h, "Accept": f"image/jphc; transfer-syntax={HT_RPCL}"}
    whole = requests.get(url, headers=accept)
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-type"].startswith("image/jphc")
    frame = whole.content
    c = codecs.get(HT_RPCL)
    np.testing.assert_array_equal(c.decode(frame), ref)
    for reduce in (3, 2, 1):
        n = codecs.resolution_prefix(frame, reduce)
        assert n < len(frame) // 2
        r = requests.get(url, headers={**accept, "Range": f"bytes=0-{n - 1}"})
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes 0-{n - 1}/{len(frame)}"
        assert r.content == frame[:n]
        small = c.decode(r.content, reduce=reduce)
        assert small.shape == (-(-ref.shape[0] // 2 ** reduce), -(-ref.shape[1] // 2 ** reduce))
        np.testing.assert_array_equal(small, c.decode(frame, reduce=reduce))
    # the rest, when the viewer wants full quality: If-Range with the ETag
    n = codecs.resolution_prefix(frame, 2)
    r = requests.get(url, headers={**accept, "Range": f"bytes={n}-",
                                   "If-Range": whole.headers["etag"]})
    assert r.status_code == 206 and frame[:n] + r.content == frame
    r = requests.get(url, headers={**accept, "Range": f"bytes={n}-", "If-Range": '"other"'})
    assert r.status_code == 200 and r.content == frame
    # several ranges: multipart/byteranges
    r = requests.get(url, headers={**accept, "Range": "bytes=0-99, 200-299, -50"})
    assert r.status_code == 206
    assert r.headers["content-type"].startswith("multipart/byteranges")
    got = parse_byteranges(r.content, r.headers["content-type"])
    assert [(s, e) for s, e, _n, _b in got] == [(0, 99), (200, 299),
                                                (len(frame) - 50, len(frame) - 1)]
    for s, e, total, b in got:
        assert total == len(frame) and b == frame[s:e + 1]
    # nothing satisfiable: 416 with the length
    r = requests.get(url, headers={**accept, "Range": f"bytes={len(frame)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(frame)}"
    # two frames cannot go as one single part: 406 naming why
    r = requests.get(_url(dw, corpus["big_copy"], "1,1"), headers=accept)
    assert r.status_code == 406 and "single-part" in r.text


def test_range_on_instances_and_multipart(dw, corpus):
    from server.http_ranges import parse_byteranges

    path = corpus["rgb"]
    url = _url(dw, path)
    data = Path(path).read_bytes()
    r = requests.get(url, headers={**dw.h, "Range": "bytes=128-131"})      # the DICM prefix
    assert r.status_code == 206 and r.content == b"DICM" == data[128:132]
    r = requests.get(url, headers={**dw.h, "Range": "bytes=0-9,-10"})
    got = {(s, e): b for s, e, _n, b in parse_byteranges(r.content, r.headers["content-type"])}
    assert got == {(0, 9): data[:10], (len(data) - 10, len(data) - 1): data[-10:]}
    # a multipart answer asked in ranges is one stable representation: the pieces join
    # to the whole body, which holds the instance
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={JLS}'
    whole = requests.get(url, headers={**dw.h, "Range": "bytes=0-", "Accept": accept})
    assert whole.status_code == 206
    a = requests.get(url, headers={**dw.h, "Range": "bytes=0-499", "Accept": accept})
    b = requests.get(url, headers={**dw.h, "Range": "bytes=500-", "Accept": accept})
    assert a.headers["etag"] == b.headers["etag"] == whole.headers["etag"]
    assert a.content + b.content == whole.content
    ((_h, part),) = _parts(whole)
    np.testing.assert_array_equal(pydicom.dcmread(io.BytesIO(part)).pixel_array, _ref(path))
    # frames, multipart, in ranges
    fr = _frame(dw, corpus["signed"], HT_RPCL, Range="bytes=0-")
    assert fr.status_code == 206
    ((_h, frag),) = _parts(fr)
    np.testing.assert_array_equal(codecs.get(HT_RPCL).decode(frag), _ref(corpus["signed"]))


def test_parse_range_unit():
    from server.http_ranges import parse_range

    assert parse_range(None, 100) is None
    assert parse_range("items=0-5", 100) is None                 # another unit: ignored
    assert parse_range("bytes=5-1", 100) is None                 # invalid: ignored
    assert parse_range("bytes=x-1", 100) is None
    assert parse_range("bytes=0-9", 100) == [(0, 9)]
    assert parse_range("bytes=90-200", 100) == [(90, 99)]
    assert parse_range("bytes=-10", 100) == [(90, 99)]
    assert parse_range("bytes=-200", 100) == [(0, 99)]
    assert parse_range("bytes=0-9,5-20,21-30,50-", 100) == [(0, 30), (50, 99)]   # coalesced
    assert parse_range("bytes=100-", 100) == []                  # 416
    assert parse_range("bytes=" + ",".join(f"{i}-{i}" for i in range(0, 80, 2)), 100) is None
