"""The HTTP API (Starlette, served by uvicorn).

Routes
------
``POST /api/login``                      ``{"username", "password"}`` → ``{"session"}``
``POST /api/logout``
``GET  /api/health``
``/dicomweb/...``                       DICOMweb (PS3.18): QIDO-RS, WADO-RS (retrieve,
                                          metadata, frames, bulk data, rendered,
                                          thumbnail), STOW-RS: see
                                          :mod:`server_stub.dicomweb`
``GET  /api/series/{series}/images``     per-image geometry, rescale, window, codestream
                                          facts: what a viewer needs to lay out a series
``GET|POST /jpip``                       packet requests (see :mod:`server_stub.packets`);
                                          POST carries ``{"model": ...}``, the client's
                                          declaration of what its cache holds.

Policy routes (versions, diagnosis status and records, session context): see
:mod:`server_stub.policy_routes`.

DICOMweb: :mod:`server_stub.dicomweb`. The session id travels as ``Authorization: Bearer <id>`` or as the
JPIP ``cid`` field. Every route calls :meth:`Authority.authorize` first, with the object
it is about — every path element (and the JPIP ``target``) resolved against its parent by
:func:`server_stub.targets.resolve` (404 outside it), a slide by its scopes — so the grant
is the one on the object actually served; it is enforced by the packet planner (for
slides by the same check in slide terms), by the image ranges for an instance or frame,
and by the whole-file routes (original DICOM, whole codestream, a slide's label/macro),
which need an unlimited grant. Inputs are checked by :mod:`server_stub.inputs` (400
naming the field, never 500). Every request is written to the audit log, whatever its
outcome (packet requests when their stream ends, with what was actually sent).
``GET /api/openapi.json`` describes the API (:mod:`server_stub.openapi`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from codestream.databins import databins_from_ranges, split_databins
from codestream.index import CodestreamError, PacketIndex

from . import dicomweb, peers, policy_routes
from .admission import Admission, Gates, Limits
from .responses import GZIP_MIN_BYTES, accepts_gzip, error, json_response  # noqa: F401
from .auth import AuthError, Authority, Session, is_loopback
from .inputs import InputError, Param, check_query, parse_json, read_body
from .targets import BadParam, NotFound
from .targets import resolve as resolve_target
from .catalogue import QueryError
from .diagnosis import DiagnosisError, DiagnosisRecords
from .packets import (ImageSource, RequestError, declare_from_body, parse_request, plan,
                      resolve_model, stream)
from .policy import PolicyError, PolicySource
from .dbutil import StorageFull, read_only_reason
from .store import Store, StoreError, StoreIntegrityError
from .jobs import JobScheduler, Leases, MigrationJob
from .series_facts import SeriesFacts
from .tiers import Tiers
from .versions import VersionTable

log = logging.getLogger("medview.server")

VERSION = "0.1.0"
_PRIVATE_KEYS = {"codestream_relpath", "codestream_sha256", "index_relpath", "index_sha256",
                 "original_relpath", "original_sha256"}


class _LRU:
    """A small thread-safe LRU with a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._d: OrderedDict = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key, value, size: int) -> None:
        with self._lock:
            if key in self._d:
                return
            self._d[key] = (value, size)
            self._size += size
            while self._size > self.budget and len(self._d) > 1:
                _, (_, s) = self._d.popitem(last=False)
                self._size -= s


