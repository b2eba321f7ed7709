"""Diagnosis status, notes, annotations and report over the API (SPEC V5, V6), versions
asked for by version, quality, purpose or automatically (V3, V8), all audited."""
from __future__ import annotations

import pytest

from client import SeriesData, ServerError, Session
from client.policy import PolicyClient, machine_context
from server.embedded import EmbeddedServer
from server.rights import Rule
from tests.policyutil import copy_store, fetch, series_uid, study_uid


@pytest.fixture(scope="module")
def dsrv(ct_store, tmp_path_factory):
    store = copy_store(ct_store, tmp_path_factory.mktemp("diag") / "store")
    srv = EmbeddedServer(str(store)).start()
    srv.study, srv.series = study_uid(store), series_uid(store)
    yield srv
    srv.stop()


@pytest.fixture()
def pc(dsrv):
    return PolicyClient(Session(dsrv.url))


def test_status_changes_and_history(dsrv, pc):
    rec = pc.diagnosis(dsrv.study)
    assert rec["status"] == 1 and rec["status_name"] == "unread"
    assert rec["allowed_versions"] == ["V1"]
    out = pc.set_status(dsrv.study, 2, "first read")
    assert out == {**out, "status": 2, "previous": 1, "allowed_versions": ["V1", "V2", "V3"]}
    with pytest.raises(ServerError) as e:
        pc.set_status(dsrv.study, 6)
    assert e.value.status == 400
    pc.set_status(dsrv.study, 1, "back to unread")
    rec = pc.diagnosis(dsrv.study)
    assert [(h["previous"], h["status"], h["changed_by"]) for h in rec["status_history"]][-2:] == \
        [(1, 2, "local"), (2, 1, "local")]
    rows = dsrv.app.state.server.auth.audit_rows(action="diagnose", resource=dsrv.study)
    assert rows[0]["detail"]["status"] == [2, 1] and rows[0]["user"] == "local"


def test_notes_report_and_history(dsrv, pc):
    n = pc.add_note(dsrv.study, "nodule right upper lobe?")
    assert n["rev"] == 1 and n["created_by"] == "local"
    assert pc.diagnosis(dsrv.study)["status"] == 3                      # auto-advance: notes
    n2 = pc.edit_note(dsrv.study, n["id"], "nodule right upper lobe, 6 mm", n["rev"])
    assert n2["rev"] == 2 and n2["text"].endswith("6 mm")
    with pytest.raises(ServerError) as e:                               # stale revision
        pc.edit_note(dsrv.study, n["id"], "overwrite", 1)
    assert e.value.status == 409 and e.value.body["rev"] == 2
    gone = pc.delete_note(dsrv.study, n["id"], 2)
    assert gone["deleted"] and gone["rev"] == 3
    hist = pc.history(dsrv.study, n["id"])["revisions"]
    assert [(h["rev"], h["action"]) for h in hist] == [(1, "create"), (2, "edit"), (3, "delete")]
    assert hist[0]["text"] == "nodule right upper lobe?"                # nothing is lost
    r = pc.save_report(dsrv.study, "Findings: none.")
    assert r["rev"] == 1 and pc.diagnosis(dsrv.study)["status"] == 5
    r = pc.save_report(dsrv.study, "Findings: 6 mm nodule.", r["rev"])
    assert r["rev"] == 2
    with pytest.raises(ServerError) as e:
        pc.save_report(dsrv.study, "a second report")                  # no base_rev: create
    assert e.value.status == 409
    rec = pc.diagnosis(dsrv.study)
    assert rec["report"]["text"] == "Findings: 6 mm nodule." and rec["notes"] == []
    pc.set_status(dsrv.study, 1, "reset for the other tests")


