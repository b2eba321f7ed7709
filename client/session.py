"""HTTP session with the image server: login, catalogue browsing, packet streams."""
from __future__ import annotations

import os
import random
import threading
from typing import Any, Callable

import requests

from .link import LinkMeter

DEFAULT_USER = "local"


class ServerError(Exception):
    """The server answered with an error (status and the server's own message)."""

    def __init__(self, status: int, message: str, body: dict | None = None):
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.message = message
        self.body = body or {}


class ConnectionFailed(ServerError):
    def __init__(self, url: str, cause: Exception):
        super().__init__(0, f"cannot reach the image server at {url}: {cause}")


def _raise_for(resp: requests.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        msg = body.get("error") or resp.reason
    except ValueError:
        body, msg = None, resp.text[:200] or resp.reason
    raise ServerError(resp.status_code, msg, body)


#: A busy server (503 with Retry-After): at most this many repeats of one request, and
#: at most this long waiting for it in all, then the 503 is raised as a ServerError.
BUSY_RETRIES = 6
BUSY_MAX_WAIT_S = 60.0
BUSY_MAX_PAUSE_S = 15.0


def retry_after(resp: requests.Response) -> float | None:
    """The pause a 503 asks for (``Retry-After`` in seconds), None if not a busy answer."""
    if resp.status_code != 503:
        return None
    value = resp.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None                     # an HTTP date or nothing: not our server's busy


class UIThreadRequest(AssertionError):
    """A request was made on the UI (main) thread while the guard was on (a bug)."""


class _UIThreadGuard:
    """Debug check: while on, a request from the main thread (a Qt app's UI thread)
    raises :class:`UIThreadRequest`. On from the start with ``MEDVIEW_ASSERT_OFF_UI_THREAD=1``;
    tests turn it on around UI actions with :func:`assert_off_ui_thread`. Off, it costs
    one attribute test per request."""

    def __init__(self) -> None:
        self.on = os.environ.get("MEDVIEW_ASSERT_OFF_UI_THREAD", "") not in ("", "0")

    def check(self, method: str, path: str) -> None:
        if self.on and threading.current_thread() is threading.main_thread():
            raise UIThreadRequest(f"{method} {path} on the UI thread (run it in a worker)")


UI_THREAD_GUARD = _UIThreadGuard()


class assert_off_ui_thread:
    """``with assert_off_ui_thread():`` — requests from the main thread raise inside."""

    def __enter__(self) -> "assert_off_ui_thread":
        self._was, UI_THREAD_GUARD.on = UI_THREAD_GUARD.on, True
        return self

    def __exit__(self, *exc) -> None:
        UI_THREAD_GUARD.on = self._was


class Session:
    """One logged-in session. Thread-safe for concurrent requests (requests.Session
    pools connections per host).

    A busy server (503 with ``Retry-After``, :mod:`server.admission`) is asked again
    after the pause it gives (plus a little jitter, at most ``BUSY_MAX_PAUSE_S``), up to
    ``BUSY_RETRIES`` times and ``BUSY_MAX_WAIT_S`` in all; ``on_busy(pause, attempt)`` is
    called (from the requesting thread) before each pause, so a viewer can say "server busy,
    retrying"."""

    def __init__(self, base_url: str, username: str = DEFAULT_USER, password: str | None = None,
                 timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.timeout = timeout
        self.on_busy: Callable[[float, int], None] | None = None
        self.busy_retries = BUSY_RETRIES
        self.busy_max_wait = BUSY_MAX_WAIT_S
        self._closing = threading.Event()
        self.http = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16)
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)
        self.id: str | None = None
        self.link = LinkMeter()            # throughput and latency of our own transfers
        self.http.hooks["response"].append(self.link.response_hook)
        self.login(password)

    # ------------------------------------------------------------------ plumbing
    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def request(self, method: str, path: str, **kw) -> requests.Response:
        if UI_THREAD_GUARD.on:
            UI_THREAD_GUARD.check(method, path)
        kw.setdefault("timeout", self.timeout)
        headers = kw.pop("headers", {})
        if self.id:
            headers["Authorization"] = f"Bearer {self.id}"
        waited = 0.0
        for attempt in range(1, self.busy_retries + 2):
            try:
                resp = self.http.request(method, self._url(path), headers=headers, **kw)
            except requests.ConnectionError as e:
                raise ConnectionFailed(self.base_url, e) from None
            pause = retry_after(resp)
            if pause is None or attempt > self.busy_retries or self._closing.is_set():
                break
            pause = min(BUSY_MAX_PAUSE_S, pause) * random.uniform(1.0, 1.25)
            if waited + pause > self.busy_max_wait:
                break
            _ = resp.content                # (small) kept for the error if the wait ends
            resp.close()
            if self.on_busy is not None:
                try:
                    self.on_busy(pause, attempt)
                except Exception:  # noqa: BLE001 - a display problem never stops a request
                    pass
            if self._closing.wait(pause):
                break
            waited += pause
        _raise_for(resp)
        return resp

    def get_json(self, path: str, **params) -> Any:
        return self.request("GET", path, params=params).json()

    # ------------------------------------------------------------------ API
    def login(self, password: str | None = None) -> None:
        self._closing.clear()
        self.id = None
        body = {"username": self.username, "password": password}
        self.id = self.request("POST", "/api/login", json=body).json()["session"]

    def logout(self) -> None:
        self._closing.set()             # no more waiting for a busy server
        if self.id:
            try:
                self.request("POST", "/api/logout")
            except ServerError:
                pass
            self.id = None
        self.http.close()

    def studies(self, **query) -> list[dict]:
        return self.get_json("/dicomweb/studies", format="json", **query)

    def series(self, study_uid: str | None = None, **query) -> list[dict]:
        if study_uid:
            return self.get_json(f"/dicomweb/studies/{study_uid}/series", format="json", **query)
        return self.get_json("/dicomweb/series", format="json", **query)

    def instances(self, study_uid: str, series_uid: str) -> list[dict]:
        return self.get_json(f"/dicomweb/studies/{study_uid}/series/{series_uid}/instances",
                             format="json")

    def series_images(self, series_uid: str) -> dict:
        """{"series": {...}, "images": [...]}: geometry, rescale, window and codestream
        facts (numres, nlayers, total_bytes, layer_bytes, key) for every image."""
        return self.get_json(f"/api/series/{series_uid}/images")

    def packet_stream(self, params: dict, model: dict | None = None) -> requests.Response:
        """Open a streaming packet response (caller iterates and closes it)."""
        params = {k: v for k, v in params.items() if v is not None}
        if model is not None:
            return self.request("POST", "/jpip", params=params, json={"model": model},
                                stream=True, timeout=(self.timeout, 120))
        return self.request("GET", "/jpip", params=params, stream=True, timeout=(self.timeout, 120))
