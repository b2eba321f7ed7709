"""Whole frames in a final-copy codec (SPEC H1): HTJ2K for full-quality volume loads.

For a whole-volume load at full quality (MPR, VR, cine at lossless) two routes give the
same stored values, bit for bit:

(a) the rest of the layered JPEG 2000 transport (packets; what the cache lacks), decoded
    by OpenJPEG (:mod:`client.decode`), or
(b) each frame's HTJ2K copy, fetched whole through WADO-RS
    (``GET /dicomweb/.../frames/N`` with ``Accept: image/jphc;
    transfer-syntax=1.2.840.10008.1.2.4.202``; the server sends its final copy as stored,
    or transcodes) and decoded by OpenJPH: a 512² CT frame in 1.5 ms of CPU against
    OpenJPEG's 25.8 ms for the whole J2K, but ~6 % more bytes, none of which the cache
    holds.

:func:`choose_full_load` estimates both end to end as the loader runs them
(:mod:`client.volume_loader`), and picks the sooner:

* the layers: the J2K previews still ahead (their request, their bytes, the decodes of
  their renders), then the full stage's transfer of what the cache lacks, with a decode of
  every image at each layer the server recommends while the rest arrives (a decode
  running when a later recommendation comes delays it: the latest wins), and the decode
  of all layers after the last byte — decoding does not overlap the last layer's transfer;
* the copies: one request, 6 % more bytes than the whole J2K (none held), each frame
  decoded while the next arrives; the further J2K previews are left out.

The decode costs are CPU seconds measured on this machine (:data:`RATES`), spread over
the cores. Against bench/codecs.py ``--viewer-only`` (100 x 512², 19.8 MB; see the
report in the commit) the copies win on loopback, 100 and 10 Mbit/s; the layers win
where the cache already holds most of them on a slow link.
:func:`fetch_series_frames` (every frame of the series in one multipart/related answer,
the series' Pixel Data resource; :func:`fetch_frame` one frame per request, where the
server lacks it) and :func:`decode_frame` are the route (b).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from codestream import codecs

HTJ2K_SYNTAX = codecs.HTJ2K_LOSSLESS_RPCL
HTJ2K_MEDIA = "image/jphc"

#: The cost model's constants. CPU seconds, measured on this machine (2 cores) by
#: ``bench/full_load_rates.py`` on the sample CT (512², 12 bits, the transport's 4-layer
#: codestream and the converter's HTJ2K RPCL copy): one decode on one thread
#: (``time.process_time``; CPU time, unlike wall time, does not change with the other
#: work on a shared machine). The J2K decode fits ``per_px * pixels + per_byte * bytes``
#: over 1..4 layers (2.6, 4.5, 8.9, 25.8 ms at 10, 26, 65, 198 kB). The per-image apply
#: costs (the rebuilt codestream, the copy into the volume; a preview render also fills
#: the slots around each slice) are the process CPU of the loader's own applies,
#: traced on a 100 x 512² load less the decodes. The model spreads CPU over
#: :func:`decode_cores`.
RATES = {
    "j2k_cpu_s_per_px": 4.3e-9,      # OpenJPEG (the transport's decode): per pixel ...
    "j2k_cpu_s_per_byte": 1.24e-7,   # ... and per byte of the layers decoded
    "htj2k_cpu_s_per_px": 5.7e-9,    # OpenJPH, lossless (1.5 ms a 512² frame)
    "apply_cpu_s": 1.0e-3,           # per image applied at full resolution (either route)
    "preview_apply_cpu_s": 6.0e-3,   # per image per render of a J2K preview, decode included
    "htj2k_size_ratio": 1.06,        # HTJ2K lossless bytes / layered J2K bytes (measured
                                     # again on the probe frame when the loader has one)
    "request_s": 0.03,               # one request's set-up (the server's plan, the round trip)
}


def decode_cores() -> int:
    """Cores the decodes spread over: the loader decodes 2 images at once, OpenJPEG
    with up to 4 threads each (client.decode)."""
    import os

    return max(1, min(4, os.cpu_count() or 1))


def cpu_share() -> float:
    """The share of the machine's cores a decode can expect now: cores over the
    1-minute load average (at most 1; 1 where the system does not say). On a shared
    machine the decodes slow down with the other work (the bench's J2K decode of 100
    512² slices: ~1.4 s alone, 6-8 s at a load of 10 on 2 cores), which the CPU seconds
    of :data:`RATES` do not show."""
    import os

    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 1.0
    return min(1.0, (os.cpu_count() or 1) / load) if load > 0 else 1.0


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
    previews_left_out: int = 0  # J2K preview stages the copies' route leaves out


def _layer_bytes(im: dict) -> list[int]:
    """Cumulative bytes of the image at 1..L layers, full resolution."""
    lb = [int(b) for b in (im.get("layer_bytes") or ())]
    total = int(im.get("total_bytes") or 0)
    return lb if lb and lb[-1] else [total]


def _j2k_full_stage(images: list[dict], held: list[int], link: float, r: dict,
                    cores: float) -> float:
    """Seconds of the full stage through the layers: the transfer of what ``held`` lacks,
    layer after layer across all images (``order=quality``); at each layer's end the
    server recommends a render and the loader decodes every image at that layer unless
    it is still busy with an earlier one (then the latest recommendation waits); the
    last decode (all layers) follows the last byte."""
    lbs = [_layer_bytes(im) for im in images]
    nl = max(len(lb) for lb in lbs)
    pixels = [int(im["Rows"]) * int(im["Columns"]) for im in images]

    def cum(q: int) -> int:           # bytes to fetch until every image has q layers
        return sum(max(0, lb[min(q, len(lb)) - 1] - h) for lb, h in zip(lbs, held))

    def decode(q: int) -> float:
        cpu = sum(px * r["j2k_cpu_s_per_px"] + lb[min(q, len(lb)) - 1] * r["j2k_cpu_s_per_byte"]
                  + r["apply_cpu_s"] for px, lb in zip(pixels, lbs))
        return cpu / cores

    arrive = [r["request_s"] + cum(q) / link for q in range(1, nl + 1)]
    free, applied = 0.0, 0
    while applied < nl:
        ready = [q for q in range(applied + 1, nl + 1) if arrive[q - 1] <= free]
        if not ready:
            free = arrive[applied]        # wait for the next layer
            continue
        q = max(ready)                    # coalesced: the latest recommendation wins
        free += decode(q)
        applied = q
    return free


def choose_full_load(images: list[dict], held: list[int], link_bytes_s: float | None, *,
                     previews: Sequence[tuple[Sequence[int], int, int]] = (),
                     htj2k_ratio: float | None = None, cores: int | None = None,
                     share: float = 1.0, rates: dict | None = None) -> FullLoadChoice:
    """Pick the sooner route for loading ``images`` (``series_images`` rows) whole and
    lossless. ``held``: bytes of each image the client already holds (the packet
    cache); ``link_bytes_s``: the measured link rate (None: unknown — the transport,
    whose bytes the cache keeps). ``previews``: (positions in ``images``, reduce,
    layers) of each J2K preview stage the layers' route still runs before the full stage and the copies'
    route leaves out (their bytes are part of what the cache lacks; their request and
    renders are the cost). ``htj2k_ratio``: the copies' bytes against the J2K, measured
    (default :data:`RATES`); ``cores``: default :func:`decode_cores`; ``share``: of
    those the decodes get (:func:`cpu_share`; 1: all)."""
    r = {**RATES, **(rates or {})}
    cores = (cores or decode_cores()) * min(1.0, max(share, 0.05))
    total = sum(int(im.get("total_bytes") or 0) for im in images)
    remaining = max(0, total - sum(held))
    ratio = htj2k_ratio if htj2k_ratio and htj2k_ratio > 0 else r["htj2k_size_ratio"]
    ht_bytes = int(total * ratio)
    if link_bytes_s is None or link_bytes_s <= 0:
        return FullLoadChoice("j2k", float("nan"), float("nan"), remaining, ht_bytes, None,
                              "link rate not measured yet: the layered transport")
    link = link_bytes_s
    # the layers: the previews still ahead, each a request, its bytes (the first layers
    # at its reduction: ~half the bytes per level less, an estimate; what they bring is
    # no longer to fetch in the full stage) and two renders (the server's first
    # consistent set, then the stage's own level)
    t_prev = 0.0
    held_after = list(held)
    for which, reduce, layers in previews:
        got = 0
        for i in which:
            lb = _layer_bytes(images[i])
            want = lb[min(max(1, layers or len(lb)), len(lb)) - 1] >> max(0, int(reduce))
            add = max(0, want - held_after[i])
            held_after[i] += add
            got += add
        t_prev += (r["request_s"] + got / link
                   + 2 * len(which) * r["preview_apply_cpu_s"] / cores)
    t_j2k = t_prev + _j2k_full_stage(images, held_after, link, r, cores)
    # the copies: one request, frames decoded while the next arrive (the reads and the
    # decodes share the pool), the last frame's decode after the last byte
    pixels = [int(im["Rows"]) * int(im["Columns"]) for im in images]
    cpu_ht = [px * r["htj2k_cpu_s_per_px"] + r["apply_cpu_s"] for px in pixels]
    t_ht = (r["request_s"] + max(ht_bytes / link, sum(cpu_ht) / cores)
            + (max(cpu_ht) if cpu_ht else 0.0))
    route = "htj2k" if t_ht < t_j2k else "j2k"
    left = (f", {len(previews)} J2K preview stage{'s' if len(previews) != 1 else ''} "
            "left out" if previews and route == "htj2k" else "")
    why = (f"{'HTJ2K copies' if route == 'htj2k' else 'J2K layers'} sooner: J2K "
           f"{remaining / 1e6:.1f} MB to fetch, ~{t_j2k:.2f} s (decode after the last "
           f"byte); HTJ2K {ht_bytes / 1e6:.1f} MB, ~{t_ht:.2f} s at "
           f"{link_bytes_s * 8 / 1e6:.0f} Mbit/s, decodes on {cores:.1f} cores{left}")
    return FullLoadChoice(route, t_j2k, t_ht, remaining, ht_bytes, link_bytes_s, why,
                          len(previews) if route == "htj2k" else 0)


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
    return _frame_request(session, study_uid, series_uid, sop_uid, frame, syntax).content


def _frame_request(session, study_uid: str, series_uid: str, sop_uid: str, frame: int,
                   syntax: str, stream: bool = False):
    """The answer to a request for one frame in ``syntax``, checked to be in it."""
    media = _MEDIA[syntax]
    resp = session.request("GET", frame_path(study_uid, series_uid, sop_uid, frame),
                           headers={"Accept": f"{media}; transfer-syntax={syntax}"}, stream=stream)
    got = resp.headers.get("content-type", "")
    if not got.startswith(media) or f"transfer-syntax={syntax}" not in got:
        resp.close()
        raise ValueError(f"asked {media} {syntax}, got {got!r}")
    return resp


def probe_frame(session, study_uid: str, series_uid: str, sop_uid: str, frame: int,
                syntax: str = HTJ2K_SYNTAX, chunk: int = 16384) -> tuple[bytes, float]:
    """One frame in ``syntax`` (as :func:`fetch_frame`) and the link rate it shows, in
    bytes/s: the body after its first chunk over the time it took to arrive — the
    server's time before the first byte left out (under load it is most of a small
    frame's time, and would make a fast link look slow); the whole answer's rate where
    the body came at once (loopback)."""
    import time

    t0 = time.monotonic()
    resp = _frame_request(session, study_uid, series_uid, sop_uid, frame, syntax, stream=True)
    try:
        parts, first, t1 = [], 0, None
        for c in resp.iter_content(chunk):
            if t1 is None:
                t1, first = time.monotonic(), len(c)
            parts.append(c)
        t2 = time.monotonic()
    finally:
        resp.close()
    data = b"".join(parts)
    rest = len(data) - first
    if t1 is not None and rest >= len(data) // 2 and t2 - t1 > 1e-3:
        return data, rest / (t2 - t1)
    return data, len(data) / max(t2 - t0, 1e-6)


def decode_frame(data: bytes, image: dict, syntax: str = HTJ2K_SYNTAX) -> np.ndarray:
    """The stored values of a frame (``series_images`` row ``image``), as the transport's
    decode gives them: signed stays signed, before rescale."""
    arr = codecs.get(syntax).decode(data, signed=bool(image.get("signed")),
                                    bits_stored=image.get("bits_stored"))
    if arr.shape[:2] != (int(image["Rows"]), int(image["Columns"])):
        raise ValueError(f"frame decoded as {arr.shape}, the image is "
                         f"{image['Rows']}x{image['Columns']}")
    return arr
