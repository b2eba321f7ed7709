"""Whole frames in a final-copy codec (SPEC H1): HTJ2K for full-quality volume loads.

For a whole-volume load at full quality (MPR, VR, cine at lossless) two routes give the
same stored values, bit for bit:

(a) the rest of the layered JPEG 2000 transport (packets; what the cache lacks), decoded
    by OpenJPEG (:mod:`client.decode`), or
(b) each frame's HTJ2K copy, fetched whole through WADO-RS
    (``GET /dicomweb/.../frames/N`` with ``Accept: image/jphc;
    transfer-syntax=1.2.840.10008.1.2.4.202``; the server sends its final copy as stored,
    or transcodes) and decoded by OpenJPH, 13–26× faster but ~7 % more bytes, none of
    which the cache holds.

:func:`choose_full_load` estimates both end to end — transfer and decode overlap, so each
takes the longer of the two — from the measured link rate and what the cache already
holds, and picks the sooner. Against bench/codecs.py's measurement (100 x 512², 19.8 MB)
the model gives J2K 3.1 / 3.5 / 16.6 s and HTJ2K 0.3 / 1.8 / 17.0 s on loopback, 100 and
10 Mbit/s (measured 3.2 / 2.5 / 16.3 and 0.3 / 1.7 / 16.8 s). The rates come from ``bench/codecs.py`` (:data:`RATES`).
:func:`fetch_series_frames` (every frame of the series in one multipart/related answer,
the series' Pixel Data resource; :func:`fetch_frame` one frame per request, where the
server lacks it) and :func:`decode_frame` are the route (b).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from codestream import codecs

HTJ2K_SYNTAX = codecs.HTJ2K_LOSSLESS_RPCL
HTJ2K_MEDIA = "image/jphc"

#: Measured by bench/codecs.py on the sample CT (100 x 512², 2 cores): decode rate in
#: pixels/s of the whole client (4 threads) and the HTJ2K copy's size against the
#: layered J2K codestream.
RATES = {
    "j2k_decode_px_s": 8.5e6,      # glymur/OpenJPEG, the transport's decode (~32 images/s)
    "htj2k_decode_px_s": 95e6,     # OpenJPH (~360 images/s)
    "htj2k_size_ratio": 1.07,      # HTJ2K lossless bytes / layered J2K bytes
    "overlap_penalty": 0.25,       # transfer and decode overlap, not wholly: the longer
}                                  # of the two plus this share of the shorter


@dataclass(frozen=True)
class FullLoadChoice:
    """The route of a full-quality volume load and why."""

    route: str                 # "htj2k" | "j2k"
    j2k_seconds: float         # estimated end to end, the layers the cache lacks
    htj2k_seconds: float       # estimated end to end, every frame's HTJ2K copy
    j2k_bytes: int             # bytes still to fetch through the transport
    htj2k_bytes: int           # estimated bytes of the HTJ2K copies
    link_bytes_s: float | None
    reason: str


def choose_full_load(images: list[dict], held: list[int], link_bytes_s: float | None, *,
                     rates: dict | None = None) -> FullLoadChoice:
    """Pick the sooner route for loading ``images`` (``series_images`` rows) whole and
    lossless. ``held``: bytes of each image the client already holds (the packet
    cache); ``link_bytes_s``: the measured link rate (None: unknown — the transport,
    whose bytes the cache keeps)."""
    r = {**RATES, **(rates or {})}
    total = sum(int(im.get("total_bytes") or 0) for im in images)
    remaining = max(0, total - sum(held))
    pixels = sum(int(im["Rows"]) * int(im["Columns"]) for im in images)
    ht_bytes = int(total * r["htj2k_size_ratio"])
    if link_bytes_s is None or link_bytes_s <= 0:
        return FullLoadChoice("j2k", float("nan"), float("nan"), remaining, ht_bytes, None,
                              "link rate not measured yet: the layered transport")
    def both(transfer: float, decode: float) -> float:
        return max(transfer, decode) + r["overlap_penalty"] * min(transfer, decode)

    t_j2k = both(remaining / link_bytes_s, pixels / r["j2k_decode_px_s"])
    t_ht = both(ht_bytes / link_bytes_s, pixels / r["htj2k_decode_px_s"])
    route = "htj2k" if t_ht < t_j2k else "j2k"
    why = (f"{'HTJ2K copies' if route == 'htj2k' else 'J2K layers'} sooner: J2K "
           f"{remaining / 1e6:.1f} MB to fetch, ~{t_j2k:.2f} s; HTJ2K {ht_bytes / 1e6:.1f} MB, "
           f"~{t_ht:.2f} s at {link_bytes_s * 8 / 1e6:.0f} Mbit/s")
    return FullLoadChoice(route, t_j2k, t_ht, remaining, ht_bytes, link_bytes_s, why)


def frame_path(study_uid: str, series_uid: str, sop_uid: str, frame: int) -> str:
    return (f"/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
            f"/frames/{int(frame)}")


_MEDIA = {codecs.HTJ2K_LOSSLESS_RPCL: HTJ2K_MEDIA, codecs.HTJ2K_LOSSLESS: HTJ2K_MEDIA,
          codecs.JPEGLS_LOSSLESS: "image/jls", codecs.JPEGXL_LOSSLESS: "image/jxl"}
_LOCATION = re.compile(r"/instances/([^/]+)/frames/(\d+)\s*$")


def iter_multipart(chunks: Iterable[bytes], boundary: str) -> Iterator[tuple[dict, bytes]]:
    """The parts of a multipart/related body as its chunks arrive: (headers with
    lower-case names, content). Raises ValueError when the body ends before its closing
    delimiter (a cut answer: the server failed on the way)."""
    delim = b"\r\n--" + boundary.encode("latin-1")
    buf = bytearray(b"\r\n")           # the first delimiter has no CRLF of its own
    start = None                        # where the current part begins in buf
    search = 0
    it = iter(chunks)
    while True:
        i = buf.find(delim, search)
        if i < 0:
            chunk = next(it, None)
            if chunk is None:
                raise ValueError("the multipart answer ended before its closing delimiter")
            search = max(0, len(buf) - len(delim) + 1)
            buf += chunk
            continue
        if len(buf) < i + len(delim) + 2:   # what follows the delimiter not here yet
            chunk = next(it, None)
            if chunk is None:
                raise ValueError("the multipart answer ended inside a delimiter")
            buf += chunk
            continue
        if start is not None:
            head, sep, body = bytes(buf[start:i]).partition(b"\r\n\r\n")
            if not sep:
                raise ValueError("a multipart part without its header block")
            headers = {}
            for line in head.decode("latin-1").split("\r\n"):
                k, _, v = line.partition(":")
                if k.strip():
                    headers[k.strip().lower()] = v.strip()
            yield headers, body
        after = bytes(buf[i + len(delim):i + len(delim) + 2])
        if after == b"--":
            return
        if after != b"\r\n":
            raise ValueError("a malformed multipart delimiter line")
        del buf[:i + len(delim) + 2]
        start, search = 0, 0


def fetch_series_frames(session, study_uid: str, series_uid: str, syntax: str = HTJ2K_SYNTAX,
                        ) -> tuple[object, Iterator[tuple[str, int, bytes]]]:
    """Every frame of a series in ``syntax``, in one request (the series' Pixel Data
    resource, ``GET .../series/{uid}/pixeldata``, one multipart/related answer):
    (the open response — the caller closes it —, an iterator of (SOP Instance UID, frame
    number, frame bytes) as the parts arrive). Raises the session's ServerError (403
    without an unlimited grant, 404 where the server lacks the resource, 406 when the
    syntax cannot hold an image); the iterator raises ValueError for a cut answer or a
    part in another syntax."""
    media = _MEDIA[syntax]
    resp = session.request("GET", f"/dicomweb/studies/{study_uid}/series/{series_uid}/pixeldata",
                           headers={"Accept": f'multipart/related; type="{media}"; '
                                              f"transfer-syntax={syntax}"}, stream=True)
    ctype = resp.headers.get("content-type", "")
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    if not ctype.startswith("multipart/related") or m is None:
        resp.close()
        raise ValueError(f"asked multipart/related {media}, got {ctype!r}")

    def frames() -> Iterator[tuple[str, int, bytes]]:
        for headers, body in iter_multipart(resp.iter_content(1 << 18), m.group(1)):
            got = headers.get("content-type", "")
            if not got.startswith(media) or f"transfer-syntax={syntax}" not in got:
                raise ValueError(f"asked {media} {syntax}, got a part in {got!r}")
            loc = _LOCATION.search(headers.get("content-location", ""))
            if loc is None:
                raise ValueError("a frame part without its Content-Location")
            yield loc.group(1), int(loc.group(2)), body
    return resp, frames()


def fetch_frame(session, study_uid: str, series_uid: str, sop_uid: str, frame: int,
                syntax: str = HTJ2K_SYNTAX) -> bytes:
    """One frame in ``syntax`` as a single part (raises the session's ServerError, e.g.
    403 when the grant is not unlimited, 406 when the syntax cannot hold the image)."""
    media = _MEDIA[syntax]
    resp = session.request("GET", frame_path(study_uid, series_uid, sop_uid, frame),
                           headers={"Accept": f"{media}; transfer-syntax={syntax}"})
    got = resp.headers.get("content-type", "")
    if not got.startswith(media) or f"transfer-syntax={syntax}" not in got:
        raise ValueError(f"asked {media} {syntax}, got {got!r}")
    return resp.content


def decode_frame(data: bytes, image: dict, syntax: str = HTJ2K_SYNTAX) -> np.ndarray:
    """The stored values of a frame (``series_images`` row ``image``), as the transport's
    decode gives them: signed stays signed, before rescale."""
    arr = codecs.get(syntax).decode(data, signed=bool(image.get("signed")),
                                    bits_stored=image.get("bits_stored"))
    if arr.shape[:2] != (int(image["Rows"]), int(image["Columns"])):
        raise ValueError(f"frame decoded as {arr.shape}, the image is "
                         f"{image['Rows']}x{image['Columns']}")
    return arr
