"""The slide routes (issue 6; SPEC H3, W6, W7): one method of :class:`SlideRoutes` per
handler, each behind the app's ``guarded`` decorator (the one authorisation point and
the audit log) with the slide's scopes; the slide store, its rights and its packet
planning are :mod:`server.slides`.

``GET  /api/slides``                        the catalogue (``patient_id``, ``accession``,
                                            ``tier``, ``flagged=1|0`` filter it)
``GET  /api/slides/{slide}``                one slide: catalogue facts, QC, pyramid
                                            geometry (levels, tile grid, bytes per level),
                                            associated image names, versions, the user's
                                            ``rights`` on it
``GET  /api/slides/{slide}/associated/{name}``  label / macro / thumbnail as PNG
``GET|POST /jpip/slides/{slide}``           packets: ``level`` (the pyramid level, default
                                            0) plus the fields of ``/jpip`` (``target`` may
                                            be left out; ``comps`` names tiles of the
                                            level; ``reduce`` is per tile, clamped to small
                                            edge tiles; ``version``/``quality``/
                                            ``purpose``/``auto``); POST ``{"model": ...}``
                                            declares the cache.
``GET  /api/stations/{station}/worklist``   the exams assigned to a reading station
                                            (``station`` / ``assignment`` tables), each
                                            with the slides the user may browse, their
                                            manifest SHA-256 and ``unlimited``; the
                                            station's cache folder (W7)

``{slide}`` is the slide UID or its catalogue number. Every slide request counts as
activity for the idle-time tier scheduler.
"""
from __future__ import annotations

import functools
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from imaging.pyramid import PyramidError
from server.slide_catalogue import CatalogueError
from server.slide_store import slide_summary

from . import policy_routes
from .inputs import Param
from .packet_routes import audited_stream, stream_headers
from .packets import KNOWN_FIELDS, CacheModel, RequestError, parse_request, stream
from .peers import peer_of
from .slides import SlideService, slide_limits, slide_plan, slide_scopes

log = logging.getLogger("medview.slides")

__all__ = ["SlideRoutes", "register_routes", "declare_tiles"]

TILE_DECLARATION = '{"model": {"<key>": {"h": 0|1, "b": {...}}}}'


def register_routes(routes: list, srv, guarded=None, *, jobs=None) -> SlideService:
    """Add the slide routes to a Starlette route list.

    ``create_app`` calls ``register_routes(routes, srv, guarded)`` with its
    authorise-and-run decorator, so every slide request passes the one authorisation
    point (and the audit log); on a built app, ``register_routes(app.router.routes,
    app.state.server)`` returns the routes' service. ``jobs`` (the server's
    :class:`~server.jobs.JobScheduler`) gets the idle-time slide tier job."""
    existing = getattr(srv, "slides", None)
    if isinstance(existing, SlideService):
        return existing            # create_app registered them already
    if guarded is None:
        raise TypeError("the slide routes need the app's authorisation decorator "
                        "(server.app.create_app registers them)")
    policy = getattr(srv, "policy", None)
    svc = SlideService(srv.store.root, jobs=jobs,
                       policy=policy.get if policy is not None else None)
    srv.slides = svc
    routes.extend(SlideRoutes(srv, svc, guarded).routes())
    return svc


def slide_errors(fn):
    """A handler with slide-store failures mapped to JSON errors: an unknown slide 404,
    damaged or missing stored data 500 (logged)."""
    @functools.wraps(fn)
    def mapped(request):
        try:
            return fn(request)
        except CatalogueError as e:
            raise RequestError(str(e), status=404) from None
        except (PyramidError, OSError) as e:
            log.error("slide store problem: %s", e)
            raise RequestError(f"stored slide data is damaged or missing: {e}",
                               status=500) from None
    mapped.__doc__ = fn.__doc__
    return mapped


