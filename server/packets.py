"""Packet requests: parse the JPIP-style fields, plan the increments, stream the response.

No HTTP here: :func:`parse_request` turns query fields into a :class:`PacketRequest`,
:func:`plan` turns it plus the session's cache model into a :class:`Plan` (the list of
increments and their byte counts, which is also the announcement), and
:func:`stream` yields the framed response records while updating the session model.

Request fields (JPIP names where JPIP has one):

``target``   Series Instance UID.
``comps``    Images of the series (the series' JPIP components): ``0-63``, ``0,4,9-12``.
             Default: all.
``layers``   Number of quality layers (1..max). Default: all.
``fsiz``     ``w,h``: smallest resolution at least this large (JPIP round-up).
``reduce``   Resolution levels to discard (0 = full). ``fsiz`` wins if both are given.
``roff``/``rsiz``  Region ``x,y`` / ``w,h`` in full-resolution pixels; in a JPP-stream
             request with ``fsiz``, in the frame of ``fsiz`` (JPIP C.4.3).
``order``    ``quality`` (every image at layer 1, then layer 2 ...), ``resolution``, or
             ``image`` (image by image).
``framing``  ``mv`` (records: JPP data + control messages, default) or ``jpp`` (bare
             JPP-stream for standard JPIP tooling).
``len``      Byte limit for the response (JPIP ``len``); the response stops at a packet
             boundary and ends with EOR "byte limit".
``type``     ``jpp-stream`` (JPIP): the bare JPP-stream, as ``framing=jpp``.
``stream``   JPIP codestream selection: ``0-9,12`` or ``0-63:4`` (every 4th); the images
             of the series are its codestreams. Instead of ``comps``.
``context``  JPIP codestream context: ``jpxl<ranges>`` (each image is its own compositing
             layer) or ``mj2t<1>`` (the series as one track = every image).
``cnew``     ``http``: open a channel; the answer names it in ``JPIP-cnew: cid=...``.
``cid``      The channel whose cache model this request extends (the login session id is
             accepted too: the session's own model, as for the framed protocol).
``cclose``   Channel ids (or ``*``) to close once this request is planned.
``tid``      Target id: ``0`` asks for it; the answer carries ``JPIP-tid`` (the Series
             Instance UID). A different id than the target's means the client's cache
             belongs to another target: the request is served as stateless.
``model``    JPIP cache model of the client (C.9): ``Hm``, ``H*``/``Ht``, ``P<id>``,
             ``P<id>:L<layers>`` or ``P<id>:<bytes>``, ``-`` to remove, ``[ranges]`` to
             name the codestreams of the descriptors that follow.
``need``     JPIP ``need``: only these data-bins (same descriptors as ``model``).
``compat``   ``openjpeg``: the tile-header data-bin laid out as OpenJPEG's JPIP tools
             read it (see docs/ARCHITECTURE.md), for ``opj_jpip_transcode``.
``wait``     ``yes`` (JPIP C.7.1): this request is answered completely before any later
             request on the same cache model (session and target, or channel) is
             planned; a later request waits (at most ``ORDERED_WAIT_S``) until this
             stream has ended. A client may so send its next request while this one
             still streams (pipelining) and nothing is sent twice. ``no``: default.

Cache models: the framed protocol (``framing=mv``) keeps the login session's model per
target (the project's client declares it once and relies on it). A JPP-stream request
(``framing=jpp`` / ``type=jpp-stream``) without a channel is *stateless* (JPIP B.1): it
sends everything asked minus what ``model`` declares; ``cnew``/``cid`` give it a channel
with its own model.
``version``  ``V1``/``V2``/``V3`` (names from the site policy) or ``auto``: the quality
             layers of that version of the series (SPEC V3); with ``layers`` too, the
             smaller wins.
``quality``  0-100: the cheapest version whose quality figure reaches it.
``purpose``  ``diagnosis``, ``reference``, ``comparison``: the version for that purpose.
             At most one of version / quality / purpose.

Rights (SPEC P7, V6): :func:`plan` takes the user's :class:`~server.rights.Grant`
and refuses (HTTP 403) a request that would send anything beyond it, naming the maximum
allowed; see :mod:`server.rights`.

Verification (issue 15): an image whose lossless layer is not verified yet
(``lossless_state`` pending, :mod:`server.verify`) is served without its last layer, one
whose verification failed not at all (``served_layers``); the announcement says each
image's ``lossless_state`` and the layers it will get.

Tiered storage (SPEC V7): an image whose lossless layers are in the archive has
``hot_layers`` set; the announcement lists the images that need a recall
(``"recall"``), and the stream sends a ``recalling`` control message before it waits for
the archive (after everything it could send from the hot store at that point of the
order), and ``recalled`` once the data is back.
"""
from __future__ import annotations

import json
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

from codestream import framing
from codestream.databins import openjpeg_tile_header, reduced_main_header, split_databins
from codestream.index import PacketIndex
from codestream.ranges import parse_ranges as _parse_ranges
from codestream.jpp import (EOR_BYTE_LIMIT, EOR_WINDOW_DONE, MAIN_HEADER, PRECINCT,
                            TILE_HEADER, JppMessage, JppWriter)
from codestream.layersplit import databins_from_head

from . import rights as _rights

ORDERS = ("quality", "resolution", "image")
RECORD_TARGET = 64 * 1024          # bytes of JPP data gathered into one DATA record


