"""User rights (SPEC P7, V6): for each kind of right, a request beyond it is refused with
a 403 that names the maximum, and a request within it carries no packet beyond it —
checked by parsing every byte the server streamed."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import requests

from client import SeriesData, ServerError, Session
from server.embedded import EmbeddedServer
from server.rights import Grant, Rule, decide
from tests.policyutil import copy_store, fetch, indexes, packets_sent, series_uid, study_uid

_names = itertools.count()


@pytest.fixture(scope="module")
def rstore(ct_store, tmp_path_factory):
    return copy_store(ct_store, tmp_path_factory.mktemp("rights") / "store")


@pytest.fixture(scope="module")
def rsrv(rstore):
    srv = EmbeddedServer(str(rstore)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def uid(rstore):
    return series_uid(rstore)


@pytest.fixture(scope="module")
def ixs(rstore, uid):
    return indexes(rstore, uid)


def user_with(srv, **rule) -> Session:
    """A new user with one rule on every study, logged in."""
    name = f"u{next(_names)}"
    auth = srv.app.state.server.auth
    auth.add_user(name, "a long password")
    auth.set_rule(Rule(name, rule.pop("scope", "*"), **rule))
    return Session(srv.url, name, "a long password")


def again(srv, s: Session) -> Session:
    """Another session of the same user (a server never sends a packet twice per
    session, so each exact count starts afresh)."""
    return Session(srv.url, s.username, "a long password")


def expected(ixs, *, comps=None, layers=None, res=None, region=None):
    """The packets (csn, comp, res, prec, layer) a request must carry, and their bytes."""
    out = {}
    for csn, ix in ixs.items():
        if comps is not None and csn not in comps:
            continue
        top = ix.numres - 1 if res is None else res
        for c in range(ix.ncomp):
            for r in range(top + 1):
                precs = (ix.precincts_for_region(c, r, *region) if region
                         else range(ix.num_precincts(c, r)))
                lens = ix.packet_lengths_by_bin()
                for p in precs:
                    b = ix.databin_id(c, r, p)
                    for l in range(layers or ix.nlayers):
                        out[(csn, c, r, p, l)] = lens[b][l]
    return out


def header_total(ixs, comps=None):
    return sum(ix.main_header_end + ix.tile_header[1] - ix.tile_header[0]
               for csn, ix in ixs.items() if comps is None or csn in comps)


def check_within(resp, ixs, want: dict, comps=None):
    """The response carried exactly the packets of ``want``: nothing else, no byte more."""
    assert resp.status == 200
    sent, hdr = packets_sent(resp.messages, ixs)
    keys = [(s.csn, s.comp, s.res, s.prec, s.layer) for s in sent]
    assert len(keys) == len(set(keys)), "a packet was sent twice"
    assert set(keys) == set(want), "packets beyond (or short of) the right"
    assert sum(s.nbytes for s in sent) == sum(want.values())
    assert hdr == header_total(ixs, comps)
    (announce,) = [c for c in resp.controls if c["type"] == "announce"]
    (end,) = [c for c in resp.controls if c["type"] == "end"]
    assert announce["bytes"] == end["bytes_sent"] == sum(want.values()) + hdr


def refused(resp, *denied) -> dict:
    assert resp.status == 403, resp
    body = resp.json
    assert set(denied) <= set(body["denied"]), body
    assert "beyond your rights" in body["error"]
    return body


# ---------------------------------------------------------------- each kind of right
def test_quality_layers(rsrv, uid, ixs):
    s = user_with(rsrv, max_layers=2)
    body = refused(fetch(rsrv.url, s.id, target=uid), "layers")        # all layers
    assert body["max_layers"] == 2
    refused(fetch(rsrv.url, s.id, target=uid, layers=3), "layers")
    refused(fetch(rsrv.url, s.id, target=uid, version="V1"), "layers")
    check_within(fetch(rsrv.url, s.id, target=uid, layers=2), ixs, expected(ixs, layers=2))


def test_resolution(rsrv, uid, ixs):
    s = user_with(rsrv, max_reduce_min=1)
    body = refused(fetch(rsrv.url, s.id, target=uid, layers=1), "resolution")
    assert body == {**body, "max_reduce_min": 1}
    refused(fetch(rsrv.url, s.id, target=uid, fsiz="256,256"), "resolution")
    top = ixs[0].numres - 2
    check_within(fetch(rsrv.url, s.id, target=uid, reduce=1), ixs, expected(ixs, res=top))
    # a display size at or below the allowed resolution is fine
    check_within(fetch(rsrv.url, again(rsrv, s).id, target=uid, fsiz="60,60", comps="2"), ixs,
                 expected(ixs, comps={2}, res=0), comps={2})


def test_images(rsrv, uid, ixs):
    s = user_with(rsrv, images={0, 1, 2, 3})
    body = refused(fetch(rsrv.url, s.id, target=uid), "images")
    assert body["allowed_images"] == "0-3"
    refused(fetch(rsrv.url, s.id, target=uid, comps="2-5"), "images")
    check_within(fetch(rsrv.url, s.id, target=uid, comps="1,3"), ixs,
                 expected(ixs, comps={1, 3}), comps={1, 3})


def test_regions(rsrv, uid, ixs):
    allowed = (0, 0, 100, 80)
    s = user_with(rsrv, regions=[allowed])
    body = refused(fetch(rsrv.url, s.id, target=uid, comps="0"), "region")
    assert body["allowed_regions"] == [list(allowed)]
    refused(fetch(rsrv.url, s.id, target=uid, comps="0", roff="50,50", rsiz="100,100"), "region")
    x, y, w, h = 10, 10, 60, 50
    resp = fetch(rsrv.url, s.id, target=uid, comps="0-1", roff=f"{x},{y}", rsiz=f"{w},{h}")
    want = expected(ixs, comps={0, 1}, region=(x, y, x + w, y + h))
    check_within(resp, ixs, want, comps={0, 1})
    # every precinct sent also covers the allowed region; full resolution stays near it
    ceiling = expected(ixs, comps={0, 1}, region=(0, 0, 100, 80))
    assert set(want) <= set(ceiling)
    top = ixs[0].numres - 1
    full_res = {k[3] for k in want if k[2] == top}
    assert len(full_res) < ixs[0].num_precincts(0, top)
    # the whole region is allowed; the image minus the region is not
    check_within(fetch(rsrv.url, again(rsrv, s).id, target=uid, comps="0", roff="0,0",
                       rsiz="100,80"), ixs,
                 expected(ixs, comps={0}, region=(0, 0, 100, 80)), comps={0})


def test_versions_by_rights(rsrv, rstore, uid, ixs):
    """A referrer allowed V2 and V3 gets nothing of an unread study (the status matrix
    sends it only as V1), and V2/V3 once it has been read."""
    s = user_with(rsrv, versions=["V2", "V3"])
    body = refused(fetch(rsrv.url, s.id, target=uid, layers=1), "layers")
    assert body["max_layers"] == 0 and body["allowed_versions"] == []
    study = study_uid(rstore)
    diag = rsrv.app.state.server.diagnosis
    diag.set_status(study, 2, "test")
    try:
        body = refused(fetch(rsrv.url, s.id, target=uid, version="V1"), "version")
        assert body["allowed_versions"] == ["V2", "V3"] and body["max_layers"] == 2
        refused(fetch(rsrv.url, s.id, target=uid), "layers")               # lossless = V1
        refused(fetch(rsrv.url, s.id, target=uid, purpose="diagnosis"), "version")
        resp = fetch(rsrv.url, s.id, target=uid, version="V2")
        check_within(resp, ixs, expected(ixs, layers=2))
        assert resp.controls[0]["version"]["name"] == "V2"
        resp = fetch(rsrv.url, again(rsrv, s).id, target=uid, quality=10)    # cheapest: V3
        check_within(resp, ixs, expected(ixs, layers=1))
        assert resp.controls[0]["version"]["name"] == "V3"
    finally:
        diag.set_status(study, 1, "test")


def test_status_matrix(rsrv, rstore, uid, ixs):
    """At status 5 (report) the default matrix no longer sends V1 to those who may not
    diagnose: lossless is refused, V2 goes out; whoever may diagnose (the local
    radiologist) still gets V1 (an addendum is read lossless, [status]
    diagnosing_versions); at status 1 only V1 may be asked for by name."""
    study = study_uid(rstore)
    local = Session(rsrv.url)
    viewer = user_with(rsrv, actions={"browse", "metadata", "fetch"})      # may not diagnose
    diag = rsrv.app.state.server.diagnosis
    try:
        refused(fetch(rsrv.url, local.id, target=uid, version="V3"), "version")
        diag.set_status(study, 5, "test")
        body = refused(fetch(rsrv.url, viewer.id, target=uid), "layers")
        assert body["allowed_versions"] == ["V2", "V3"] and body["diagnosis_status"] == 5
        assert "status 5" in refused(fetch(rsrv.url, viewer.id, target=uid, version="V1"),
                                     "version")["error"]
        check_within(fetch(rsrv.url, viewer.id, target=uid, version="V2", comps="4"), ixs,
                     expected(ixs, comps={4}, layers=2), comps={4})
        check_within(fetch(rsrv.url, local.id, target=uid, version="V1", comps="4"), ixs,
                     expected(ixs, comps={4}), comps={4})               # lossless for the radiologist
        r = requests.get(f"{rsrv.url}/dicomweb/studies/{study}/series/{uid}/instances/x/frames/1",
                         headers={"Authorization": f"Bearer {local.id}"})
        assert r.status_code in (403, 404)
    finally:
        diag.set_status(study, 1, "test")


def test_whole_files_need_unlimited_rights(rsrv, rstore, uid):
    study = study_uid(rstore)
    s = user_with(rsrv, max_layers=3)
    local = Session(rsrv.url)
    sop = local.instances(study, uid)[0]["SOPInstanceUID"]
    for path in (f"/dicomweb/studies/{study}/series/{uid}/instances/{sop}",
                 f"/dicomweb/studies/{study}/series/{uid}/instances/{sop}/frames/1"):
        r = requests.get(rsrv.url + path, headers={"Authorization": f"Bearer {s.id}"})
        assert r.status_code == 403 and r.json()["denied"] == ["whole-file"]
        assert r.json()["max_layers"] == 3
        assert requests.get(rsrv.url + path,
                            headers={"Authorization": f"Bearer {local.id}"}).status_code == 200


def test_actions(rsrv, uid):
    s = user_with(rsrv, actions={"browse", "metadata"})
    assert s.series()                                    # browsing is allowed
    r = fetch(rsrv.url, s.id, target=uid, layers=1)
    assert r.status == 403 and r.json["denied"] == ["action"]
    assert r.json["allowed_actions"] == ["browse", "metadata"]
    audit = rsrv.app.state.server.auth.audit_rows(user=s.username, action="fetch")
    assert audit[0]["outcome"] == "denied" and audit[0]["http_status"] == 403


# ---------------------------------------------------------------- how rules combine
def test_rule_precedence():
    rules = [Rule("ann", "*", max_layers=1), Rule("@rad", "*", max_layers=3),
             Rule("@rad", "ST", max_layers=2), Rule("@ref", "ST", max_layers=4, images={1}),
             Rule("ann", "SE", max_reduce_min=2)]
    assert decide(rules, "ann", ["rad"], None, None).max_layers == 1          # user before group
    assert decide(rules, "bob", ["rad"], None, None).max_layers == 3
    g = decide(rules, "bob", ["rad", "ref"], "SE0", "ST")                     # study scope, union
    assert g.max_layers == 4 and g.images is None
    g = decide(rules, "ann", ["rad"], "SE", "ST")                              # series scope first
    assert g.max_reduce_min == 2 and g.max_layers is None
    assert decide(rules, "zed", [], "SE", "ST").unlimited
    # the status matrix narrows versions and caps layers through the lossy versions
    g = Grant(versions=["V1", "V2"], status_versions=["V2", "V3"])
    assert g.allowed_versions(["V1", "V2", "V3"]) == ["V2"]


# ---------------------------------------------------------------- the client side
def test_client_stays_within_rights(rsrv, rstore, uid, ixs):
    s = user_with(rsrv, max_layers=2, max_reduce_min=1, images=set(range(6)))
    sd = SeriesData(s, None, uid)
    assert sd.rights["max_layers"] == 2 and sd.rights["allowed_images"] == "0-5"
    t = sd.transfer()
    assert t.params["layers"] == 2 and t.params["reduce"] == 1 and t.params["comps"] == "0-5"
    t.run()
    assert t.limited is None
    assert [sd.levels(c) for c in range(6)] == [(2, ixs[0].numres - 2)] * 6
    assert sd.levels(6) == (0, -1)
    # a request wholly beyond the rights sends nothing and says why (no exception: a
    # viewer scrolling onto such an image simply gets nothing more)
    heard = []
    sd.listeners.append(lambda kind, msg: heard.append((kind, msg)))
    t = sd.transfer(comps=[8, 9])
    assert t.run()["reason"] == "beyond-rights" and t.received == 0
    assert t.limited["denied"] == ["images"] and t.limited["allowed_images"] == "0-5"
    assert heard[0][0] == "limited" and isinstance(t.blocked, ServerError)
    assert not sd.can_fetch([8]) and sd.can_fetch([5, 8])


def test_client_learns_changed_rights_and_asks_again(rsrv, uid, ixs):
    s = user_with(rsrv)                                 # no limit when the series opens
    sd = SeriesData(s, None, uid)
    assert sd.rights.get("max_layers") is None
    events = []
    sd.listeners.append(lambda kind, msg: events.append((kind, msg)))
    rsrv.app.state.server.auth.set_rule(Rule(s.username, "*", max_layers=1))
    t = sd.transfer(comps=[0, 1])
    t.run()
    assert t.limited["max_layers"] == 1 and t.params["layers"] == 1
    assert events[0][0] == "limited" and events[0][1]["denied"] == ["layers"]
    assert sd.levels(0)[0] == 1
    np.testing.assert_array_equal(sd.decode(0).pixels.shape, (ixs[0].height, ixs[0].width))
