"""HTTP routes of the server policy (issue 5): versions, diagnosis status and records,
the client's context for the automatic version choice, who am I.

Kept apart from :mod:`server.app` (which adds them with :func:`routes`); every route
goes through the same ``guarded`` decorator, hence :meth:`Authority.authorize` and the
audit log.

``GET    /api/me``                                   user, groups, rights on everything
``POST   /api/session/context``                      ``{"link_bps", "latency_ms",
                                                      "memory_mb", "cpus", "place"}``: what the client reports
                                                      for ``version=auto`` (V8)
``GET    /api/series/{series}/versions``             versions (layers, target and actual
                                                      ratio, quality, purpose), which are
                                                      allowed, the automatic choice and
                                                      why, the user's rights
``GET    /api/studies/{study}/diagnosis``            status (+ history), notes,
                                                      annotations, report
``PUT    /api/studies/{study}/status``               ``{"status": 1-5, "comment"}``
``POST   /api/studies/{study}/notes``                ``{"text"}``
``PUT    /api/studies/{study}/notes/{item}``         ``{"text", "base_rev"}``
``DELETE /api/studies/{study}/notes/{item}?base_rev=N``
``POST   /api/studies/{study}/annotations``          annotation body (see
                                                      :mod:`server.diagnosis`)
``PUT    /api/studies/{study}/annotations/{item}``   ``{..., "base_rev"}``
``DELETE /api/studies/{study}/annotations/{item}?base_rev=N``
``PUT    /api/studies/{study}/report``               ``{"text", "base_rev"}`` (no base_rev:
                                                      create)
``GET    /api/studies/{study}/items/{item}/history`` every revision of an item

Writes need the ``diagnose`` action; reads need ``metadata``.
"""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .diagnosis import STATUS_FOR_KIND, DiagnosisError
from . import peers
from .inputs import InputError, Param, parse_json
from .packets import RequestError
from .policy import AutoInputs

CONTEXT_KEYS = {"link_bps": float, "memory_mb": float, "cpus": int, "place": str,
                "latency_ms": float}


def _json(request: Request) -> dict:
    """The request's JSON object body (parsed once, within the limits, by the guard:
    :func:`server.inputs.parse_json`); an empty body is ``{}``."""
    body = getattr(request.state, "json", None)
    if body is None:
        body = parse_json(request.state.body or b"{}")
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object", "body")
    return body


def peer_of(request: Request) -> str | None:
    """The client address (forwarding headers believed from trusted proxies only)."""
    return peers.peer_of(request)


def auto_choice(srv, session, grant, versions, peer):
    """The automatic version for this session on this series (V8)."""
    pol = srv.policy.get()
    ctx = session.context
    inputs = AutoInputs(status=grant.status, link_bps=ctx.get("link_bps"),
                        memory_mb=ctx.get("memory_mb"), cpus=ctx.get("cpus"),
                        latency_ms=ctx.get("latency_ms"),
                        groups=tuple(srv.auth.groups_of(session.user)),
                        place=pol.place_for(peer, ctx.get("place")))
    return pol.choose_auto(inputs, grant.allowed_versions(versions.names()))


def series_policy(srv, uid: str, session, grant, peer) -> dict:
    """What the viewer needs to know about a series besides its images: versions and
    which may be sent, the automatic choice, the user's rights, the diagnosis record."""
    versions = srv.versions.get(uid)
    pol = srv.policy.get()
    out: dict = {"rights": grant.limits(versions), "unlimited": grant.unlimited}
    if versions is not None:
        allowed = grant.allowed_versions(versions.names())
        out["versions"] = [dict(v.to_json(), allowed=allowed is None or v.name in allowed)
                           for v in versions.versions]
        out["auto"] = auto_choice(srv, session, grant, versions, peer).to_json()
    info = srv.catalogue.get_series(uid) or {}
    study = info.get("StudyInstanceUID")
    if study:
        rec = srv.diagnosis.record(study, series=uid)
        rec["status_name"] = pol.status_name(rec["status"])
        rec["status_names"] = {str(k): v for k, v in sorted(pol.status_names.items())}
        out["diagnosis"] = rec
    return out