class RequestError(ValueError):
    """A malformed or out-of-range request field; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 400, **extra):
        super().__init__(message)
        self.status = status
        self.extra = extra


@dataclass
class ImageSource:
    """One image (codestream) of a series as the packet engine sees it."""

    csn: int                       # index within the series
    key: str                       # stable cache key: "<SOPInstanceUID>/<frame>"
    index: PacketIndex
    load: Callable[[], bytes]      # returns the verified codestream bytes (or its head)
    hot_layers: int | None = None  # layers held in the hot store; None = all of them
    recall: Callable[[], bytes] | None = None   # the whole codestream, from the archive
    # (layers, res) -> data-bins with at least those packets (range reads of a remote
    # object store); None: ``load`` the whole codestream
    load_part: Callable[[int, int], object] | None = None
    # layers that may be served (server.verify.layers_served): None = all; one fewer while
    # the lossless layer awaits its verification; 0 after a failed one
    served_layers: int | None = None
    lossless_state: str = "verified"

    def needs_recall(self, layers: int) -> bool:
        return self.hot_layers is not None and layers > self.hot_layers


@dataclass
class PacketRequest:
    target: str
    comps: list[int] | None = None
    layers: int | None = None
    fsiz: tuple[int, int] | None = None
    reduce: int | None = None
    region: tuple[int, int, int, int] | None = None      # x, y, w, h (full resolution)
    order: str = "quality"
    framing: str = "mv"
    max_bytes: int | None = None
    version: str | None = None                            # a version name or "auto"
    quality: int | None = None                            # 0-100
    purpose: str | None = None
    fsiz_round: str = "round-down"                        # JPIP default
    cnew: bool = False
    wait: bool = False                                    # JPIP wait=yes: later ones queue
    cid: str | None = None
    cclose: list[str] = field(default_factory=list)
    tid: str | None = None
    model: str | None = None                              # JPIP model field (C.9)
    need: str | None = None
    compat: str | None = None                             # "openjpeg"


def _ints(value: str, name: str, n: int) -> tuple[int, ...]:
    parts = value.split(",")
    if len(parts) != n:
        raise RequestError(f"{name} must be {n} comma-separated integers, got {value!r}")
    try:
        out = tuple(int(p) for p in parts)
    except ValueError:
        raise RequestError(f"{name} must be integers, got {value!r}") from None
    if any(v < 0 for v in out):
        raise RequestError(f"{name} must not be negative, got {value!r}")
    return out


def parse_ranges(value: str, name: str = "comps") -> list[int]:
    try:
        out = sorted(_parse_ranges(value))
    except ValueError:
        raise RequestError(f"{name} must be ranges like 0-9,12, got {value!r}") from None
    if not out:
        raise RequestError(f"{name} must name at least one image")
    return out


KNOWN_FIELDS = {"target", "comps", "layers", "fsiz", "reduce", "roff", "rsiz", "order",
                "framing", "len", "cid", "type", "version", "quality", "purpose",
                "cnew", "cclose", "tid", "stream", "context", "model", "need", "compat",
                "wait"}
FSIZ_ROUNDING = ("round-down", "round-up", "closest")


def _stream_ranges(value: str, name: str) -> list[int]:
    """JPIP codestream ranges: ``a-b`` / ``a`` / ``a-b:step``, comma separated."""
    out: set[int] = set()
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        rng, _, step = part.partition(":")
        try:
            st = int(step) if step else 1
            lo, _, hi = rng.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise RequestError(f"{name} must be ranges like 0-9,12 or 0-63:4, "
                               f"got {value!r}") from None
        if st < 1 or a < 0 or b < a:
            raise RequestError(f"{name}: bad range {part!r}")
        out.update(range(a, b + 1, st))
    if not out:
        raise RequestError(f"{name} must name at least one codestream")
    return sorted(out)


def _context_streams(value: str) -> list[int] | None:
    """``jpxl<ranges>`` -> those images; ``mj2t<1>`` -> every image (None)."""
    v = value.strip()
    if v.startswith("jpxl<") and v.endswith(">"):
        return _stream_ranges(v[5:-1], "context")
    if v.startswith("mj2t<") and v.endswith(">"):
        track = v[5:-1].split("+")[0]
        if track.strip() != "1":
            raise RequestError(f"context: a series is one track (mj2t<1>), got {value!r}",
                               status=416)
        return None
    raise RequestError(f"context must be jpxl<ranges> or mj2t<1>, got {value!r}")


def parse_request(q: dict[str, str]) -> PacketRequest:
    unknown = set(q) - KNOWN_FIELDS
    if unknown:
        raise RequestError(f"unknown request field(s): {', '.join(sorted(unknown))}")
    target = q.get("target")
    if not target:
        raise RequestError("target (a Series Instance UID) is required")
    req = PacketRequest(target=target)
    if "comps" in q:
        req.comps = parse_ranges(q["comps"])
    if "layers" in q:
        (req.layers,) = _ints(q["layers"], "layers", 1)
        if req.layers < 1:
            raise RequestError("layers must be at least 1")
    if "fsiz" in q:                                    # "w,h[,round-down|round-up|closest]"
        parts = q["fsiz"].split(",")
        if len(parts) == 3:
            req.fsiz_round = parts[2].strip()
            if req.fsiz_round not in FSIZ_ROUNDING:
                raise RequestError(f"fsiz rounding must be one of {', '.join(FSIZ_ROUNDING)}")
            parts = parts[:2]
        req.fsiz = _ints(",".join(parts), "fsiz", 2)
        if 0 in req.fsiz:
            raise RequestError("fsiz must be positive")
    if sum(k in q for k in ("comps", "stream", "context")) > 1:
        raise RequestError("select images with one of comps, stream or context")
    if "stream" in q:
        req.comps = _stream_ranges(q["stream"], "stream")
    if "context" in q:
        req.comps = _context_streams(q["context"])
    if "type" in q:
        types = [t.strip().split(";")[0] for t in q["type"].split(",")]
        if "jpp-stream" not in types:
            raise RequestError("type: this server sends jpp-stream only", status=415)
        if "framing" not in q:
            q = {**q, "framing": "jpp"}
    if "wait" in q:
        if q["wait"] not in ("yes", "no"):
            raise RequestError("wait must be yes or no")
        req.wait = q["wait"] == "yes"
    if "cnew" in q:
        if q["cnew"].strip() not in ("http", "http-tcp"):
            raise RequestError("cnew: this server offers the http transport only")
        req.cnew = True
    if q.get("cid"):
        req.cid = q["cid"].strip()
    if "cclose" in q:
        req.cclose = [c.strip() for c in q["cclose"].split(",") if c.strip()]
    if "tid" in q:
        req.tid = q["tid"].strip()
    if "model" in q:
        req.model = q["model"]
    if "need" in q:
        req.need = q["need"]
    if "compat" in q:
        if q["compat"] != "openjpeg":
            raise RequestError("compat: only openjpeg is known")
        req.compat = "openjpeg"
    if "reduce" in q:
        (req.reduce,) = _ints(q["reduce"], "reduce", 1)
    if ("roff" in q) != ("rsiz" in q):
        raise RequestError("roff and rsiz go together")
    if "roff" in q:
        x, y = _ints(q["roff"], "roff", 2)
        w, h = _ints(q["rsiz"], "rsiz", 2)
        if w == 0 or h == 0:
            raise RequestError("rsiz must be positive")
        req.region = (x, y, w, h)
    req.order = q.get("order", "quality")
    if req.order not in ORDERS:
        raise RequestError(f"order must be one of {', '.join(ORDERS)}")
    req.framing = q.get("framing", "mv")
    if req.framing not in ("mv", "jpp"):
        raise RequestError("framing must be mv or jpp")
    if "len" in q:
        (req.max_bytes,) = _ints(q["len"], "len", 1)
    if sum(k in q for k in ("version", "quality", "purpose")) > 1:
        raise RequestError("ask for one of version, quality or purpose, not several")
    if "version" in q:
        req.version = q["version"].strip()
        if not req.version:
            raise RequestError("version must not be empty")
    if "quality" in q:
        (req.quality,) = _ints(q["quality"], "quality", 1)
        if req.quality > 100:
            raise RequestError("quality is a percentage, 0-100")
    if "purpose" in q:
        req.purpose = q["purpose"].strip()
        if not req.purpose:
            raise RequestError("purpose must not be empty")
    return req


# --------------------------------------------------------------------------- model
class CacheModel:
    """What one session holds, per image key: header bins and layers per precinct bin.

    Thread-safe; shared by every request of a session.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._images: dict[str, dict] = {}
        self._ordered = threading.Condition()
        self._streams_ahead = 0          # wait=yes streams planned and not yet ended

    def begin_ordered(self) -> Callable[[], None]:
        """Register a ``wait=yes`` stream planned on this model; returns its release
        (idempotent), to be called when the stream has ended (completed, cancelled,
        never started)."""
        with self._ordered:
            self._streams_ahead += 1
        done = [False]

        def release() -> None:
            with self._ordered:
                if not done[0]:
                    done[0] = True
                    self._streams_ahead -= 1
                    self._ordered.notify_all()
        return release

    def wait_ordered(self, timeout: float) -> bool:
        """Block until no ``wait=yes`` stream of this model is running (False: timed
        out; the caller plans anyway, which at worst resends what is in flight)."""
        with self._ordered:
            return self._ordered.wait_for(lambda: self._streams_ahead == 0, timeout)

    def declare(self, images: dict[str, dict]) -> None:
        """Replace what is known of the target by the client's own declaration:
        ``{"<key>": {"h": 1, "b": {"<bin id>": layers}}}``; images not named are held
        by the client not at all (the server may have believed otherwise after a broken
        transfer)."""
        with self._lock:
            self._images.clear()
            for key, held in images.items():
                self._images[key] = {
                    "h": bool(held.get("h")),
                    "b": {int(b): int(n) for b, n in (held.get("b") or {}).items()},
                }

    def snapshot(self, key: str) -> tuple[bool, dict[int, int]]:
        with self._lock:
            m = self._images.get(key)
            return (m["h"], dict(m["b"])) if m else (False, {})

    def add_headers(self, key: str) -> None:
        with self._lock:
            self._images.setdefault(key, {"h": False, "b": {}})["h"] = True

    def add_layers(self, key: str, bins: dict[int, int]) -> None:
        with self._lock:
            m = self._images.setdefault(key, {"h": False, "b": {}})["b"]
            for b, n in bins.items():
                if n > m.get(b, 0):
                    m[b] = n


