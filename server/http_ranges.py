"""HTTP Range requests (RFC 9110 §14) on a representation held in memory.

:func:`range_response` answers a GET for ``body`` (bytes of one media type):

* no ``Range`` header, a header that is not ``bytes=...`` or that cannot be parsed, or
  an ``If-Range`` that does not match the ETag: ``200`` with the whole body (a server
  may ignore a Range it does not understand, §14.2);
* one satisfiable range: ``206`` with ``Content-Range: bytes a-b/len``;
* several: ``206`` ``multipart/byteranges`` (each part with its own Content-Type and
  Content-Range); overlapping or adjacent ranges are coalesced first, and more than
  :data:`MAX_RANGES` ranges are answered with the whole body (a guard against many
  tiny ranges, §14.2);
* none satisfiable: ``416`` with ``Content-Range: bytes */len``.

Every answer carries ``Accept-Ranges: bytes`` and a strong ETag (the SHA-256 of the
body), so a client can check that a later range comes from the same representation.
"""
from __future__ import annotations

import hashlib
import re
import secrets

from starlette.responses import Response

MAX_RANGES = 32
_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


def parse_range(header: str | None, length: int) -> list[tuple[int, int]] | None:
    """``bytes=a-b, c-, -n`` → [(start, end inclusive)] of the satisfiable ranges, sorted
    and coalesced; None when the header is absent or unusable (answer the whole body);
    [] when nothing is satisfiable (416)."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec.strip():
        return None
    out: list[tuple[int, int]] = []
    items = spec.split(",")
    if len(items) > MAX_RANGES:
        return None
    for item in items:
        m = _SPEC.match(item)
        if not m or (not m.group(1) and not m.group(2)):
            return None                       # a syntax error: ignore the whole header
        a, b = m.group(1), m.group(2)
        if a:
            start = int(a)
            end = int(b) if b else length - 1
            if b and end < start:
                return None
            if start >= length:
                continue                      # unsatisfiable, the others may still be
            out.append((start, min(end, length - 1)))
        else:
            n = int(b)
            if n == 0 or length == 0:
                continue
            out.append((max(0, length - n), length - 1))
    out.sort()
    merged: list[tuple[int, int]] = []
    for s, e in out:
        if merged and s <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def range_response(request_headers, body: bytes, media_type: str,
                   headers: dict | None = None) -> Response:
    """The answer to a (possibly ranged) GET of ``body`` (see the module doc)."""
    tag = etag_of(body)
    base = {**(headers or {}), "Accept-Ranges": "bytes", "ETag": tag}
    header = request_headers.get("range")
    if_range = request_headers.get("if-range")
    if header and if_range and if_range.strip() != tag:
        header = None                          # the representation changed: all of it
    ranges = parse_range(header, len(body))
    if ranges is None:
        return Response(body, media_type=media_type, headers=base)
    if not ranges:
        return Response(b"", status_code=416,
                        headers={**base, "Content-Range": f"bytes */{len(body)}"})
    if len(ranges) == 1:
        s, e = ranges[0]
        return Response(body[s:e + 1], status_code=206, media_type=media_type,
                        headers={**base, "Content-Range": f"bytes {s}-{e}/{len(body)}"})
    boundary = secrets.token_hex(16)
    chunks = []
    for s, e in ranges:
        chunks.append(f"--{boundary}\r\nContent-Type: {media_type}\r\n"
                      f"Content-Range: bytes {s}-{e}/{len(body)}\r\n\r\n".encode())
        chunks.append(body[s:e + 1])
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return Response(b"".join(chunks), status_code=206,
                    media_type=f"multipart/byteranges; boundary={boundary}", headers=base)


def parse_byteranges(body: bytes, content_type: str) -> list[tuple[int, int, int, bytes]]:
    """A ``multipart/byteranges`` body → [(start, end, length, bytes)] (for clients and
    tests)."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ValueError("multipart/byteranges without a boundary")
    delim = b"--" + m.group(1).encode()
    out = []
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        cr = re.search(rb"Content-Range:\s*bytes (\d+)-(\d+)/(\d+)", head, re.I)
        if not cr:
            raise ValueError("a byteranges part without Content-Range")
        s, e, n = (int(x) for x in cr.groups())
        out.append((s, e, n, data[:e - s + 1]))
    return out
