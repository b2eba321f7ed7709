"""User rights on slides (SPEC P7, V6, H3): the slide routes enforce every right of the
grant that has a meaning for a slide through the series' own check — for each, a request
beyond it is refused with a 403 that names the maximum, and a request within it carries
no packet beyond it (every byte of the stream parsed); scopes (slide, exam, patient) hide
a patient's slides, listing, description, label and macro; malformed slide requests get
a clear 4xx."""
from __future__ import annotations

import itertools

import pytest
import requests

from codestream import framing
from codestream.jpp import EorMessage, JppParser
from imaging.slide_sample import make_ihc_slide
from imaging.tilesource import ArraySource
from server.embedded import EmbeddedServer
from server.rights import Rule, exam_scope, patient_scope

from pathology_util import new_store
from policyutil import copy_store, packets_sent, series_uid
from waits import WAIT_S, wait_for

_names = itertools.count()
PASSWORD = "a long password"


# --------------------------------------------------------------------------- set-up
@pytest.fixture(scope="module")
def env(ct_store, tmp_path_factory):
    """A server over a copy of the CT store plus two slides: A (640x512, levels 0-2) of
    the CT's own patient, B (300x280, a corner tile too small to be reduced) of P2."""
    from server.store import Store

    root = copy_store(ct_store, tmp_path_factory.mktemp("rslides") / "store")
    with Store(root) as st:
        (study,) = st.catalogue.query_studies()
    pid = study["PatientID"]
    slides = new_store(root)
    img, assoc = make_ihc_slide(640, 512, seed=2)
    a = slides.ingest(ArraySource(img, mpp=0.5, associated=assoc), patient_id=pid,
                      accession="ACC-A", tile_size=256, run_qc=False)
    img, assoc = make_ihc_slide(300, 280, seed=3)
    b = slides.ingest(ArraySource(img, mpp=0.5, associated=assoc), patient_id="P2",
                      accession="ACC-B", tile_size=256, run_qc=False)
    slides.close()
    srv = EmbeddedServer(str(root)).start()
    yield {"srv": srv, "url": srv.url, "root": root, "a": a, "b": b, "pid": pid,
           "series": series_uid(root), "study": study["StudyInstanceUID"]}
    srv.stop()


def login(url: str, name: str = "local", password: str | None = None) -> str:
    r = requests.post(f"{url}/api/login", json={"username": name, "password": password},
                      timeout=WAIT_S)
    assert r.status_code == 200, r.text
    return r.json()["session"]


def on(scope: str, **limits) -> Rule:
    """A rule on ``scope`` (its subject is set by :func:`user_with`)."""
    return Rule("?", scope, **limits)


def user_with(env, *rules: Rule, **rule) -> tuple[str, str]:
    """A new user with the given rules (or one rule on ``*`` from keywords), logged in:
    (name, session)."""
    name = f"s{next(_names)}"
    auth = env["srv"].app.state.server.auth
    auth.add_user(name, PASSWORD)
    for r in rules or (on("*", **rule),):
        auth.set_rule(Rule(name, r.scope, r.max_layers, r.max_reduce_min, r.regions, r.images,
                           r.versions, r.actions))
    return name, login(env["url"], name, PASSWORD)


def again(env, name: str) -> str:
    """Another session of the user (a session never gets a packet twice)."""
    return login(env["url"], name, PASSWORD)


def get(env, sid: str, path: str, **params) -> requests.Response:
    return requests.get(env["url"] + path, params=params,
                        headers={"Authorization": f"Bearer {sid}"}, timeout=WAIT_S)


class Stream:
    def __init__(self, status: int, body: dict | None, controls=(), messages=()):
        self.status, self.json = status, body
        self.controls, self.messages = list(controls), list(messages)

    @property
    def announce(self) -> dict:
        (a,) = [c for c in self.controls if c["type"] == "announce"]
        return a


def fetch(env, sid: str, slide: dict, **params) -> Stream:
    """One raw slide packet request, read to the end and parsed."""
    r = get(env, sid, f"/jpip/slides/{slide['slide_uid']}", **params)
    if r.status_code != 200:
        return Stream(r.status_code, r.json())
    controls, messages = [], []
    parser = JppParser()
    for rtype, payload in framing.RecordReader().feed(r.content):
        if rtype == framing.CONTROL:
            controls.append(payload)
        else:
            messages.extend(m for m in parser.feed(payload) if not isinstance(m, EorMessage))
    return Stream(200, None, controls, messages)


def stored(env, slide: dict):
    return env["srv"].app.state.server.slides.store.open(slide["pk"])[1]