#: How long a request waits for earlier ``wait=yes`` streams on its model to end.
ORDERED_WAIT_S = 120.0


def ordered(body: Iterator[bytes], release: Callable[[], None]) -> Iterator[bytes]:
    """``body``, then ``release`` (also when the stream breaks off). A stream that is
    never started is released when it is garbage-collected."""
    def run() -> Iterator[bytes]:
        try:
            yield from body
        finally:
            release()
    gen = run()
    weakref.finalize(gen, release)
    return gen


# --------------------------------------------------------------------------- JPIP state
CHANNEL_KEY = "jpip-channel:"        # session.model key prefix of a channel's model
MAX_CHANNELS = 16                    # per session; the oldest is dropped beyond


def _split_model_items(spec: str) -> list[str]:
    """Split a JPIP model/need value at commas outside ``[...]``."""
    items, depth, cur = [], 0, []
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return [i.strip() for i in items if i.strip()]


def parse_bin_descriptors(spec: str, n_images: int, name: str = "model"):
    """JPIP bin descriptors (C.9.2) -> [(images, subtract, kind, bin id | None, limit)],
    ``kind`` "H" (main + tile header: ``Hm``, ``H0``, ``H*``) or "P" (a precinct,
    ``*`` = all), ``limit`` None (whole bin), ("L", layers) or ("B", bytes).
    Metadata and tile descriptors are accepted and ignored (no such bins here)."""
    out = []
    images: list[int] = list(range(n_images))
    for item in _split_model_items(spec):
        if item.startswith("["):
            close = item.find("]")
            if close < 0:
                raise RequestError(f"{name}: unbalanced [ in {item!r}")
            images = [i for i in _stream_ranges(item[1:close], name) if i < n_images]
            item = item[close + 1:].strip()
            if not item:
                continue
        sub = item.startswith("-")
        item = item.lstrip("-")
        body, _, qual = item.partition(":")
        limit = None
        if qual:
            try:
                limit = ("L", int(qual[1:])) if qual[:1] == "L" else ("B", int(qual))
            except ValueError:
                raise RequestError(f"{name}: bad qualifier in {item!r}") from None
        if not body:
            raise RequestError(f"{name}: empty descriptor")
        kind, ident = body[0], body[1:]
        if kind == "H" and ident in ("m", "*") or kind == "H" and ident.isdigit():
            if ident.isdigit() and int(ident) != 0:
                continue                     # one tile: tile 0 only
            out.append((images, sub, "H", None, None))
        elif kind == "P":
            if ident == "*":
                out.append((images, sub, "P", None, limit))
            else:
                try:
                    out.append((images, sub, "P", int(ident), limit))
                except ValueError:
                    raise RequestError(f"{name}: bad precinct id in {item!r}") from None
        elif kind in "TM":
            continue
        else:
            raise RequestError(f"{name}: unknown data-bin descriptor {item!r}")
    return out


