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

The routes are :mod:`server.slide_routes` (``/api/slides``, ``/jpip/slides/{slide}``,
``/api/stations/{station}/worklist``).
"""
from __future__ import annotations

import dataclasses
import threading

from server.slide_catalogue import CatalogueError
from imaging.pyramid import PyramidError
from server.slide_store import SlideStore, slide_summary

from . import rights as _rights
from .packets import Plan, RequestError, plan, refuse, resolve_version
from .packets import ImageSource as PacketSource


__all__ = ["SlideService", "slide_plan", "slide_problems", "slide_scopes",
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


def tile_source(st, level: int, tile: int) -> PacketSource:
    """Tile ``tile`` of pyramid level ``level`` of a stored slide as the packet planner
    sees an image: component ``tile`` of the level's target."""
    return PacketSource(tile, f"{st.uid}/{level}/{tile}", st.tile_index(level, tile),
                        lambda: st.tile_bytes(level, tile))


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
    """Plan a request on pyramid level ``level`` of the stored slide ``st``: the tiles of
    the region (and of ``req.comps`` if given), each with its own local region. ``grant``
    (from :meth:`~server.auth.Authority.authorize`) is enforced before anything is
    planned: a request beyond it raises the 403 of the series path; ``versions`` (see
    :meth:`SlideService.versions`) resolves ``version``/``quality``/``purpose``.

    The steps: the tiles (:func:`level_tiles`), what each would get
    (:func:`tile_targets`), the rights (:func:`slide_problems`), one plan per tile on
    its local region (:func:`tile_region`), merged into one progression
    (:func:`merge_tile_increments`)."""
    version = resolve_version(req, versions)
    tiles = level_tiles(req, st, level)
    reduces, layers = tile_targets(req, st, level, tiles)
    if grant is not None:
        problems, extra = slide_problems(grant, req, st, level, reduces, layers, versions)
        refuse(grant, problems, versions, **extra)
    g = st.levels[level]
    images, res, lays, incs = [], {}, {}, []
    total = sent = 0
    for t in tiles:
        src = tile_source(st, level, t)
        sub = dataclasses.replace(req, comps=None, fsiz=None, version=None, quality=None,
                                  purpose=None, reduce=reduces[t], layers=layers[t])
        if req.region is not None:
            sub.region = tile_region(req.region, g.tile_rect(t))
        p = plan(sub, [src], model)
        images.append(src)
        res.update(p.res)
        lays.update(p.layers)
        incs.extend(p.increments)
        total += p.total_bytes
        sent += p.request_bytes
    recs = merge_tile_increments(req.order, incs, res, lays)
    return Plan(request=req, images=images, res=res, layers=lays, increments=incs,
                total_bytes=total, request_bytes=sent, recommendations=recs, version=version)


def level_tiles(req, st, level: int) -> list[int]:
    """The tiles of pyramid level ``level`` a request names: those its region touches
    (all without a region), of ``req.comps`` if given; 416 beyond the level."""
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
    return tiles


def tile_targets(req, st, level: int, tiles: list[int]
                 ) -> tuple[dict[int, int], dict[int, int]]:
    """What each tile would get: (reduce per tile, clamped to the tile's resolutions;
    layers per tile, clamped to its own)."""
    reduces, layers = {}, {}
    for t in tiles:
        ix = st.tile_index(level, t)
        reduces[t] = min(req.reduce, ix.numres - 1) if req.reduce is not None else 0
        layers[t] = min(req.layers, ix.nlayers) if req.layers is not None else ix.nlayers
    return reduces, layers


def tile_region(region, tile_rect) -> tuple[int, int, int, int] | None:
    """The part of a level region inside a tile, in the tile's pixels; None when the
    region covers the whole tile."""
    tx, ty, tw, th = tile_rect
    x, y, w, h = region
    x0, y0 = max(x, tx), max(y, ty)
    x1, y1 = min(x + w, tx + tw), min(y + h, ty + th)
    return None if (x0, y0, x1, y1) == (tx, ty, tx + tw, ty + th) else (
        x0 - tx, y0 - ty, x1 - x0, y1 - y0)


def merge_tile_increments(order: str, incs: list, res: dict[int, int],
                          lays: dict[int, int]) -> dict[int, dict]:
    """Sort the tiles' increments (``incs``, in place) into one progression and return
    its recommendations: in quality order, render after each layer of every tile; else
    once at the end."""
    if order == "image":
        incs.sort(key=lambda i: (i.csn, i.layer, i.res))
    elif order == "resolution":
        incs.sort(key=lambda i: (i.res, i.layer, i.csn))
    else:
        incs.sort(key=lambda i: (i.layer, i.res, i.csn))
    recs = {}
    maxres = max(res.values(), default=0)
    for n, inc in enumerate(incs):
        nxt = incs[n + 1] if n + 1 < len(incs) else None
        if order == "quality" and (nxt is None or nxt.layer != inc.layer):
            recs[n] = {"type": "recommend", "images": "all", "layers": inc.layer + 1,
                       "res": maxres, "action": "render"}
        elif order != "quality" and nxt is None:
            recs[n] = {"type": "recommend", "images": "all", "layers": max(lays.values()),
                       "res": maxres, "action": "render"}
    return recs
