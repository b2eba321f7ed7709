"""Every input validated (issue 10, 3): the HTTP API answers bad input with a 4xx naming
the field, never a 500 — checked three ways, in process (no sockets):

* the known crashes: integers beyond 64 bits, deeply nested JSON bodies, oversized
  bodies, NaN, wrong types, on every route that takes them;
* schemathesis against the OpenAPI document the server publishes (``/api/openapi.json``,
  generated from the route table), a small bounded number of examples per operation;
* a hypothesis property-based fuzz of the query parameters, path elements and bodies of
  every route of the route table.

The figures (requests sent, 5xx answers) are printed at the end."""
from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from starlette.routing import Route
from starlette.testclient import TestClient

from server.app import create_app
from server.store import Store

from policyutil import copy_store

PASSWORD = "a long password"
COUNTS = {"requests": 0, "5xx": 0, "schemathesis": 0, "hypothesis": 0, "known": 0}
STATUSES: dict[int, int] = {}
FAILURES: list = []


@pytest.fixture()
def api(ct_store, tmp_path_factory):
    """The app over a private copy of the CT store, a user without limits logged in, a
    note in the study: (client, auth headers, facts)."""
    root = copy_store(ct_store, tmp_path_factory.mktemp("fuzz") / "store")
    store = Store(root)
    app = create_app(store)
    srv = app.state.server
    srv.auth.add_user("fuzzer", PASSWORD)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/api/login", json={"username": "fuzzer", "password": PASSWORD})
        assert r.status_code == 200, r.text
        headers = {"Authorization": f"Bearer {r.json()['session']}"}
        (series,) = srv.catalogue.query_series()
        study = series["StudyInstanceUID"]
        img = srv.catalogue.series_images(series["SeriesInstanceUID"])[0]
        note = srv.diagnosis.add(study, "note", {"text": "n"}, "fuzzer")["id"]
        facts = {"study": study, "series": series["SeriesInstanceUID"],
                 "sop": img["SOPInstanceUID"], "frame": "1", "item": str(note),
                 "slide": "1", "name": "label", "app": app}
        yield client, headers, facts
    store.close()


def record(r, how: str, what: str) -> None:
    STATUSES[r.status_code] = STATUSES.get(r.status_code, 0) + 1
    COUNTS["requests"] += 1
    COUNTS[how] += 1
    if r.status_code >= 500:
        COUNTS["5xx"] += 1
        FAILURES.append((how, what, r.status_code, r.text[:200]))


def call(client, headers, method, path, how, *, params=None, content=None, json_body=None):
    h = dict(headers)
    if content is not None:
        h["content-type"] = "application/json"
    r = client.request(method, path, params=params, content=content, json=json_body, headers=h)
    record(r, how, f"{method} {path} {params} {str(content or json_body)[:80]}")
    return r


# --------------------------------------------------------------------------- known crashes
def body_routes(facts):
    s = facts["study"]
    return [("POST", "/api/login"), ("POST", "/api/session/context"),
            ("POST", f"/api/studies/{s}/notes"), ("POST", f"/api/studies/{s}/annotations"),
            ("PUT", f"/api/studies/{s}/notes/{facts['item']}"),
            ("PUT", f"/api/studies/{s}/status"), ("PUT", f"/api/studies/{s}/report"),
            ("POST", f"/jpip?target={facts['series']}&layers=1"),
            ("POST", f"/jpip/slabs/{facts['series']}?layers=1")]


def test_deeply_nested_bodies_are_400(api):
    client, headers, facts = api
    for depth in (40, 100_000):
        for kind in ("[", '{"a":'):
            body = (kind * depth).encode()
            for method, path in body_routes(facts):
                r = call(client, headers, method, path, "known", content=body)
                # (a body beyond the route's size limit is refused before parsing: 413)
                assert r.status_code in ((400, 413) if depth > 50_000 else (400,)), \
                    (path, r.status_code, r.text[:200])
                assert r.json()["field"] == "body"