def _layers_within(lengths: list[int], nbytes: int) -> int:
    n, acc = 0, 0
    for ln in lengths:
        if acc + ln > nbytes:
            break
        acc += ln
        n += 1
    return n


def apply_model_spec(model: CacheModel, spec: str, series: list["ImageSource"]) -> None:
    """Add (or, with ``-``, remove) what a JPIP ``model`` field says the client holds."""
    for images, sub, kind, bin_id, limit in parse_bin_descriptors(spec, len(series)):
        for i in images:
            im = series[i]
            lengths = im.index.packet_lengths_by_bin()
            with model._lock:
                m = model._images.setdefault(im.key, {"h": False, "b": {}})
                if kind == "H":
                    m["h"] = not sub
                    continue
                for b in (lengths if bin_id is None else [bin_id]):
                    if b not in lengths:
                        raise RequestError(f"model: no precinct data-bin {b} in image {i}")
                    n = len(lengths[b])
                    if limit is not None:
                        n = limit[1] if limit[0] == "L" else _layers_within(lengths[b], limit[1])
                        n = min(n, len(lengths[b]))
                    if sub:
                        m["b"][b] = min(m["b"].get(b, 0), len(lengths[b]) - n) if limit \
                            else 0
                    elif n > m["b"].get(b, 0):
                        m["b"][b] = n


def need_model(spec: str, series: list["ImageSource"], base: CacheModel) -> CacheModel:
    """JPIP ``need``: a model holding every data-bin except the ones named, so that only
    those are sent (minus what ``base`` says the client holds). A bin is needed whole:
    byte and layer qualifiers of ``need`` are not honoured (the request's ``layers`` is)."""
    full = {im.key: {"h": True, "b": {b: len(l) for b, l in
                                        im.index.packet_lengths_by_bin().items()}}
            for im in series}
    for images, sub, kind, bin_id, _limit in parse_bin_descriptors(spec, len(series), "need"):
        if sub:
            continue
        for i in images:
            im = series[i]
            have_h, have_b = base.snapshot(im.key)
            if kind == "H":
                full[im.key]["h"] = have_h
                continue
            bins = full[im.key]["b"]
            for b in (list(bins) if bin_id is None else [bin_id]):
                if b not in bins:
                    raise RequestError(f"need: no precinct data-bin {b} in image {i}")
                bins[b] = have_b.get(b, 0)
    out = CacheModel()
    out.declare(full)
    return out


def _open_channel(session, cid: str) -> CacheModel:
    """A new, empty channel model in ``session`` (the oldest channels dropped beyond
    :data:`MAX_CHANNELS`, however the channel came: ``cnew``, or adopted from another
    process)."""
    channels = [k for k in session.model if k.startswith(CHANNEL_KEY)]
    for k in channels[: max(0, len(channels) - MAX_CHANNELS + 1)]:
        session.model.pop(k, None)
    model = session.model[CHANNEL_KEY + cid] = CacheModel()
    return model


