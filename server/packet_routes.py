"""The packet routes of a series: its image list (``/api/series/{series}/images``, what a
viewer needs to lay the series out) and ``/jpip`` (packet streams, see
:mod:`server.packets`), whose audit row is written when the stream ends."""
from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from . import peers, policy_routes
from .responses import json_response
from .inputs import Param
from .packets import (ORDERED_WAIT_S, ImageSource, Plan, RequestError, declare_from_body,
                      ordered, parse_request, plan, resolve_model, stream)

log = logging.getLogger("medview.server")


_PRIVATE_KEYS = {"codestream_relpath", "codestream_sha256", "index_relpath", "index_sha256",
                 "original_relpath", "original_sha256"}


def stream_headers(p: Plan, session) -> tuple[str, dict[str, str]]:
    """The media type and headers of a packet stream (series, slabs and slides alike):
    the framed protocol or a bare JPP-stream, the session's channel, the bytes announced
    and the target's total."""
    media = "application/x-medview-jpp" if p.request.framing == "mv" else "image/jpp-stream"
    return media, {"JPIP-cnew": f"cid={session.id}", "X-Bytes-Announced": str(p.request_bytes),
                   "X-Bytes-Total": str(p.total_bytes)}


def routes(srv, guarded) -> list[Route]:
    """The packet routes of a series, each wrapped by ``guarded`` (see :mod:`server.app`)."""
    return PacketRoutes(srv, guarded).routes()


def image_entry(r: dict, src: ImageSource) -> dict:
    """The facts of one image of the list (private store paths and checksums left out)
    with its codestream's shape, bytes per layer and hot layers."""
    ix = src.index
    d = {k: v for k, v in r.items() if k not in _PRIVATE_KEYS}
    d.update(numres=ix.numres, nlayers=ix.nlayers, ncomp=ix.ncomp,
             total_bytes=ix.total_bytes, key=src.key,
             layer_bytes=[ix.bytes_at(q + 1, ix.numres - 1) for q in range(ix.nlayers)],
             hot_layers=src.hot_layers,
             # the lossless layer only once verified (server.verify)
             served_layers=ix.nlayers if src.served_layers is None else src.served_layers)
    return d


def hidden_entry(uid: str, r: dict, src: ImageSource) -> dict:
    """An image beyond the grant: its place and the shape a viewer lays out (size,
    resolutions, layers), nothing of the image: no UID (its own key names its SOP
    Instance UID), no geometry, no values; 0 bytes, as nothing of it will be sent."""
    ix = src.index
    return {"index": r["index"], "key": f"{uid}#beyond-rights/{r['index']}",
            "allowed": False, "Rows": r["Rows"], "Columns": r["Columns"],
            "numres": ix.numres, "nlayers": ix.nlayers, "ncomp": ix.ncomp,
            "total_bytes": 0, "layer_bytes": [0] * ix.nlayers, "hot_layers": None}


def audited_stream(srv, body, detail: dict, who: dict, target: str):
    """The packet stream, then its audit row: who fetched what of which target (series
    or slide), and how many bytes actually left (also when the client went away)."""
    outcome = "incomplete"          # the client went away, or the server stopped
    try:
        yield from body
        outcome = "ok" if detail.get("reason") == "complete" else detail.get("reason")
    finally:
        try:
            srv.auth.audit(action="fetch", resource=target, outcome=outcome, status=200,
                           detail=detail, **who)
        except Exception:  # noqa: BLE001 - never turn a finished stream into an error
            log.exception("audit of a packet stream failed")