def expected(st, level: int, *, region=None, reduce=0, layers=None, tiles=None):
    """{(tile, comp, res, prec, layer): bytes} a slide request must carry (a fresh
    session), and the header bytes: the tiles the level region touches, of each only the
    precincts of its part of the region, resolutions down to ``reduce``."""
    g = st.levels[level]
    want, hdr = {}, 0
    todo = g.tiles_in(*region) if region else range(g.count)
    for t in todo:
        if tiles is not None and t not in tiles:
            continue
        ix = st.tile_index(level, t)
        hdr += ix.main_header_end + ix.tile_header[1] - ix.tile_header[0]
        local = None
        if region:
            tx, ty, tw, th = g.tile_rect(t)
            x, y, w, h = region
            local = (max(x, tx) - tx, max(y, ty) - ty, min(x + w, tx + tw) - tx,
                     min(y + h, ty + th) - ty)
        lens = ix.packet_lengths_by_bin()
        for c in range(ix.ncomp):
            for r in range(ix.numres - min(reduce, ix.numres - 1)):
                precs = (ix.precincts_for_region(c, r, *local) if local
                         else range(ix.num_precincts(c, r)))
                for p in precs:
                    b = ix.databin_id(c, r, p)
                    for q in range(min(layers or ix.nlayers, ix.nlayers)):
                        want[(t, c, r, p, q)] = lens[b][q]
    return want, hdr


def check_within(resp: Stream, st, level: int, want_hdr) -> None:
    """The stream carried exactly the packets of ``want``: nothing else, no byte more."""
    want, hdr_want = want_hdr
    assert resp.status == 200, resp.json
    ixs = {t: st.tile_index(level, t) for t in range(st.levels[level].count)}
    sent, hdr = packets_sent(resp.messages, ixs)
    keys = [(s.csn, s.comp, s.res, s.prec, s.layer) for s in sent]
    assert len(keys) == len(set(keys)), "a packet was sent twice"
    assert set(keys) == set(want), "packets beyond (or short of) the right"
    assert sum(s.nbytes for s in sent) == sum(want.values())
    assert hdr == hdr_want
    (end,) = [c for c in resp.controls if c["type"] == "end"]
    assert resp.announce["bytes"] == end["bytes_sent"] == sum(want.values()) + hdr


def refused(resp, *denied) -> dict:
    status = resp.status if isinstance(resp, Stream) else resp.status_code
    body = resp.json if isinstance(resp, Stream) else resp.json()
    assert status == 403, body
    assert set(denied) <= set(body["denied"]), body
    return body


# --------------------------------------------------------------------------- each right
def test_quality_layers(env):
    a = env["a"]
    st = stored(env, a)
    _n, sid = user_with(env, max_layers=2)
    body = refused(fetch(env, sid, a, level=2), "layers")          # all layers
    assert body["max_layers"] == 2 and "beyond your rights" in body["error"]
    refused(fetch(env, sid, a, level=1, layers=3), "layers")
    refused(fetch(env, sid, a, level=1, version="V1"), "layers")    # lossless = all layers
    resp = fetch(env, sid, a, level=1, layers=2)
    check_within(resp, st, 1, expected(st, 1, layers=2))
    assert {m["layers"] for m in resp.announce["images"]} == {2}


def test_resolution_is_level_plus_reduce(env):
    a, b = env["a"], env["b"]
    st = stored(env, a)
    name, sid = user_with(env, max_reduce_min=1)
    body = refused(fetch(env, sid, a, level=0, layers=1), "resolution")
    assert body["max_reduce_min"] == 1 and body["finest_level"] == 1
    assert "level 1" in body["error"]
    refused(fetch(env, sid, a, level=0, roff="10,10", rsiz="20,20"), "resolution")
    # level 1 whole, and level 0 reduced once (the same resolution) are allowed
    check_within(fetch(env, sid, a, level=1), st, 1, expected(st, 1))
    sid2 = again(env, name)
    resp = fetch(env, sid2, a, level=0, reduce=1)
    check_within(resp, st, 0, expected(st, 0, reduce=1))
    assert max(p for (_t, _c, p, _q, _l) in expected(st, 0, reduce=1)[0]) == 1
    # a tile too small to be reduced would go out at full resolution: refused whole
    sb = stored(env, b)
    assert sb.tile_index(0, 3).numres == 1
    body = refused(fetch(env, sid2, b, level=0, reduce=1, roff="260,260", rsiz="10,10"),
                   "resolution")
    assert body["finest_level"] == 1
    check_within(fetch(env, sid2, b, level=1, roff="130,130", rsiz="5,5"), sb, 1,
                 expected(sb, 1, region=(130, 130, 5, 5)))