def resolve_model(req: PacketRequest, session, series: list["ImageSource"]
                  ) -> tuple[CacheModel, dict[str, str], bool]:
    """The cache model a request is planned against, the JPIP response headers, and
    whether the request runs in a channel (or the session's own model).

    See the module docstring: framed requests use the session's model; JPP-stream
    requests are stateless unless they name or open a channel."""
    import secrets

    headers = {"JPIP-tid": req.target}
    stateful = True
    claim = getattr(session, "claim_model", None)
    if claim is not None:          # a cluster: forget a model another replica made stale
        claim()
    if req.cid and req.cid != session.id:
        model = session.model.get(CHANNEL_KEY + req.cid)
        if model is None and getattr(session, "foreign_channels", False) \
                and req.cid.startswith(f"{session.id}.") \
                and req.cid not in getattr(session, "closed_channels", ()):
            # serve --workers N: a channel of this session that another process opened,
            # or whose model this process forgot when another streamed to the session;
            # what was sent on it is not known here: sent again, nothing lost
            model = _open_channel(session, req.cid)
        if model is None:
            raise RequestError(f"cid: no channel {req.cid!r} in this session (closed, or "
                               "never opened with cnew)", status=404)
    elif req.cid:
        model = session.model_for(req.target)
    elif req.cnew:
        cid = f"{session.id}.{secrets.token_hex(6)}"
        model = _open_channel(session, cid)
        headers["JPIP-cnew"] = f"cid={cid},path=/jpip,transport=http"
    elif req.framing == "mv":
        model = session.model_for(req.target)
    else:
        model, stateful = CacheModel(), False
    if req.tid not in (None, "", "0", req.target):
        model, stateful = CacheModel(), False        # the client's cache is another target's
    elif req.model:                  # stateless: what the client holds; a channel: added
        apply_model_spec(model, req.model, series)
    if req.need:
        model = need_model(req.need, series, model)
        stateful = False                           # the channel is not advanced by a need
    closed = getattr(session, "closed_channels", None)     # (stay closed: see above)
    for c in req.cclose:
        keys = [k for k in session.model if k.startswith(CHANNEL_KEY)
                and (c == "*" or k == CHANNEL_KEY + c)]
        for k in keys:
            session.model.pop(k, None)
        if closed is not None and len(closed) < 4 * MAX_CHANNELS:
            closed.update([c] if c != "*" else [k[len(CHANNEL_KEY):] for k in keys])
    return model, headers, stateful


def declare_from_body(body: bytes, model: CacheModel) -> None:
    """Apply a client's cache declaration sent as a request body:
    ``{"model": {"<key>": {"h": 0|1, "b": {"<bin id>": layers}}}}`` (JPIP's model field)."""
    try:
        obj = json.loads(body)
        declared = obj.get("model") if isinstance(obj, dict) else None
        if declared is not None:
            if not isinstance(declared, dict):
                raise ValueError
            model.declare(declared)
    except (ValueError, TypeError, AttributeError):
        raise RequestError('POST body must be JSON: {"model": {"<key>": {"h": 0|1, "b": {...}}}}') from None


# --------------------------------------------------------------------------- planning
@dataclass
class Increment:
    csn: int
    layer: int                       # 0-based layer index this increment completes
    res: int                         # resolution index
    headers: bool                    # carries the main + tile header bins first
    packets: list[tuple[int, int, int, int]]   # (comp, res, prec, layer) in send order
    nbytes: int


@dataclass
class Plan:
    request: PacketRequest
    images: list[ImageSource]
    res: dict[int, int]              # csn -> target resolution index
    layers: dict[int, int]           # csn -> layers requested
    increments: list[Increment]
    total_bytes: int                 # whole target at full parameters
    request_bytes: int               # what this response will send
    # (after increment i) -> recommendation dict
    recommendations: dict[int, dict] = field(default_factory=dict)
    version: dict | None = None      # the version asked for (name, layers, ratios...)
    recall: list[int] = field(default_factory=list)   # images that need the archive

    def announcement(self) -> dict:
        return {
            "type": "announce",
            "target": self.request.target,
            "order": self.request.order,
            "bytes": self.request_bytes,
            "total_bytes": self.total_bytes,
            "images": [{
                "csn": im.csn, "key": im.key, "numres": im.index.numres,
                "nlayers": im.index.nlayers, "width": im.index.width,
                "height": im.index.height, "res": self.res[im.csn],
                "layers": self.layers[im.csn], "total_bytes": im.index.total_bytes,
                "lossless_state": im.lossless_state,
            } for im in self.images],
            "increments": [[inc.csn, inc.layer + 1, inc.res, inc.nbytes] for inc in self.increments],
            "region": list(self.request.region) if self.request.region else None,
            "version": self.version,
            "recall": self.recall,
        }


def res_for_fsiz(ix: PacketIndex, fx: int, fy: int, rounding: str = "round-down") -> int:
    """The resolution JPIP's ``fsiz`` asks for (C.4.2): ``round-down`` the largest whose
    size fits in fx x fy (the smallest if none does), ``round-up`` the smallest at least
    that large (the full size if none is), ``closest`` the one nearest in area."""
    sizes = [ix.res_size(r) for r in range(ix.numres)]
    if rounding == "round-up":
        return next((r for r, (w, h) in enumerate(sizes) if w >= fx and h >= fy),
                    ix.numres - 1)
    if rounding == "closest":
        return min(range(ix.numres), key=lambda r: (abs(sizes[r][0] * sizes[r][1] - fx * fy), r))
    fits = [r for r, (w, h) in enumerate(sizes) if w <= fx and h <= fy]
    return fits[-1] if fits else 0


def header_bytes(ix: PacketIndex) -> int:
    return ix.main_header_end + (ix.tile_header[1] - ix.tile_header[0])


def resolve_version(req: PacketRequest, versions) -> dict | None:
    """Turn ``version``/``quality``/``purpose`` into a layer count (``req.layers`` becomes
    the smaller of the two when both are given); returns the version's description.
    ``version=auto`` must have been replaced by a concrete name before (the server
    decides it, see :meth:`server.policy.SitePolicy.choose_auto`)."""
    if req.version is None and req.quality is None and req.purpose is None:
        return None
    if versions is None:
        raise RequestError("this series has no versions (no site policy)", status=404)
    from .policy import SelectionError
    try:
        v = versions.select(version=req.version, quality=req.quality, purpose=req.purpose)
    except SelectionError as e:
        raise RequestError(str(e), versions=versions.names()) from None
    layers = versions.layers_of(v.name)
    req.layers = min(req.layers, layers) if req.layers is not None else (
        None if v.lossless else layers)
    req.version = v.name
    return v.to_json()