def test_annotations_in_image_coordinates(dsrv, pc):
    s = Session(dsrv.url)
    key = s.series_images(dsrv.series)["images"][3]["key"]
    ann = {"series": dsrv.series, "image": key, "shape": "line", "points": [[10, 20], [40.5, 60]],
           "label": "lesion", "measurement": {"kind": "distance", "value": 12.5, "unit": "mm"}}
    a = pc.add_annotation(dsrv.study, ann)
    assert a["points"] == [[10.0, 20.0], [40.5, 60.0]] and a["measurement"]["unit"] == "mm"
    for bad, why in (({**ann, "image": "1.2/1"}, "image"), ({**ann, "shape": "star"}, "shape"),
                     ({**ann, "points": [[1, 2]]}, "2 points"), ({**ann, "series": "9.9"}, "series")):
        with pytest.raises(ServerError) as e:
            pc.add_annotation(dsrv.study, bad)
        assert e.value.status == 400 and why in e.value.message
    a2 = pc.edit_annotation(dsrv.study, a["id"], {**ann, "label": "lesion A"}, a["rev"])
    assert a2["label"] == "lesion A"
    # delivered with the images: the series description carries the diagnosis record
    sd = SeriesData(s, None, dsrv.series)
    assert [x["label"] for x in sd.diagnosis["annotations"]] == ["lesion A"]
    assert sd.diagnosis["status"] == 4 and sd.diagnosis["status_name"] == "annotations"
    pc.delete_annotation(dsrv.study, a["id"], a2["rev"])
    pc.set_status(dsrv.study, 1, "reset")


def test_diagnose_needs_the_right(dsrv):
    auth = dsrv.app.state.server.auth
    auth.add_user("viewer-only", "a long password")
    auth.set_rule(Rule("viewer-only", "*", actions={"browse", "metadata", "fetch"}))
    pc = PolicyClient(Session(dsrv.url, "viewer-only", "a long password"))
    assert pc.diagnosis(dsrv.study)["status"] == 1
    with pytest.raises(ServerError) as e:
        pc.add_note(dsrv.study, "hello")
    assert e.value.status == 403 and e.value.body["denied"] == ["action"]


def test_versions_route_and_requests(dsrv, pc):
    v = pc.versions(dsrv.series)
    assert [x["name"] for x in v["versions"]] == ["V1", "V2", "V3"]
    assert [x["allowed"] for x in v["versions"]] == [True, False, False]   # status 1
    assert v["auto"]["version"] == "V1" and v["diagnosis"]["status"] == 1
    # a selection the status does not allow becomes the nearest allowed version
    sd = SeriesData(Session(dsrv.url), None, dsrv.series)
    sd.select(purpose="comparison")
    t = sd.transfer(comps=[7])
    assert t.params["version"] == "V1" and "purpose" not in t.params
    t.run()
    assert t.announce["version"]["name"] == "V1" and t.limited is None
    pc.set_status(dsrv.study, 2)
    try:
        s = pc.session
        for params, name, layers in (({"version": "V2"}, "V2", 2), ({"purpose": "comparison"}, "V2", 2),
                                     ({"quality": 40}, "V2", 2), ({"version": "V1"}, "V1", 4)):
            r = fetch(dsrv.url, Session(dsrv.url).id, target=dsrv.series, comps="0", **params)
            ann = r.controls[0]
            assert ann["version"]["name"] == name and ann["images"][0]["layers"] == layers
        r = fetch(dsrv.url, s.id, target=dsrv.series, version="V2", quality=30)
        assert r.status == 400
        # automatic: the client reports a slow link, the server picks V3 and says why
        ctx = pc.set_context(link_bps=2e6, place="home", **machine_context())
        assert ctx["link_bps"] == 2e6 and ctx["cpus"] >= 1
        r = fetch(dsrv.url, s.id, target=dsrv.series, version="auto", comps="1")
        ver = r.controls[0]["version"]
        assert ver["name"] == "V3" and "slow link" in ver["auto"][0]
        sd = SeriesData(s, None, dsrv.series)
        sd.select(purpose="reference")
        t = sd.transfer(comps=[5])
        t.run()
        assert t.announce["version"]["name"] == "V3" and sd.levels(5)[0] == 1
        with pytest.raises(ServerError) as e:
            s.request("POST", "/api/session/context", json={"weather": "rain"})
        assert e.value.status == 400 and "weather" in e.value.message
    finally:
        pc.set_status(dsrv.study, 1)
