"""Progressive series on the client: what each image holds, transfers that add to it.

:class:`SeriesData` keeps, per image of a series, the data-bins received so far (a
:class:`~codestream.databins.BinSet`), loads them from the packet cache first and writes
every increment back to it. :class:`Transfer` runs one packet request: it reads the
framed response as it streams, applies the JPP messages, and reports each increment
through callbacks (image, layers and resolution reached, bytes received / requested /
total). It can be cancelled at any time; the cache stays consistent because only whole
data-bin prefixes are written, in one transaction per network record.

Server policy (issue 5): the series description carries the user's rights, the versions
and the diagnosis record. Every request is kept within the rights
(:class:`client.rights.Limits`); if the server still refuses one (HTTP 403: the rights
changed), the limits in its answer are learnt and the request is made once more within
them. :attr:`SeriesData.selection` asks for a version, a quality or a purpose on every
request. When archived layers are recalled, the transfer reports it (``recalling``).
:attr:`SeriesData.listeners` hear ``("limited", body)``, ``("recalling", msg)`` and
``("recalled", msg)`` from any transfer of the series, and ``("version", v)`` with the
version each transfer's announce names (for ``version=auto``: which one and why), and
``("auto", choice)`` when the automatic choice changes.

Neither imports Qt; the viewer wraps them in its own worker signals.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from codestream import framing
from codestream.ranges import format_ranges
from codestream.databins import BinSet

from .cache import PacketCache
from .decode import decode
from .pool import CancelToken
from .rights import Limits, RightsLimited, is_rights_body
from .session import ServerError, Session

log = logging.getLogger("medview.client")


class TransferError(RuntimeError):
    """The transfer broke off (server gone, malformed stream)."""


class Cancelled(Exception):
    """The transfer was cancelled by the caller."""


@dataclass
class ImageProgress:
    csn: int
    key: str
    layers: int               # quality layers reached (whole image, up to `res`)
    res: int                  # resolution index reached (-1: nothing yet)
    max_layers: int
    numres: int
    received: int             # bytes of this image received in this transfer
    requested: int            # bytes of this image this transfer will send
    total: int                # compressed bytes of the image at full parameters


@dataclass
class TransferProgress:
    received: int
    requested: int
    total: int
    elapsed: float

    @property
    def rate(self) -> float:
        return self.received / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class Decoded:
    csn: int
    pixels: np.ndarray        # stored values, offset undone, before rescale
    reduce: int
    layers: int
    res: int
    area: tuple[int, int, int, int] | None = None


@dataclass
class Callbacks:
    on_announce: Callable[[dict], None] | None = None
    on_image: Callable[[ImageProgress], None] | None = None
    on_progress: Callable[[TransferProgress], None] | None = None
    on_recommend: Callable[[dict], None] | None = None
    on_end: Callable[[dict], None] | None = None
    on_recalling: Callable[[dict], None] | None = None   # "recalling" and "recalled"
    on_limited: Callable[[dict], None] | None = None     # a 403 body, before the retry


class SeriesData:
    """All images of one series as held by this client."""

    def __init__(self, session: Session, cache: PacketCache | None, series_uid: str,
                 meta: dict | None = None) -> None:
        self.session = session
        self.cache = cache
        self.uid = series_uid
        meta = meta or session.series_images(series_uid)
        self.info: dict = meta["series"]
        self.images: list[dict] = meta["images"]
        self.rights: dict = meta.get("rights") or {}
        self.limits = Limits.from_body(self.rights)
        self.versions: list[dict] | None = meta.get("versions")
        self.auto: dict | None = meta.get("auto")
        self.diagnosis: dict | None = meta.get("diagnosis")
        self.selection: dict = {}      # {"version": "V2"} | {"quality": 70} | {"purpose": ...}
        self.listeners: list[Callable[[str, dict], None]] = []
        self.ns = session.base_url
        self._lock = threading.RLock()
        self.bins: list[BinSet] = [
            (cache.load(self.ns, im["key"]) if cache else BinSet()) for im in self.images]
        # the server must learn what we hold: at first use, and after a broken transfer
        self.declare_needed = any(b.main_header for b in self.bins)

    def __len__(self) -> int:
        return len(self.images)

    # ------------------------------------------------------------------ policy
    def select(self, *, version: str | None = None, quality: int | None = None,
               purpose: str | None = None) -> None:
        """Ask for this version (``"auto"``: the server chooses), quality or purpose on
        every later request; nothing = every layer the rights allow."""
        given = {k: v for k, v in (("version", version), ("quality", quality),
                                   ("purpose", purpose)) if v is not None}
        if len(given) > 1:
            raise ValueError("select one of version, quality or purpose")
        self.selection = given

    def learn_rights(self, body: dict) -> None:
        """Adopt the limits a 403 answer names and tell the listeners."""
        self.rights = {k: v for k, v in body.items() if k not in ("error", "status", "denied")}
        self.limits = Limits.from_body(body)
        self._notify("limited", body)

    def _notify(self, kind: str, msg: dict) -> None:
        for fn in list(self.listeners):
            try:
                fn(kind, msg)
            except Exception:  # noqa: BLE001 - a listener bug must not break a transfer
                log.exception("series listener failed")

    def clamp(self, params: dict) -> dict:
        """``params`` with the selection added, kept within the rights. A selected
        version (or the version a quality or purpose means) that may not be sent is
        replaced by the nearest one that may."""
        p = dict(params)
        p.update(self._allowed_selection())
        return self.limits.clamp(p, self.images)

    def _allowed_selection(self) -> dict:
        sel = self.selection
        allowed = self.limits.versions
        if not sel or allowed is None or not self.versions or sel.get("version") == "auto":
            return dict(sel)
        names = [v["name"] for v in self.versions]
        if "version" in sel:
            want = sel["version"]
        elif "purpose" in sel:
            want = next((v["name"] for v in self.versions
                         if v.get("purpose", "").lower() == str(sel["purpose"]).lower()), None)
        else:
            ok = [v for v in self.versions if v.get("quality", 0) >= sel["quality"]]
            want = min(ok, key=lambda v: v["quality"])["name"] if ok else names[0]
        if want is None or want in allowed or want not in names or not allowed:
            return dict(sel)
        i = names.index(want)
        near = min((n for n in allowed if n in names), key=lambda n: (abs(names.index(n) - i),
                                                                    names.index(n)), default=None)
        return {"version": near} if near else dict(sel)

    def model(self) -> dict:
        """Declaration of what this client holds, for the server's session model."""
        out = {}
        with self._lock:
            for im, bs in zip(self.images, self.bins):
                if bs.index is None:
                    continue
                lengths = bs.index.packet_lengths_by_bin()
                out[im["key"]] = {"h": 1, "b": {
                    str(b): n for b in bs.precincts
                    if b in lengths and (n := bs.layers_in_bin(b, lengths[b])) > 0}}
        return out

    def levels(self, csn: int, max_res: int | None = None) -> tuple[int, int]:
        """(layers, res) image ``csn`` holds, looking no higher than ``max_res``."""
        with self._lock:
            return self.bins[csn].levels(max_res)

    def levels_in_region(self, csn: int, region) -> tuple[int, int]:
        with self._lock:
            return self.bins[csn].levels_in_region(region)

    def held_bytes(self, csn: int) -> int:
        with self._lock:
            bs = self.bins[csn]
            return (len(bs.main_header or b"") + len(bs.tile_header or b"")
                    + sum(len(v) for v in bs.precincts.values()))

    def decode(self, csn: int, *, reduce: int | None = None, layers: int = 0,
               area: tuple[int, int, int, int] | None = None) -> Decoded:
        """Decode image ``csn`` from what it holds (never at a resolution not held)."""
        im = self.images[csn]
        with self._lock:
            bs = self.bins[csn]
            snapshot = BinSet(bs.main_header, bs.tile_header, dict(bs.precincts), bs.index)
            q, r = bs.levels_in_region(area) if area else bs.levels()
        if reduce is not None and r >= 0:
            reduce = max(reduce, bs.index.numres - 1 - r)
        pixels, red = decode(snapshot, offset=im["offset"], signed=bool(im["signed"]),
                             bits_stored=im["bits_stored"], reduce=reduce, layers=layers,
                             area=area)
        return Decoded(csn, pixels, red, layers or q, snapshot.index.numres - 1 - red, area)

    # ------------------------------------------------------------------ receiving
    def apply(self, msg, dirty: dict[int, dict]) -> int:
        """Apply one JPP message; returns the new bytes it added."""
        csn = msg.csn
        if csn >= len(self.bins):
            raise TransferError(f"server sent codestream {csn}, the series has {len(self.bins)}")
        with self._lock:
            n, key, data = self.bins[csn].absorb(msg)
        if key is not None:
            dirty.setdefault(csn, {})[key] = data
        return n

    def flush(self, dirty: dict[int, dict]) -> None:
        """Queue the changed data-bins for the cache (written off this thread)."""
        if self.cache:
            for csn, bins in dirty.items():
                self.cache.put_later(self.ns, self.images[csn]["key"], bins)
        dirty.clear()

    def drain(self) -> None:
        """Wait for this series' queued cache writes (the cache holds what was received)."""
        if self.cache:
            self.cache.drain()

    # ------------------------------------------------------------------ requests
    def transfer(self, *, comps: list[int] | None = None, layers: int | None = None,
                 reduce: int | None = None, display: tuple[int, int] | None = None,
                 region: tuple[int, int, int, int] | None = None, order: str = "quality",
                 callbacks: Callbacks | None = None) -> "Transfer":
        """Build a request. ``display`` (w, h) is the largest size the caller can show;
        the request never asks for more resolution than that (V4)."""
        params: dict = {"target": self.uid, "order": order}
        if comps is not None:
            params["comps"] = format_ranges(comps)
        if layers is not None:
            params["layers"] = layers
        red = reduce
        if display is not None:
            red_disp = self.reduce_for_display(display, comps, region)
            red = red_disp if red is None else max(red, red_disp)
        if red is not None:
            ims = [self.images[c] for c in comps] if comps else self.images
            params["reduce"] = min([red] + [im["numres"] - 1 for im in ims])
        if region is not None:
            x, y, w, h = region
            params["roff"], params["rsiz"] = f"{x},{y}", f"{w},{h}"
        return Transfer(self, params, callbacks or Callbacks())

    def can_fetch(self, comps: list[int] | None = None) -> bool:
        """False when the rights allow none of these images."""
        try:
            self.limits.clamp({"comps": format_ranges(comps) if comps else None}, self.images)
            return True
        except RightsLimited:
            return False

    def reduce_for_display(self, display: tuple[int, int], comps=None, region=None) -> int:
        """Smallest reduce at which the image (or region) still fills ``display``."""
        ims = [self.images[c] for c in comps] if comps else self.images
        if not ims:
            return 0
        im = ims[0]
        w, h = (region[2], region[3]) if region else (im["Columns"], im["Rows"])
        dw, dh = max(1, display[0]), max(1, display[1])
        red = 0
        while red < im["numres"] - 1 and -(-w // (2 << red)) >= dw and -(-h // (2 << red)) >= dh:
            red += 1
        return red



#: :func:`run_in_order`: send the next request when this much time of data is left
#: of the current one at its rate so far, or this many bytes, whichever is more.
PIPELINE_LEAD_S = 0.1
PIPELINE_LEAD_MIN_BYTES = 64 * 1024


class Transfer:
    """One packet request, run with :meth:`run` (blocking; use a worker)."""

    def __init__(self, series: SeriesData, params: dict, callbacks: Callbacks) -> None:
        self.series = series
        self.asked = params                   # as the caller asked
        self.cb = callbacks
        self.limited: dict | None = None      # the 403 body that made us ask again
        self.recalling = False                # waiting for the archive
        self.blocked: RightsLimited | None = None   # nothing of it may be fetched
        try:
            self.params = series.clamp(params)    # as it is sent: within the rights
        except RightsLimited as e:
            self.params, self.blocked = dict(params), e
        self.token = CancelToken()
        self.announce: dict | None = None
        self.end: dict | None = None
        self.received = 0
        self.requested = 0
        self.total = 0
        self.recommendations: list[dict] = []
        self._resp = None
        self._near_end: Callable[[], None] | None = None   # run_in_order: ask the next

    def cancel(self) -> None:
        """Stop promptly: the connection is closed, so the server stops too."""
        self.token.cancel()
        resp = self._resp
        if resp is not None:
            try:
                resp.close()
            except Exception:
                pass

    def run(self, token: CancelToken | None = None) -> dict:
        """Returns the server's end message; raises Cancelled or TransferError.

        A request wholly beyond the user's rights (e.g. only images the user may not
        load) sends nothing: it ends at once with reason ``beyond-rights``, ``limited``
        holds the explanation, and the series' listeners hear ``limited``."""
        if token is not None:
            self.token = token
        if self.blocked is not None:
            return self._beyond_rights(self.blocked)
        t0 = time.monotonic()
        resp = self._open()
        if resp is None:
            return self.end
        return self._receive(resp, t0)

    def _open(self):
        """Send the request; the streaming response (its headers read), or None when
        the rights leave nothing of it (``end`` says so)."""
        s = self.series
        model = s.model() if s.declare_needed else None
        try:
            resp = s.session.packet_stream(self.params, model)
        except ServerError as e:
            if e.status != 403 or not is_rights_body(e.body) or self.limited is not None:
                raise
            # the rights changed since the series was opened: learn them, ask within them
            s.learn_rights(e.body)
            self.limited = e.body
            if self.cb.on_limited:
                self.cb.on_limited(e.body)
            try:
                retry = s.clamp(self.asked)
            except RightsLimited as limited:
                self._beyond_rights(limited, notify=False)
                return None
            if retry == self.params:
                raise
            self.params = retry
            resp = s.session.packet_stream(self.params, model)
        s.declare_needed = False
        return resp

    def _receive(self, resp, t0: float) -> dict:
        """Read the response to its end, applying every record as it arrives."""
        s = self.series
        self._resp = resp
        if self.token.cancelled:          # cancelled while the request was on its way
            resp.close()
            self._resp = None
            s.declare_needed = True
            raise Cancelled()
        reader = framing.PacketStreamReader()
        dirty: dict[int, dict] = {}
        per_image_rx: dict[int, int] = {}
        per_image_req: dict[int, int] = {}
        chunks = resp.iter_content(chunk_size=32768)
        meter = getattr(s.session, "link", None)
        if meter is not None:
            chunks = meter.timed(chunks)      # link throughput over active time (V8)
        try:
            for chunk in chunks:
                if self.token.cancelled:
                    raise Cancelled()
                for rtype, payload in reader.feed(chunk):
                    if rtype == framing.CONTROL:
                        self._control(payload, per_image_req, t0)
                        continue
                    touched = set()
                    for msg in payload:
                        n = s.apply(msg, dirty)
                        self.received += n
                        per_image_rx[msg.csn] = per_image_rx.get(msg.csn, 0) + n
                        touched.add(msg.csn)
                    s.flush(dirty)
                    for csn in sorted(touched):
                        self._image_progress(csn, per_image_rx, per_image_req)
                    if self.cb.on_progress:
                        self.cb.on_progress(TransferProgress(self.received, self.requested,
                                                             self.total, time.monotonic() - t0))
                if self._near_end is not None and self.announce is not None:
                    self._check_near_end(t0)
                if self.token.cancelled:
                    raise Cancelled()
        except Cancelled:
            s.flush(dirty)
            s.declare_needed = True
            raise
        except Exception as e:
            s.flush(dirty)
            s.declare_needed = True
            if self.token.cancelled:
                raise Cancelled() from None
            if isinstance(e, TransferError):
                raise
            raise TransferError(f"transfer broke off: {e}") from e
        finally:
            resp.close()
            self._resp = None
            s.drain()
        if self.end is None:
            s.declare_needed = True
            raise TransferError("the server closed the stream before the end of the transfer")
        return self.end

    def _check_near_end(self, t0: float) -> None:
        elapsed = time.monotonic() - t0
        rate = self.received / elapsed if elapsed > 0 else 0.0
        if self.requested - self.received <= max(PIPELINE_LEAD_MIN_BYTES, rate * PIPELINE_LEAD_S):
            fn, self._near_end = self._near_end, None
            fn()

    def _beyond_rights(self, e: RightsLimited, notify: bool = True) -> dict:
        self.limited = e.body
        if notify:
            self.series._notify("limited", e.body)
            if self.cb.on_limited:
                self.cb.on_limited(e.body)
        self.end = {"type": "end", "reason": "beyond-rights", "bytes_sent": 0,
                    "bytes_announced": 0, "error": str(e.message)}
        if self.cb.on_end:
            self.cb.on_end(self.end)
        return self.end

    def _control(self, msg: dict, per_image_req: dict, t0: float) -> None:
        kind = msg.get("type")
        if kind == "announce":
            self.announce = msg
            self.requested = msg["bytes"]
            self.total = msg["total_bytes"]
            for csn, _l, _r, nbytes in msg["increments"]:
                per_image_req[csn] = per_image_req.get(csn, 0) + nbytes
            self._version(msg.get("version"))
            if self.cb.on_announce:
                self.cb.on_announce(msg)
            if self.cb.on_progress:
                self.cb.on_progress(TransferProgress(0, self.requested, self.total,
                                                     time.monotonic() - t0))
        elif kind == "recommend":
            self.recommendations.append(msg)
            if self.cb.on_recommend:
                self.cb.on_recommend(msg)
        elif kind == "end":
            self.end = msg
            if self.cb.on_end:
                self.cb.on_end(msg)
        elif kind in ("recalling", "recalled"):
            self.recalling = kind == "recalling"
            self.series._notify(kind, msg)
            if self.cb.on_recalling:
                self.cb.on_recalling(msg)
        elif kind == "error":
            raise TransferError(msg.get("error", "server error during transfer"))

    def _version(self, v: dict | None) -> None:
        """The version the server sends (the automatic choice and why, when ``auto``):
        kept as the series' ``auto`` and told to the listeners (``("version", v)``)."""
        if not v:
            return
        s = self.series
        s._notify("version", dict(v))
        if "auto" in v:
            new = {"version": v.get("name"), "reasons": list(v.get("auto") or []),
                   "why": v.get("why", ""), "facts": v.get("facts", "")}
            changed = (s.auto or {}).get("version") != new["version"]
            s.auto = new
            if changed:
                s._notify("auto", new)

    def _image_progress(self, csn: int, rx: dict, req: dict) -> None:
        if not self.cb.on_image:
            return
        s = self.series
        im = s.images[csn]
        q, r = s.levels(csn)
        self.cb.on_image(ImageProgress(csn, im["key"], q, r, im["nlayers"], im["numres"],
                                       rx.get(csn, 0), req.get(csn, 0), im["total_bytes"]))


def run_in_order(transfers: list[Transfer], token: CancelToken | None = None) -> list[dict]:
    """Run transfers of one series one after the other, each next request sent while
    the previous response still streams, so the link does not idle between them (the
    stages of a progressive session: preview, ~1:20, lossless). Returns their end
    messages; blocking (use a worker).

    Every request but the last is sent with JPIP ``wait=yes``: the server plans the next
    one only once the previous stream has ended, against a model that holds all it sent,
    so nothing is sent twice. The next response is read only after the previous one
    ended (its data continues the same data-bins). If a transfer fails or is cancelled,
    the next (already asked) is closed unread, the series declares what it holds on its
    next request, and the error is raised.

    The next request goes out when the current one has about ``PIPELINE_LEAD_S`` of data
    left at its measured rate (at least ``PIPELINE_LEAD_MIN_BYTES``): early enough to
    hide the round trip and the server's planning, late enough that the next stage's
    data does not share the link with (and so delay) most of the current stage."""
    if not transfers:
        return []
    s = transfers[0].series
    if any(t.series is not s for t in transfers):
        raise ValueError("run_in_order: transfers of one series only")
    token = token or CancelToken()
    for t in transfers[:-1]:
        t.params["wait"] = "yes"
    ends: list[dict] = []
    pending: list = []                  # the next request, once sent: (thread, box)
    try:
        for i, t in enumerate(transfers):
            t.token = token
            if pending:
                resp = _collect(pending.pop())
            elif t.blocked is not None:
                ends.append(t._beyond_rights(t.blocked))
                continue
            else:
                resp = t._open()
            t0 = time.monotonic()
            if resp is None:                  # nothing of it within the rights
                ends.append(t.end)
                continue
            nxt = transfers[i + 1] if i + 1 < len(transfers) else None
            if nxt is not None and nxt.blocked is None:
                t._near_end = lambda nxt=nxt: pending.append(_open_async(nxt))
            ends.append(t._receive(resp, t0))
    except BaseException:
        if pending:
            try:
                resp = _collect(pending.pop())
                if resp is not None:
                    resp.close()
            except Exception:  # noqa: BLE001 - the first error is the one to raise
                pass
            s.declare_needed = True
        raise
    return ends


def _open_async(t: Transfer) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["resp"] = t._open()
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            box["error"] = e

    th = threading.Thread(target=run, name="transfer-next", daemon=True)
    th.start()
    return th, box


def _collect(pending: tuple[threading.Thread, dict]):
    th, box = pending
    th.join()
    if "error" in box:
        raise box["error"]
    return box.get("resp")