def plan(req: PacketRequest, series: list[ImageSource], model: CacheModel,
         grant: "_rights.Grant | None" = None, versions=None) -> Plan:
    """The increments of a request, minus what the session holds.

    ``grant`` (from :meth:`server.auth.Authority.authorize`) is enforced here: a
    request beyond it raises :class:`RequestError` with status 403 and the maximum
    allowed in its body. ``versions`` (a :class:`~server.policy.SeriesVersions`)
    resolves version/quality/purpose requests and caps layers by the status matrix.

    The steps: the version asked for (:func:`resolve_version`), the images
    (:func:`select_images`), each image's resolution and layers (:func:`image_targets`),
    the rights (:func:`enforce`), the packets the session lacks (:func:`missing_packets`),
    the send order written as data (:func:`send_order`), then the increments and the
    recommendations after each consistent set (:func:`build_increments`)."""
    version = resolve_version(req, versions)
    images = select_images(req, series)
    if req.region is not None and req.fsiz is not None and req.framing == "jpp" and images:
        req.region = region_at_full_resolution(req.region, req.fsiz, images[0].index)
    res, layers = image_targets(req, images)
    if grant is not None:
        enforce(grant, req, images, len(series), res, layers, versions)
    units, need_headers = missing_packets(images, res, layers, req.region, model)
    keys = send_order(req.order, [im.csn for im in images], res, layers)
    increments, recs = build_increments(req.order, keys, units, need_headers, images, res,
                                        layers)
    total = sum(im.index.total_bytes for im in images)
    sent = sum(inc.nbytes for inc in increments)
    return Plan(req, images, res, layers, increments, total, sent, recs, version,
                recall_needed(increments, images))


def select_images(req: PacketRequest, series: list[ImageSource]) -> list[ImageSource]:
    """The images a request names (``comps``; every image when it names none)."""
    if req.comps is None:
        return list(series)
    bad = [c for c in req.comps if c >= len(series)]
    if bad:
        raise RequestError(
            f"comps out of range: the series has {len(series)} images (0-{len(series) - 1})",
            status=416, max_comp=len(series) - 1)
    return [series[c] for c in req.comps]


def region_at_full_resolution(region: tuple[int, int, int, int], fsiz: tuple[int, int],
                              ix: PacketIndex) -> tuple[int, int, int, int]:
    """JPIP C.4.3: in a JPP-stream request with ``fsiz``, roff/rsiz are in the frame of
    the requested fsiz; the same region in full-resolution pixels (outward; the images
    of a series share one size)."""
    sx, sy = ix.width / fsiz[0], ix.height / fsiz[1]
    x, y, w, h = region
    x0, y0 = int(x * sx), int(y * sy)
    return (x0, y0, max(1, math.ceil((x + w) * sx) - x0), max(1, math.ceil((y + h) * sy) - y0))


def image_targets(req: PacketRequest, images: list[ImageSource]
                  ) -> tuple[dict[int, int], dict[int, int]]:
    """Per image (by csn): the resolution index to reach (``fsiz``, else ``reduce``, else
    full) and the number of quality layers (``layers``, else all); a request beyond
    what the images have is refused (416, naming the maximum)."""
    res: dict[int, int] = {}
    layers: dict[int, int] = {}
    for im in images:
        ix = im.index
        if req.layers is not None and req.layers > ix.nlayers:
            raise RequestError(f"layers={req.layers} but the images have {ix.nlayers} layers",
                               status=416, max_layers=ix.nlayers)
        layers[im.csn] = req.layers or ix.nlayers
        if im.served_layers is not None:         # never an unverified lossless layer
            layers[im.csn] = min(layers[im.csn], im.served_layers)
        if req.fsiz is not None:
            res[im.csn] = res_for_fsiz(ix, *req.fsiz, req.fsiz_round)
        elif req.reduce is not None:
            if req.reduce >= ix.numres:
                raise RequestError(f"reduce={req.reduce} but the images have {ix.numres} "
                                   f"resolution levels (reduce 0-{ix.numres - 1})",
                                   status=416, max_reduce=ix.numres - 1)
            res[im.csn] = ix.numres - 1 - req.reduce
        else:
            res[im.csn] = ix.numres - 1
        if req.region is not None:
            x, y, w, h = req.region
            if x >= ix.width or y >= ix.height:
                raise RequestError(f"region offset {x},{y} is outside the {ix.width}x{ix.height} image",
                                   status=416, width=ix.width, height=ix.height)
    return res, layers


# (csn, layer, resolution) -> (packets (comp, res, prec, layer), their bytes)
Units = dict[tuple[int, int, int], tuple[list, int]]


def missing_packets(images: list[ImageSource], res: dict[int, int], layers: dict[int, int],
                    region: tuple[int, int, int, int] | None, model: CacheModel
                    ) -> tuple[Units, set[int]]:
    """Per image, the packets wanted per (layer, resolution) minus what the session
    holds (``model``), and the images whose headers the session lacks."""
    units: Units = {}
    need_headers: set[int] = set()
    for im in images:
        ix = im.index
        have_h, have_b = model.snapshot(im.key)
        if not have_h:
            need_headers.add(im.csn)
        lengths = ix.packet_lengths_by_bin()
        for c in range(ix.ncomp):
            for r in range(res[im.csn] + 1):
                if region is not None:
                    x, y, w, h = region
                    precs = ix.precincts_for_region(c, r, x, y, x + w, y + h)
                else:
                    precs = range(ix.num_precincts(c, r))
                for p in precs:
                    b = ix.databin_id(c, r, p)
                    for l in range(have_b.get(b, 0), layers[im.csn]):
                        pk, n = units.setdefault((im.csn, l, r), ([], 0))
                        pk.append((c, r, p, l))
                        units[(im.csn, l, r)] = (pk, n + lengths[b][l])
    return units, need_headers