def test_oversized_body_is_413(api):
    client, headers, facts = api
    r = call(client, headers, "POST", f"/api/studies/{facts['study']}/notes", "known",
             content=b" " * ((16 << 20) + 1))
    assert r.status_code == 413 and r.json()["field"] == "body"


@pytest.mark.parametrize("value", ["99999999999999999999", "-1", "1e3", "x", "9223372036854775808"])
def test_integers_beyond_range_are_400_naming_the_field(api, value):
    client, headers, facts = api
    s, se = facts["study"], facts["series"]
    for path, field in ((f"/dicomweb/studies?limit={value}", "limit"),
                        (f"/dicomweb/studies?offset={value}", "offset"),
                        (f"/dicomweb/studies/{s}/series/{se}/instances?limit={value}", "limit"),
                        (f"/jpip?target={se}&layers={value}", "layers"),
                        (f"/jpip?target={se}&len={value}", "len"),
                        (f"/dicomweb/studies/{s}/series/{se}/instances/{facts['sop']}/frames/{value}",
                         "frame"),
                        (f"/api/studies/{s}/items/{value}/history", "item")):
        r = call(client, headers, "GET", path, "known")
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert r.json()["field"] == field, r.json()
    r = call(client, headers, "DELETE", f"/api/studies/{s}/notes/{facts['item']}?base_rev={value}",
             "known")
    assert r.status_code == 400 and r.json()["field"] == "base_rev"


def test_bad_json_values_are_400(api):
    client, headers, facts = api
    s = facts["study"]
    for body, field in ((b'{"status": 99999999999999999999}', "body.status"),
                        (b'{"text": "x", "base_rev": 1e999}', "body"),
                        (b'{"text": NaN}', "body"), (b"\xff\xfe", "body")):
        r = call(client, headers, "PUT", f"/api/studies/{s}/status", "known", content=body)
        assert r.status_code == 400 and r.json()["field"] == field, (body, r.text)
    for body in ({"username": ["x"]}, {"username": "x", "password": 5}, {"username": "x" * 300}):
        r = call(client, headers, "POST", "/api/login", "known", json_body=body)
        assert r.status_code == 400, r.text
    r = call(client, headers, "PUT", f"/api/studies/{s}/status", "known",
             json_body={"status": 2, "comment": {"not": "text"}})
    assert r.status_code == 400, r.text


# --------------------------------------------------------------------------- schemathesis
def test_schemathesis_no_server_error(api):
    """Schemathesis on the published document: per operation, a few valid examples
    (positive) and a few that break the schema (negative), half of those with path
    parameters on real objects so that they get past the 404 of the path."""
    from schemathesis import GenerationMode

    client, headers, facts = api
    r = client.get("/api/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    # the document is the route table: every route, every method, every path parameter
    for route in facts["app"].routes:
        if isinstance(route, Route):
            ops = doc["paths"][route.path]
            for m in (route.methods or {"GET"}) - {"HEAD"}:
                names = {p["name"] for p in ops[m.lower()]["parameters"] if p["in"] == "path"}
                assert names == set(route.param_convertors)
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", facts["app"])
    operations = [res.ok() for res in schema.get_all_operations()]
    # (schemathesis leaves out the document's own path)
    assert len(operations) == sum(len(v) for v in doc["paths"].values()) - 1
    # one in-process client for every call (schemathesis would otherwise open one per
    # call, running the app's start-up and shut-down each time)
    from schemathesis.python import asgi

    with asgi.get_client(facts["app"]) as sclient:
        _schemathesis_runs(operations, sclient, headers, facts)


def _schemathesis_runs(operations, sclient, headers, facts):
    from schemathesis import GenerationMode

    for op in operations:
        if op.path == "/api/logout":         # would end the fuzzing session
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(mode), real=st.booleans())
            def run(case, real):
                if real and case.path_parameters:
                    for k in case.path_parameters:
                        if k in facts:
                            case.path_parameters[k] = facts[k]
                r = case.call(session=sclient, headers=headers)
                STATUSES[r.status_code] = STATUSES.get(r.status_code, 0) + 1
                COUNTS["requests"] += 1
                COUNTS["schemathesis"] += 1
                if r.status_code >= 500:
                    COUNTS["5xx"] += 1
                    FAILURES.append(("schemathesis", op.label, r.status_code, r.text[:200]))
                assert r.status_code < 500, (op.label, case.path_parameters, case.query,
                                             str(case.body)[:200], r.text[:300])

            try:
                run()
            except Unsatisfiable:
                # nothing of this operation can break its schema (no parameters, no body)
                assert mode == GenerationMode.NEGATIVE, op.label


