"""HTTP session with the image server: login, catalogue browsing, packet streams."""
from __future__ import annotations

from typing import Any

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


class Session:
    """One logged-in session. Thread-safe for concurrent requests (requests.Session
    pools connections per host)."""

    def __init__(self, base_url: str, username: str = DEFAULT_USER, password: str | None = None,
                 timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.timeout = timeout
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
        kw.setdefault("timeout", self.timeout)
        headers = kw.pop("headers", {})
        if self.id:
            headers["Authorization"] = f"Bearer {self.id}"
        try:
            resp = self.http.request(method, self._url(path), headers=headers, **kw)
        except requests.ConnectionError as e:
            raise ConnectionFailed(self.base_url, e) from None
        _raise_for(resp)
        return resp

    def get_json(self, path: str, **params) -> Any:
        return self.request("GET", path, params=params).json()

    # ------------------------------------------------------------------ API
    def login(self, password: str | None = None) -> None:
        self.id = None
        body = {"username": self.username, "password": password}
        self.id = self.request("POST", "/api/login", json=body).json()["session"]

    def logout(self) -> None:
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
