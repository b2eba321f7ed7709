"""End to end: HTTP server, packet streaming, client cache and decode, against OpenJPEG."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import requests

from client import (Callbacks, Cancelled, PacketCache, SeriesData, ServerError, Session,
                    TransferError)
from codestream import framing
from codestream.encode import decode_full
from codestream.jpp import EorMessage, JppMessage, parse_all
from server.store import Store


def _reference(ct_store, series_uid, csn):
    with Store(ct_store) as st:
        row = st.catalogue.series_images(series_uid)[csn]
        cs = st.read_verified(row["codestream_relpath"], row["codestream_sha256"])
    return cs, row


# ------------------------------------------------------------------ sessions and browse
def test_login_and_authorisation(server):
    s = Session(server.url)
    assert s.id
    # no session: refused with a JSON error
    r = requests.get(f"{server.url}/dicomweb/studies")
    assert r.status_code == 401 and "log in" in r.json()["error"]
    r = requests.get(f"{server.url}/dicomweb/studies", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    with pytest.raises(ServerError) as e:
        Session(server.url, "nobody", "secret")
    assert e.value.status == 401
    server.app.state.server.auth.add_user("alice", "correct horse")
    assert Session(server.url, "alice", "correct horse").id
    with pytest.raises(ServerError):
        Session(server.url, "alice", "wrong")
    s.logout()


def test_qido_browse(server, ct_series_uid):
    s = Session(server.url)
    studies = s.studies(PatientName="phantom*")
    assert len(studies) == 1 and studies[0]["PatientID"] == "MV-0001"
    assert s.studies(PatientName="nomatch*") == []
    series = s.series(studies[0]["StudyInstanceUID"])
    assert [x["SeriesInstanceUID"] for x in series] == [ct_series_uid]
    # DICOM JSON by default, as QIDO-RS
    r = s.request("GET", "/dicomweb/studies")
    assert r.headers["content-type"].startswith("application/dicom+json")
    assert r.json()[0]["00100020"] == {"vr": "LO", "Value": ["MV-0001"]}
    meta = s.series_images(ct_series_uid)
    assert len(meta["images"]) == 12
    im = meta["images"][0]
    assert im["Rows"] == 256 and im["numres"] == 3 and im["nlayers"] == 4
    assert "codestream_relpath" not in im
    assert im["layer_bytes"] == sorted(im["layer_bytes"])


def test_metadata_is_gzipped_when_the_client_accepts_it(server, ct_series_uid):
    import gzip
    import json

    s = Session(server.url)
    plain = s.request("GET", f"/api/series/{ct_series_uid}/images",
                      headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    packed = s.request("GET", f"/api/series/{ct_series_uid}/images",
                       headers={"Accept-Encoding": "gzip"}, stream=True)
    assert packed.headers["content-encoding"] == "gzip"
    assert packed.headers["vary"] == "Accept-Encoding"
    wire = packed.raw.read(decode_content=False)
    assert len(wire) * 4 < len(plain.content)                 # about 8x smaller
    assert json.loads(gzip.decompress(wire)) == plain.json() == s.series_images(ct_series_uid)
    refused = s.request("GET", f"/api/series/{ct_series_uid}/images",
                        headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in refused.headers


@pytest.mark.parametrize("header,ok", [
    ("gzip", True), ("deflate, gzip;q=0.5", True), ("*", True), ("GZIP", True),
    ("", False), ("identity", False), ("gzip;q=0", False), ("br, gzip;q=bad", False),
    ("xgzip", False)])
def test_accept_encoding_parsing(header, ok):
    from server.app import accepts_gzip

    assert accepts_gzip(header) is ok


# ------------------------------------------------------------------ progressive results
@pytest.mark.parametrize("layers,reduce", [(1, 2), (2, 1), (3, 0), (4, 0), (1, 0)])
def test_partial_results_equal_openjpeg(server, ct_store, ct_series_uid, layers, reduce):
    s = Session(server.url)
    sd = SeriesData(s, None, ct_series_uid)
    sd.transfer(layers=layers, reduce=reduce, comps=[0, 5]).run()
    for csn in (0, 5):
        assert sd.levels(csn) == (layers, 2 - reduce)
        d = sd.decode(csn, reduce=reduce, layers=layers)
        cs, row = _reference(ct_store, ct_series_uid, csn)
        ref = decode_full(cs, row["offset"], bool(row["signed"]), layers=layers, reduce=reduce)
        assert d.pixels.dtype == ref.dtype
        np.testing.assert_array_equal(d.pixels, ref)


def test_lossless_is_bit_exact_to_dicom(server, ct_series_uid, ct_store):
    import pydicom

    s = Session(server.url)
    sd = SeriesData(s, None, ct_series_uid)
    sd.transfer().run()
    with Store(ct_store) as st:
        for csn in (0, 11):
            row = st.catalogue.series_images(ct_series_uid)[csn]
            inst = st.catalogue.find_instance(row["SOPInstanceUID"])
            ds = pydicom.dcmread(st.abspath(inst["original_relpath"]))
            np.testing.assert_array_equal(sd.decode(csn).pixels, ds.pixel_array)


def test_region_sends_only_covering_precincts(server, ct_store, ct_series_uid):
    s = Session(server.url)
    sd = SeriesData(s, None, ct_series_uid)
    region = (150, 40, 50, 30)
    t = sd.transfer(comps=[2], region=region)
    t.run()
    bs = sd.bins[2]
    ix = bs.index
    wanted = {ix.databin_id(0, r, p) for r in range(ix.numres)
              for p in ix.precincts_for_region(0, r, 150, 40, 200, 70)}
    assert set(bs.precincts) == wanted
    assert len(wanted) < sum(ix.num_precincts(0, r) for r in range(ix.numres))
    assert t.received < ix.total_bytes / 2
    d = sd.decode(2, area=region)
    cs, row = _reference(ct_store, ct_series_uid, 2)
    ref = decode_full(cs, row["offset"], True, area=(40, 150, 70, 200))
    np.testing.assert_array_equal(d.pixels, ref)
    # the region at full quality is also exact against the source
    assert d.pixels.shape == (30, 50)


def test_never_sends_a_packet_twice(server, ct_series_uid):
    s = Session(server.url)
    sd = SeriesData(s, None, ct_series_uid)
    received = 0
    for layers in (1, 2, 4):
        t = sd.transfer(layers=layers)
        t.run()
        received += t.received
    again = sd.transfer()
    again.run()
    assert again.requested == 0 and again.received == 0
    total = sum(im["total_bytes"] for im in sd.images)
    # everything but the stale PLT/EOC bytes of the stored files arrived exactly once
    assert 0.97 * total < received <= total


def test_quality_first_order_and_recommendations(server, ct_series_uid):
    s = Session(server.url)
    sd = SeriesData(s, None, ct_series_uid)
    seen = []
    levels_at_first_render = []

    def on_rec(m):
        seen.append(m)
        if m["action"] == "render" and not levels_at_first_render:
            levels_at_first_render.extend(sd.levels(c) for c in range(len(sd)))

    t = sd.transfer(layers=2, callbacks=Callbacks(on_recommend=on_rec))
    end = t.run()
    assert end["reason"] == "complete" and end["bytes_sent"] == t.requested == t.received
    # quality-first: every image reached layer 1 at the lowest resolution first
    assert levels_at_first_render == [(1, 0)] * 12
    renders = [(m["layers"], m["res"]) for m in seen if m["action"] == "render"]
    assert renders == [(1, 0), (1, 2), (2, 2)]
    assert [m for m in seen if m["action"] == "store"]
    # announced increments are in quality-first order
    incs = t.announce["increments"]
    assert [i[1] for i in incs] == sorted(i[1] for i in incs)


def test_image_by_image_order(server, ct_series_uid):
    s = Session(server.url)
    sd = SeriesData(s, None, ct_series_uid)
    t = sd.transfer(order="image", comps=[3, 4])
    t.run()
    assert [i[0] for i in t.announce["increments"]] == sorted(i[0] for i in t.announce["increments"])
    assert [m["images"] for m in t.recommendations] == [[3], [4]]


def test_display_size_limits_resolution(server, ct_series_uid):
    s = Session(server.url)
    sd = SeriesData(s, None, ct_series_uid)
    t = sd.transfer(display=(64, 64))
    assert t.params["reduce"] == 2
    t.run()
    assert all(sd.levels(c) == (4, 0) for c in range(len(sd)))
    t = sd.transfer(display=(100, 90))
    assert t.params["reduce"] == 1


def test_progress_callbacks_match_bytes(server, ct_series_uid):
    s = Session(server.url)
    sd = SeriesData(s, None, ct_series_uid)
    per_image = {}
    overall = []
    t = sd.transfer(layers=3, callbacks=Callbacks(
        on_image=lambda p: per_image.__setitem__(p.csn, p), on_progress=overall.append))
    t.run()
    assert sum(p.received for p in per_image.values()) == t.received
    assert all(p.received == p.requested for p in per_image.values())
    assert all(p.layers == 3 and p.res == 2 for p in per_image.values())
    assert overall[-1].received == overall[-1].requested == t.requested
    assert overall[-1].total == t.total >= t.requested


# ------------------------------------------------------------------ cache
def test_cache_reused_across_restart(server, ct_store, ct_series_uid, tmp_path):
    path = tmp_path / "packets.sqlite"
    cache = PacketCache(path)
    sd = SeriesData(Session(server.url), cache, ct_series_uid)
    sd.transfer(layers=2).run()
    cache.close()
    # "restart": new session, new cache object on the same file
    cache = PacketCache(path)
    sd2 = SeriesData(Session(server.url), cache, ct_series_uid)
    assert sd2.declare_needed and sd2.levels(7) == (2, 2)
    t = sd2.transfer(layers=2)
    t.run()
    assert t.requested == 0 and t.received == 0
    t = sd2.transfer()
    t.run()
    cs, row = _reference(ct_store, ct_series_uid, 7)
    np.testing.assert_array_equal(sd2.decode(7).pixels, decode_full(cs, row["offset"], True))
    # only the missing layers travelled
    assert t.received < sum(im["total_bytes"] for im in sd2.images) * 0.9


def test_damaged_cache_entry_is_refetched(server, ct_store, ct_series_uid, tmp_path):
    path = tmp_path / "packets.sqlite"
    cache = PacketCache(path)
    sd = SeriesData(Session(server.url), cache, ct_series_uid)
    sd.transfer(comps=[1]).run()
    cache.close()
    con = sqlite3.connect(path)
    con.execute("UPDATE bins SET data = zeroblob(size) WHERE cls = 0 AND bin = 0")
    con.commit()
    con.close()
    cache = PacketCache(path)
    sd2 = SeriesData(Session(server.url), cache, ct_series_uid)
    assert cache.dropped == 1
    t = sd2.transfer(comps=[1])
    t.run()
    assert 0 < t.received
    cs, row = _reference(ct_store, ct_series_uid, 1)
    np.testing.assert_array_equal(sd2.decode(1).pixels, decode_full(cs, row["offset"], True))


def test_damaged_cache_file_starts_afresh(tmp_path):
    path = tmp_path / "packets.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    cache = PacketCache(path)
    assert cache.usage() == (0, 0)
    assert list(tmp_path.glob("packets.sqlite.damaged-*"))


def test_cache_lru_eviction(server, ct_series_uid, tmp_path):
    cache = PacketCache(tmp_path / "p.sqlite", max_bytes=10**9)
    sd = SeriesData(Session(server.url), cache, ct_series_uid)
    sd.transfer(layers=1).run()
    size, n = cache.usage()
    assert n == 12
    cache.max_bytes = size // 2
    keep = {(sd.ns, sd.images[0]["key"])}
    freed = cache.evict(keep)
    assert freed > 0 and cache.usage()[0] <= size // 2
    assert sd.images[0]["key"] in cache.images(sd.ns)


# ------------------------------------------------------------------ cancel
def test_cancel_stops_and_leaves_cache_consistent(server, ct_store, ct_series_uid, tmp_path):
    cache = PacketCache(tmp_path / "p.sqlite")
    sd = SeriesData(Session(server.url), cache, ct_series_uid)
    progress = []
    holder = {}

    def on_image(p):
        progress.append(p)
        holder["t"].cancel()

    t = sd.transfer(order="image", callbacks=Callbacks(on_image=on_image))
    holder["t"] = t
    with pytest.raises(Cancelled):
        t.run()
    assert t.received < t.requested
    assert sd.declare_needed
    # finish: the server learns what we hold and sends only the rest
    t2 = sd.transfer()
    t2.run()
    assert t2.requested <= t.requested - t.received + 1000 * 12  # + header re-declaration slack
    for csn in (0, 11):
        cs, row = _reference(ct_store, ct_series_uid, csn)
        np.testing.assert_array_equal(sd.decode(csn).pixels, decode_full(cs, row["offset"], True))
    # and a fresh client on the same cache file sees consistent entries
    cache2 = PacketCache(tmp_path / "p.sqlite")
    sd2 = SeriesData(Session(server.url), cache2, ct_series_uid)
    assert cache2.dropped == 0
    assert [sd2.levels(c) for c in range(12)] == [(4, 2)] * 12


# ------------------------------------------------------------------ wire formats
def test_bare_jpp_stream(server, ct_series_uid):
    s = Session(server.url)
    r = s.request("GET", "/jpip", params={"target": ct_series_uid, "comps": "0-1", "layers": 1,
                                          "framing": "jpp"})
    assert r.headers["content-type"] == "image/jpp-stream"
    msgs = parse_all(r.content)
    assert isinstance(msgs[-1], EorMessage) and msgs[-1].reason == 2
    data = [m for m in msgs if isinstance(m, JppMessage)]
    assert {m.csn for m in data} == {0, 1}
    assert data[0].cls == 6 and data[1].cls == 2      # main header, tile header first


def test_framed_stream_structure(server, ct_series_uid):
    s = Session(server.url)
    r = s.request("GET", "/jpip", params={"target": ct_series_uid, "layers": 1, "reduce": 2})
    reader = framing.RecordReader()
    recs = list(reader.feed(r.content))
    assert recs[0][0] == framing.CONTROL and recs[0][1]["type"] == "announce"
    assert recs[-1][1]["type"] == "end"
    jpp = b"".join(p for t, p in recs if t == framing.DATA)
    body = sum(len(m.data) for m in parse_all(jpp) if isinstance(m, JppMessage))
    assert body == recs[0][1]["bytes"] == int(r.headers["X-Bytes-Announced"])


@pytest.mark.parametrize("params,status,words", [
    ({}, 400, "target"),
    ({"target": "1.2.3.4"}, 404, "unknown target"),
    ({"layers": "0"}, 400, "layers"),
    ({"layers": "x"}, 400, "integer"),
    ({"layers": "9"}, 416, "4 layers"),
    ({"reduce": "7"}, 416, "resolution levels"),
    ({"comps": "0-40"}, 416, "out of range"),
    ({"comps": "a-b"}, 400, "ranges"),
    ({"roff": "1,1"}, 400, "together"),
    ({"roff": "900,0", "rsiz": "10,10"}, 416, "outside"),
    ({"fsiz": "0,0"}, 400, "positive"),
    ({"order": "random"}, 400, "order"),
    ({"bogus": "1"}, 400, "unknown request field"),
])
def test_malformed_requests(server, ct_series_uid, params, status, words):
    s = Session(server.url)
    if params and "target" not in params:
        params = {"target": ct_series_uid, **params}
    with pytest.raises(ServerError) as e:
        s.request("GET", "/jpip", params=params)
    assert e.value.status == status
    assert words in e.value.message
    assert e.value.body["status"] == status


def test_bad_model_declaration(server, ct_series_uid):
    s = Session(server.url)
    with pytest.raises(ServerError) as e:
        s.request("POST", "/jpip", params={"target": ct_series_uid}, data=b"{not json")
    assert e.value.status == 400


def test_damaged_codestream_in_store(tmp_path, ct_store, ct_series_uid):
    """A truncated codestream file gives a clear error; the other images still flow."""
    from server.embedded import EmbeddedServer
    from tests.policyutil import copy_store

    root = copy_store(ct_store, tmp_path / "store")        # files and database, any engine
    with Store(root) as st:
        row = st.catalogue.series_images(ct_series_uid)[4]
        study = st.catalogue.get_series(ct_series_uid)["StudyInstanceUID"]
        p = st.abspath(row["codestream_relpath"])
    p.write_bytes(p.read_bytes()[:5000])
    with EmbeddedServer(str(root)) as srv:
        s = Session(srv.url)
        sd = SeriesData(s, None, ct_series_uid)
        with pytest.raises(TransferError):
            sd.transfer(comps=[3, 4, 5]).run()
        sd2 = SeriesData(Session(srv.url), None, ct_series_uid)
        sd2.transfer(comps=[5, 6]).run()
        assert sd2.levels(5) == (4, 2)
        (study,) = {r["StudyInstanceUID"] for r in s.series(SeriesInstanceUID=ct_series_uid)}
        with pytest.raises(ServerError) as e:       # the stored codestream, as it is kept
            s.request("GET", f"/dicomweb/studies/{study}/series/{ct_series_uid}/instances/"
                      f"{row['SOPInstanceUID']}/frames/1",
                      headers={"Accept": "application/x-medview-codestream"})
        assert e.value.status == 500 and "damaged" in e.value.message
