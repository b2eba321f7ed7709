"""Authorisation on every path element (issue 10, 1): every route of the app's route table
(read from ``app.routes``, so a new route is covered without touching this test), with a
foreign object at every position that names one — study, series, instance, frame,
diagnostic item, slide, the JPIP ``target`` — for every kind of restricted user (study
scope, series scope, image ranges, layers, resolution, region, versions): each answer is
403 or 404 with an error body, never the foreign object. Also: the series image list and
the slab layout list only the images the grant allows; the audit names what was served."""
from __future__ import annotations

import itertools
import json

import pytest
import requests
from starlette.routing import Route

from imaging.slide_sample import make_ihc_slide
from imaging.tilesource import ArraySource
from server.embedded import EmbeddedServer
from server.rights import Rule

from pathology_util import new_store
from policyutil import copy_store

PASSWORD = "a long password"
FOREIGN_NAME = "Foreign^Patient"
FOREIGN_ID = "FOREIGN-PID-77"
_names = itertools.count()

#: path parameters that name an object (a foreign one goes there); any other path
#: parameter must be listed in OTHER_PARAMS, so that a new kind fails here first
UID_POSITIONS = ("study", "series", "sop", "frame", "item", "slide")
#: a slide's associated image (label, macro...); a bulk data tag; a reading station (its
#: worklist is filtered slide by slide by the user's grants)
OTHER_PARAMS = {"name", "tag", "station"}
#: query parameters that name an object, for routes whose path names none (or besides)
QUERY_POSITIONS = {"/jpip": ("target",), "/jpip/slabs/{series}": ("target",),
                   "/jpip/slides/{slide}": ("target",)}


@pytest.fixture(scope="module")
def env(ct_store, tmp_path_factory):
    """A store with the CT study A (12 images) and a foreign study B of another patient
    (4 images), slide A (A's patient, exam ACC-A) and slide B (patient P2), and a note
    and an annotation in each study."""
    import pydicom

    from server.ingest import ingest_paths
    from server.sample import make_sample_ct
    from server.store import Store

    tmp = tmp_path_factory.mktemp("authz")
    root = copy_store(ct_store, tmp / "store")
    files = make_sample_ct(tmp / "foreign", slices=4, size=64, seed=77)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID = FOREIGN_NAME, FOREIGN_ID
        ds.save_as(f)
    with Store(root) as st:
        assert len(ingest_paths(files, st).imported) == 4
        cat = st.catalogue
        studies = {s["PatientID"]: s["StudyInstanceUID"] for s in cat.query_studies()}
        study_b = studies.pop(FOREIGN_ID)
        ((pid_a, study_a),) = studies.items()
        (series_a,) = [s["SeriesInstanceUID"] for s in cat.query_series(StudyInstanceUID=study_a)]
        (series_b,) = [s["SeriesInstanceUID"] for s in cat.query_series(StudyInstanceUID=study_b)]
        imgs_a = cat.series_images(series_a)
        imgs_b = cat.series_images(series_b)
    slides = new_store(root)
    img, assoc = make_ihc_slide(300, 280, seed=2)
    slide_a = slides.ingest(ArraySource(img, mpp=0.5, associated=assoc),
                            patient_id=pid_a, accession="ACC-A",
                            tile_size=256, run_qc=False)
    slide_b = slides.ingest(ArraySource(img, mpp=0.5, associated=assoc), patient_id="P2",
                            accession="ACC-B", tile_size=256, run_qc=False)
    slides.close()
    slide_a = slide_a if isinstance(slide_a, str) else slide_a["slide_uid"]
    slide_b = slide_b if isinstance(slide_b, str) else slide_b["slide_uid"]
    srv = EmbeddedServer(str(root)).start()
    server = srv.app.state.server
    items = {}
    for tag, study, imgs, series in (("a", study_a, imgs_a, series_a),
                                     ("b", study_b, imgs_b, series_b)):
        items[f"note_{tag}"] = server.diagnosis.add(study, "note", {"text": "n"}, "local")["id"]
        items[f"ann_{tag}"] = server.diagnosis.add(study, "annotation", {
            "series": series, "image": f"{imgs[0]['SOPInstanceUID']}/1", "shape": "point",
            "points": [[1, 1]]}, "local")["id"]
    yield {"srv": srv, "url": srv.url, "server": server, "study_a": study_a,
           "study_b": study_b, "series_a": series_a, "series_b": series_b,
           "sop_a": imgs_a[0]["SOPInstanceUID"], "sop_a_outside": imgs_a[8]["SOPInstanceUID"],
           "sop_b": imgs_b[0]["SOPInstanceUID"], "slide_a": slide_a, "slide_b": slide_b,
           **items}
    srv.stop()