def send_order(order: str, csns: list[int], res: dict[int, int], layers: dict[int, int]
               ) -> list[tuple[int, int, int]]:
    """The progression as data: the (csn, layer, resolution) steps in the order they are
    sent. ``quality``: every image at layer 1 (coarse to fine), then layer 2 …;
    ``resolution``: every layer of resolution 0, then resolution 1 …; ``image``: image
    by image. Steps beyond an image's own layers or resolution are skipped later."""
    maxres = max(res.values(), default=0)
    maxlay = max(layers.values(), default=0)
    if order == "quality":
        return [(i, l, r) for l in range(maxlay) for r in range(maxres + 1) for i in csns]
    if order == "resolution":
        return [(i, l, r) for r in range(maxres + 1) for l in range(maxlay) for i in csns]
    return [(i, l, r) for i in csns for l in range(maxlay) for r in range(maxres + 1)]


def build_increments(order: str, keys: list[tuple[int, int, int]], units: Units,
                     need_headers: set[int], images: list[ImageSource],
                     res: dict[int, int], layers: dict[int, int]
                     ) -> tuple[list[Increment], dict[int, dict]]:
    """The increments of the steps ``keys`` (an image's headers ride with its first
    increment) and a recommendation after each consistent set: a (layer, resolution)
    reached by every image, or an image finished (``image`` order)."""
    maxres = max(res.values(), default=0)
    maxlay = max(layers.values(), default=0)
    increments: list[Increment] = []
    recs: dict[int, dict] = {}
    by_csn = {im.csn: im for im in images}
    sent_headers: set[int] = set()
    first_render = True
    for n, (i, l, r) in enumerate(keys):
        if l >= layers[i] or r > res[i]:
            continue
        pk, nbytes = units.get((i, l, r), ([], 0))
        hdr = i in need_headers and i not in sent_headers
        if hdr:
            sent_headers.add(i)
            nbytes += header_bytes(by_csn[i].index)
        if pk or hdr:
            increments.append(Increment(i, l, r, hdr, pk, nbytes))
        group = (l, r) if order != "image" else i
        nxt = keys[n + 1] if n + 1 < len(keys) else None
        nxt_group = None if nxt is None else ((nxt[1], nxt[2]) if order != "image" else nxt[0])
        if nxt_group != group and increments:
            if order == "image":
                rec = {"images": [i], "layers": layers[i], "res": res[i], "action": "render"}
            else:
                full = (r == maxres) if order == "quality" else (l == maxlay - 1)
                action = "render" if (full or first_render) else "store"
                first_render = False
                rec = {"images": "all", "layers": l + 1, "res": r, "action": action}
            recs[len(increments) - 1] = {"type": "recommend", **rec}
    return increments, recs


def recall_needed(increments: list[Increment], images: list[ImageSource]) -> list[int]:
    """The images (csn) whose increments need layers that are in the archive only."""
    by_csn = {im.csn: im for im in images}
    return sorted({inc.csn for inc in increments if by_csn[inc.csn].needs_recall(
        max((pk[3] + 1 for pk in inc.packets), default=0))})


def enforce(grant: "_rights.Grant", req: PacketRequest, images: list[ImageSource],
            n_series: int, res: dict[int, int], layers: dict[int, int], versions) -> None:
    """Refuse (403) a planned request that goes beyond ``grant``; the body names the
    maximum allowed for every limited right and which ones the request exceeded."""
    problems = _rights.check(
        grant, comps=req.comps, n_images=n_series, layers=layers,
        reduces={im.csn: im.index.numres - 1 - res[im.csn] for im in images},
        numres={im.csn: im.index.numres for im in images},
        sizes={im.csn: (im.index.width, im.index.height) for im in images},
        region=req.region, version=req.version, versions=versions)
    refuse(grant, problems, versions)


def refuse(grant: "_rights.Grant", problems: list[tuple[str, str]], versions=None,
           **extra) -> None:
    """Raise the 403 of a request beyond ``grant`` if :func:`server.rights.check`
    found ``problems`` (series, slabs and slides alike): the message says what went
    beyond, the body names the maximum allowed for every limited right
    (:meth:`~server.rights.Grant.limits`, plus ``extra``) and which were exceeded
    (``denied``)."""
    if problems:
        raise RequestError("beyond your rights: " + "; ".join(m for _k, m in problems),
                           status=403, **{**grant.limits(versions, list(dict.fromkeys(
                               k for k, _m in problems))), **extra})


# --------------------------------------------------------------------------- streaming
def stream(p: Plan, model: CacheModel, *, cancelled: Callable[[], bool] = lambda: False,
           stats: dict | None = None) -> Iterator[bytes]:
    """Yield the response body. In ``mv`` framing: an announce record, DATA records of
    JPP messages, recommend records after each consistent set, an end record. The
    session model is updated as data is handed out, so nothing is sent twice.
    ``stats`` (if given) is kept up to date with ``bytes_sent`` (packet and header bytes
    handed out so far) and ``reason`` (how the stream ended).

    The steps per increment: the archive first when its layers were migrated
    (:func:`_recall`), the image's data-bins (:class:`_Databins`), its JPP messages
    (:meth:`_Body.add_increment`), a DATA record when enough is gathered or a consistent
    set ends (:meth:`_Body.flush`)."""
    stats = {} if stats is None else stats
    stats.update(bytes_sent=0, reason="started")
    body = _Body(p.request.framing == "mv", model)
    sent = 0
    limit = p.request.max_bytes
    if body.mv:
        yield framing.control(p.announcement())
    bins = _Databins()
    reason = "complete"
    for n, inc in enumerate(p.increments):
        if cancelled():
            reason = "cancelled"
            break
        im = next(x for x in p.images if x.csn == inc.csn)
        if limit is not None and sent + inc.nbytes > limit:
            reason = "byte-limit"
            break
        if bins.must_recall(im, inc) and not (yield from _recall(p, im, inc, body, bins, stats)):
            return
        body.add_increment(p, im, inc, bins.of(p, im, inc))
        sent += inc.nbytes
        stats["bytes_sent"] = sent
        rec = p.recommendations.get(n)
        if len(body.out) >= RECORD_TARGET or rec is not None:
            yield from body.flush()
        if rec is not None and body.mv:
            yield framing.control(rec)
    stats["reason"] = reason
    body.out += body.writer.eor(EOR_BYTE_LIMIT if reason == "byte-limit" else EOR_WINDOW_DONE)
    yield from body.flush()
    if body.mv:
        yield framing.control({"type": "end", "reason": reason, "bytes_sent": sent,
                               "bytes_announced": p.request_bytes})


