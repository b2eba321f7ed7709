"""HTTP routes of the server policy (issue 5): versions, diagnosis status and records,
the client's context for the automatic version choice, who am I.

One method of :class:`PolicyRoutes` per handler; :mod:`server.app` adds them with
:func:`routes`. Every route goes through the same ``guarded`` decorator, hence
:meth:`Authority.authorize` and the audit log.

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


def auto_version(srv, request: Request, req, versions):
    """``version=auto`` in a packet request: the server's choice for this session (V8),
    written into ``req`` (a :class:`~server.packets.PacketRequest`) and returned; None
    when another version (or none) was asked for."""
    if req.version != "auto":
        return None
    auto = auto_choice(srv, request.state.session, request.state.grant, versions,
                       peer_of(request))
    req.version = auto.version
    return auto


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


class PolicyRoutes:
    """The policy routes, one method per handler, each wrapped by ``guarded`` in
    :meth:`routes` (built by :func:`routes`): who am I and the client's context (the
    session), the versions of a series, and a study's diagnosis record (status, notes,
    annotations, report, item history)."""

    OBJECT = {"type": "object"}            # a JSON object body (OpenAPI)
    CONTEXT_BODY = {"type": "object", "properties": {
        "link_bps": {"type": "number"}, "memory_mb": {"type": "number"},
        "cpus": {"type": "integer"}, "place": {"type": "string"},
        "latency_ms": {"type": "number"}}}
    BASE_REV = (Param("base_rev", "int", "revision the change is based on (DELETE)"),)

    def __init__(self, srv, guarded) -> None:
        self.srv = srv
        self.guarded = guarded

    def routes(self) -> list[Route]:
        """The route table, each handler wrapped by ``guarded``."""
        g, obj = self.guarded, self.OBJECT
        S = "/api/studies/{study}"
        return [
            Route("/api/me", g("session")(self.me)),
            Route("/api/session/context", g("session", body=self.CONTEXT_BODY)(self.context),
                  methods=["POST"]),
            Route("/api/series/{series}/versions", g("metadata")(self.versions)),
            Route(S + "/diagnosis", g("metadata")(self.diagnosis)),
            Route(S + "/status", g("diagnose", body=obj)(self.set_status), methods=["PUT"]),
            Route(S + "/notes", g("diagnose", body=obj)(self.create_note), methods=["POST"]),
            Route(S + "/notes/{item}", g("diagnose", body=obj, query=self.BASE_REV)(
                self.change_note), methods=["PUT", "DELETE"]),
            Route(S + "/annotations", g("diagnose", body=obj)(self.create_annotation),
                  methods=["POST"]),
            Route(S + "/annotations/{item}", g("diagnose", body=obj, query=self.BASE_REV)(
                self.change_annotation), methods=["PUT", "DELETE"]),
            Route(S + "/report", g("diagnose", body=obj)(self.report), methods=["PUT"]),
            Route(S + "/items/{item}/history", g("metadata")(self.history)),
        ]

    def policy(self):
        return self.srv.policy.get()

    # ----------------------------------------------------------------- the session
    def me(self, request: Request):
        s = request.state.session
        g = self.srv.auth.grant_for(s.user)
        return JSONResponse({"user": s.user, "groups": self.srv.auth.groups_of(s.user),
                             "rights": g.limits(), "unlimited": g.unlimited,
                             "actions": sorted(g.actions) if g.actions is not None else None,
                             "context": s.context})

    def context(self, request: Request):
        ctx = parse_context(_json(request))
        request.state.session.context.update(ctx)
        self.srv.auth.save_context(request.state.session)      # for every replica
        request.state.audit["context"] = ctx
        return JSONResponse({"context": request.state.session.context})

    # ----------------------------------------------------------------- a series
    def versions(self, request: Request):
        uid = request.path_params["series"]
        if self.srv.catalogue.get_series(uid) is None:
            return JSONResponse({"error": f"unknown series {uid}", "status": 404}, 404)
        return JSONResponse({"series": uid, **series_policy(
            self.srv, uid, request.state.session, request.state.grant, peer_of(request))})

    # ----------------------------------------------------------------- a study's record
    @staticmethod
    def study(request: Request) -> str:
        """The study of the path, as the guard resolved it (404 there if unknown)."""
        return request.state.target.study

    def diagnosis(self, request: Request):
        study = self.study(request)
        pol = self.policy()
        rec = self.srv.diagnosis.record(study)
        rec["status_name"] = pol.status_name(rec["status"])
        rec["status_names"] = {str(k): v for k, v in sorted(pol.status_names.items())}
        rec["status_history"] = self.srv.diagnosis.status_history(study)
        rec["allowed_versions"] = pol.allowed_versions(rec["status"])
        return JSONResponse(rec)

    def set_status(self, request: Request):
        study = self.study(request)
        body = _json(request)
        comment = body.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise InputError("comment must be text", "body.comment")
        prev, new = self.srv.diagnosis.set_status(study, body.get("status"),
                                                  request.state.session.user, body.get("comment"))
        request.state.audit["status"] = [prev, new]
        pol = self.policy()
        return JSONResponse({"study": study, "status": new, "previous": prev,
                             "status_name": pol.status_name(new),
                             "allowed_versions": pol.allowed_versions(new)})

    def create_note(self, request: Request):
        return self.create_item(request, "note")

    def change_note(self, request: Request):
        return self.change_item(request, "note")

    def create_annotation(self, request: Request):
        return self.create_item(request, "annotation")

    def change_annotation(self, request: Request):
        return self.change_item(request, "annotation")

    def create_item(self, request: Request, kind: str):
        """A new note or annotation (201); may raise the study's status."""
        study = self.study(request)
        body = _json(request)
        if kind == "annotation":
            self.check_annotation(study, body)
        user = request.state.session.user
        item = self.srv.diagnosis.add(study, kind, body, user)
        request.state.audit["item"] = item["id"]
        self.advance(study, kind, user, request)
        return JSONResponse(item, status_code=201)

    def change_item(self, request: Request, kind: str):
        """Edit (PUT) or delete (DELETE) a note or annotation at its base revision."""
        study = self.study(request)
        item = self.item_of(kind, request)
        user = request.state.session.user
        request.state.audit["item"] = item["id"]
        if request.method == "DELETE":
            base = request.query_params.get("base_rev")
            out = self.srv.diagnosis.delete(item["id"], user, int(base) if base else None)
        else:
            body = _json(request)
            if kind == "annotation":
                self.check_annotation(study, body)
            out = self.srv.diagnosis.edit(item["id"], body, user, body.get("base_rev"))
        return JSONResponse(out)

    def report(self, request: Request):
        study = self.study(request)
        body = _json(request)
        user = request.state.session.user
        existing = self.srv.diagnosis.items(study, "report")
        if body.get("base_rev") is None and not existing:
            item = self.srv.diagnosis.add(study, "report", body, user)
            status = 201
        elif not existing:
            raise DiagnosisError("the study has no report yet: send it without base_rev", 409)
        elif body.get("base_rev") is None:
            raise DiagnosisError(f"the study has a report already (revision "
                                 f"{existing[0]['rev']}): edit it with base_rev", 409,
                                 rev=existing[0]["rev"], current=existing[0])
        else:
            item = self.srv.diagnosis.edit(existing[0]["id"], body, user, body.get("base_rev"))
            status = 200
        request.state.audit["item"] = item["id"]
        self.advance(study, "report", user, request)
        return JSONResponse(item, status_code=status)

    def history(self, request: Request):
        item = request.state.target.item_row       # an item of the path's study (the guard)
        return JSONResponse({"item": item, "revisions": self.srv.diagnosis.history(item["id"])})

    # ----------------------------------------------------------------- checks and effects
    def advance(self, study: str, kind: str, user: str, request: Request) -> None:
        """Writing a note, annotation or report raises the study's status (when the site
        policy says so)."""
        if self.policy().auto_advance:
            prev, new = self.srv.diagnosis.set_status(study, STATUS_FOR_KIND[kind], user,
                                                      f"{kind} written", only_raise=True)
            if new != prev:
                request.state.audit["status"] = [prev, new]

    def check_annotation(self, study: str, body: dict) -> None:
        """An annotation names a series of the study and an image of that series."""
        cat = self.srv.catalogue
        series = body.get("series")
        info = cat.get_series(series) if isinstance(series, str) else None
        if info is None or info.get("StudyInstanceUID") != study:
            raise DiagnosisError("the annotation's series is not a series of this study")
        keys = {f"{r['SOPInstanceUID']}/{r['frame']}" for r in cat.series_images(series)}
        if body.get("image") not in keys:
            raise DiagnosisError("the annotation's image is not an image of its series "
                                 "(image = '<SOP Instance UID>/<frame>')")

    @staticmethod
    def item_of(kind: str, request: Request) -> dict:
        item = request.state.target.item_row       # an item of this study (the guard)
        if item["kind"] != kind:
            raise DiagnosisError(f"no {kind} {request.path_params['item']} in this study", 404)
        return item


def parse_context(body: dict) -> dict:
    """The client's context fields (:data:`CONTEXT_KEYS`), typed; a null leaves a field
    as it was, an unknown field or a wrong type is refused."""
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
    return ctx


def routes(srv, guarded) -> list[Route]:
    """The policy routes, each wrapped by ``guarded`` (see :mod:`server.app`)."""
    return PolicyRoutes(srv, guarded).routes()
