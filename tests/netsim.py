"""Test helper: a slow link on loopback (packet streams arrive in small, late pieces)."""
from __future__ import annotations

import time


def slow_packet_streams(monkeypatch, piece: int = 4096, delay: float = 0.004) -> None:
    """Patch :meth:`client.session.Session.packet_stream` so every response body arrives
    ``piece`` bytes at a time, ``delay`` seconds apart (about 1 MB/s by default)."""
    from client.session import Session

    original = Session.packet_stream

    def packet_stream(self, params, model=None):
        resp = original(self, params, model)
        inner = resp.iter_content

        def iter_content(chunk_size=32768, **kw):
            for chunk in inner(chunk_size=chunk_size, **kw):
                for k in range(0, len(chunk), piece):
                    time.sleep(delay)
                    yield chunk[k:k + piece]
        resp.iter_content = iter_content
        return resp

    monkeypatch.setattr(Session, "packet_stream", packet_stream)
