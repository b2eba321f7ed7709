"""Slides through the packet protocol (issue 6; SPEC H3, W6).

A pyramid level of a slide is a JPIP *target* whose components are its tiles: level
``L`` of slide ``S`` has ``cols × rows`` components, component ``row * cols + col`` being
the tile's codestream (:mod:`pathology.pyramid`). A region request (``roff``/``rsiz`` in
pixels *of that level*) is planned tile by tile: only the tiles the region touches are
sent, and of a tile the region only partly covers only the precincts that influence the
covered part (the same planner as series, :func:`server_stub.packets.plan`, per tile). The
per-tile plans are merged into one quality-progressive stream: every tile at layer 1
first (coarse), then layer 2 … Nothing is sent twice in a session.

Routes (see :func:`register_routes`):

``GET  /api/slides``                        the catalogue (``patient_id``, ``accession``,
                                            ``tier``, ``flagged=1|0`` filter it)
``GET  /api/slides/{slide}``                one slide: catalogue facts, QC, pyramid
                                            geometry (levels, tile grid, bytes per level),
                                            associated image names
``GET  /api/slides/{slide}/associated/{name}``  label / macro / thumbnail as PNG
``GET|POST /jpip/slides/{slide}``           packets: ``level`` (default 0) plus the fields
                                            of ``/jpip`` (``target`` may be left out;
                                            ``comps`` names tiles of the level; ``reduce``
                                            is per tile, clamped to small edge tiles);
                                            POST ``{"model": ...}`` declares the cache.

``{slide}`` is the slide UID or its catalogue number. Every slide request counts as
activity for the idle-time tier scheduler.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading

from pathology.catalogue import CatalogueError
from pathology.pyramid import PyramidError
from pathology.store import SlideStore, slide_summary

from .packets import Plan, RequestError, parse_request, plan, stream
from .packets import ImageSource as PacketSource

log = logging.getLogger("medview.slides")

__all__ = ["SlideService", "register_routes", "slide_plan"]


class SlideService:
    """The slide store of a server (opened on first use: a radiology-only store gets no
    ``slides/`` folder), and the packet sources of its levels."""

    def __init__(self, store_root, *, schedule: bool = False) -> None:
        self.root = store_root
        self._store: SlideStore | None = None
        self._lock = threading.Lock()
        self._schedule = schedule
        self.scheduler = None
        if schedule:
            _ = self.store

    @property
    def store(self) -> SlideStore:
        with self._lock:
            if self._store is None:
                self._store = SlideStore.for_image_store(self.root)
                if self._schedule:
                    from pathology.tiers import IdleScheduler, SlideTiers

                    self.scheduler = IdleScheduler(SlideTiers(self._store)).start()
            return self._store

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self._store is not None:
            self._store.close()

    def touch(self) -> None:
        if self._store is not None:
            self._store.activity()

    def describe(self, ref: str) -> dict:
        row, st = self._open(ref)
        levels = []
        for g, lv in zip(st.levels, st.manifest["levels"]):
            levels.append({"level": g.level, "width": g.width, "height": g.height,
                           "downsample": g.downsample, "cols": g.cols, "rows": g.rows,
                           "tile": g.tile, "bytes": lv["size"]})
        return {**slide_summary(row), "tile_size": st.tile_size, "levels": levels,
                "layers": st.manifest["codestream"]["layers"],
                "associated": {k: {"width": v["width"], "height": v["height"]}
                               for k, v in st.manifest.get("associated", {}).items()},
                "objective_power": st.manifest.get("objective_power")}

    def _open(self, ref: str):
        try:
            return self.store.open(ref)
        except CatalogueError as e:
            raise RequestError(str(e), status=404) from None
        except PyramidError as e:
            raise RequestError(f"slide data unavailable: {e}", status=500) from None

    def sources(self, ref: str, level: int, tiles: list[int]) -> tuple[dict, list[PacketSource]]:
        row, st = self._open(ref)
        out = []
        for t in tiles:
            out.append(PacketSource(t, f"{st.uid}/{level}/{t}", st.tile_index(level, t),
                                    lambda lv=level, i=t: st.tile_bytes(lv, i)))
        return row, out


def slide_plan(req, st, level: int, model, grant=None) -> Plan:
    """Plan a request on level ``level`` of the stored slide ``st``: the tiles of the
    region (and of ``req.comps`` if given), each with its own local region."""
    if not 0 <= level < len(st.levels):
        raise RequestError(f"level {level} out of range: the slide has levels 0-{len(st.levels) - 1}",
                           status=416, max_level=len(st.levels) - 1)
    g = st.levels[level]
    if req.region is not None:
        x, y, w, h = req.region
        if x >= g.width or y >= g.height:
            raise RequestError(f"region offset {x},{y} is outside level {level} "
                               f"({g.width}x{g.height})", status=416, width=g.width,
                               height=g.height)
        tiles = g.tiles_in(x, y, w, h)
    else:
        tiles = list(range(g.count))
    if req.comps is not None:
        bad = [c for c in req.comps if c >= g.count]
        if bad:
            raise RequestError(f"comps out of range: level {level} has {g.count} tiles "
                               f"(0-{g.count - 1})", status=416, max_comp=g.count - 1)
        wanted = set(req.comps)
        tiles = [t for t in tiles if t in wanted]
    if grant is not None and grant.max_layers is not None and (req.layers or 99) > grant.max_layers:
        raise RequestError(f"beyond your rights: at most {grant.max_layers} quality layers",
                           status=403, max_layers=grant.max_layers)
    images, res, layers, incs = [], {}, {}, []
    total = sent = 0
    for t in tiles:
        ix = st.tile_index(level, t)
        src = PacketSource(t, f"{st.uid}/{level}/{t}", ix, lambda lv=level, i=t: st.tile_bytes(lv, i))
        sub = dataclasses.replace(req, comps=None, fsiz=None)
        if req.reduce is not None:
            sub.reduce = min(req.reduce, ix.numres - 1)
        if req.layers is not None:
            sub.layers = min(req.layers, ix.nlayers)
        if req.region is not None:
            tx, ty, tw, th = g.tile_rect(t)
            x, y, w, h = req.region
            x0, y0 = max(x, tx), max(y, ty)
            x1, y1 = min(x + w, tx + tw), min(y + h, ty + th)
            sub.region = None if (x0, y0, x1, y1) == (tx, ty, tx + tw, ty + th) else (
                x0 - tx, y0 - ty, x1 - x0, y1 - y0)
        p = plan(sub, [src], model)
        images.append(src)
        res.update(p.res)
        layers.update(p.layers)
        incs.extend(p.increments)
        total += p.total_bytes
        sent += p.request_bytes
    if req.order == "image":
        incs.sort(key=lambda i: (i.csn, i.layer, i.res))
    elif req.order == "resolution":
        incs.sort(key=lambda i: (i.res, i.layer, i.csn))
    else:
        incs.sort(key=lambda i: (i.layer, i.res, i.csn))
    recs = {}
    maxres = max(res.values(), default=0)
    for n, inc in enumerate(incs):
        nxt = incs[n + 1] if n + 1 < len(incs) else None
        if req.order == "quality" and (nxt is None or nxt.layer != inc.layer):
            recs[n] = {"type": "recommend", "images": "all", "layers": inc.layer + 1,
                       "res": maxres, "action": "render"}
        elif req.order != "quality" and nxt is None:
            recs[n] = {"type": "recommend", "images": "all", "layers": max(layers.values()),
                       "res": maxres, "action": "render"}
    return Plan(request=req, images=images, res=res, layers=layers, increments=incs,
                total_bytes=total, request_bytes=sent, recommendations=recs)


def _default_guard(srv):
    """Authorise (no per-series resource: slides are not series), run the blocking
    handler on the thread pool, map known failures to JSON errors."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    from codestream.index import CodestreamError

    from .auth import AuthError
    from .store import StoreError

    def err(status: int, message: str, **extra):
        return JSONResponse({"error": message, "status": status, **extra}, status_code=status)

    def sid(request):
        h = request.headers.get("authorization", "")
        if h.lower().startswith("bearer "):
            return h[7:].strip()
        return request.query_params.get("cid")

    def guarded(action: str):
        def deco(fn):
            async def endpoint(request):
                try:
                    request.state.body = await request.body() if request.method == "POST" else b""
                    session, grant = await run_in_threadpool(srv.auth.authorize, sid(request),
                                                             action, None)
                    request.state.session, request.state.grant = session, grant
                    return await run_in_threadpool(fn, request)
                except (AuthError, RequestError) as e:
                    return err(e.status, str(e), **e.extra)
                except (StoreError, CodestreamError, PyramidError) as e:
                    log.error("slide store problem: %s", e)
                    return err(500, f"stored slide data is damaged or missing: {e}")
            return endpoint
        return deco
    return guarded