def make_user(env, kind: str, **limits) -> tuple[str, str]:
    """A user allowed nothing anywhere ('*' rule without actions) but ``limits`` on
    study A (or series A) and slide A's exam (or slide A): (name, session id)."""
    auth = env["server"].auth
    name = f"z{kind}{next(_names)}"
    auth.add_user(name, PASSWORD)
    auth.set_rule(Rule(name, "*", actions=set()))
    if kind == "series":
        auth.set_rule(Rule(name, env["series_a"], **limits))
        auth.set_rule(Rule(name, env["slide_a"], **limits))
    else:
        auth.set_rule(Rule(name, env["study_a"], **limits))
        auth.set_rule(Rule(name, "exam:ACC-A", **limits))
    r = requests.post(f"{env['url']}/api/login", json={"username": name, "password": PASSWORD},
                      timeout=30)
    assert r.status_code == 200, r.text
    return name, r.json()["session"]


USER_KINDS = {
    "study": {},
    "series": {},
    "images": {"images": {0, 1, 2, 3}},
    "layers": {"max_layers": 2},
    "resolution": {"max_reduce_min": 1},
    "region": {"regions": [(0, 0, 100, 80)]},
    "versions": {"versions": ["V2", "V3"]},
}


def allowed_values(env, path: str) -> dict:
    """The allowed object at each position of a route (study A's)."""
    item = env["ann_a"] if "/annotations/" in path else env["note_a"]
    return {"study": env["study_a"], "series": env["series_a"], "sop": env["sop_a"],
            "frame": "1", "item": str(item), "slide": env["slide_a"], "name": "label", "tag": "7FE00010",
            "target": env["slide_a"] if "slide" in path else env["series_a"]}


def foreign_values(env, path: str, kind: str) -> dict[str, list[str]]:
    """What goes at each position instead: the foreign study's objects (and for a user
    limited to some images, an instance of the allowed series outside those images)."""
    item = env["ann_b"] if "/annotations/" in path else env["note_b"]
    out = {"study": [env["study_b"]], "series": [env["series_b"]], "sop": [env["sop_b"]],
           "frame": ["2"], "item": [str(item)], "slide": [env["slide_b"]],
           "target": [env["slide_b"] if "slide" in path else env["series_b"]]}
    if kind == "images":
        out["sop"].append(env["sop_a_outside"])
    return out


def body_for(env, path: str, method: str, item: str | None) -> dict | None:
    """A body that would be accepted were the request allowed (so that a 400 for the
    body can never hide a leak)."""
    if method not in ("POST", "PUT", "DELETE"):
        return None
    if "/annotations" in path:
        return {"series": env["series_a"], "image": f"{env['sop_a']}/1", "shape": "point",
                "points": [[2, 2]], "base_rev": _rev(env, item)}
    if path.endswith("/status"):
        return {"status": 1}
    if "/notes" in path or path.endswith("/report"):
        return {"text": "changed", "base_rev": _rev(env, item)}
    if path == "/api/session/context":
        return {"cpus": 2}
    return {}


def _rev(env, item):
    if item is None or not item.isdigit():
        return None
    return env["server"].diagnosis.get(int(item))["rev"]


def route_table(env):
    out = []
    for r in env["srv"].app.routes:
        if not isinstance(r, Route):
            continue
        for m in sorted((r.methods or {"GET"}) - {"HEAD"}):
            out.append((r.path, m, list(r.param_convertors)))
    return out


def fill(path: str, values: dict) -> str:
    for k, v in values.items():
        path = path.replace("{" + k + "}", requests.utils.quote(v, safe=""))
    return path


def send(env, sid, method, path, params, body):
    return requests.request(method, env["url"] + path, params=params, json=body,
                            headers={"Authorization": f"Bearer {sid}"}, timeout=60)