def declare_tiles(model: CacheModel, body) -> None:
    """Apply a POSTed cache declaration tile by tile. A level has thousands of tiles and a
    client declares only the tiles of its request, so the declaration is merged per tile
    key; :meth:`CacheModel.declare` (what series use) would forget every other tile of
    the slide."""
    try:
        declared = body.get("model") if isinstance(body, dict) else None
        if declared is None:
            return
        if not isinstance(declared, dict):
            raise ValueError
        for key, held in declared.items():      # per tile, not the whole target
            if held.get("h"):
                model.add_headers(key)
            model.add_layers(key, {int(b): int(n) for b, n in (held.get("b") or {}).items()})
    except (ValueError, TypeError, AttributeError):
        raise RequestError(f"POST body must be JSON: {TILE_DECLARATION}") from None


class SlideRoutes:
    """The slide routes, one method per handler, each wrapped (slide-store failures
    mapped by :func:`slide_errors`, then ``guarded``) in :meth:`routes`."""

    PACKET_QUERY = ((Param("level", "int", "pyramid level", lo=None),)
                    + tuple(Param(k) for k in sorted(KNOWN_FIELDS)))

    def __init__(self, srv, svc: SlideService, guarded) -> None:
        self.srv = srv
        self.svc = svc
        self.guarded = guarded

    def guard(self, action: str, **kw):
        """The server's guard (the slide of the path is resolved, and its scopes decided
        on, by the guard itself: :func:`server.targets.resolve`) around a handler whose
        slide-store failures become JSON errors."""
        return lambda fn: self.guarded(action, **kw)(slide_errors(fn))

    def routes(self) -> list[Route]:
        """The route table, each handler wrapped by :meth:`guard`."""
        g = self.guard
        listing_query = (Param("patient_id"), Param("accession"), Param("tier"),
                         Param("flagged", "bool"))
        return [
            Route("/api/slides", g("browse", query=listing_query)(self.listing)),
            Route("/api/stations/{station}/worklist", g("browse")(self.station_worklist)),
            Route("/api/slides/{slide}", g("metadata")(self.describe)),
            Route("/api/slides/{slide}/associated/{name}", g("retrieve")(self.associated)),
            Route("/jpip/slides/{slide}", g("fetch", query=self.PACKET_QUERY,
                                            body={"type": "object"})(self.packets),
                  methods=["GET", "POST"]),
        ]

    # ----------------------------------------------------------------- rights on rows
    def browsable(self, request: Request, rows: list[dict]) -> list[tuple[dict, object]]:
        """The catalogue rows the session user may ``browse``, with the user's grant on
        each."""
        grants = self.srv.auth.grants_for(request.state.session.user,
                                          [slide_scopes(r) for r in rows])
        return [(r, g) for r, g in zip(rows, grants) if g.actions is None or "browse" in g.actions]

    # ----------------------------------------------------------------- handlers
    def listing(self, request: Request):
        q = request.query_params
        flagged = q.get("flagged")
        rows = self.svc.store.catalogue.slides(
            patient_id=q.get("patient_id"), accession=q.get("accession"), tier=q.get("tier"),
            flagged=None if flagged is None else flagged in ("1", "true", "yes"))
        shown = [r for r, _g in self.browsable(request, rows)]
        request.state.audit["slides"] = len(shown)
        return JSONResponse([slide_summary(r) for r in shown])

    def describe(self, request: Request):
        self.svc.touch()
        return JSONResponse(self.svc.describe(request.path_params["slide"], request.state.grant))

    def associated(self, request: Request):
        row, st = self.svc._open(request.path_params["slide"])
        name = request.path_params["name"]
        a = st.manifest.get("associated", {}).get(name)
        if a is None:
            raise RequestError(f"slide {row['slide_uid']} has no {name} image "
                               f"(it has: {', '.join(st.manifest.get('associated', {})) or 'none'})",
                               status=404)
        grant = request.state.grant
        versions = self.svc.versions(st)
        if not grant.allows_whole(None, versions):
            # label and macro carry the patient's identity, macro and thumbnail the whole
            # slide: whole files, as the original DICOM of a series
            raise RequestError("beyond your rights: label, macro and thumbnail images are "
                               "whole images of the slide (the label carries the patient's "
                               "identity) and need unlimited access to it; ask for packets "
                               "within your rights at /jpip/slides", status=403,
                               **slide_limits(grant, st, versions, ["whole-file"]))
        try:
            data = st.file_bytes(a["file"])
        except PyramidError as e:
            raise RequestError(f"slide data unavailable: {e}", status=500) from None
        return Response(data, media_type="image/png")

    def packets(self, request: Request):
        self.svc.touch()
        level, row, st, req = self.packet_request(request)
        session, grant = request.state.session, request.state.grant
        session.claim_model()      # serve --workers N: forget a model another made stale
        model = session.model_for(f"slide:{row['slide_uid']}")
        if request.method == "POST":
            declare_tiles(model, getattr(request.state, "json", None) or {})  # parsed by the guard
        versions = self.svc.versions(st) if (req.version or req.quality is not None or req.purpose
                                             or grant.versions is not None
                                             or grant.status_versions is not None) else None
        auto = self.auto_version(request, req, versions)
        p = slide_plan(req, st, level, model, grant, versions)
        if auto is not None and p.version is not None:
            p.version["auto"] = auto.reasons
        media, headers = stream_headers(p, session)
        headers["X-Slide-Tiles"] = str(len(p.images))
        # audited when the stream ends, with what actually left (as series packets)
        request.state.audit_deferred = True
        detail = {"query": {k: v for k, v in request.query_params.items() if k != "cid"},
                  "served": request.state.target.served(), "level": level,
                  "version": p.version["name"] if p.version else None,
                  "images": len(p.images), "bytes_announced": p.request_bytes}
        who = dict(user=session.user, session=session.serial, peer=peer_of(request))
        body = audited_stream(self.srv, stream(p, model, stats=detail), detail, who,
                              row["slide_uid"])
        return StreamingResponse(body, media_type=media, headers=headers)

    def station_worklist(self, request: Request):
        """The exams assigned to a reading station (W7), with the slides of each that the
        user may browse (an exam with none is left out), their manifest checksum (to
        check a pre-distributed copy) and whether the user's rights on them are
        unlimited (a limited slide is read through the server, within them)."""
        name = request.path_params["station"]
        cat = self.svc.store.catalogue
        station = cat.station(name)
        if station is None:
            raise RequestError(f"unknown reading station {name!r}", status=404)
        exams = [e for a in cat.assignments(name) if (e := self.station_exam(request, a))]
        request.state.audit["exams"] = len(exams)
        return JSONResponse({"station": station["name"], "cache_dir": station["cache_dir"],
                             "exams": exams})

    # ----------------------------------------------------------------- pieces
    def packet_request(self, request: Request):
        """(pyramid level, catalogue row, stored slide, packet request) of a slide packet
        request; ``target`` may be left out or name the slide of the path."""
        ref = request.path_params["slide"]
        q = dict(request.query_params)
        try:
            level = int(q.pop("level", "0"))
        except ValueError:
            raise RequestError("level must be an integer") from None
        row, st = self.svc._open(ref)
        if q.setdefault("target", row["slide_uid"]) not in (row["slide_uid"], ref):
            raise RequestError("target must be the slide of the path (or left out)")
        q["target"] = row["slide_uid"]
        return level, row, st, parse_request(q)

    def auto_version(self, request: Request, req, versions):
        """``version=auto`` (:func:`server.policy_routes.auto_version`); a slide without
        versions (no site policy) has no automatic choice (404)."""
        if req.version == "auto" and versions is None:
            raise RequestError("this slide has no versions (no site policy)", status=404)
        return policy_routes.auto_version(self.srv, request, req, versions)

    def station_exam(self, request: Request, a: dict) -> dict | None:
        """One assigned exam of a worklist with the slides the user may browse (None if
        none)."""
        rows = self.svc.store.catalogue.slides(accession=a["accession"])
        shown = [dict(slide_summary(r), manifest_sha256=r["manifest_sha256"],
                      unlimited=bool(g.unlimited)) for r, g in self.browsable(request, rows)]
        if not shown:
            return None
        first = shown[0]
        return {"accession": a["accession"], "assigned_at": a["assigned_at"],
                "distributed_at": a["distributed_at"],
                **{k: first.get(k) for k in ("patient_id", "patient_name", "patient_status",
                                             "exam_date", "exam_description")},
                "slides": shown}