def test_resolution_beyond_the_pyramid_allows_its_coarsest(env):
    a = env["a"]
    st = stored(env, a)
    _n, sid = user_with(env, max_reduce_min=9)
    top = len(st.levels) - 1
    coarsest = st.tile_index(top, 0).numres - 1
    body = refused(fetch(env, sid, a, level=top), "resolution")
    assert body["finest_level"] == top and body["max_reduce_min"] == 9
    refused(fetch(env, sid, a, level=top, reduce=coarsest - 1), "resolution")
    check_within(fetch(env, sid, a, level=top, reduce=coarsest), st, top,
                 expected(st, top, reduce=coarsest))


def test_regions_scale_with_the_level(env):
    a = env["a"]
    st = stored(env, a)
    allowed = (0, 0, 300, 200)                      # full-resolution pixels
    name, sid = user_with(env, regions=[allowed])
    body = refused(fetch(env, sid, a, level=0, layers=1), "region")          # whole level
    assert body["allowed_regions"] == [list(allowed)]
    assert body["allowed_regions_at_level"] == [list(allowed)] and body["level"] == 0
    refused(fetch(env, sid, a, level=0, roff="250,150", rsiz="100,100"), "region")
    body = refused(fetch(env, sid, a, level=1, roff="0,0", rsiz="151,100"), "region")
    assert body["allowed_regions_at_level"] == [[0, 0, 150, 100]] and body["level"] == 1
    refused(fetch(env, sid, a, level=1, comps="0"), "region")                # tiles, no region
    # inside: exactly the precincts of the region, of the tiles it touches
    region = (10, 10, 280, 180)
    resp = fetch(env, sid, a, level=0, roff="10,10", rsiz="280,180")
    want = expected(st, 0, region=region)
    check_within(resp, st, 0, want)
    assert {k[0] for k in want[0]} == {0, 1}
    # nothing at full resolution lies outside the allowed region
    for (t, c, r, p, _l) in want[0]:
        ix = st.tile_index(0, t)
        if r == ix.numres - 1:
            tx, ty, _w, _h = st.levels[0].tile_rect(t)
            assert p in ix.precincts_for_region(c, r, max(0, 0 - tx), 0, 300 - tx, 200)
    # the allowed region at coarser levels, scaled (and at level 2 exactly 75x50)
    sid2 = again(env, name)
    check_within(fetch(env, sid2, a, level=1, roff="0,0", rsiz="150,100"), st, 1,
                 expected(st, 1, region=(0, 0, 150, 100)))
    check_within(fetch(env, sid2, a, level=2, roff="0,0", rsiz="75,50"), st, 2,
                 expected(st, 2, region=(0, 0, 75, 50)))
    refused(fetch(env, sid2, a, level=2, roff="0,0", rsiz="76,50"), "region")


def test_versions(env):
    a = env["a"]
    st = stored(env, a)
    local = login(env["url"])
    info = get(env, local, f"/api/slides/{a['slide_uid']}").json()
    layers = {v["name"]: v["layers"] or 4 for v in info["versions"]}
    assert layers["V1"] == 4 and all(v["allowed"] for v in info["versions"])
    assert layers["V2"] < 4 and layers["V3"] <= layers["V2"]
    name, sid = user_with(env, versions=["V2", "V3"])
    body = refused(fetch(env, sid, a, level=2), "layers")                   # lossless
    assert body["allowed_versions"] == ["V2", "V3"] and body["max_layers"] == layers["V2"]
    refused(fetch(env, sid, a, level=2, version="V1"), "version")
    refused(fetch(env, sid, a, level=2, purpose="diagnosis"), "version")
    refused(fetch(env, sid, a, level=2, layers=layers["V2"] + 1), "layers")
    resp = fetch(env, sid, a, level=2, version="V2")
    check_within(resp, st, 2, expected(st, 2, layers=layers["V2"]))
    assert resp.announce["version"]["name"] == "V2"
    resp = fetch(env, again(env, name), a, level=2, version="auto")
    assert resp.status == 200 and resp.announce["version"]["name"] in ("V2", "V3")
    assert resp.announce["version"]["auto"]
    mine = get(env, sid, f"/api/slides/{a['slide_uid']}").json()
    assert {v["name"]: v["allowed"] for v in mine["versions"]} == {"V1": False, "V2": True,
                                                                  "V3": True}
    assert mine["rights"]["max_layers"] == layers["V2"] and mine["unlimited"] is True


