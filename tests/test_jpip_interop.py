"""The bare JPP-stream against OpenJPEG's JPIP tools, and the standard JPIP request fields.

``opj_jpip_transcode`` (Debian libopenjpip-dec-server) turns the project's JPP-stream into
a J2K codestream; ``opj_decompress`` of that must equal ``opj_decompress`` of the stored
codestream at the same layers and reduction, pixel for pixel.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from client.session import ServerError, Session
from codestream.databins import BinSet, rebuild_codestream
from codestream.jpp import EorMessage, JppMessage, parse_all
from server.store import Store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def openjpeg_tools():
    r = subprocess.run(["bash", str(REPO / "scripts/apt-ensure.sh"), "libopenjpip-dec-server",
                        "libopenjp2-tools"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _decode(path: Path, out_dir: Path, *args: str) -> np.ndarray:
    """opj_decompress to PGM, read back (OpenJPEG's own decode, no Python codec)."""
    out = out_dir / (path.stem + "-" + "-".join(a.strip("-") for a in args) + ".pgm")
    r = subprocess.run(["opj_decompress", "-i", str(path), "-o", str(out), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and out.is_file(), r.stdout + r.stderr
    from PIL import Image
    return np.asarray(Image.open(out))


def _stored(ct_store: Path, series: str, image: int) -> Path:
    with Store(ct_store) as st:
        row = st.catalogue.series_images(series)[image]
        return st.abspath(row["codestream_relpath"])


def _jpp(s: Session, **params) -> bytes:
    r = s.request("GET", "/jpip", params=params)
    assert r.headers["content-type"] == "image/jpp-stream"
    return r.content


@pytest.mark.parametrize("layers,reduce", [(None, None), (2, None), (1, 1), (4, 2), (None, 1), (2, 2), (1, 2), (3, 1)])
def test_opj_jpip_transcode_reads_the_jpp_stream(openjpeg_tools, server, ct_store, ct_series_uid,
                                                 tmp_path, layers, reduce):
    s = Session(server.url)
    params = {"target": ct_series_uid, "type": "jpp-stream", "stream": "3",
              "compat": "openjpeg"}
    if layers:
        params["layers"] = layers
    if reduce:
        params["reduce"] = reduce
    jpp = tmp_path / "img.jpp"
    jpp.write_bytes(_jpp(s, **params))
    j2k = tmp_path / "img.j2k"
    r = subprocess.run(["opj_jpip_transcode", str(jpp), str(j2k)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and j2k.is_file(), r.stdout + r.stderr
    ref_args = []
    if layers:
        ref_args += ["-l", str(layers)]
    if reduce:
        ref_args += ["-r", str(reduce)]
    want = _decode(_stored(ct_store, ct_series_uid, 3), tmp_path, *ref_args)
    # OpenJPEG's transcoder drops the unsent resolutions from the codestream itself
    got = _decode(j2k, tmp_path, *(["-l", str(layers)] if layers else []))
    assert got.shape == want.shape
    assert np.array_equal(got, want)


def test_standard_layout_for_the_projects_client(server, ct_series_uid):
    """Without compat the tile-header bin is the standard one (no SOT, no SOD); the
    client rebuilds from either layout."""
    s = Session(server.url)
    std = [m for m in parse_all(_jpp(s, target=ct_series_uid, type="jpp-stream", stream="0"))
           if isinstance(m, JppMessage)]
    opj = [m for m in parse_all(_jpp(s, target=ct_series_uid, type="jpp-stream", stream="0",
                                     compat="openjpeg")) if isinstance(m, JppMessage)]
    th_std = next(m.data for m in std if m.cls == 2)
    th_opj = next(m.data for m in opj if m.cls == 2)
    assert th_std[:1] == b"\xff" and th_std[-2:] != b"\xff\x93"
    assert th_opj[:2] == b"\x00\x0a" and th_opj[-2:] == b"\xff\x93" and th_opj[10:-2] == th_std
    a, b = BinSet(), BinSet()
    for m in std:
        a.absorb(m)
    for m in opj:
        b.absorb(m)
    assert rebuild_codestream(a) == rebuild_codestream(b)


def test_stateless_and_channels(server, ct_series_uid):
    s = Session(server.url)
    q = {"target": ct_series_uid, "type": "jpp-stream", "stream": "0-1", "layers": 1}
    first = _jpp(s, **q)
    # stateless: the same request sends everything again
    assert _jpp(s, **q) == first
    # a channel: the second request sends only what is new
    r = s.request("GET", "/jpip", params={**q, "cnew": "http", "tid": "0"})
    assert r.headers["JPIP-tid"] == ct_series_uid
    cid = dict(kv.split("=", 1) for kv in r.headers["JPIP-cnew"].split(","))["cid"]
    assert r.content == first
    again = s.request("GET", "/jpip", params={**q, "cid": cid}).content
    assert [type(m) for m in parse_all(again)] == [EorMessage]
    more = parse_all(s.request("GET", "/jpip", params={**q, "layers": 2, "cid": cid}).content)
    assert {m.cls for m in more if isinstance(m, JppMessage)} == {0}     # precincts only
    # a tid of another target: the channel's model does not apply
    other = s.request("GET", "/jpip", params={**q, "cid": cid, "tid": "1.2.3"}).content
    assert other == first
    # cclose ends the channel
    s.request("GET", "/jpip", params={**q, "cid": cid, "cclose": cid})
    with pytest.raises(ServerError) as e:
        s.request("GET", "/jpip", params={**q, "cid": cid})
    assert e.value.status == 404


def test_model_need_fsiz_and_context(server, ct_series_uid):
    s = Session(server.url)
    base = {"target": ct_series_uid, "type": "jpp-stream", "stream": "0"}
    full = [m for m in parse_all(_jpp(s, **base)) if isinstance(m, JppMessage)]
    # model: the client holds the headers and precinct 0 -> neither is sent
    part = [m for m in parse_all(_jpp(s, **base, model="Hm,H*,P0"))
            if isinstance(m, JppMessage)]
    assert {m.cls for m in part} == {0} and 0 not in {m.bin_id for m in part}
    assert len(part) == len([m for m in full if m.cls == 0 and m.bin_id != 0])
    # layer qualifier: P1 holds 2 layers -> layers 3.. of bin 1 only
    p1 = [m for m in parse_all(_jpp(s, **base, model="Hm,H*,P1:L2")) if
          isinstance(m, JppMessage) and m.bin_id == 1]
    assert p1 and min(m.offset for m in p1) > 0
    # need: only the named bins
    need = [m for m in parse_all(_jpp(s, **base, need="P2,P3")) if isinstance(m, JppMessage)]
    assert {m.bin_id for m in need} == {2, 3} and {m.cls for m in need} == {0}
    # context and stream select the same images
    a = _jpp(s, target=ct_series_uid, type="jpp-stream", context="jpxl<2-3>", layers=1)
    b = _jpp(s, target=ct_series_uid, type="jpp-stream", stream="2-3", layers=1)
    assert a == b and {m.csn for m in parse_all(a) if isinstance(m, JppMessage)} == {2, 3}
    assert _jpp(s, target=ct_series_uid, type="jpp-stream", context="mj2t<1>", layers=1) == \
        _jpp(s, target=ct_series_uid, type="jpp-stream", layers=1)

    # fsiz rounding (256x256 image: 256, 128, 64, ...)
    def top_res(**extra) -> int:
        msgs = parse_all(_jpp(s, **base, layers=1, **extra))
        bins = BinSet()
        for m in msgs:
            if isinstance(m, JppMessage):
                bins.absorb(m)
        return bins.levels()[1]
    full_res = top_res()
    assert top_res(fsiz="200,200") == full_res - 1                 # round-down (default)
    assert top_res(fsiz="200,200,round-up") == full_res
    assert top_res(fsiz="140,140,closest") == full_res - 1
    # roff/rsiz in the fsiz frame: in a 512x512 frame (the 256x256 image is the largest
    # resolution that fits) the 128x128 corner is the image's 64x64 corner
    a = _jpp(s, **base, fsiz="512,512", roff="0,0", rsiz="128,128")
    b = _jpp(s, **base, fsiz="512,512")
    full = s.request("GET", "/jpip", params={"target": ct_series_uid, "framing": "jpp",
                                              "stream": "0", "roff": "0,0",
                                              "rsiz": "64,64"}).content
    assert a == full and len(a) < len(b)
    for bad in ({"fsiz": "10,10,sideways"}, {"type": "jpt-stream"}, {"stream": "0",
                                                                      "comps": "1"},
                {"context": "jpxl<x>"}, {"model": "Q5"}):
        with pytest.raises(ServerError):
            s.request("GET", "/jpip", params={"target": ct_series_uid, **bad})