def register_routes(routes: list, srv, guarded=None, *, schedule: bool = False) -> SlideService:
    """Add the slide routes to a Starlette route list.

    In ``create_app``: ``register_routes(routes, srv, guarded)`` before the app is made;
    on a built app: ``register_routes(app.router.routes, app.state.server)``.
    ``schedule`` starts the idle-time tier scheduler (a daemon thread)."""
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    existing = getattr(srv, "slides", None)
    if isinstance(existing, SlideService):
        return existing            # create_app registered them already
    svc = SlideService(srv.store.root, schedule=schedule)
    srv.slides = svc
    outer = guarded or _default_guard(srv)

    def guard(action: str):
        """The server's guard, with slide-store failures mapped to JSON errors."""
        def deco(fn):
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
            return outer(action)(mapped)
        return deco

    @guard("browse")
    def listing(request):
        q = request.query_params
        flagged = q.get("flagged")
        rows = svc.store.catalogue.slides(
            patient_id=q.get("patient_id"), accession=q.get("accession"), tier=q.get("tier"),
            flagged=None if flagged is None else flagged in ("1", "true", "yes"))
        return JSONResponse([slide_summary(r) for r in rows])

    @guard("metadata")
    def describe(request):
        svc.touch()
        return JSONResponse(svc.describe(request.path_params["slide"]))

    @guard("retrieve")
    def associated(request):
        row, st = svc._open(request.path_params["slide"])
        name = request.path_params["name"]
        a = st.manifest.get("associated", {}).get(name)
        if a is None:
            raise RequestError(f"slide {row['slide_uid']} has no {name} image "
                               f"(it has: {', '.join(st.manifest.get('associated', {})) or 'none'})",
                               status=404)
        data = (st.path / a["file"]).read_bytes()
        return Response(data, media_type="image/png")

    @guard("fetch")
    def packets(request):
        svc.touch()
        ref = request.path_params["slide"]
        q = dict(request.query_params)
        try:
            level = int(q.pop("level", "0"))
        except ValueError:
            raise RequestError("level must be an integer") from None
        row, st = svc._open(ref)
        if q.setdefault("target", row["slide_uid"]) not in (row["slide_uid"], ref):
            raise RequestError("target must be the slide of the path (or left out)")
        q["target"] = row["slide_uid"]
        req = parse_request(q)
        session = request.state.session
        model = session.model_for(f"slide:{row['slide_uid']}")
        if request.method == "POST":
            # A level has thousands of tiles and a client declares only the tiles of its
            # request, so the declaration is merged per tile key; CacheModel.declare (used
            # by declare_from_body for series) would forget every other tile of the slide.
            try:
                body = json.loads(request.state.body or b"{}")
                declared = body.get("model") if isinstance(body, dict) else None
                if declared is not None:
                    if not isinstance(declared, dict):
                        raise ValueError
                    for key, held in declared.items():      # per tile, not the whole target
                        if held.get("h"):
                            model.add_headers(key)
                        model.add_layers(key, {int(b): int(n)
                                               for b, n in (held.get("b") or {}).items()})
            except (ValueError, TypeError, AttributeError):
                raise RequestError('POST body must be JSON: '
                                   '{"model": {"<key>": {"h": 0|1, "b": {...}}}}') from None
        p = slide_plan(req, st, level, model, request.state.grant)
        media = "application/x-medview-jpp" if req.framing == "mv" else "image/jpp-stream"
        headers = {"JPIP-cnew": f"cid={session.id}", "X-Bytes-Announced": str(p.request_bytes),
                   "X-Bytes-Total": str(p.total_bytes), "X-Slide-Tiles": str(len(p.images))}
        return StreamingResponse(stream(p, model), media_type=media, headers=headers)

    routes.append(Route("/api/slides", listing))
    routes.append(Route("/api/slides/{slide}", describe))
    routes.append(Route("/api/slides/{slide}/associated/{name}", associated))
    routes.append(Route("/jpip/slides/{slide}", packets, methods=["GET", "POST"]))
    return svc
