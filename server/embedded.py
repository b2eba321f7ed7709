"""Run the HTTP server inside this process, on a background thread.

Used by the desktop app (bundled server on a free loopback port) and by tests. The
socket is bound before the thread starts, so the port is known at once. This is the one
server where the password-less ``local`` user exists (from loopback only).
"""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from .app import create_app
from .store import Store


class EmbeddedServer:
    def __init__(self, store_dir: str, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning", *, allow_local: bool = True,
                 trusted_proxies=()) -> None:
        self.store = Store(store_dir)
        # the desktop's own server has the password-less local user (tests may say no)
        self.app = create_app(self.store, allow_local=allow_local,
                              trusted_proxies=trusted_proxies)
        # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets
        # whose proto says TCP, and accepted sockets inherit the listener's; with proto 0
        # every response written in two parts (headers, body) waited for the client's
        # delayed ACK: 40 ms per request on loopback (issue 15)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        config = uvicorn.Config(self.app, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=2, proxy_headers=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="medview-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        self._server.run(sockets=[self._sock])

    def start(self, timeout: float = 20.0) -> "EmbeddedServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the embedded image server did not start")
            time.sleep(0.02)
        return self

    dicom = None                      # a server.dimse.DimseServer while enabled

    def set_dicom(self, port: int, ae_title: str = "MEDVIEW", host: str = "127.0.0.1") -> None:
        """Run the DICOM SCP on ``port`` (0: stop it) next to the HTTP server."""
        from .dimse import DimseServer

        if self.dicom is not None:
            if (port and self.dicom.port == port and self.dicom.ae_title == ae_title):
                return
            self.dicom.stop()
            self.dicom = None
        if port:
            self.dicom = DimseServer(self.store, ae_title=ae_title, host=host, port=port).start()

    def stop(self) -> None:
        if self.dicom is not None:
            self.dicom.stop()
            self.dicom = None
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
        self.store.close()

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