class _Body:
    """The response being written: JPP messages gathered into DATA records (``mv``
    framing) or a bare JPP-stream (``jpp``), and the session model's updates, applied
    only once their data was handed out."""

    def __init__(self, mv: bool, model: CacheModel) -> None:
        self.mv = mv
        self.model = model
        self.writer = JppWriter()
        self.out = bytearray()
        self.pending_model: list[tuple[str, dict[int, int] | None]] = []

    def flush(self) -> Iterator[bytes]:
        """Hand out what is gathered (one DATA record), then note it in the model."""
        data = bytes(self.out)
        self.out.clear()
        yield framing.record(framing.DATA, data) if self.mv else data
        for key, bins in self.pending_model:
            if bins is None:
                self.model.add_headers(key)
            else:
                self.model.add_layers(key, bins)
        self.pending_model.clear()

    def add_increment(self, p: Plan, im: ImageSource, inc: Increment, db) -> None:
        """The JPP messages of one increment: the main and tile header bins first when
        it carries them, then its packets, each a precinct data-bin message."""
        w, out = self.writer, self.out
        if inc.headers:
            th, mh = db.tile_header, db.main_header
            if p.request.compat == "openjpeg":
                th = openjpeg_tile_header(th, im.index)
                mh = reduced_main_header(mh, im.index.numres - 1 - p.res[inc.csn])
            out += w.message(JppMessage(MAIN_HEADER, inc.csn, 0, 0, mh, True))
            out += w.message(JppMessage(TILE_HEADER, inc.csn, 0, 0, th, True))
            self.pending_model.append((im.key, None))
        got: dict[int, int] = {}
        ix = im.index
        for c, r, pr, l in inc.packets:
            b = ix.databin_id(c, r, pr)
            layers = db.precincts[b]
            if layers[l] is None:       # archived and not recalled: never send a guess
                raise RuntimeError(f"packet {c},{r},{pr},{l} of image {inc.csn} is archived")
            off = sum(len(x) for x in layers[:l])
            out += w.message(JppMessage(PRECINCT, inc.csn, b, off, layers[l], l == ix.nlayers - 1))
            got[b] = l + 1
        self.pending_model.append((im.key, got))


class _Databins:
    """The data-bins of the images a stream sends, read once per image (a few kept):
    range reads of the packets the plan sends, the whole codestream, the hot layers of
    an archived image, or the codestream recalled from the archive."""

    KEEP = 8

    def __init__(self) -> None:
        self.cache: dict[int, object] = {}
        self.whole: set[int] = set()      # images whose bins come from the whole codestream
        self.recalled: set[int] = set()

    def must_recall(self, im: ImageSource, inc: Increment) -> bool:
        top = max((pk[3] + 1 for pk in inc.packets), default=0)
        return im.needs_recall(top) and inc.csn not in self.whole

    def add_recalled(self, csn: int, db) -> None:
        self.cache[csn] = db
        self.whole.add(csn)
        self.recalled.add(csn)

    def of(self, p: Plan, im: ImageSource, inc: Increment):
        db = self.cache.get(inc.csn)
        if db is not None:
            return db
        if len(self.cache) > self.KEEP:
            self.cache.clear()
        if im.load_part is not None and im.hot_layers is None and inc.csn not in self.whole:
            # the packets this plan sends of the image, as range reads
            db = im.load_part(p.layers[inc.csn], p.res[inc.csn])
        else:
            data = im.recall() if inc.csn in self.whole and im.recall is not None else im.load()
            if im.hot_layers is None or len(data) == im.index.total_bytes:
                db = split_databins(data, im.index)
                self.whole.add(inc.csn)
            else:
                db = databins_from_head(data, im.index, im.hot_layers)
        self.cache[inc.csn] = db
        return db


def _recall(p: Plan, im: ImageSource, inc: Increment, body: _Body, bins: _Databins,
            stats: dict) -> Iterator[bytes]:
    """Bring an image's archived layers back before its increment. In ``mv`` framing,
    what is ready goes out first, then a ``recalling`` message (the client knows why it
    waits) and ``recalled`` once every image of the plan's recall list is back. Returns
    False (the stream ends, after an ``error`` message) when the archive fails."""
    if not bins.recalled and body.mv:
        if body.out:
            yield from body.flush()
        yield framing.control({"type": "recalling", "images": p.recall})
    try:
        data = im.recall()
    except Exception as e:  # noqa: BLE001 - reported to the client, then logged
        import logging
        logging.getLogger("medview.server").error("recall failed: %s", e)
        if body.out:
            yield from body.flush()
        stats["reason"] = "recall-failed"
        if body.mv:
            yield framing.control({"type": "error", "error": f"the archive could "
                                   f"not deliver image {inc.csn}: {e}"})
        return False
    bins.add_recalled(inc.csn, split_databins(data, im.index))
    if body.mv and bins.recalled >= set(p.recall):
        yield framing.control({"type": "recalled", "images": p.recall})
    return True
