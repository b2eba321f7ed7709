"""Slides through the packet protocol (issue 6; SPEC H3, W6), within the user's rights.

A pyramid level of a slide is a JPIP *target* whose components are its tiles: level
``L`` of slide ``S`` has ``cols × rows`` components, component ``row * cols + col`` being
the tile's codestream (:mod:`imaging.pyramid`). A region request (``roff``/``rsiz`` in
pixels *of that level*) is planned tile by tile: only the tiles the region touches are
sent, and of a tile the region only partly covers only the precincts that influence the
covered part (the same planner as series, :func:`server.packets.plan`, per tile). The
per-tile plans are merged into one quality-progressive stream: every tile at layer 1
first (coarse), then layer 2 … Nothing is sent twice in a session.

Rights (SPEC P7, V6): every slide route goes through the app's authorisation decorator,
hence :meth:`server.auth.Authority.authorize`, with the slide's scopes — its UID,
``exam:<accession>``, ``patient:<Patient ID>`` — so rules on the slide, its exam, its
patient or ``*`` apply as they do to series (see :mod:`server.rights`). A packet
request is checked before anything is planned by the series' own
:func:`server.rights.check`, translated into slide terms (:func:`slide_problems`),
and refused as a whole with the series' 403 (:func:`server.packets.refuse`):

* ``max_layers`` and ``versions``: layers per tile (a slide's V1–V3 are computed as for a
  series, modality ``SM``, from the tiles of one level: :meth:`SlideService.versions`);
* ``max_reduce_min``: level ``L`` at reduction ``r`` is the slide reduced ``2**(L+r)``
  times; ``L + r`` must reach the right (the body names ``finest_level``); a tile too
  small to be reduced as far as asked counts at the reduction it can give;
* ``regions`` (full-resolution pixels): scaled to the level asked, outward (a level pixel
  is allowed when it covers an allowed full-resolution pixel); a request must name a
  region inside one of them;
* ``images``: a slide has no image numbers, so a grant that limits images allows no
  slide packets (as slabs; a rule on the slide, exam or patient can lift it);
* label / macro / thumbnail images are whole files (the label carries the patient's
  identity): ``retrieve`` and an unlimited grant, as the original DICOM of a series.

The listing shows only the slides the user may ``browse``.

Routes (see :func:`register_routes`):

``GET  /api/slides``                        the catalogue (``patient_id``, ``accession``,
                                            ``tier``, ``flagged=1|0`` filter it)
``GET  /api/slides/{slide}``                one slide: catalogue facts, QC, pyramid
                                            geometry (levels, tile grid, bytes per level),
                                            associated image names, versions, the user's
                                            ``rights`` on it
``GET  /api/slides/{slide}/associated/{name}``  label / macro / thumbnail as PNG
``GET|POST /jpip/slides/{slide}``           packets: ``level`` (default 0) plus the fields
                                            of ``/jpip`` (``target`` may be left out;
                                            ``comps`` names tiles of the level; ``reduce``
                                            is per tile, clamped to small edge tiles;
                                            ``version``/``quality``/``purpose``/``auto``);
                                            POST ``{"model": ...}`` declares the cache.

``GET  /api/stations/{station}/worklist``   the exams assigned to a reading station
                                            (``station`` / ``assignment`` tables), each
                                            with the slides the user may browse, their
                                            manifest SHA-256 and ``unlimited``; the
                                            station's cache folder (W7)

``{slide}`` is the slide UID or its catalogue number. Every slide request counts as
activity for the idle-time tier scheduler.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading

from server.slide_catalogue import CatalogueError
from imaging.pyramid import PyramidError
from server.slide_store import SlideStore, slide_summary

from . import rights as _rights
from .packets import Plan, RequestError, parse_request, plan, refuse, resolve_version, stream
from .packets import ImageSource as PacketSource
from .peers import peer_of

log = logging.getLogger("medview.slides")

__all__ = ["SlideService", "register_routes", "slide_plan", "slide_problems", "slide_scopes",
           "slide_limits"]

#: slide versions are measured on the finest level with at most this many tiles
VERSION_SAMPLE_TILES = 16


def slide_scopes(row: dict) -> list[str]:
    """The rights scopes of a catalogued slide, finest first: its UID, its exam, its
    patient (see :mod:`server.rights`)."""
    return [s for s in (row["slide_uid"], _rights.exam_scope(row.get("accession")),
                        _rights.patient_scope(row.get("patient_id"))) if s]


class SlideService:
    """The slide store of a server (opened on first use: a radiology-only store gets no
    ``slides/`` folder), the packet sources of its levels, and the versions of its
    slides (``policy``: the site policy, as ``Server.policy.get``)."""

    def __init__(self, store_root, *, jobs=None, policy=None) -> None:
        self.root = store_root
        self._store: SlideStore | None = None
        self._lock = threading.Lock()
        self._jobs = jobs
        self._policy = policy
        self._versions: dict[str, tuple[str, object]] = {}
        if jobs is not None:
            _ = self.store

    @property
    def store(self) -> SlideStore:
        with self._lock:
            if self._store is None:
                self._store = SlideStore.for_image_store(self.root)
                if self._jobs is not None:
                    from .jobs import SlideTierJob
                    from .slide_tiers import SlideTiers

                    self._jobs.add(SlideTierJob(SlideTiers(self._store)))
            return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def touch(self) -> None:
        if self._store is not None:
            self._store.activity()

    def scopes(self, ref: str) -> list[str]:
        """The rights scopes of slide ``ref`` (404 if there is no such slide)."""
        try:
            row = self.store.catalogue.slide(ref)
        except (CatalogueError, ValueError) as e:
            raise RequestError(str(e), status=404) from None
        if row is None:
            raise RequestError(f"unknown slide {ref!r}", status=404)
        return slide_scopes(row)

    def versions(self, st):
        """V1–V3 of a stored slide (a :class:`~server.policy.SeriesVersions`, None
        without a site policy): the site's versions for modality ``SM``, each a layer
        count of every tile, measured on the tiles of the finest level that has at most
        :data:`VERSION_SAMPLE_TILES` tiles (every level has the same four layers)."""
        if self._policy is None:
            return None
        from .policy import image_facts

        pol = self._policy()
        with self._lock:
            hit = self._versions.get(st.uid)
        if hit is not None and hit[0] == pol.fingerprint:
            return hit[1]
        g = next((lv for lv in st.levels if lv.count <= VERSION_SAMPLE_TILES), st.levels[-1])
        facts = [image_facts(st.tile_index(g.level, t), 8) for t in range(g.count)]
        sv = pol.series_versions(st.uid, {"Modality": "SM"}, facts)
        with self._lock:
            if len(self._versions) > 256:
                self._versions.clear()
            self._versions[st.uid] = (pol.fingerprint, sv)
        return sv

    def describe(self, ref: str, grant=None) -> dict:
        row, st = self._open(ref)
        levels = []
        for g, lv in zip(st.levels, st.manifest["levels"]):
            levels.append({"level": g.level, "width": g.width, "height": g.height,
                           "downsample": g.downsample, "cols": g.cols, "rows": g.rows,
                           "tile": g.tile, "bytes": lv["size"]})
        out = {**slide_summary(row), "tile_size": st.tile_size, "levels": levels,
               "layers": st.manifest["codestream"]["layers"],
               "associated": {k: {"width": v["width"], "height": v["height"]}
                              for k, v in st.manifest.get("associated", {}).items()},
               "objective_power": st.manifest.get("objective_power")}
        if grant is not None:
            versions = self.versions(st)
            out["rights"] = slide_limits(grant, st, versions)
            out["unlimited"] = grant.unlimited
            if versions is not None:
                allowed = grant.allowed_versions(versions.names())
                out["versions"] = [dict(v.to_json(), allowed=allowed is None or v.name in allowed)
                                   for v in versions.versions]
        return out

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


# --------------------------------------------------------------------------- rights
def _coarsest(st) -> int:
    """The largest reduction the pyramid offers (top level, its tile at its coarsest),
    as a power of two."""
    top = len(st.levels) - 1
    return top + st.tile_index(top, 0).numres - 1


def _finest(grant, st) -> int | None:
    """The finest reduction (level + reduce) the grant allows on this slide."""
    if not grant.max_reduce_min:
        return None
    return min(grant.max_reduce_min, _coarsest(st))


def level_rect(rect, downsample: int) -> tuple[int, int, int, int]:
    """A full-resolution rectangle x, y, w, h in pixels of a level reduced ``downsample``
    times, rounded outward."""
    x, y, w, h = rect
    x0, y0 = x // downsample, y // downsample
    x1, y1 = -(-(x + w) // downsample), -(-(y + h) // downsample)
    return x0, y0, x1 - x0, y1 - y0


def slide_limits(grant, st, versions=None, denied=()) -> dict:
    """The series' rights block (:meth:`~server.rights.Grant.limits`) plus the
    finest pyramid level the user may get."""
    d = grant.limits(versions, denied)
    finest = _finest(grant, st)
    if finest is not None:
        d["finest_level"] = min(finest, len(st.levels) - 1)
    return d


def slide_problems(grant, req, st, level: int, reduces: dict[int, int],
                   layers: dict[int, int], versions=None) -> tuple[list[tuple[str, str]], dict]:
    """What a slide request goes beyond, by :func:`server.rights.check` (the series'
    check) on the request in slide terms: ``reduces``/``layers`` are per tile of level
    ``level`` as they would be sent. Returns (problems, extra 403 body fields)."""
    g = st.levels[level]
    extra: dict = {}
    view = grant
    if grant.regions is not None:
        scaled = [level_rect(r, g.downsample) for r in grant.regions]
        view = dataclasses.replace(grant, regions=scaled)
        extra.update(level=level, allowed_regions_at_level=[list(r) for r in scaled])
    coarsest = _coarsest(st)
    problems: list[tuple[str, str]] = []
    if grant.images is not None:
        problems.append(("images", "your rights limit which images of a series you may load "
                                   f"({_rights.format_ranges(grant.images) or 'none'}), and a "
                                   "slide has no image numbers: none of it may be sent"))
    if versions is None and (grant.versions is not None or grant.status_versions is not None):
        problems.append(("version", "your rights limit the versions you may get and this "
                                    "server has no versions for slides (no site policy)"))
    for kind, msg in _rights.check(
            view, comps=None, n_images=0, layers=layers,
            reduces={t: level + r for t, r in reduces.items()},
            numres={t: coarsest + 1 for t in reduces}, sizes={0: (g.width, g.height)},
            region=req.region, version=req.version, versions=versions):
        if kind == "resolution":
            worst = min(level + r for r in reduces.values())
            finest = _finest(grant, st)
            msg = (f"level {level} at reduce={worst - level} is the slide at 1/{2 ** worst} "
                   f"resolution, the finest allowed is 1/{2 ** finest} "
                   f"(level {min(finest, len(st.levels) - 1)})")
        elif kind == "region":
            msg += f" of level {level} (scaled from full resolution)"
        problems.append((kind, msg))
    finest = _finest(grant, st)
    if finest is not None:
        extra["finest_level"] = min(finest, len(st.levels) - 1)
    return problems, extra


def slide_plan(req, st, level: int, model, grant=None, versions=None) -> Plan:
    """Plan a request on level ``level`` of the stored slide ``st``: the tiles of the
    region (and of ``req.comps`` if given), each with its own local region. ``grant``
    (from :meth:`~server.auth.Authority.authorize`) is enforced before anything is
    planned: a request beyond it raises the 403 of the series path; ``versions`` (see
    :meth:`SlideService.versions`) resolves ``version``/``quality``/``purpose``."""
    version = resolve_version(req, versions)
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
    # what each tile would get: reduce clamped to the tile's resolutions, layers to its own
    reduces, layers = {}, {}
    for t in tiles:
        ix = st.tile_index(level, t)
        reduces[t] = min(req.reduce, ix.numres - 1) if req.reduce is not None else 0
        layers[t] = min(req.layers, ix.nlayers) if req.layers is not None else ix.nlayers
    if grant is not None:
        problems, extra = slide_problems(grant, req, st, level, reduces, layers, versions)
        refuse(grant, problems, versions, **extra)
    images, res, lays, incs = [], {}, {}, []
    total = sent = 0
    for t in tiles:
        ix = st.tile_index(level, t)
        src = PacketSource(t, f"{st.uid}/{level}/{t}", ix, lambda lv=level, i=t: st.tile_bytes(lv, i))
        sub = dataclasses.replace(req, comps=None, fsiz=None, version=None, quality=None,
                                  purpose=None, reduce=reduces[t], layers=layers[t])
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
        lays.update(p.layers)
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
            recs[n] = {"type": "recommend", "images": "all", "layers": max(lays.values()),
                       "res": maxres, "action": "render"}
    return Plan(request=req, images=images, res=res, layers=lays, increments=incs,
                total_bytes=total, request_bytes=sent, recommendations=recs, version=version)


# --------------------------------------------------------------------------- HTTP
def register_routes(routes: list, srv, guarded=None, *, jobs=None) -> SlideService:
    """Add the slide routes to a Starlette route list.

    ``create_app`` calls ``register_routes(routes, srv, guarded)`` with its
    authorise-and-run decorator, so every slide request passes the one authorisation
    point (and the audit log); on a built app, ``register_routes(app.router.routes,
    app.state.server)`` returns the routes' service. ``jobs`` (the server's
    :class:`~server.jobs.JobScheduler`) gets the idle-time slide tier job."""
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

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

    def guard(action: str, scoped: bool = True, **kw):
        """The server's guard — on the slide of the path (its scopes) unless ``scoped``
        is False — with slide-store failures mapped to JSON errors."""
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
            # the slide of the path is resolved (and its scopes decided on) by the
            # guard itself (server.targets.resolve)
            mapped.__doc__ = fn.__doc__
            return guarded(action, **kw)(mapped)
        return deco

    from .inputs import Param
    from .packets import KNOWN_FIELDS

    @guard("browse", scoped=False, query=(
        Param("patient_id"), Param("accession"), Param("tier"), Param("flagged", "bool")))
    def listing(request):
        q = request.query_params
        flagged = q.get("flagged")
        rows = svc.store.catalogue.slides(
            patient_id=q.get("patient_id"), accession=q.get("accession"), tier=q.get("tier"),
            flagged=None if flagged is None else flagged in ("1", "true", "yes"))
        grants = srv.auth.grants_for(request.state.session.user, [slide_scopes(r) for r in rows])
        shown = [r for r, g in zip(rows, grants) if g.actions is None or "browse" in g.actions]
        request.state.audit["slides"] = len(shown)
        return JSONResponse([slide_summary(r) for r in shown])

    @guard("metadata")
    def describe(request):
        svc.touch()
        return JSONResponse(svc.describe(request.path_params["slide"], request.state.grant))

    @guard("retrieve")
    def associated(request):
        row, st = svc._open(request.path_params["slide"])
        name = request.path_params["name"]
        a = st.manifest.get("associated", {}).get(name)
        if a is None:
            raise RequestError(f"slide {row['slide_uid']} has no {name} image "
                               f"(it has: {', '.join(st.manifest.get('associated', {})) or 'none'})",
                               status=404)
        grant = request.state.grant
        versions = svc.versions(st)
        if not grant.allows_whole(None, versions):
            # label and macro carry the patient's identity, macro and thumbnail the whole
            # slide: whole files, as the original DICOM of a series
            raise RequestError("beyond your rights: label, macro and thumbnail images are "
                               "whole images of the slide (the label carries the patient's "
                               "identity) and need unlimited access to it; ask for packets "
                               "within your rights at /jpip/slides", status=403,
                               **slide_limits(grant, st, versions, ["whole-file"]))
        data = (st.path / a["file"]).read_bytes()
        return Response(data, media_type="image/png")

    @guard("fetch", query=(Param("level", "int", "pyramid level", lo=None),)
           + tuple(Param(k) for k in sorted(KNOWN_FIELDS)), body={"type": "object"})
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
        session, grant = request.state.session, request.state.grant
        model = session.model_for(f"slide:{row['slide_uid']}")
        if request.method == "POST":
            # A level has thousands of tiles and a client declares only the tiles of its
            # request, so the declaration is merged per tile key; CacheModel.declare (used
            # by declare_from_body for series) would forget every other tile of the slide.
            try:
                body = getattr(request.state, "json", None) or {}   # parsed by the guard
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
        versions = svc.versions(st) if (req.version or req.quality is not None or req.purpose
                                        or grant.versions is not None
                                        or grant.status_versions is not None) else None
        auto = None
        if req.version == "auto":
            if versions is None:
                raise RequestError("this slide has no versions (no site policy)", status=404)
            from . import policy_routes

            auto = policy_routes.auto_choice(srv, session, grant, versions,
                                             policy_routes.peer_of(request))
            req.version = auto.version
        p = slide_plan(req, st, level, model, grant, versions)
        if auto is not None and p.version is not None:
            p.version["auto"] = auto.reasons
        media = "application/x-medview-jpp" if req.framing == "mv" else "image/jpp-stream"
        headers = {"JPIP-cnew": f"cid={session.id}", "X-Bytes-Announced": str(p.request_bytes),
                   "X-Bytes-Total": str(p.total_bytes), "X-Slide-Tiles": str(len(p.images))}
        # audited when the stream ends, with what actually left (as series packets)
        request.state.audit_deferred = True
        detail = {"query": {k: v for k, v in request.query_params.items() if k != "cid"},
                  "served": request.state.target.served(), "level": level, "version": p.version["name"] if p.version else None,
                  "images": len(p.images), "bytes_announced": p.request_bytes}
        who = dict(user=session.user, session=session.serial, peer=peer_of(request))
        body = srv.audited_stream(stream(p, model, stats=detail), detail, who, row["slide_uid"])
        return StreamingResponse(body, media_type=media, headers=headers)

    @guard("browse", scoped=False)
    def station_worklist(request):
        """The exams assigned to a reading station (W7), with the slides of each that the
        user may browse (an exam with none is left out), their manifest checksum (to
        check a pre-distributed copy) and whether the user's rights on them are
        unlimited (a limited slide is read through the server, within them)."""
        name = request.path_params["station"]
        cat = svc.store.catalogue
        station = cat.station(name)
        if station is None:
            raise RequestError(f"unknown reading station {name!r}", status=404)
        exams = []
        for a in cat.assignments(name):
            rows = cat.slides(accession=a["accession"])
            grants = srv.auth.grants_for(request.state.session.user,
                                         [slide_scopes(r) for r in rows])
            shown = [dict(slide_summary(r), manifest_sha256=r["manifest_sha256"],
                          unlimited=bool(g.unlimited))
                     for r, g in zip(rows, grants) if g.actions is None or "browse" in g.actions]
            if not shown:
                continue
            first = shown[0]
            exams.append({"accession": a["accession"], "assigned_at": a["assigned_at"],
                          "distributed_at": a["distributed_at"],
                          **{k: first.get(k) for k in ("patient_id", "patient_name",
                                                       "patient_status", "exam_date",
                                                       "exam_description")},
                          "slides": shown})
        request.state.audit["exams"] = len(exams)
        return JSONResponse({"station": station["name"], "cache_dir": station["cache_dir"],
                             "exams": exams})

    routes.append(Route("/api/slides", listing))
    routes.append(Route("/api/stations/{station}/worklist", station_worklist))
    routes.append(Route("/api/slides/{slide}", describe))
    routes.append(Route("/api/slides/{slide}/associated/{name}", associated))
    routes.append(Route("/jpip/slides/{slide}", packets, methods=["GET", "POST"]))
    return svc