def test_image_rights_allow_no_slide_packets(env):
    a = env["a"]
    _n, sid = user_with(env, images={0, 1})
    body = refused(fetch(env, sid, a, level=2, layers=1), "images")
    assert body["allowed_images"] == "0-1" and "slide" in body["error"]
    # a rule on the slide itself lifts it
    _n, sid = user_with(env, on("*", images={0, 1}), on(a["slide_uid"]))
    assert fetch(env, sid, a, level=2, layers=1).status == 200


def test_whole_images_need_unlimited_rights(env):
    a = env["a"]
    local = login(env["url"])
    for limits in ({"max_layers": 3}, {"regions": [(0, 0, 10, 10)]}, {"max_reduce_min": 1},
                   {"versions": ["V2"]}):
        _n, sid = user_with(env, **limits)
        for name in ("label", "macro"):
            r = get(env, sid, f"/api/slides/{a['slide_uid']}/associated/{name}")
            body = refused(r, "whole-file")
            assert body["denied"] == ["whole-file"]
        if "max_layers" in limits:
            assert body["max_layers"] == 3
    _n, sid = user_with(env, actions={"browse", "metadata", "fetch"})
    r = get(env, sid, f"/api/slides/{a['slide_uid']}/associated/label")
    assert r.status_code == 403 and r.json()["denied"] == ["action"]
    r = get(env, local, f"/api/slides/{a['slide_uid']}/associated/label")
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- scopes
def test_patient_scope_hides_every_image_of_the_patient(env):
    a, b = env["a"], env["b"]
    name, sid = user_with(env, on(patient_scope(env["pid"]), actions=set()))
    listing = get(env, sid, "/api/slides").json()
    assert isinstance(listing, list), listing
    assert [r["slide_uid"] for r in listing] == [b["slide_uid"]]
    assert get(env, sid, "/api/slides", patient_id=env["pid"]).json() == []
    for path in (f"/api/slides/{a['slide_uid']}", f"/api/slides/{a['pk']}",
                 f"/api/slides/{a['slide_uid']}/associated/label",
                 f"/api/slides/{a['slide_uid']}/associated/macro"):
        r = get(env, sid, path)
        assert r.status_code == 403 and r.json()["denied"] == ["action"], path
    resp = fetch(env, sid, a, level=2, layers=1)
    assert resp.status == 403 and resp.json["allowed_actions"] == []
    # the same rule hides the patient's radiology
    r = get(env, sid, "/jpip", target=env["series"], layers=1)
    assert r.status_code == 403 and r.json()["denied"] == ["action"]
    # another patient's slide is untouched
    assert get(env, sid, f"/api/slides/{b['slide_uid']}").status_code == 200
    got = fetch(env, sid, b, level=1)
    assert got.status == 200
    # audited: the refusal, and the stream when it ended, with the bytes that left
    auth = env["srv"].app.state.server.auth
    rows: list[dict] = []

    def streamed():
        rows[:] = auth.audit_rows(user=name, action="fetch")
        return any(r["outcome"] == "ok" for r in rows)

    wait_for(streamed, what="the audit row of the stream")
    assert {(r["resource"], r["outcome"], r["http_status"]) for r in rows} >= {
        (a["slide_uid"], "denied", 403), (b["slide_uid"], "ok", 200)}
    (ok,) = [r for r in rows if r["outcome"] == "ok"]
    end = got.controls[-1]
    assert ok["detail"]["bytes_sent"] == end["bytes_sent"] > 0 and ok["detail"]["level"] == 1


def test_scope_ranking_slide_exam_patient(env):
    a, b = env["a"], env["b"]
    # the slide's own rule beats its patient's
    _n, sid = user_with(env, on(patient_scope(env["pid"]), actions=set()),
                        on(a["slide_uid"], max_layers=1))
    assert [r["slide_uid"] for r in get(env, sid, "/api/slides").json()] == [
        a["slide_uid"], b["slide_uid"]]
    refused(fetch(env, sid, a, level=2, layers=2), "layers")
    assert fetch(env, sid, a, level=2, layers=1).status == 200
    r = get(env, sid, "/jpip", target=env["series"], layers=1)       # still hidden there
    assert r.status_code == 403
    # an exam rule applies to the exam's slides only
    _n, sid = user_with(env, on(exam_scope(b["accession"]), max_layers=1))
    assert refused(fetch(env, sid, b, level=1), "layers")["max_layers"] == 1
    assert fetch(env, sid, a, level=2).status == 200
    # the grant of a series comes from its own study, whatever study the path names
    auth = env["srv"].app.state.server.auth
    name, _sid = user_with(env, on(env["study"], actions=set()), on("1.2.3.999"))
    assert auth.grant_for(name, env["series"], "1.2.3.999").actions == set()
    assert auth.grant_for(name, None, "1.2.3.999").actions is None


