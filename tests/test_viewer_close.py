"""Closing the app never waits on the network on the UI thread (issue 12): the logout,
the bundled server stopping and the cache closing run on a shutdown thread."""
from __future__ import annotations

import json
import logging
import socket
import threading

import pytest

from viewer.services import Backend
from waits import WAIT_S


class HangingServer:
    """A loopback HTTP server that answers the login and then hangs: every later request
    is read and never answered until :meth:`close` (a server that stopped answering)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.hanging = threading.Event()        # a request is waiting for an answer
        self.release = threading.Event()
        self.logged_in = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                if self.logged_in:
                    self.hanging.set()
                    self.release.wait()
                    return
                self.logged_in = True
                body = json.dumps({"session": "a-session"}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.release.set()
        self.sock.close()


def test_close_in_background_returns_while_the_server_does_not_answer(tmp_path, caplog):
    srv = HangingServer()
    backend = Backend(cache_path=tmp_path / "cache" / "packets.sqlite")
    try:
        backend.open_cache()
        backend.login(srv.url)                   # logged in: closing will log out
        assert backend.session.id == "a-session"
        with caplog.at_level(logging.WARNING, logger="medview.services"):
            done = backend.close_in_background()
            assert backend.closed and backend.pool.closed    # no new jobs from now on
            assert srv.hanging.wait(WAIT_S)     # the logout is waiting on the server ...
            assert not done.is_set()             # ... and close_in_background did not
            assert backend.wait_closed(WAIT_S)   # the 2 s logout timeout ends it
        assert backend.shutdown_step == "done"
        assert backend.cache._closed
        assert any("logout from" in r.getMessage() and "did not answer" in r.getMessage()
                   for r in caplog.records)
        assert backend.close_in_background() is done          # closing twice: one close
    finally:
        srv.close()
        backend.close()


def test_close_in_background_stops_the_owned_server_and_closes_the_cache(tmp_path, ct_store):
    import requests

    from policyutil import copy_store
    from server.embedded import EmbeddedServer

    srv = EmbeddedServer(str(copy_store(ct_store, tmp_path / "store"))).start()
    backend = Backend(cache_path=tmp_path / "cache" / "packets.sqlite")
    backend.adopt_server(srv, own=True)
    backend.login(srv.url)
    cache = backend.cache
    assert cache is not None
    backend.close_in_background()
    assert backend.wait_closed(WAIT_S)
    assert backend.server is None and cache._closed and backend.session.id is None
    try:
        requests.get(f"{srv.url}/api/health", timeout=2)
        raise AssertionError("the owned server still answers after closing")
    except requests.ConnectionError:
        pass


def test_the_window_makes_no_request_on_the_ui_thread(qtbot, tmp_path, server, ct_series_uid):
    """Connect, browse, open a series, open MPR (its series described in the pool), close:
    with the guard on, any request from the UI thread raises (and fails the test)."""
    from client.series_loader import SeriesRegistry
    from client.session import UI_THREAD_GUARD, UIThreadRequest, assert_off_ui_thread
    from test_viewer_app import connect, make_window, open_and_wait_idle
    from waits import WAIT_MS

    with assert_off_ui_thread():
        with pytest.raises(UIThreadRequest):         # the guard works: here is the UI thread
            UI_THREAD_GUARD.check("GET", "/api/health")
        win = make_window(qtbot, tmp_path, cache_path=tmp_path / "cache" / "packets.sqlite")
        try:
            connect(qtbot, win, server.url)
            open_and_wait_idle(qtbot, win, ct_series_uid)
            win.series_ctl.close_loader()
            # a registry that has not described the series: MPR must ask the server
            win.backend.registry = SeriesRegistry(win.backend.session, win.backend.cache)
            win.threed.open_mpr()
            qtbot.waitUntil(lambda: bool(win.threed.windows), timeout=WAIT_MS)
        finally:
            win.close()
        assert win.backend.wait_closed(WAIT_S)