class Server:
    """State shared by the routes: the store, the authority and small caches."""

    def __init__(self, store: Store, authority: Authority | None = None,
                 cache_bytes: int = 256 << 20, policy: PolicySource | None = None) -> None:
        self.store = store
        self.catalogue = store.catalogue
        db = str(Path(store.root) / "catalogue.sqlite")
        self.policy = policy or PolicySource(store.root)
        self.diagnosis = DiagnosisRecords(db)
        self.auth = authority or Authority(db)
        if self.auth.status_of is None:
            self.auth.status_of = self.diagnosis.status
        if self.auth.policy is None:
            self.auth.policy = self.policy.get
        self._indexes = _LRU(64 << 20)
        self._bytes = _LRU(cache_bytes)
        self.facts = SeriesFacts(self.catalogue)       # per series, kept per generation
        self.versions = VersionTable(store, self.policy.get, index_of=self._index,
                                     facts=self.facts)
        self.tiers = Tiers(store, versions=self.versions.get, status_of=self.diagnosis.status,
                           settings=lambda: self.policy.get().storage)

    def _index(self, row: dict) -> PacketIndex:
        key = row["index_sha256"]
        v = self._indexes.get(key)
        if v is None:
            raw = self.store.read_verified(row["index_relpath"], row["index_sha256"])
            v = PacketIndex.from_json(raw)
            self._indexes.put(key, v, len(raw))
        else:
            v = v[0]
        return v

    def _cached(self, sha: str, read) -> bytes:
        v = self._bytes.get(sha)
        if v is not None:
            return v[0]
        data = read()
        self._bytes.put(sha, data, len(data))
        return data

    def _loader(self, row: dict):
        """The whole codestream (recalled from the archive if it was migrated meanwhile)."""
        return lambda: self._cached(row["codestream_sha256"],
                                    lambda: self.tiers.read_codestream(row))

    def _part_loader(self, row: dict):
        """For a remote object store: the packets a request needs as HTTP range reads at
        the index's offsets, unless the whole codestream is at hand (memory, the local
        read cache) or the request wants most of it (then one whole, checked read)."""
        if not self.store.objects.remote:
            return None

        def load(layers: int, res: int):
            ix = self._index(row)
            sha = row["codestream_sha256"]
            v = self._bytes.get(sha)
            data = v[0] if v is not None else (
                self.store.cache.get(sha) if self.store.cache is not None else None)
            if data is None and 2 * ix.bytes_at(layers, res) < ix.total_bytes:
                rel = row["codestream_relpath"]
                try:
                    return databins_from_ranges(
                        ix, lambda a, b: self.store.read_range(rel, a, b), layers, res)
                except StoreIntegrityError as e:
                    if e.problem != "file is missing":     # migrated meanwhile: below
                        raise
            if data is None:
                data = self._loader(row)()
            return split_databins(data, ix)
        return load

    def _head_loader(self, row: dict, tier):
        """The hot part of an archived codestream (the whole one if recalled meanwhile)."""
        def load() -> bytes:
            v = self._bytes.get(tier.head_sha256) or self._bytes.get(row["codestream_sha256"])
            if v is not None:
                return v[0]
            data = self.tiers.read_head(row, tier)
            key = tier.head_sha256 if len(data) == tier.head_size else row["codestream_sha256"]
            self._bytes.put(key, data, len(data))
            return data
        return load

    def _recaller(self, row: dict, frame_pk: int):
        return lambda: self._cached(row["codestream_sha256"],
                                    lambda: self.tiers.recall_frame(row, frame_pk))

    def sources(self, series_uid: str) -> list[ImageSource]:
        """The packet sources of a series, built once per generation (shared: read-only)."""
        return self.facts.kept(series_uid, "sources", lambda: self._sources(series_uid))

    def _sources(self, series_uid: str) -> list[ImageSource]:
        rows = self.facts.images(series_uid)
        states = self.tiers.frame_states(series_uid) if rows else {}
        out = []
        for r in rows:
            key = f"{r['SOPInstanceUID']}/{r['frame']}"
            pk, tier = states.get((r["SOPInstanceUID"], r["frame"]), (None, None))
            if tier is not None and tier.state == "archived":
                out.append(ImageSource(r["index"], key, self._index(r), self._head_loader(r, tier),
                                       hot_layers=tier.hot_layers, recall=self._recaller(r, pk)))
            else:
                out.append(ImageSource(r["index"], key, self._index(r), self._loader(r),
                                       load_part=self._part_loader(r)))
        return out

    def close(self) -> None:
        for part in (self.versions, self.tiers, self.diagnosis, self.auth,
                     getattr(self, "slides", None)):
            if part is not None:
                part.close()