# --------------------------------------------------------------------------- the rest
def test_unlimited_user_and_description(env):
    a = env["a"]
    st = stored(env, a)
    local = login(env["url"])
    check_within(fetch(env, local, a, level=0, roff="300,200", rsiz="100,100"), st, 0,
                 expected(st, 0, region=(300, 200, 100, 100)))
    d = get(env, local, f"/api/slides/{a['pk']}").json()
    assert d["unlimited"] is True and d["rights"] == {}
    _n, sid = user_with(env, max_layers=2, max_reduce_min=1, regions=[(0, 0, 64, 64)])
    d = get(env, sid, f"/api/slides/{a['pk']}").json()
    assert d["unlimited"] is False
    assert d["rights"] == {**d["rights"], "max_layers": 2, "max_reduce_min": 1,
                           "finest_level": 1, "allowed_regions": [[0, 0, 64, 64]]}


def test_malformed_slide_requests(env):
    a = env["a"]
    uid = a["slide_uid"]
    local = login(env["url"])
    cases = [
        ({"level": "x"}, 400, "level"),
        ({"level": "7"}, 416, "level 7"),
        ({"level": "-1"}, 416, "level -1"),
        ({"level": "0", "roff": "5000,0", "rsiz": "10,10"}, 416, "outside"),
        ({"level": "0", "roff": "0,0", "rsiz": "0,10"}, 400, "rsiz"),
        ({"level": "0", "roff": "a,b", "rsiz": "10,10"}, 400, "roff"),
        ({"level": "0", "roff": "1,2,3", "rsiz": "10,10"}, 400, "roff"),
        ({"level": "0", "roff": "0,0"}, 400, "roff and rsiz"),
        ({"level": "0", "roff": "-5,0", "rsiz": "10,10"}, 400, "negative"),
        ({"level": "2", "comps": "5"}, 416, "comps"),
        ({"level": "2", "comps": "x"}, 400, "comps"),
        ({"level": "2", "target": "someone-else"}, 400, "target"),
        ({"level": "2", "bogus": "1"}, 400, "unknown"),
        ({"level": "2", "version": "V9"}, 400, "V9"),
        ({"level": "2", "layers": "0"}, 400, "layers"),
    ]
    for params, status, word in cases:
        r = get(env, local, f"/jpip/slides/{uid}", **params)
        assert r.status_code == status, (params, r.text)
        assert word in r.json()["error"], (params, r.json())
    r = get(env, local, f"/jpip/slides/{uid}", level="7")
    assert r.json()["max_level"] == 2
    for path in ("/jpip/slides/nope", "/api/slides/nope", "/api/slides/99999",
                 "/api/slides/nope/associated/label", f"/api/slides/{uid}/associated/overview"):
        r = get(env, local, path)
        assert r.status_code == 404 and r.json()["error"], path
    r = requests.post(f"{env['url']}/jpip/slides/{uid}", params={"level": 2}, data=b"{not json",
                      headers={"Authorization": f"Bearer {local}"}, timeout=WAIT_S)
    assert r.status_code == 400 and "POST body" in r.json()["error"]
    # no session: 401, whether the slide exists or not
    for path in (f"/jpip/slides/{uid}", "/jpip/slides/nope", "/api/slides/nope", "/api/slides"):
        assert requests.get(env["url"] + path, timeout=WAIT_S).status_code == 401, path


def test_cli_scopes(env, capsys):
    from server.cli import main as cli

    auth = env["srv"].app.state.server.auth
    auth.add_user("cliuser", PASSWORD)
    a = env["a"]
    for flag, value, scope in (("--patient", "P2", "patient:P2"),
                               ("--exam", a["accession"], f"exam:{a['accession']}"),
                               ("--slide", a["slide_uid"], a["slide_uid"])):
        assert cli(["user", "grant", "cliuser", "--store", str(env["root"]), flag, value,
                    "--actions", ""]) == 0
        assert f'"scope": "{scope}"' in capsys.readouterr().out
    assert {r.scope: r.actions for r in auth.rules(["cliuser"])} == {
        "patient:P2": set(), f"exam:{a['accession']}": set(), a["slide_uid"]: set()}
    sid = login(env["url"], "cliuser", PASSWORD)
    assert get(env, sid, "/api/slides").json() == []
    assert cli(["user", "grant", "cliuser", "--store", str(env["root"]), "--slide",
                a["slide_uid"], "--revoke"]) == 0
    assert get(env, sid, f"/api/slides/{a['slide_uid']}").status_code == 403   # exam rule