def test_foreign_uid_at_every_position(env, capsys):
    users = {kind: make_user(env, kind, **lim) for kind, lim in USER_KINDS.items()}
    foreign_markers = (FOREIGN_NAME, FOREIGN_ID, env["sop_b"] + '"', "Foreign")
    tried, leaks, positions, routes_seen = 0, [], set(), set()
    baseline_bad = []
    table = route_table(env)
    assert len(table) >= 25
    for path, method, params in table:
        unknown = set(params) - set(UID_POSITIONS) - OTHER_PARAMS
        assert not unknown, f"{path}: path parameter(s) {unknown} unknown to this test"
        qpos = QUERY_POSITIONS.get(path, ())
        slots = [p for p in params if p in UID_POSITIONS] + [f"?{q}" for q in qpos]
        if not slots:
            continue
        routes_seen.add((path, method))
        ok = allowed_values(env, path)
        for kind, (name, sid) in users.items():
            # the allowed object itself, for a user without limits on it: not refused
            if method == "GET" and kind == "study" and "/jpip" not in path:
                r = send(env, sid, method, fill(path, ok), {}, None)
                if r.status_code >= 400:
                    baseline_bad.append((path, r.status_code, r.text[:200]))
            for slot in slots:
                name_ = slot.lstrip("?")
                for value in foreign_values(env, path, kind)[name_]:
                    vals = dict(ok)
                    query = {"target": ok["target"]} if qpos else {}
                    if slot.startswith("?"):
                        query[name_] = value
                    else:
                        vals[name_] = value
                    if "{" in path and not slot.startswith("?"):    # the path names it
                        query.pop("target", None)
                    if "/jpip" in path:
                        query.update(layers="1", reduce="2", roff="0,0", rsiz="64,64",
                                     version="V3")
                    item = vals.get("item")
                    body = body_for(env, path, method, item)
                    if method == "DELETE":
                        query["base_rev"] = str(_rev(env, item) or 1)
                        body = None
                    r = send(env, sid, method, fill(path, vals), query, body)
                    tried += 1
                    positions.add((path, method, slot))
                    text = r.text
                    refused = (403, 404)
                    if slot == "?target" and "{" in path:   # contradicts the path: malformed
                        refused = (400, 403, 404)
                    bad = r.status_code not in refused
                    if not bad:
                        try:
                            bad = "error" not in r.json()
                        except ValueError:
                            bad = True
                    if bad or any(m in text for m in foreign_markers):
                        leaks.append((kind, method, path, slot, value[-12:], r.status_code,
                                      text[:160]))
    with capsys.disabled():
        print(f"\nauthz: {len(routes_seen)} routes x methods, {len(positions)} "
              f"(route, position) pairs, {len(users)} restricted users: {tried} foreign "
              f"requests, {len(leaks)} not refused")
    assert not leaks, "\n".join(map(str, leaks[:30]))
    assert not baseline_bad, baseline_bad
    assert tried >= 7 * 20


def test_image_list_and_slab_layout_only_allowed_images(env):
    _, sid = make_user(env, "images", images={0, 1, 2, 3})
    h = {"Authorization": f"Bearer {sid}"}
    r = requests.get(f"{env['url']}/api/series/{env['series_a']}/images", headers=h, timeout=60)
    assert r.status_code == 200
    images = r.json()["images"]
    assert [im["index"] for im in images] == list(range(12))       # places kept
    r = requests.get(f"{env['url']}/dicomweb/studies/{env['study_a']}/series/"
                     f"{env['series_a']}/instances", headers=h, timeout=60)
    assert r.status_code == 200
    listed = {row["00080018"]["Value"][0] for row in r.json()}
    assert listed == {im["SOPInstanceUID"] for im in images[:4]}
    assert [im["index"] for im in images if "SOPInstanceUID" in im] == [0, 1, 2, 3]
    shape = {"index", "key", "allowed", "Rows", "Columns", "numres", "nlayers", "ncomp",
             "total_bytes", "layer_bytes", "hot_layers"}
    for im in images[4:]:           # beyond the grant: its place and shape, nothing of it
        assert set(im) == shape and im["allowed"] is False and im["total_bytes"] == 0
        assert "/" not in im["key"].split("#", 1)[1].replace("beyond-rights/", "")
    r = requests.get(f"{env['url']}/api/series/{env['series_a']}/slabs", headers=h, timeout=120)
    assert r.status_code == 200
    lay = r.json()
    order = lay["pyramid"]["order"]
    assert lay["images"], "no band of the allowed images"
    for im in lay["images"]:
        assert {order[t] for t in range(*im["span"])} <= {0, 1, 2, 3}
    # the bands listed can be fetched; the others not
    shown = ",".join(str(im["index"]) for im in lay["images"])
    r = requests.get(f"{env['url']}/jpip/slabs/{env['series_a']}", headers=h, timeout=120,
                     params={"comps": shown, "layers": "1"})
    assert r.status_code == 200
    r = requests.get(f"{env['url']}/jpip/slabs/{env['series_a']}", headers=h, timeout=60,
                     params={"layers": "1"})
    assert r.status_code == 403


