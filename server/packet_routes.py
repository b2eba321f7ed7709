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
from .packets import (RequestError, declare_from_body, parse_request, plan,
                      resolve_model, stream)

log = logging.getLogger("medview.server")


_PRIVATE_KEYS = {"codestream_relpath", "codestream_sha256", "index_relpath", "index_sha256",
                 "original_relpath", "original_sha256"}


def routes(srv, guarded) -> list[Route]:
    @guarded("metadata")
    def series_images(request: Request):
        """Per-image facts of a series: only of the images the user's grant allows; an
        image beyond the grant keeps its place in the list (its index is its packet
        component number) with ``"allowed": false`` and only the shape a viewer lays out
        (Rows, Columns, numres, nlayers, ncomp; 0 bytes), under a key that is not the
        image's own (which names its SOP Instance UID)."""
        uid = request.state.target.series
        info = request.state.target.series_row
        allowed = request.state.grant.images
        rows = srv.facts.images(uid)
        srcs = {s.csn: s for s in srv.sources(uid)}
        images = []
        for r in rows:
            ix = srcs[r["index"]].index
            if allowed is not None and r["index"] not in allowed:
                # its place and the shape a viewer lays out (size, resolutions, layers),
                # nothing of the image: no UID (its own key names its SOP Instance UID),
                # no geometry, no values; 0 bytes, as nothing of it will be sent
                images.append({"index": r["index"], "key": f"{uid}#beyond-rights/{r['index']}",
                               "allowed": False, "Rows": r["Rows"], "Columns": r["Columns"],
                               "numres": ix.numres, "nlayers": ix.nlayers, "ncomp": ix.ncomp,
                               "total_bytes": 0, "layer_bytes": [0] * ix.nlayers,
                               "hot_layers": None})
                continue
            d = {k: v for k, v in r.items() if k not in _PRIVATE_KEYS}
            d.update(numres=ix.numres, nlayers=ix.nlayers, ncomp=ix.ncomp,
                     total_bytes=ix.total_bytes, key=srcs[r["index"]].key,
                     layer_bytes=[ix.bytes_at(q + 1, ix.numres - 1) for q in range(ix.nlayers)],
                     hot_layers=srcs[r["index"]].hot_layers,
                     # the lossless layer only once verified (server.verify)
                     served_layers=(ix.nlayers if srcs[r["index"]].served_layers is None
                                    else srcs[r["index"]].served_layers))
            images.append(d)
        extra = policy_routes.series_policy(srv, uid, request.state.session,
                                            request.state.grant, policy_routes.peer_of(request))
        return json_response(request, {"series": info, "images": images, **extra})

    jpip_params = (
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
        Param("quality", "int", "0-100", hi=100), Param("purpose", "str"))

    @guarded("fetch", query=jpip_params, body={"type": "object"})
    def jpip(request: Request):
        q = dict(request.query_params)
        req = parse_request(q)
        session = request.state.session
        sources = srv.sources(req.target)
        if not sources:
            raise RequestError(f"unknown target {req.target!r}: no such series", status=404)
        model, jpip_headers, in_channel = resolve_model(req, session, sources)
        if request.method == "POST":
            declare_from_body(request.state.body, model)
        versions = srv.versions.get(req.target)
        auto = None
        if req.version == "auto":
            auto = policy_routes.auto_choice(srv, session, request.state.grant, versions,
                                             policy_routes.peer_of(request))
            req.version = auto.version
        p = plan(req, sources, model, request.state.grant, versions)
        if auto is not None and p.version is not None:
            p.version["auto"] = auto.reasons
            p.version["why"], p.version["facts"] = auto.why, auto.facts
        media = "application/x-medview-jpp" if req.framing == "mv" else "image/jpp-stream"
        headers = {"JPIP-cnew": f"cid={session.id}", "X-Bytes-Announced": str(p.request_bytes),
                   "X-Bytes-Total": str(p.total_bytes)}
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
        return StreamingResponse(_audited(stream(p, model, stats=detail), detail, who,
                                          req.target), media_type=media, headers=headers)

    def _audited(body, detail: dict, who: dict, target: str):
        """The packet stream, then its audit row: who fetched what of which series, and
        how many bytes actually left (also when the client went away)."""
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

    srv.audited_stream = _audited          # the slide packet route audits the same way

    return [
        Route("/api/series/{series}/images", series_images),
        Route("/jpip", jpip, methods=["GET", "POST"]),
    ]
