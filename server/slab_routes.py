"""The slab routes (issue 4, P10: thick to thin): one method of :class:`SlabRoutes` per
handler, each behind the app's ``guarded`` decorator (the one authorisation point and
the audit log); building and caching the pyramids and translating a grant into slab
terms is :mod:`server.slabs`.

``GET  /api/series/{series}/slabs``   the pyramid: ``{"series", "images", "pyramid"}``;
                                       ``images`` are per-band image facts as
                                       ``/api/series/{series}/images`` gives them,
                                       ``pyramid`` the layout (slab levels, band of each
                                       component, thin-slice order, byte totals).
``GET|POST /jpip/slabs/{series}``     packet requests on the slab target, with the fields
                                       of ``/jpip`` (``target`` may be left out).
"""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .inputs import Param
from .packet_routes import stream_headers
from .packets import KNOWN_FIELDS, RequestError, declare_from_body, parse_request, plan, stream
from .slabs import SlabCatalogue, slab_grant, visible_layout

__all__ = ["SlabRoutes", "register_routes"]


def register_routes(routes: list, srv, guarded) -> SlabCatalogue:
    """Add the slab routes to a Starlette route list; ``create_app`` calls this with its
    authorise-and-run decorator ``guarded``, so every slab request passes the one
    authorisation point."""
    if isinstance(getattr(srv, "slabs", None), SlabCatalogue):
        return srv.slabs
    slabs = SlabCatalogue(srv)
    srv.slabs = slabs
    routes.extend(SlabRoutes(srv, slabs, guarded).routes())
    return slabs


class SlabRoutes:
    """The slab routes, one method per handler, each wrapped by ``guarded`` in
    :meth:`routes`."""

    PACKET_QUERY = tuple(Param(k) for k in sorted(KNOWN_FIELDS))

    def __init__(self, srv, slabs: SlabCatalogue, guarded) -> None:
        self.srv = srv
        self.slabs = slabs
        self.guarded = guarded

    def routes(self) -> list[Route]:
        """The route table, each handler wrapped by ``guarded``."""
        g = self.guarded
        return [
            Route("/api/series/{series}/slabs", g("metadata")(self.layout)),
            Route("/jpip/slabs/{series}", g("fetch", query=self.PACKET_QUERY,
                                            body={"type": "object"})(self.packets),
                  methods=["GET", "POST"]),
        ]

    def layout(self, request: Request):
        """The slab pyramid: only the band images the user's grant allows."""
        built = self.slabs.get(request.state.target.series)
        return JSONResponse(visible_layout(built.layout, request.state.grant.images))

    def packets(self, request: Request):
        uid = request.path_params["series"]
        q = dict(request.query_params)
        if q.setdefault("target", uid) != uid:
            raise RequestError("target must be the series of the path (or left out)")
        req = parse_request(q)
        built = self.slabs.get(uid)
        session = request.state.session
        session.claim_model()      # serve --workers N: forget a model another made stale
        model = session.model_for(f"{uid}#slabs")
        if request.method == "POST":
            declare_from_body(request.state.body, model)
        # image ranges in slab terms: only bands whose slab holds allowed images only
        grant = slab_grant(getattr(request.state, "grant", None), built.layout)
        p = plan(req, built.sources, model, grant, self.image_versions(uid))
        media, headers = stream_headers(p, session)
        return StreamingResponse(stream(p, model), media_type=media, headers=headers)

    def image_versions(self, uid: str):
        """The image versions (V1-V3) of the series, when the server has them."""
        table = getattr(self.srv, "versions", None)
        return table.get(uid) if table is not None and hasattr(table, "get") else None
