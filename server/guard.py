"""The one authorisation point of the HTTP API (:func:`make_guard`): every route's
handler runs behind it. It reads the body within its limit, checks the declared query
parameters, resolves every object the path names against its parent
(:func:`server.targets.resolve`), decides the grant on the object actually served
(:meth:`server.auth.Authority.authorize`), runs the blocking handler on the thread
pool, maps every failure to a JSON error, and writes the audit row whatever the outcome.
"""
from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from codestream.index import CodestreamError

from . import peers
from .responses import error, storage_full_error
from .auth import AuthError, Session
from .inputs import InputError, check_query, parse_json, read_body
from .targets import BadParam, NotFound
from .targets import resolve as resolve_target
from .catalogue import QueryError
from .diagnosis import DiagnosisError
from .packets import (RequestError)
from .policy import PolicyError
from .dbutil import StorageFull
from .store import StoreError

log = logging.getLogger("medview.server")


def _sid(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    if h.lower().startswith("bearer "):
        return h[7:].strip()
    cid = request.query_params.get("cid")
    # a JPIP channel id is "<session id>.<channel>" (server.packets.resolve_model)
    return cid.split(".", 1)[0] if cid else None


def make_guard(srv):
    """The ``guarded(action, scopes=None, *, query=(), body=None)`` decorator of a
    server (:class:`server.app.Server`)."""
    def guarded(action: str, scopes=None, *, query: tuple = (), body: dict | None = None):
        """Authorise, then run the (blocking) handler on the thread pool, never on the
        event loop; map every failure to a JSON error with its HTTP status (anything
        unexpected: a 500 without details); write the request to the audit log, whatever
        its outcome (a handler may add details to ``request.state.audit``, or take the
        writing over with ``audit_deferred``).

        Before the handler runs: the body is read within its size limit, the declared
        ``query`` parameters (:class:`~server.inputs.Param`) are checked, and once
        the session is valid every object the path names (study, series, instance,
        frame, item, slide, or the JPIP ``target``) is resolved against its parent
        (:func:`server.targets.resolve`: 404 if a part is not inside its parent) and
        the grant is decided on the object actually served. The resolved
        :class:`~server.targets.Target` is ``request.state.target``; handlers serve
        exactly that. ``scopes(request)`` (rights scopes, finest first) is for a route
        about something the resolver does not know. ``body`` is the JSON schema of the
        request body (for the OpenAPI document)."""
        def deco(fn):
            async def endpoint(request: Request):
                call = GuardedCall(srv, request, action, scopes)
                try:
                    await call.admit(query)
                    response = await run_in_threadpool(fn, request)
                    if not request.state.audit_deferred:
                        status = response.status_code
                        await call.audit("ok" if status < 400 else "denied"
                                         if status in (401, 403) else "error", status)
                    return response
                except Exception as e:  # noqa: BLE001 - every failure is answered in JSON
                    return await call.failure(e)
            endpoint.medview = {"action": action, "query": tuple(query), "body": body}
            endpoint.__doc__ = fn.__doc__
            endpoint.__name__ = fn.__name__
            return endpoint
        return deco

    return guarded


class GuardedCall:
    """One request through the guard: who asks (known once the session is), the object
    it is about, and its audit row."""

    def __init__(self, srv, request: Request, action: str, scopes) -> None:
        self.srv = srv
        self.request = request
        self.action = action
        self.scopes = scopes
        self.peer = peers.peer_of(request)
        self.who: dict = {"user": None, "session": None}
        self.resolved: list = []
        request.state.audit = {}
        request.state.audit_deferred = False
        request.state.target = None

    async def admit(self, query: tuple) -> None:
        """Read the body, authorise the session on the object the path names, check the
        query and parse a JSON body; leaves ``session``, ``grant``, ``target``, ``body``
        and ``json`` on ``request.state``."""
        request = self.request
        request.state.body = (await read_body(request)
                              if request.method in ("POST", "PUT") else b"")
        session, grant = await run_in_threadpool(
            self.srv.auth.authorize, _sid(request), self.action, target=self.target)
        self.who.update(user=session.user, session=session.serial)
        check_query(query, request.query_params)
        request.state.json = None
        if request.state.body and not request.headers.get(
                "content-type", "").startswith(("multipart/", "application/dicom")):
            try:
                request.state.json = parse_json(request.state.body)
            except InputError as e:        # "POST body must be JSON (...)"
                raise InputError(f"{request.method} {e}", e.field, e.status) from None
        request.state.session, request.state.grant = session, grant

    def target(self):
        """The object the path names, resolved against its parents (called by
        :meth:`~server.auth.Authority.authorize` once the session is valid)."""
        request = self.request
        t = resolve_target(self.srv, request.path_params, request.query_params)
        if self.scopes is not None and t.scopes is None:
            t.scopes = self.resolved[:] = [x for x in self.scopes(request) if x]
        request.state.target = t
        return t

    def fallback_resource(self):
        p = self.request.path_params
        return (p.get("slide") or p.get("series") or self.request.query_params.get("target")
                or p.get("study"))

    async def audit(self, outcome: str, status: int, message: str | None = None) -> None:
        request = self.request
        t = request.state.target
        query_ = {k: v for k, v in request.query_params.items() if k not in ("cid", "cclose")}
        detail = {"method": request.method, "path": request.url.path,
                  **({"query": query_} if query_ else {}),
                  **({"served": t.served()} if t is not None else {}),
                  **request.state.audit, **({"error": message} if message else {})}
        resource = (t.resource if t is not None else None) or \
            (self.resolved[0] if self.resolved else None) or self.fallback_resource()
        try:
            await run_in_threadpool(
                self.srv.auth.audit, user=self.who["user"], session=self.who["session"],
                peer=self.peer, action=self.action, resource=resource, outcome=outcome,
                status=status, detail=detail)
        except Exception:  # noqa: BLE001 - the answer still goes out
            log.exception("audit failed for %s %s", request.method, request.url.path)

    def note_session(self, e: Exception, *, unless_known: bool = False) -> None:
        """Who asked, from a failure that carries the session (raised after it was
        checked)."""
        session = getattr(e, "session", None)
        if isinstance(session, Session) and not (unless_known and self.who["user"] is not None):
            self.who.update(user=session.user, session=session.serial)

    async def failure(self, e: Exception):
        """The JSON error of a failure, audited: its status, and for an unexpected one
        a 500 without details (logged)."""
        request = self.request
        if isinstance(e, AuthError):
            self.note_session(e)
            await self.audit("denied", e.status, str(e))
            return error(e.status, str(e), **e.extra)
        if isinstance(e, (InputError, BadParam, NotFound)):
            self.note_session(e)
            await self.audit("not-found" if e.status == 404 else "error", e.status, str(e))
            return error(e.status, str(e), field=e.field)
        if isinstance(e, (RequestError, DiagnosisError)):
            self.note_session(e, unless_known=True)      # (raised resolving the path)
            await self.audit("denied" if e.status == 403 else "error", e.status, str(e))
            return error(e.status, str(e), **e.extra)
        if isinstance(e, QueryError):
            await self.audit("error", 400, str(e))
            return error(400, str(e))
        if isinstance(e, StorageFull):                 # a full disk: writes only
            await self.audit("error", 507, str(e))
            return storage_full_error(e)
        if isinstance(e, (StoreError, CodestreamError, PolicyError)):
            log.error("store problem: %s", e)
            await self.audit("error", 500, str(e))
            return error(500, f"stored data is damaged or missing: {e}")
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=e)
        self.note_session(e, unless_known=True)
        await self.audit("error", 500, f"unhandled {type(e).__name__}")
        return error(500, "internal server error (logged and audited)")
