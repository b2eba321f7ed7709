"""JSON answers of the HTTP API: the error body every route uses, and JSON with gzip when
the client accepts it (series metadata and QIDO answers; never packet streams)."""
from __future__ import annotations

import gzip
import json
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response


def error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status)


GZIP_MIN_BYTES = 1024


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (``gzip`` or ``*`` with q > 0)."""
    for part in accept_encoding.split(","):
        name, _, params = part.partition(";")
        if name.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        return q > 0
    return False


def json_response(request: Request, payload, media_type: str = "application/json") -> Response:
    """A JSON answer, gzip-compressed (``Content-Encoding: gzip``) when the client accepts
    it and the body is worth compressing: series metadata is about 1 kB per image and
    shrinks about eight times, which matters when it is part of the first preview.
    Packet streams are never compressed (JPEG 2000 data does not shrink)."""
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")
    headers = {"Vary": "Accept-Encoding"}
    if len(body) >= GZIP_MIN_BYTES and accepts_gzip(request.headers.get("accept-encoding", "")):
        body = gzip.compress(body, compresslevel=6, mtime=0)
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=media_type, headers=headers)


class _LRU:
    """A small thread-safe LRU with a byte budget."""


log = logging.getLogger("medview.server")


def storage_full_error(exc: Exception) -> JSONResponse:
    """507 Insufficient Storage: a write refused for lack of space; reads go on."""
    log.error("write refused: %s", exc)
    return error(507, f"{exc}: reading goes on; storing anything needs free space on the "
                      f"store's disk", read_only=True)