def routes(srv, guarded) -> list[Route]:
    pol = srv.policy.get
    obj = {"type": "object"}            # a JSON object body (OpenAPI)

    @guarded("session")
    def me(request: Request):
        s = request.state.session
        g = srv.auth.grant_for(s.user)
        return JSONResponse({"user": s.user, "groups": srv.auth.groups_of(s.user),
                             "rights": g.limits(), "unlimited": g.unlimited,
                             "actions": sorted(g.actions) if g.actions is not None else None,
                             "context": s.context})

    @guarded("session", body={"type": "object", "properties": {
        "link_bps": {"type": "number"}, "memory_mb": {"type": "number"},
        "cpus": {"type": "integer"}, "place": {"type": "string"},
        "latency_ms": {"type": "number"}}})
    def context(request: Request):
        body = _json(request)
        ctx = {}
        for k, v in body.items():
            kind = CONTEXT_KEYS.get(k)
            if kind is None:
                raise RequestError(f"unknown context field {k!r}; known: {', '.join(CONTEXT_KEYS)}")
            if v is None:
                continue
            try:
                ctx[k] = kind(v)
            except (TypeError, ValueError):
                raise RequestError(f"{k} must be a {kind.__name__}") from None
        request.state.session.context.update(ctx)
        srv.auth.save_context(request.state.session)      # for every replica
        request.state.audit["context"] = ctx
        return JSONResponse({"context": request.state.session.context})

    @guarded("metadata")
    def versions(request: Request):
        uid = request.path_params["series"]
        if srv.catalogue.get_series(uid) is None:
            return JSONResponse({"error": f"unknown series {uid}", "status": 404}, 404)
        return JSONResponse({"series": uid, **series_policy(
            srv, uid, request.state.session, request.state.grant, peer_of(request))})

    def _study(request: Request) -> str:
        """The study of the path, as the guard resolved it (404 there if unknown)."""
        return request.state.target.study

    @guarded("metadata")
    def diagnosis(request: Request):
        study = _study(request)
        rec = srv.diagnosis.record(study)
        rec["status_name"] = pol().status_name(rec["status"])
        rec["status_names"] = {str(k): v for k, v in sorted(pol().status_names.items())}
        rec["status_history"] = srv.diagnosis.status_history(study)
        rec["allowed_versions"] = pol().allowed_versions(rec["status"])
        return JSONResponse(rec)

    @guarded("diagnose", body=obj)
    def set_status(request: Request):
        study = _study(request)
        body = _json(request)
        comment = body.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise InputError("comment must be text", "body.comment")
        prev, new = srv.diagnosis.set_status(study, body.get("status"),
                                             request.state.session.user, body.get("comment"))
        request.state.audit["status"] = [prev, new]
        return JSONResponse({"study": study, "status": new, "previous": prev,
                             "status_name": pol().status_name(new),
                             "allowed_versions": pol().allowed_versions(new)})

    def _advance(study: str, kind: str, user: str, request: Request) -> None:
        if pol().auto_advance:
            prev, new = srv.diagnosis.set_status(study, STATUS_FOR_KIND[kind], user,
                                                 f"{kind} written", only_raise=True)
            if new != prev:
                request.state.audit["status"] = [prev, new]

    def _check_annotation(study: str, body: dict) -> None:
        series = body.get("series")
        info = srv.catalogue.get_series(series) if isinstance(series, str) else None
        if info is None or info.get("StudyInstanceUID") != study:
            raise DiagnosisError("the annotation's series is not a series of this study")
        keys = {f"{r['SOPInstanceUID']}/{r['frame']}" for r in srv.catalogue.series_images(series)}
        if body.get("image") not in keys:
            raise DiagnosisError("the annotation's image is not an image of its series "
                                 "(image = '<SOP Instance UID>/<frame>')")

    def _item_of(study: str, kind: str, request: Request) -> dict:
        item = request.state.target.item_row       # an item of this study (the guard)
        if item["kind"] != kind:
            raise DiagnosisError(f"no {kind} {request.path_params['item']} in this study", 404)
        return item

    def _collection(kind: str):
        @guarded("diagnose", body=obj)
        def create(request: Request):
            study = _study(request)
            body = _json(request)
            if kind == "annotation":
                _check_annotation(study, body)
            user = request.state.session.user
            item = srv.diagnosis.add(study, kind, body, user)
            request.state.audit["item"] = item["id"]
            _advance(study, kind, user, request)
            return JSONResponse(item, status_code=201)

        @guarded("diagnose", body=obj, query=(Param("base_rev", "int", "revision the "
                                                     "change is based on (DELETE)"),))
        def change(request: Request):
            study = _study(request)
            item = _item_of(study, kind, request)
            user = request.state.session.user
            request.state.audit["item"] = item["id"]
            if request.method == "DELETE":
                base = request.query_params.get("base_rev")
                out = srv.diagnosis.delete(item["id"], user, int(base) if base else None)
            else:
                body = _json(request)
                if kind == "annotation":
                    _check_annotation(study, body)
                out = srv.diagnosis.edit(item["id"], body, user, body.get("base_rev"))
            return JSONResponse(out)
        return create, change

    notes_create, notes_change = _collection("note")
    ann_create, ann_change = _collection("annotation")

    @guarded("diagnose", body=obj)
    def report(request: Request):
        study = _study(request)
        body = _json(request)
        user = request.state.session.user
        existing = srv.diagnosis.items(study, "report")
        if body.get("base_rev") is None and not existing:
            item = srv.diagnosis.add(study, "report", body, user)
            status = 201
        elif not existing:
            raise DiagnosisError("the study has no report yet: send it without base_rev", 409)
        elif body.get("base_rev") is None:
            raise DiagnosisError(f"the study has a report already (revision "
                                 f"{existing[0]['rev']}): edit it with base_rev", 409,
                                 rev=existing[0]["rev"], current=existing[0])
        else:
            item = srv.diagnosis.edit(existing[0]["id"], body, user, body.get("base_rev"))
            status = 200
        request.state.audit["item"] = item["id"]
        _advance(study, "report", user, request)
        return JSONResponse(item, status_code=status)

    @guarded("metadata")
    def history(request: Request):
        item = request.state.target.item_row       # an item of the path's study (the guard)
        return JSONResponse({"item": item, "revisions": srv.diagnosis.history(item["id"])})

    return [
        Route("/api/me", me),
        Route("/api/session/context", context, methods=["POST"]),
        Route("/api/series/{series}/versions", versions),
        Route("/api/studies/{study}/diagnosis", diagnosis),
        Route("/api/studies/{study}/status", set_status, methods=["PUT"]),
        Route("/api/studies/{study}/notes", notes_create, methods=["POST"]),
        Route("/api/studies/{study}/notes/{item}", notes_change, methods=["PUT", "DELETE"]),
        Route("/api/studies/{study}/annotations", ann_create, methods=["POST"]),
        Route("/api/studies/{study}/annotations/{item}", ann_change, methods=["PUT", "DELETE"]),
        Route("/api/studies/{study}/report", report, methods=["PUT"]),
        Route("/api/studies/{study}/items/{item}/history", history),
    ]