class OrderedStreamingResponse(StreamingResponse):
    """The stream of a ``wait=yes`` request: its model's later requests are released
    when the response is done, also when the client went away mid-stream (Starlette
    then abandons the body iterator, which would only be closed by the garbage
    collector)."""

    def __init__(self, content, release, **kw) -> None:
        super().__init__(content, **kw)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class PacketRoutes:
    """The packet routes of a series, one method per handler, each wrapped by
    ``guarded`` in :meth:`routes`."""

    JPIP_QUERY = (
        Param("target", "str", "Series Instance UID", required=True),
        Param("comps", "str", "image ranges, e.g. 0-9,12"),
        Param("layers", "int", "quality layers", lo=1),
        Param("reduce", "int", "resolution reduction", hi=64),
        Param("fsiz", "str", "display size w,h"), Param("roff", "str", "region offset x,y"),
        Param("rsiz", "str", "region size w,h"),
        Param("order", "str", enum=("quality", "resolution", "image")),
        Param("framing", "str", enum=("mv", "jpp")), Param("len", "int", "byte budget"),
        Param("cid", "str", "session id (instead of the Authorization header)"),
        Param("type", "str"), Param("version", "str", "version name or auto"),
        Param("quality", "int", "0-100", hi=100), Param("purpose", "str"),
        Param("wait", "str", "yes: later requests of the model wait for this one",
              enum=("yes", "no")))

    def __init__(self, srv, guarded) -> None:
        self.srv = srv
        self.guarded = guarded

    def routes(self) -> list[Route]:
        """The route table, each handler wrapped by ``guarded``."""
        g = self.guarded
        return [
            Route("/api/series/{series}/images", g("metadata")(self.series_images)),
            Route("/jpip", g("fetch", query=self.JPIP_QUERY, body={"type": "object"})(self.jpip),
                  methods=["GET", "POST"]),
        ]

    def series_images(self, request: Request):
        """Per-image facts of a series: only of the images the user's grant allows; an
        image beyond the grant keeps its place in the list (its index is its packet
        component number) with ``"allowed": false`` and only the shape a viewer lays out
        (Rows, Columns, numres, nlayers, ncomp; 0 bytes), under a key that is not the
        image's own (which names its SOP Instance UID)."""
        srv = self.srv
        uid = request.state.target.series
        info = request.state.target.series_row
        allowed = request.state.grant.images
        rows = srv.facts.images(uid)
        srcs = {s.csn: s for s in srv.sources(uid)}
        images = []
        for r in rows:
            hidden = allowed is not None and r["index"] not in allowed
            src = srcs[r["index"]]
            images.append(hidden_entry(uid, r, src) if hidden else image_entry(r, src))
        extra = policy_routes.series_policy(srv, uid, request.state.session,
                                            request.state.grant, policy_routes.peer_of(request))
        return json_response(request, {"series": info, "images": images, **extra})

    def jpip(self, request: Request):
        srv = self.srv
        q = dict(request.query_params)
        req = parse_request(q)
        session = request.state.session
        sources = srv.sources(req.target)
        if not sources:
            raise RequestError(f"unknown target {req.target!r}: no such series", status=404)
        model, jpip_headers, in_channel = resolve_model(req, session, sources)
        # an earlier wait=yes stream on this model (a pipelining client) ends first, so
        # this plan sees everything it sent
        if not model.wait_ordered(ORDERED_WAIT_S):
            log.warning("jpip: earlier wait=yes stream still running after %.0f s; "
                        "planning anyway", ORDERED_WAIT_S)
        if request.method == "POST":
            declare_from_body(request.state.body, model)
        versions = srv.versions.get(req.target)
        auto = policy_routes.auto_version(srv, request, req, versions)
        p = plan(req, sources, model, request.state.grant, versions)
        if auto is not None and p.version is not None:
            p.version["auto"] = auto.reasons
            p.version["why"], p.version["facts"] = auto.why, auto.facts
        media, headers = stream_headers(p, session)
        if req.framing == "jpp":        # JPIP: a channel only when one was asked for
            headers.pop("JPIP-cnew")
        headers.update(jpip_headers)
        request.state.audit_deferred = True
        detail = {"query": {k: v for k, v in q.items() if k not in ("cid", "cclose")},
                  "version": p.version["name"] if p.version else None,
                  "images": len(p.images), "bytes_announced": p.request_bytes,
                  "recall": p.recall}
        who = dict(user=session.user, session=session.serial,
                   peer=peers.peer_of(request))
        body = audited_stream(srv, stream(p, model, stats=detail), detail, who, req.target)
        if req.wait:
            release = model.begin_ordered()
            return OrderedStreamingResponse(ordered(body, release), release,
                                            media_type=media, headers=headers)
        return StreamingResponse(body, media_type=media, headers=headers)