def storage_full_error(exc: Exception) -> JSONResponse:
    """507 Insufficient Storage: a write refused for lack of space; reads go on."""
    log.error("write refused: %s", exc)
    return error(507, f"{exc}: reading goes on; storing anything needs free space on the "
                      f"store's disk", read_only=True)


def _sid(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    if h.lower().startswith("bearer "):
        return h[7:].strip()
    cid = request.query_params.get("cid")
    # a JPIP channel id is "<session id>.<channel>" (server_stub.packets.resolve_model)
    return cid.split(".", 1)[0] if cid else None


def create_app(store: Store, authority: Authority | None = None, *,
               policy: PolicySource | None = None, schedule: bool = False,
               allow_local: bool = False, trusted_proxies=(),
               proxy_header: str = "x-forwarded-for",
               admission: Limits | None = None) -> Starlette:
    """The application. ``schedule`` starts the migration job (tiered storage) inside
    the server, every ``[storage] schedule_hours`` of the site policy. ``allow_local``
    lets the password-less ``local`` user log in from loopback (the desktop's bundled
    server); ``trusted_proxies`` (CIDR blocks) are the proxies whose ``proxy_header``
    names the client (:mod:`server_stub.peers`). A store whose disk is full is served
    read-only (:meth:`Store.open_for_serving`). ``admission``: the limits of
    :mod:`server_stub.admission` (503 + Retry-After beyond them)."""
    store.open_for_serving()
    srv = Server(store, authority, policy=policy)
    gates = Gates(admission)        # 503 + Retry-After beyond them (server_stub.admission)
    if allow_local:
        srv.auth.allow_local = True

    def guarded(action: str, scopes=None, *, query: tuple = (), body: dict | None = None):
        """Authorise, then run the (blocking) handler on the thread pool, never on the
        event loop; map every failure to a JSON error with its HTTP status (anything
        unexpected: a 500 without details); write the request to the audit log, whatever
        its outcome (a handler may add details to ``request.state.audit``, or take the
        writing over with ``audit_deferred``).

        Before the handler runs: the body is read within its size limit, the declared
        ``query`` parameters (:class:`~server_stub.inputs.Param`) are checked, and once
        the session is valid every object the path names (study, series, instance,
        frame, item, slide, or the JPIP ``target``) is resolved against its parent
        (:func:`server_stub.targets.resolve`: 404 if a part is not inside its parent) and
        the grant is decided on the object actually served. The resolved
        :class:`~server_stub.targets.Target` is ``request.state.target``; handlers serve
        exactly that. ``scopes(request)`` (rights scopes, finest first) is for a route
        about something the resolver does not know. ``body`` is the JSON schema of the
        request body (for the OpenAPI document)."""
        def deco(fn):
            async def endpoint(request: Request):
                peer = peers.peer_of(request)
                request.state.audit = {}
                request.state.audit_deferred = False
                request.state.target = None
                who: dict = {"user": None, "session": None}
                resolved: list = []

                def fallback_resource():
                    p = request.path_params
                    return (p.get("slide") or p.get("series") or request.query_params.get("target")
                            or p.get("study"))

                async def audit(outcome: str, status: int, message: str | None = None):
                    t = request.state.target
                    query_ = {k: v for k, v in request.query_params.items()
                              if k not in ("cid", "cclose")}
                    detail = {"method": request.method, "path": request.url.path,
                              **({"query": query_} if query_ else {}),
                              **({"served": t.served()} if t is not None else {}),
                              **request.state.audit, **({"error": message} if message else {})}
                    resource = (t.resource if t is not None else None) or \
                        (resolved[0] if resolved else None) or fallback_resource()
                    try:
                        await run_in_threadpool(
                            srv.auth.audit, user=who["user"], session=who["session"], peer=peer,
                            action=action, resource=resource, outcome=outcome, status=status,
                            detail=detail)
                    except Exception:  # noqa: BLE001 - the answer still goes out
                        log.exception("audit failed for %s %s", request.method, request.url.path)

                def target():
                    t = resolve_target(srv, request.path_params, request.query_params)
                    if scopes is not None and t.scopes is None:
                        t.scopes = resolved[:] = [x for x in scopes(request) if x]
                    request.state.target = t
                    return t

                try:
                    request.state.body = (await read_body(request)
                                          if request.method in ("POST", "PUT") else b"")
                    session, grant = await run_in_threadpool(
                        srv.auth.authorize, _sid(request), action, target=target)
                    who.update(user=session.user, session=session.serial)
                    check_query(query, request.query_params)
                    request.state.json = None
                    if request.state.body and not request.headers.get(
                            "content-type", "").startswith(("multipart/", "application/dicom")):
                        try:
                            request.state.json = parse_json(request.state.body)
                        except InputError as e:        # "POST body must be JSON (...)"
                            raise InputError(f"{request.method} {e}", e.field, e.status) from None
                    request.state.session, request.state.grant = session, grant
                    response = await run_in_threadpool(fn, request)
                    if not request.state.audit_deferred:
                        await audit("ok" if response.status_code < 400 else
                                    "denied" if response.status_code in (401, 403) else "error",
                                    response.status_code)
                    return response
                except AuthError as e:
                    if e.session is not None:
                        who.update(user=e.session.user, session=e.session.serial)
                    await audit("denied", e.status, str(e))
                    return error(e.status, str(e), **e.extra)
                except (InputError, BadParam, NotFound) as e:
                    session = getattr(e, "session", None)
                    if session is not None:
                        who.update(user=session.user, session=session.serial)
                    await audit("not-found" if e.status == 404 else "error", e.status, str(e))
                    return error(e.status, str(e), field=e.field)
                except (RequestError, DiagnosisError) as e:
                    session = getattr(e, "session", None)      # (raised resolving the path)
                    if session is not None and who["user"] is None:
                        who.update(user=session.user, session=session.serial)
                    await audit("denied" if e.status == 403 else "error", e.status, str(e))
                    return error(e.status, str(e), **e.extra)
                except QueryError as e:
                    await audit("error", 400, str(e))
                    return error(400, str(e))
                except StorageFull as e:                 # a full disk: writes only
                    await audit("error", 507, str(e))
                    return storage_full_error(e)
                except (StoreError, CodestreamError, PolicyError) as e:
                    log.error("store problem: %s", e)
                    await audit("error", 500, str(e))
                    return error(500, f"stored data is damaged or missing: {e}")
                except Exception as e:  # noqa: BLE001 - never a traceback to the client
                    log.exception("unhandled error in %s %s", request.method, request.url.path)
                    session = getattr(e, "session", None)
                    if isinstance(session, Session) and who["user"] is None:
                        who.update(user=session.user, session=session.serial)
                    await audit("error", 500, f"unhandled {type(e).__name__}")
                    return error(500, "internal server error (logged and audited)")
            endpoint.medview = {"action": action, "query": tuple(query), "body": body}
            endpoint.__doc__ = fn.__doc__
            endpoint.__name__ = fn.__name__
            return endpoint
        return deco

    async def login(request: Request):
        peer = peers.peer_of(request)
        direct = (request.client is not None and is_loopback(request.client.host)
                  and not peers.has_forwarding(request.headers))
        try:
            body = parse_json(await read_body(request, 64 << 10), object_only=True)
        except InputError as e:
            await run_in_threadpool(srv.auth.audit, user=None, action="login", resource=None,
                                    outcome="error", status=e.status, peer=peer,
                                    detail={"error": str(e)})
            return error(e.status, 'login body must be JSON: {"username": ..., "password": ...}'
                         f" ({e})", field=e.field)
        name, password = body.get("username"), body.get("password")
        bad = None
        if not isinstance(name, str) or not name or len(name) > 256 or "\x00" in name:
            bad = ("username", "username is required (a string of at most 256 characters)")
        elif password is not None and (not isinstance(password, str) or len(password) > 1024):
            bad = ("password", "password must be a string of at most 1024 characters")
        if bad is not None:
            await run_in_threadpool(srv.auth.audit, user=None, action="login", resource=None,
                                    outcome="error", status=400, peer=peer,
                                    detail={"error": bad[1]})
            return error(400, bad[1], field=bad[0])
        try:
            s = await run_in_threadpool(srv.auth.login, name, password, peer,
                                        direct_loopback=direct)
        except AuthError as e:
            await run_in_threadpool(srv.auth.audit, user=name, action="login", resource=None,
                                    outcome="denied", status=e.status, peer=peer,
                                    detail={"error": str(e)})
            headers = ({"Retry-After": str(e.extra["retry_after"])}
                       if "retry_after" in e.extra else None)
            return JSONResponse({"error": str(e), "status": e.status, **e.extra},
                                status_code=e.status, headers=headers)
        await run_in_threadpool(srv.auth.audit, user=s.user, session=s.serial, action="login",
                                resource=None, outcome="ok", status=200, peer=peer)
        return JSONResponse({"session": s.id, "user": s.user})

    login.medview = {"action": None, "public": True, "body_required": True, "body": {
        "type": "object", "required": ["username"],
        "properties": {"username": {"type": "string"}, "password": {"type": "string"}}}}

    @guarded("logout")
    def logout(request: Request):
        srv.auth.logout(request.state.session.id)
        return JSONResponse({"ok": True})

    async def health(request: Request):
        """``ok``, or ``degraded`` with why: the store is read-only (its disk was full at
        start), audit rows wait in memory because writes fail, or final copies failed their
        verification (an alarm: :mod:`server_stub.policy_copies`)."""
        from .policy_copies import conversion_health

        audit = srv.auth.health()
        read_only = read_only_reason(srv.auth.db.path)
        conv = await run_in_threadpool(conversion_health, srv.catalogue)
        problems = []
        if read_only:
            problems.append(f"read-only: {read_only}")
        if audit["failing"] or audit["dropped"]:
            problems.append(f"audit rows held in memory: {audit['pending']}, not written: "
                            f"{audit['dropped']} ({audit['failing'] or 'writes work again'})")
        if conv["failed"]:
            problems.append(f"final copies that failed verification: {conv['failed']}")
        return JSONResponse({"status": "degraded" if problems else "ok", "version": VERSION,
                             "read_only": read_only is not None, "problems": problems,
                             "audit": audit, "conversion": conv,
                             "admission": gates.stats(),
                             "jobs": srv.jobs.stats() if srv.jobs is not None else None,
                             "replica": srv.auth.replica})

    health.medview = {"action": None, "public": True}

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
                     hot_layers=srcs[r["index"]].hot_layers)
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

    routes = [
        Route("/api/login", login, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/api/health", health),
        Route("/api/series/{series}/images", series_images),
        Route("/jpip", jpip, methods=["GET", "POST"]),
    ]
    routes += policy_routes.routes(srv, guarded)        # issue 5: versions, diagnosis
    routes += dicomweb.routes(srv, guarded)             # PS3.18 QIDO / WADO / STOW-RS

    async def not_found(request, exc):
        """No such route (404) or method (405): answered in JSON, and audited."""
        status = getattr(exc, "status_code", 404)
        try:
            await run_in_threadpool(
                srv.auth.audit, user=None, action="request", resource=None, outcome="error",
                status=status, peer=request.client.host if request.client else None,
                detail={"method": request.method, "path": request.url.path})
        except Exception:  # noqa: BLE001 - the answer still goes out
            log.exception("audit of a %d failed", status)
        return error(status, getattr(exc, "detail", "not found"))

    async def unhandled(request, exc):
        """Anything a route did not handle (guarded routes handle their own): a JSON 500
        without details, and an audit row."""
        log.error("unhandled error in %s %s", request.method, request.url.path,
                  exc_info=(type(exc), exc, exc.__traceback__))
        try:
            await run_in_threadpool(
                srv.auth.audit, user=None, action="request", resource=None, outcome="error",
                status=500, peer=peers.peer_of(request),
                detail={"method": request.method, "path": request.url.path,
                        "error": f"unhandled {type(exc).__name__}"})
        except Exception:  # noqa: BLE001
            log.exception("audit of an unhandled error failed")
        return error(500, "internal server error (logged and audited)")

    # the background jobs (series and slide tiering), each under its lease in the
    # catalogue database so that one process of several runs it
    scheduler = None
    if schedule and store.read_only is None:
        first = float(os.environ.get("MEDVIEW_JOB_FIRST_DELAY_S", "60"))
        scheduler = JobScheduler([MigrationJob(srv.tiers, first_delay=first)],
                                 leases=Leases(Path(store.root) / "catalogue.sqlite"))
    srv.jobs = scheduler

    space_back = threading.Event()

    def watch_space() -> None:
        """Read-only on a full disk: back to read-write once there is room again."""
        while not space_back.wait(2.0):
            if store.try_leave_read_only():
                log.warning("the store's disk has room again: read-write")
                return

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if scheduler is not None:
            scheduler.start()
        watcher = None
        if store.read_only is not None:
            watcher = threading.Thread(target=watch_space, name="medview-space", daemon=True)
            watcher.start()
        try:
            yield
        finally:
            space_back.set()
            if watcher is not None:
                watcher.join(10)
            if scheduler is not None:
                scheduler.stop()
            srv.close()

    from .slabs import register_routes as register_slab_routes
    register_slab_routes(routes, srv, guarded)     # thick-to-thin slab pyramids (issue 4)
    from .slides import register_routes as register_slide_routes
    register_slide_routes(routes, srv, guarded,    # whole-slide pyramids (issue 6)
                          jobs=scheduler)

    from .openapi import openapi_route
    routes.append(openapi_route(VERSION))    # /api/openapi.json, from this table

    async def storage_full(request, exc):
        return storage_full_error(exc)

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found,
                                                       StorageFull: storage_full,
                                                       Exception: unhandled},
                    middleware=[Middleware(Admission, gates=gates)], lifespan=lifespan)
    app.state.server = srv
    app.state.admission = gates
    app.state.trusted_proxies = peers.parse_networks(trusted_proxies)
    app.state.proxy_header = proxy_header.lower()
    return app


def run(store_dir: str, host: str = "127.0.0.1", port: int = 8042, log_level: str = "info",
        policy_path: str | None = None, *, allow_local: bool = False, trusted_proxies=(),
        proxy_header: str = "x-forwarded-for") -> None:
    """Serve until interrupted (blocking), with the scheduled migration job. uvicorn's
    own proxy-header handling is off: :mod:`server_stub.peers` decides who the client
    is, from ``trusted_proxies`` only."""
    import uvicorn

    store = Store(store_dir)
    app = create_app(store, policy=PolicySource(store.root, policy_path), schedule=True,
                     allow_local=allow_local, trusted_proxies=trusted_proxies,
                     proxy_header=proxy_header)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            proxy_headers=False)
    log.warning("medview-server %s serving %s on http://%s:%d%s", VERSION, store_dir, host,
                port, f" READ-ONLY ({store.read_only})" if store.read_only else "")
    uvicorn.Server(config).run()