# --------------------------------------------------------------------------- hypothesis
NASTY_INTS = st.sampled_from(["0", "-1", "1", "2", "99999999999999999999", "9223372036854775807",
                              "9223372036854775808", "-9223372036854775809", "1e400", "NaN",
                              "0x10", "", " 1", "1,2", "0-3", "3-0", "1,,2", "-0"])
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
VALUE = st.one_of(NASTY_INTS, TEXT, st.sampled_from(["auto", "V1", "V9", "quality", "jpp",
                                                       "true", "\x00", "*", "a" * 5000]))
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
              st.floats(allow_nan=False, allow_infinity=False), TEXT),
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.sampled_from(
                               ["text", "status", "comment", "base_rev", "series", "image",
                                "shape", "points", "label", "measurement", "model", "h", "b",
                                "username", "password", "cpus", "link_bps", "memory_mb",
                                "place", "kind", "value"]) | TEXT, kids, max_size=5)),
    max_leaves=20)


def routes_of(app):
    out = []
    for r in app.routes:
        if isinstance(r, Route) and r.path != "/api/logout":     # (would end the session)
            info = getattr(r.endpoint, "medview", {}) or {}
            names = [p.name for p in info.get("query", ())]
            for m in sorted((r.methods or {"GET"}) - {"HEAD"}):
                out.append((r.path, m, list(r.param_convertors), names))
    return out


@st.composite
def requests_(draw, facts, table):
    path, method, params, qnames = draw(st.sampled_from(table))
    url = path
    for p in params:
        real = facts.get(p, "1")
        v = draw(st.one_of(st.just(real), st.just(real), VALUE.filter(lambda s: s.strip("./")),
                           st.just(real + "0")))
        url = url.replace("{" + p + "}", _quote(v))
    keys = draw(st.lists(st.one_of(st.sampled_from(qnames or ["limit"]), TEXT.filter(bool)),
                         max_size=4, unique=True))
    query = {k: draw(VALUE) for k in keys}
    if path.startswith("/jpip") and draw(st.booleans()):
        query["target"] = facts["series"]
    body = None
    if method in ("POST", "PUT"):
        body = draw(st.one_of(JSON.map(lambda o: json.dumps(o).encode()),
                              st.binary(max_size=40),
                              st.integers(1, 200).map(lambda n: b"[" * n + b"]" * n)))
    return method, url, query, body


def _quote(v: str) -> str:
    from urllib.parse import quote

    return quote(v, safe="") or "x"


def test_hypothesis_fuzz_no_server_error(api):
    client, headers, facts = api
    table = routes_of(facts["app"])

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests_(facts, table))
    def run(req):
        method, url, query, body = req
        r = call(client, headers, method, url, "hypothesis", params=query, content=body)
        assert r.status_code < 500, (method, url, query, body and body[:100], r.text[:300])
        if r.status_code == 400 and r.headers.get("content-type", "").startswith("application/json"):
            assert r.json().get("error")

    run()


def test_zz_report():
    """The figures of this file's run (it runs last)."""
    print(f"\nfuzz: {COUNTS['requests']} requests ({COUNTS['known']} known cases, "
          f"{COUNTS['schemathesis']} schemathesis, {COUNTS['hypothesis']} hypothesis), "
          f"{COUNTS['5xx']} answered 5xx; statuses {dict(sorted(STATUSES.items()))}")
    assert COUNTS["5xx"] == 0, FAILURES[:20]