def test_audit_names_what_was_served(env):
    name, sid = make_user(env, "study")
    h = {"Authorization": f"Bearer {sid}"}
    base = f"{env['url']}/dicomweb/studies/{env['study_a']}/series/{env['series_a']}/instances"
    assert requests.get(f"{base}/{env['sop_a']}/frames/1", headers=h, timeout=60).status_code == 200
    assert requests.get(f"{base}/{env['sop_b']}/metadata", headers=h, timeout=60).status_code == 404
    rows = env["server"].auth.audit_rows(user=name, limit=5)
    notfound, served = rows[0], rows[1]
    assert served["outcome"] == "ok" and served["resource"] == env["series_a"]
    assert served["detail"]["served"] == {"study": env["study_a"], "series": env["series_a"],
                                          "sop": env["sop_a"], "frame": 1}
    assert notfound["outcome"] == "not-found" and notfound["http_status"] == 404
    # a stranger's request is audited too
    requests.get(f"{base}/{env['sop_a']}/metadata", timeout=60)
    row = env["server"].auth.audit_rows(action="metadata", limit=1)[0]
    assert row["user"] is None and row["http_status"] == 401 and row["outcome"] == "denied"


def test_unhandled_error_is_json_500_and_audited(env, monkeypatch):
    name, sid = make_user(env, "study")
    cat = env["server"].catalogue

    def broken(uid):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cat, "instance_header", broken)
    r = requests.get(f"{env['url']}/dicomweb/studies/{env['study_a']}/series/{env['series_a']}"
                     f"/instances/{env['sop_a']}/metadata",
                     headers={"Authorization": f"Bearer {sid}"}, timeout=60)
    assert r.status_code == 500
    assert r.json() == {"error": "internal server error (logged and audited)", "status": 500}
    assert "Traceback" not in r.text and "boom" not in r.text
    row = env["server"].auth.audit_rows(user=name, limit=1)[0]
    assert row["outcome"] == "error" and row["http_status"] == 500
    assert row["detail"]["error"] == "unhandled ZeroDivisionError"
    assert json.dumps(row)          # plain data


def test_unhandled_error_outside_the_guard_is_json_500_and_audited(env, monkeypatch):
    auth = env["server"].auth

    def broken(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(auth, "login", broken)
    r = requests.post(f"{env['url']}/api/login", json={"username": "x", "password": "y"},
                      timeout=60)
    assert r.status_code == 500
    assert r.json() == {"error": "internal server error (logged and audited)", "status": 500}
    row = auth.audit_rows(action="request", limit=1)[0]
    assert row["http_status"] == 500 and row["detail"]["path"] == "/api/login"
    assert row["detail"]["error"] == "unhandled ZeroDivisionError"


def test_listings_hide_what_the_rules_hide(env):
    """A rule without actions on a patient hides that patient's studies, series and
    instances from every listing (the study list carries names and IDs)."""
    auth = env["server"].auth
    name = f"zlist{next(_names)}"
    auth.add_user(name, PASSWORD)
    auth.set_rule(Rule(name, f"patient:{FOREIGN_ID}", actions=set()))
    sid = requests.post(f"{env['url']}/api/login", json={"username": name, "password": PASSWORD},
                        timeout=30).json()["session"]
    h = {"Authorization": f"Bearer {sid}"}
    for path in ("/dicomweb/studies", "/dicomweb/series", "/dicomweb/studies?format=json",
                 "/dicomweb/studies?limit=1",             # paged after hiding: never short
                 f"/dicomweb/series?StudyInstanceUID={env['study_b']}"):
        r = requests.get(env["url"] + path, headers=h, timeout=60)
        assert r.status_code == 200, (path, r.text)
        assert FOREIGN_ID not in r.text and env["study_b"] not in r.text, path
        if "StudyInstanceUID=" not in path:
            assert env["study_a"] in r.text, path
