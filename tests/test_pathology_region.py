"""Slides through the packet protocol: a region fetch sends only the tiles (and, of edge
tiles, only the precincts) it needs; nothing twice; level and rights errors."""
from __future__ import annotations

import numpy as np
import pytest

from imaging.slide_sample import make_ihc_slide
from imaging.tilesource import ArraySource

from pathology_util import new_store


@pytest.fixture(scope="module")
def slide_server(tmp_path_factory):
    from server.embedded import EmbeddedServer
    from server.slide_routes import register_routes

    root = tmp_path_factory.mktemp("slidesrv")
    img, assoc = make_ihc_slide(1024, 768, seed=2)
    st = new_store(root)
    row = st.ingest(ArraySource(img, mpp=0.5, associated=assoc), patient_id="P1",
                    accession="A1", tile_size=256)
    st.close()
    srv = EmbeddedServer(str(root))
    register_routes(srv.app.router.routes, srv.app.state.server)
    srv.start()
    yield srv, row, img, assoc
    srv.stop()


def _session(srv):
    from client.session import Session

    return Session(srv.url)


def test_listing_and_description(slide_server):
    srv, row, _img, assoc = slide_server
    s = _session(srv)
    rows = s.get_json("/api/slides", patient_id="P1")
    assert [r["slide_uid"] for r in rows] == [row["slide_uid"]]
    assert "path" not in rows[0]                      # no file-system paths leave the server
    d = s.get_json(f"/api/slides/{row['pk']}")
    assert [(lv["cols"], lv["rows"]) for lv in d["levels"]] == [(4, 3), (2, 2), (1, 1)]
    assert d["mpp"] == 0.5 and d["layers"] == 4 and set(d["associated"]) == {"label", "macro"}
    s.logout()


def test_region_fetch_sends_only_the_tiles_needed(slide_server):
    from client.slides import RemoteSlide

    srv, row, img, _a = slide_server
    s = _session(srv)
    rs = RemoteSlide(s, row["slide_uid"])
    lv0 = srv.app.state.server.slides.store.open(row["pk"])[1].manifest["levels"][0]
    # a 100x100 region inside tile column 1, across tile rows 0 and 1
    got = rs.fetch(0, [], 0, region=(300, 200, 100, 100))
    ann = rs.last_announce
    assert sorted(im["csn"] for im in ann["images"]) == [1, 5]
    assert got == ann["bytes"]
    whole_tiles = lv0["tiles"][1][1] + lv0["tiles"][5][1]
    assert 0 < got < whole_tiles            # only the precincts of the region, not whole tiles
    assert {t for (lv, t), b in rs._bins.items() if b.precincts} == {1, 5}
    # the region decodes exactly (lossless) from what arrived
    from codestream.databins import rebuild_codestream
    from codestream.encode import openjpeg_decode

    bs = rs._bins[(0, 1)]
    cs = rebuild_codestream(bs)
    px = openjpeg_decode(cs, area=(300 - 256, 200, 100, 56))
    assert np.array_equal(px, img[200:256, 300:400])
    # asking again sends nothing: the session knows what the client holds
    assert rs.fetch(0, [], 0, region=(300, 200, 100, 100)) == 0
    assert rs.last_announce["bytes"] == 0
    # a coarse, quality-1 view of the whole top level is one small request
    before = rs.bytes_received
    rs.fetch(2, [0], 1)
    assert rs.last_announce["images"][0]["layers"] == 1
    assert rs.bytes_received - before < 0.25 * srv.app.state.server.slides.store.open(
        row["pk"])[1].manifest["levels"][2]["size"]
    s.logout()


def test_whole_level_remote_is_lossless_and_never_resent(slide_server):
    from client.slides import RemoteSlide

    srv, row, img, assoc = slide_server
    s = _session(srv)
    rs = RemoteSlide(s, row["pk"])
    assert np.array_equal(rs.read_level(0, 0, 0, 1024, 768), img)
    n = rs.bytes_received
    assert rs.fetch(0, list(range(12)), 0) == 0 and rs.bytes_received == n
    assert np.array_equal(rs.associated("label"), assoc["label"])
    s.logout()


def test_errors(slide_server):
    from client.session import ServerError

    srv, row, _img, _a = slide_server
    s = _session(srv)
    with pytest.raises(ServerError) as e:
        s.request("GET", f"/jpip/slides/{row['slide_uid']}", params={"level": 7})
    assert e.value.status == 416 and e.value.body["max_level"] == 2
    with pytest.raises(ServerError) as e:
        s.request("GET", f"/jpip/slides/{row['slide_uid']}",
                  params={"level": 0, "roff": "5000,0", "rsiz": "10,10"})
    assert e.value.status == 416
    with pytest.raises(ServerError) as e:
        s.get_json("/api/slides/nope")
    assert e.value.status == 404
    with pytest.raises(ServerError) as e:
        s.request("GET", f"/api/slides/{row['pk']}/associated/overview")
    assert e.value.status == 404 and "label" in e.value.message
    s.logout()
