"""Whole-slide viewer pane (W6): smooth pan and zoom, tiles coarse first, prefetch,
scale bar in µm, overview navigator, label and macro, super-resolution marked.

Widgets only build and wire; the logic lives in :mod:`imaging`, :mod:`client.slides` and :mod:`client.srqueue` (no Qt):
:class:`~imaging.viewport.Viewport` (which level, which tiles, what to prefetch),
:class:`~imaging.viewport.TileCache` (one budget; on-screen and overview tiles are never
evicted), a provider (:class:`~client.slides.LocalSlide` or
:class:`~client.slides.RemoteSlide`), and for super-resolution
:class:`~client.srqueue.SRTileService` on a :class:`~client.srqueue.SRQueue` (scheduled on
the same worker pool as the tiles).

Loading (:class:`SlideTileLoader`): the visible tiles are asked for first at quality layer
1 (a small fraction of the bytes; INTERACTION priority), then at all layers (lossless),
then the prefetch ring in the direction of panning at PREFETCH priority, on the worker
pool of :mod:`client.pool`. On a link measured slower than 2 MB/s, prefetch brings only
the first quality layer (SPEC H5); what comes on screen is refined as usual. While a
tile is missing, the best coarser tile already held is drawn scaled up in its place — the
overview level is always held — so the view is never empty and sharpens in place. A
result never replaces a better one.

Modes:
* **High resolution + prefetch** (default for slides scanned at high resolution): zoom
  stops at 4 screen pixels per scanned pixel; tiles ahead of the panning are prefetched.
* **Low resolution + super-resolution** (default for slides stored at low resolution):
  past level 0 (from 1.5× and 3× magnification) tiles are super-resolved ×2 / ×4; the
  tiles in view go to the SR queue first and pre-empt the background work on their
  neighbours. Every generated tile is drawn with a magenta hatched frame and an
  "SR ×n" badge, and a banner says that generated detail is on screen.

Rights (SPEC P7): a :class:`~client.slides.RemoteSlide` never asks beyond the user's
rights; the pane says what they limit in plain words (a banner, and :attr:`SlidePane.notice`
for the main window's status bar; :func:`client.policy_text.explain_slide_rights`). Zoom
never goes to a level finer than the rights allow: the finest allowed level is drawn
enlarged, with an "ENLARGED" banner — it is not super-resolved unless the user chooses the
super-resolution mode (then it is generated from that level, marked as always). Under a
region right the parts not allowed are grey. Label and macro buttons say "not permitted"
when the rights do not allow them (they are fetched on a worker, never on the UI thread).
When the server teaches new rights mid-session, the banner and the view follow.

Mouse and keys as in QuPath / OpenSeadragon: drag to pan (with a little inertia), wheel
to zoom at the cursor (animated), double-click to zoom in (Shift: out), arrows / WASD
to pan, + / - to zoom, 0 or Home to fit the whole slide, click or drag in the overview
to jump there.
"""
from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QBrush, QColor, QFont, QImage, QPainter, QPen, QPixmap
from PySide6.QtWidgets import (QComboBox, QDialog, QHBoxLayout, QLabel, QPushButton,
                               QVBoxLayout, QWidget)

from client.pool import INTERACTION, PREFETCH, WorkerPool, default_pool
from client.rights import RightsLimited
from client.srqueue import NEAR, VIEW, SRQueue, SRTileService
from imaging.memory import MemoryBudget
from imaging.viewport import CachedTile, TileCache, Viewport

from client.policy_text import explain_slide_rights, explain_slide_rights_error
from .workers import Task, dispatcher

log = logging.getLogger("medview.slideview")

SR_COLOUR = QColor(230, 0, 200)
LIMIT_COLOUR = QColor(255, 214, 120, 235)     # the "enlarged, not finer" banner
MODES = ("high", "low")            # high resolution + prefetch / low resolution + SR
MODE_NAMES = {"high": "High resolution + prefetch", "low": "Low resolution + super-resolution"}


def qimage(rgb: np.ndarray) -> QImage:
    a = np.ascontiguousarray(rgb[:, :, :3])
    h, w = a.shape[:2]
    img = QImage(a.data, w, h, 3 * w, QImage.Format.Format_RGB888)
    return img.copy()               # own the pixels


def nice_length(um: float) -> float:
    """The 1-2-5 length not above ``um``."""
    if um <= 0:
        return 0.0
    e = 10 ** math.floor(math.log10(um))
    for m in (5, 2, 1):
        if m * e <= um:
            return m * e
    return e


class SlideTileLoader:
    """Loads tiles of a provider into a TileCache on a WorkerPool (no widgets).

    ``notify()`` is called (on a worker thread) whenever a tile arrived; the view turns
    it into a repaint on the UI thread."""

    def __init__(self, provider, cache: TileCache, notify,
                 pool: WorkerPool | None = None) -> None:
        self.provider = provider
        self.cache = cache
        self.notify = notify
        # the app's one worker pool (its class caps hold for slides too)
        self.pool = pool or default_pool()
        self._inflight: dict = {}
        self._lock = threading.Lock()
        self.requests = 0
        cache.on_evict = self._evicted

    def _evicted(self, key) -> None:
        with self._lock:
            job = self._inflight.pop(key, None)
        if job is not None and hasattr(job, "cancel"):    # not a submit's marker
            job.cancel()

    def want(self, level: int, tiles: list[int], priority: int) -> None:
        """Ask for ``tiles`` of ``level``: layer 1 first, then all layers."""
        todo = []
        for t in tiles:
            key = (level, t)
            c = self.cache.get(key)
            if c is not None and c.complete:
                continue
            with self._lock:
                if key in self._inflight:
                    continue
            todo.append(t)
        if not todo:
            return
        for chunk in [todo[i:i + 8] for i in range(0, len(todo), 8)]:
            # in flight before the job can run (and finish: _load's clean-up comes after)
            marker = object()
            with self._lock:
                for t in chunk:
                    self._inflight[(level, t)] = marker
            job = self.pool.submit(
                lambda tok, lv=level, ts=chunk, p=priority: self._load(lv, ts, p, tok),
                priority, tag=self)
            with self._lock:
                for t in chunk:
                    if self._inflight.get((level, t)) is marker:
                        self._inflight[(level, t)] = job
            # a job cancelled before it ran (prefetch cancelled, a tile evicted) never
            # reaches _load's clean-up: its tiles must not stay "in flight" for ever
            job.future.add_done_callback(
                lambda f, lv=level, ts=chunk, j=job: f.cancelled() and self._settled(lv, ts, j))

    def _settled(self, level: int, tiles: list[int], job) -> None:
        with self._lock:
            for t in tiles:
                if self._inflight.get((level, t)) is job:
                    del self._inflight[(level, t)]

    def _load(self, level: int, tiles: list[int], priority: int, token) -> None:
        full = self.provider.max_layers
        try:
            if priority == PREFETCH:
                # H5: on a slow link, prefetch only the first quality layer
                stages = [1] if self.slow() else [full]
            else:
                stages = [1, full]
            for layers in stages:
                if token.cancelled:
                    return
                need = [t for t in tiles if not self._has(level, t, layers)]
                if not need:
                    continue
                self.provider.fetch(level, need, layers, cancelled=lambda: token.cancelled)
                self.requests += 1
                # what "all layers" means may have shrunk during the fetch (rights learnt)
                full = self.provider.max_layers
                got = min(layers, full)
                for t in need:
                    if token.cancelled:
                        return
                    px = self.provider.tile(level, t, layers=layers)
                    self.cache.put((level, t), CachedTile(px, got, got >= full))
                    self.notify()
        except RightsLimited as e:       # nothing of it may be had: the banner says why
            log.info("slide tiles %s of level %d not within the rights: %s", tiles, level,
                     e.message)
        except Exception:  # noqa: BLE001 - a failed tile stays coarse; logged
            log.exception("slide tiles %s of level %d failed", tiles, level)
        finally:
            with self._lock:
                for t in tiles:
                    self._inflight.pop((level, t), None)

    #: below this measured rate (bytes/s) prefetch brings layer 1 only
    slow_rate = 2_000_000

    def slow(self) -> bool:
        rate = getattr(self.provider, "rate", None)
        return rate is not None and rate < self.slow_rate

    def _has(self, level: int, t: int, layers: int) -> bool:
        c = self.cache.get((level, t))
        return c is not None and (c.complete or c.layers >= layers)

    def cancel_prefetch(self) -> None:
        self.pool.cancel_where(lambda j: j.priority == PREFETCH and j.tag is self)

    def close(self) -> None:
        self.pool.cancel_where(lambda j: j.tag is self)


class SlideView(QWidget):
    """The canvas: draws tiles, navigator, scale bar and marks; handles mouse and keys."""

    viewChanged = Signal()

    def __init__(self, provider, parent: QWidget | None = None, *, mode: str | None = None,
                 cache_bytes: "int | MemoryBudget" = 384 << 20, sr_queue: SRQueue | None = None,
                 sr_cache=None, pool: WorkerPool | None = None) -> None:
        super().__init__(parent)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setMouseTracking(True)
        self.setMinimumSize(320, 240)
        self.provider = provider
        info = provider.info
        self.finest = int(getattr(provider, "finest_level", 0) or 0)
        # a slide the rights limit in resolution is not super-resolved unless asked
        self.mode = mode or ("low" if info.get("state") == "low" and not self.finest else "high")
        self.vp = Viewport(provider.width, provider.height, provider.levels, (800, 600))
        self.vp.fit()
        self.cache = TileCache(cache_bytes)
        disp = dispatcher()
        self.loader = SlideTileLoader(provider, self.cache, lambda: disp.post(self._arrived),
                                      pool=pool)
        self._sr_queue = sr_queue or SRQueue(1, self.loader.pool)
        self._own_sr_queue = sr_queue is None
        self._sr_cache = sr_cache
        self.sr = self._make_sr()
        self._sr_jobs: dict = {}
        self._target_scale = self.vp.scale
        self._anchor = (0.0, 0.0)
        self._drag: QPointF | None = None
        self._last_pan_t = 0.0
        self._inertia = (0.0, 0.0)
        self._nav_drag = False
        self._overview = self._overview_level()
        self._anim = QTimer(self)
        self._anim.setInterval(16)
        self._anim.timeout.connect(self._tick)
        self._repaint_pending = False
        self.apply_mode(self.mode)
        self.loader.want(self._overview, list(range(provider.levels[self._overview].count)),
                         INTERACTION)

    # ------------------------------------------------------------------ state
    def _overview_level(self) -> int:
        for g in self.provider.levels:
            if max(g.width, g.height) <= 1024 and g.count <= 16:
                return max(g.level, self.finest)
        return len(self.provider.levels) - 1

    def _make_sr(self) -> SRTileService:
        """Super-resolution from the finest level the rights allow (level 0 if any)."""
        lv = self.finest
        g = self.provider.levels[lv]
        prov = self.provider
        return SRTileService(lambda x, y, w, h: prov.read_level(lv, x, y, w, h),
                             width=g.width, height=g.height,
                             tile=int(prov.info.get("tile_size") or 512) // 2,
                             queue=self._sr_queue, cache=self._sr_cache if lv == 0 else None)

    def _sr_downsample(self) -> int:
        return self.provider.levels[self.finest].downsample

    def rights_changed(self) -> None:
        """The provider learnt new rights: redo what is shown within them."""
        finest = int(getattr(self.provider, "finest_level", 0) or 0)
        if finest != self.finest:
            self.finest = finest
            self._overview = self._overview_level()
            for job in self._sr_jobs.values():
                job.cancel()
            self._sr_jobs.clear()
            self.sr = self._make_sr()
        self.loader.cancel_prefetch()
        self.cache.clear()
        self.loader.want(self._overview,
                         list(range(self.provider.levels[self._overview].count)), INTERACTION)
        self.refresh()

    def apply_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode
        self.vp.max_scale = 8.0 if mode == "low" else 4.0
        self.vp.clamp()
        self._target_scale = min(self._target_scale, self.vp.max_scale)
        self.refresh()

    def close_view(self) -> None:
        self._anim.stop()
        self.loader.close()
        self.cache.close()              # its tiles leave the one memory budget
        if self._own_sr_queue:          # running SR jobs (tile reads, maybe over the
            self._sr_queue.shutdown(wait=0)  # network) are cancelled: not waited for here

    def level(self) -> int:
        """The level drawn: the one the zoom calls for, never finer than the rights."""
        return max(self.vp.level_for_scale(), self.finest)

    def enlarged(self) -> float | None:
        """Screen pixels per pixel of the finest allowed level when zoomed in past it
        (that level is drawn enlarged: no finer detail may be had), else None."""
        if not self.finest or self.sr_active():
            return None
        k = self.vp.scale * self._sr_downsample()
        return k if k > 1.0 + 1e-6 else None

    def beyond_scan(self) -> float | None:
        """High-resolution mode zoomed past the scan's native magnification (level 0
        drawn enlarged, nothing generated): screen pixels per scanned pixel, else None.
        (A rights limit is :meth:`enlarged`; super-resolution is :meth:`sr_active`.)"""
        if self.mode != "high" or self.finest:
            return None
        k = self.vp.scale
        return k if k > 1.0 + 1e-6 else None

    def beyond_scan_text(self) -> str:
        """The banner for :meth:`beyond_scan` ("" when not zoomed past the scan)."""
        k = self.beyond_scan()
        if not k:
            return ""
        mpp = self.provider.info.get("mpp")
        native = f" (scan {10.0 / mpp:.1f}×)" if mpp else ""
        return f"enlarged ×{k:.1f} beyond scan{native}: enlarged pixels, no finer detail was scanned"

    def sr_active(self) -> int | None:
        if self.mode != "low":
            return None
        return self.vp.sr_scale(self.vp.scale * self._sr_downsample())

    def sr_tiles_visible(self) -> list[tuple[int, int, int]]:
        s = self.sr_active()
        if not s:
            return []
        x, y, w, h = self.vp.rect()
        n = self.sr.tile / s * self._sr_downsample()      # level-0 pixels per SR tile
        c0, r0 = max(0, int(x // n)), max(0, int(y // n))
        c1 = min(int((x + w) // n), int(math.ceil(self.provider.width / n)) - 1)
        r1 = min(int((y + h) // n), int(math.ceil(self.provider.height / n)) - 1)
        return [(s, c, r) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]

    # ------------------------------------------------------------------ loading
    def refresh(self) -> None:
        """The view changed: pin what is on screen, ask for it, prefetch ahead."""
        lvl = self.level()
        vis = self.vp.visible_tiles(lvl)
        pins = {(lvl, t) for t in vis}
        pins |= {(self._overview, t) for t in range(self.provider.levels[self._overview].count)}
        sr_vis = self.sr_tiles_visible()
        pins |= {("sr",) + k for k in sr_vis}
        self.cache.pin(pins)
        self.loader.want(lvl, vis, INTERACTION)
        if self.mode == "high" or not sr_vis:
            ahead = self.vp.prefetch_tiles(lvl)[:24]
            if ahead:
                self.loader.want(lvl, ahead, PREFETCH)
        if sr_vis:
            self._want_sr(sr_vis)
        self.update()
        self.viewChanged.emit()

    def _want_sr(self, vis: list[tuple[int, int, int]]) -> None:
        s = vis[0][0]
        cols = {k[1] for k in vis}
        rows = {k[2] for k in vis}
        near = {(s, c, r) for c in range(min(cols) - 1, max(cols) + 2)
                for r in range(min(rows) - 1, max(rows) + 2)} - set(vis)
        self._sr_queue.retarget(set(vis), near)
        n = self.sr.tile / s * self._sr_downsample()
        cx, cy = self.vp.centre
        centre_first = sorted(vis, key=lambda k: math.hypot((k[1] + 0.5) * n - cx,
                                                            (k[2] + 0.5) * n - cy))
        for key, prio in [(k, VIEW) for k in centre_first] + [(k, NEAR) for k in sorted(near)]:
            if ("sr",) + key in self.cache or key in self._sr_jobs:
                continue
            if key[1] < 0 or key[2] < 0:
                continue
            job = self.sr.request(*key, priority=prio)
            self._sr_jobs[key] = job
            disp = dispatcher()
            job.future.add_done_callback(lambda f, k=key: disp.post(self._sr_done, k, f))

    def _sr_done(self, key, fut) -> None:
        self._sr_jobs.pop(key, None)
        if fut.cancelled() or fut.exception() is not None:
            return
        t = fut.result()
        self.cache.put(("sr",) + key, CachedTile(t.pixels, 0, True, generated=True))
        self.update()

    def _arrived(self) -> None:
        self.update()

    # ------------------------------------------------------------------ painting
    def paintEvent(self, _ev) -> None:
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(236, 236, 236))
        p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, self.vp.scale < 2.0)
        lvl = self.level()
        g = self.provider.levels[lvl]
        sr_drawn = 0
        for t in self.vp.visible_tiles(lvl):
            self._draw_tile(p, lvl, t)
        for key in self.sr_tiles_visible():
            c = self.cache.get(("sr",) + key)
            if c is None:
                continue
            s, col, row = key
            n = self.sr.tile / s * self._sr_downsample()
            x0, y0 = self.vp.to_screen(col * n, row * n)
            target = QRectF(x0, y0, n * self.vp.scale, n * self.vp.scale)
            img = qimage(c.pixels)
            p.drawImage(target, img, QRectF(0, 0, img.width(), img.height()))
            self._mark_sr(p, target, s)
            sr_drawn += 1
        self._draw_scale_bar(p)
        self._draw_navigator(p)
        self._draw_banners(p, sr_drawn, g)
        p.end()

    def _draw_tile(self, p: QPainter, lvl: int, t: int) -> None:
        g = self.provider.levels[lvl]
        tx, ty, tw, th = g.tile_rect(t)
        d = g.downsample
        x0, y0 = self.vp.to_screen(tx * d, ty * d)
        target = QRectF(x0, y0, tw * d * self.vp.scale, th * d * self.vp.scale)
        c = self.cache.get((lvl, t))
        if c is not None:
            img = qimage(c.pixels)
            p.drawImage(target, img, QRectF(0, 0, img.width(), img.height()))
            return
        # coarse first: the best coarser tile held, scaled up into place
        for up in range(lvl + 1, len(self.provider.levels)):
            G = self.provider.levels[up]
            f = G.downsample / d
            ax, ay = tx / f, ty / f
            T = G.tiles_in(int(ax), int(ay), 1, 1)
            if not T:
                continue
            c = self.cache.get((up, T[0]))
            if c is None:
                continue
            ux, uy, _uw, _uh = G.tile_rect(T[0])
            src = QRectF(ax - ux, ay - uy, tw / f, th / f)
            p.drawImage(target, qimage(c.pixels), src)
            return

    @staticmethod
    def _mark_sr(p: QPainter, r: QRectF, s: int) -> None:
        pen = QPen(SR_COLOUR, 2, Qt.PenStyle.DashLine)
        p.setPen(pen)
        p.setBrush(Qt.BrushStyle.NoBrush)
        p.drawRect(r.adjusted(1, 1, -1, -1))
        badge = QRectF(r.left() + 3, r.top() + 3, 46, 16)
        p.fillRect(badge, SR_COLOUR)
        p.setPen(QColor(255, 255, 255))
        f = QFont()
        f.setPixelSize(11)
        f.setBold(True)
        p.setFont(f)
        p.drawText(badge, Qt.AlignmentFlag.AlignCenter, f"SR ×{s}")
        p.setBrush(QBrush(SR_COLOUR, Qt.BrushStyle.BDiagPattern))
        p.setPen(Qt.PenStyle.NoPen)
        p.drawRect(QRectF(r.right() - 14, r.top(), 14, 14))

    def _draw_scale_bar(self, p: QPainter) -> None:
        mpp = self.provider.mpp
        if not mpp:
            return
        um_per_screen_px = mpp / self.vp.scale
        target = nice_length(160 * um_per_screen_px)
        if target <= 0:
            return
        px = target / um_per_screen_px
        x, y = 16, self.height() - 24
        p.fillRect(QRectF(x - 6, y - 20, px + 12, 30), QColor(255, 255, 255, 200))
        p.fillRect(QRectF(x, y, px, 5), QColor(0, 0, 0))
        p.setPen(QColor(0, 0, 0))
        label = f"{target / 1000:g} mm" if target >= 1000 else f"{target:g} µm"
        p.drawText(QPointF(x, y - 5), label)

    def nav_rect(self) -> QRectF:
        g = self.provider.levels[self._overview]
        side = 180.0
        f = side / max(g.width, g.height)
        w, h = g.width * f, g.height * f
        return QRectF(self.width() - w - 12, 12, w, h)

    def _draw_navigator(self, p: QPainter) -> None:
        r = self.nav_rect()
        g = self.provider.levels[self._overview]
        p.fillRect(r.adjusted(-3, -3, 3, 3), QColor(255, 255, 255, 220))
        f = r.width() / g.width
        for t in range(g.count):
            c = self.cache.get((self._overview, t))
            if c is None:
                continue
            tx, ty, tw, th = g.tile_rect(t)
            p.drawImage(QRectF(r.left() + tx * f, r.top() + ty * f, tw * f, th * f),
                        qimage(c.pixels), QRectF(0, 0, tw, th))
        x, y, w, h = self.vp.rect()
        s = r.width() / self.provider.width
        p.setPen(QPen(QColor(220, 30, 30), 2))
        p.setBrush(Qt.BrushStyle.NoBrush)
        view = QRectF(r.left() + x * s, r.top() + y * s, max(3, w * s), max(3, h * s))
        p.drawRect(view.intersected(r.adjusted(-1, -1, 1, 1)))

    def _draw_banners(self, p: QPainter, sr_drawn: int, g) -> None:
        info = self.provider.info
        f = QFont()
        f.setPixelSize(12)
        p.setFont(f)
        lines = []
        mag = self.vp.scale * (10.0 / info["mpp"] if info.get("mpp") else 1)
        lines.append(f"{MODE_NAMES[self.mode]} · level {g.level} · "
                     + (f"{mag:.1f}×" if info.get("mpp") else f"{self.vp.scale:.2f}×"))
        y = 8
        for text in lines:
            p.fillRect(QRectF(8, y, 8 + 7 * len(text), 18), QColor(255, 255, 255, 200))
            p.setPen(QColor(0, 0, 0))
            p.drawText(QPointF(12, y + 13), text)
            y += 22
        if info.get("qc_status") == "flagged":
            flags = ", ".join((info.get("qc") or {}).get("flags") or [])
            text = f"QC FLAGGED: {flags}"
            p.fillRect(QRectF(8, y, 8 + 7 * len(text), 18), QColor(255, 170, 0, 230))
            p.setPen(QColor(0, 0, 0))
            p.drawText(QPointF(12, y + 13), text)
            y += 22
        text = self.beyond_scan_text()
        if text:
            p.fillRect(QRectF(8, y, 8 + 7 * len(text), 18), LIMIT_COLOUR)
            p.setPen(QColor(0, 0, 0))
            p.drawText(QPointF(12, y + 13), text)
            y += 22
        k = self.enlarged()
        if k:
            text = (f"ENLARGED ×{k:.1f} from level {self.finest}, the finest your rights allow: "
                    "no finer detail (not super-resolved)")
            p.fillRect(QRectF(8, y, 8 + 7 * len(text), 18), LIMIT_COLOUR)
            p.setPen(QColor(0, 0, 0))
            p.drawText(QPointF(12, y + 13), text)
            y += 22
        if sr_drawn:
            s = self.sr_active()
            text = f"SUPER-RESOLVED ×{s}: generated detail on screen (magenta tiles), not scanned"
            if self.finest:
                text += f" (from level {self.finest}, the finest your rights allow)"
            p.fillRect(QRectF(0, y, self.width() - 200, 20), SR_COLOUR)
            p.setPen(QColor(255, 255, 255))
            p.drawText(QPointF(12, y + 15), text)

    # ------------------------------------------------------------------ animation
    def zoom_to(self, scale: float, anchor: tuple[float, float] | None = None,
                animate: bool = True) -> None:
        self._target_scale = min(self.vp.max_scale, max(self.vp.min_scale(), scale))
        self._anchor = anchor or (self.width() / 2, self.height() / 2)
        if not animate:
            self.vp.zoom_at(self._target_scale / self.vp.scale, *self._anchor)
            self.refresh()
            return
        self._anim.start()

    def _tick(self) -> None:
        busy = False
        if abs(math.log(self._target_scale / self.vp.scale)) > 0.005:
            step = math.exp(0.3 * math.log(self._target_scale / self.vp.scale))
            self.vp.zoom_at(step, *self._anchor)
            busy = True
        vx, vy = self._inertia
        if self._drag is None and math.hypot(vx, vy) > 0.5:
            self.vp.pan_screen(vx, vy)
            self._inertia = (vx * 0.88, vy * 0.88)
            self.vp.velocity = (-vx / self.vp.scale * 60, -vy / self.vp.scale * 60)
            busy = True
        if not busy:
            self._anim.stop()
            self.vp.velocity = (0.0, 0.0)
        self.refresh()

    # ------------------------------------------------------------------ input
    def resizeEvent(self, ev) -> None:
        first = self.vp.size == (800, 600)
        self.vp.size = (max(1, self.width()), max(1, self.height()))
        if first:
            self.vp.fit()
            self._target_scale = self.vp.scale
        self.vp.clamp()
        self.refresh()

    def wheelEvent(self, ev) -> None:
        steps = ev.angleDelta().y() / 120.0
        pos = ev.position()
        self.zoom_to(self._target_scale * (1.25 ** steps), (pos.x(), pos.y()))

    def mousePressEvent(self, ev) -> None:
        pos = ev.position()
        if self.nav_rect().contains(pos):
            self._nav_drag = True
            self._nav_jump(pos)
            return
        if ev.button() == Qt.MouseButton.LeftButton:
            self._drag = pos
            self._inertia = (0.0, 0.0)
            self._last_pan_t = time.monotonic()
            self.setCursor(Qt.CursorShape.ClosedHandCursor)

    def mouseMoveEvent(self, ev) -> None:
        pos = ev.position()
        if self._nav_drag:
            self._nav_jump(pos)
            return
        if self._drag is not None:
            dx, dy = pos.x() - self._drag.x(), pos.y() - self._drag.y()
            now = time.monotonic()
            dt = max(1e-3, now - self._last_pan_t)
            self._last_pan_t = now
            self._drag = pos
            self.vp.pan_screen(dx, dy)
            self._inertia = (dx, dy)
            self.vp.velocity = (-dx / self.vp.scale / dt, -dy / self.vp.scale / dt)
            self.refresh()

    def mouseReleaseEvent(self, ev) -> None:
        if self._nav_drag:
            self._nav_drag = False
            return
        if self._drag is not None:
            self._drag = None
            self.unsetCursor()
            if math.hypot(*self._inertia) > 2:
                self._anim.start()

    def mouseDoubleClickEvent(self, ev) -> None:
        pos = ev.position()
        f = 0.5 if ev.modifiers() & Qt.KeyboardModifier.ShiftModifier else 2.0
        self.zoom_to(self._target_scale * f, (pos.x(), pos.y()))

    def _nav_jump(self, pos: QPointF) -> None:
        r = self.nav_rect()
        s = self.provider.width / r.width()
        self.vp.centre = ((pos.x() - r.left()) * s, (pos.y() - r.top()) * s)
        self.vp.clamp()
        self.refresh()

    def keyPressEvent(self, ev) -> None:
        k = ev.key()
        step = 0.2 * min(self.width(), self.height())
        moves = {Qt.Key.Key_Left: (step, 0), Qt.Key.Key_A: (step, 0),
                 Qt.Key.Key_Right: (-step, 0), Qt.Key.Key_D: (-step, 0),
                 Qt.Key.Key_Up: (0, step), Qt.Key.Key_W: (0, step),
                 Qt.Key.Key_Down: (0, -step), Qt.Key.Key_S: (0, -step)}
        if k in moves:
            dx, dy = moves[k]
            self.vp.velocity = (-dx / self.vp.scale * 5, -dy / self.vp.scale * 5)
            self.vp.pan_screen(dx, dy)
            self.refresh()
        elif k in (Qt.Key.Key_Plus, Qt.Key.Key_Equal):
            self.zoom_to(self._target_scale * 1.5)
        elif k == Qt.Key.Key_Minus:
            self.zoom_to(self._target_scale / 1.5)
        elif k in (Qt.Key.Key_0, Qt.Key.Key_Home):
            self.vp.fit()
            self._target_scale = self.vp.scale
            self.refresh()
        else:
            super().keyPressEvent(ev)


class ImageDialog(QDialog):
    """A label or macro image."""

    def __init__(self, title: str, rgb: np.ndarray, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(title)
        lay = QVBoxLayout(self)
        lab = QLabel()
        pm = QPixmap.fromImage(qimage(rgb))
        if pm.width() > 900:
            pm = pm.scaledToWidth(900, Qt.TransformationMode.SmoothTransformation)
        lab.setPixmap(pm)
        lay.addWidget(lab)


class SlidePane(QWidget):
    """The pane: a tool row (mode, label, macro, fit), a rights banner when the user's
    rights limit the slide, the canvas, a status line."""

    #: plain-words news for the main window's status bar (rights, label refused, ...)
    notice = Signal(str)

    def __init__(self, provider, parent: QWidget | None = None, **kw) -> None:
        super().__init__(parent)
        self.provider = provider
        # listening before the view asks for its first tiles, so that rights a refused
        # request teaches are never missed (handled on the UI thread, after this returns)
        listeners = getattr(provider, "listeners", None)
        if listeners is not None:           # heard on a worker thread, handled on the UI's
            disp = dispatcher()
            self._listener = (lambda kind, body: disp.post(self._on_limited, body)
                              if kind == "limited" else None)
            listeners.append(self._listener)
        self.view = SlideView(provider, self, **kw)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        self.mode_box = QComboBox()
        for m in MODES:
            self.mode_box.addItem(MODE_NAMES[m], m)
        self.mode_box.setCurrentIndex(MODES.index(self.view.mode))
        self.mode_box.currentIndexChanged.connect(
            lambda i: self.view.apply_mode(self.mode_box.itemData(i)))
        row.addWidget(QLabel("Mode:"))
        row.addWidget(self.mode_box)
        self.assoc_buttons: dict[str, QPushButton] = {}
        self.assoc_state: dict[str, str] = {}          # name -> "not permitted" / "shown"
        self._assoc_tasks: list = []
        for name in ("label", "macro", "thumbnail"):
            if name in (provider.info.get("associated") or {}):
                b = QPushButton(name.capitalize())
                b.clicked.connect(lambda _=False, n=name: self.show_associated(n))
                row.addWidget(b)
                self.assoc_buttons[name] = b
                if not provider.associated_permitted(name):
                    self._not_permitted(name, "they are whole images of the slide (the label "
                                              "carries the patient's identity) and need "
                                              "unlimited access; your access is limited")
        fit = QPushButton("Fit")
        fit.clicked.connect(lambda: self.view.keyPressEvent(_FakeKey(Qt.Key.Key_Home)))
        row.addWidget(fit)
        row.addStretch(1)
        info = provider.info
        qc = info.get("qc_status") or "unchecked"
        self.status = QLabel(
            f"{info.get('label') or info.get('slide_uid')} · {info['width']}×{info['height']} px"
            + (f" · {info['mpp']:.3g} µm/px" if info.get("mpp") else "")
            + f" · stored {info.get('state') or 'high'} resolution · QC {qc}")
        if qc == "flagged":
            self.status.setStyleSheet("color: #b35c00; font-weight: bold")
        row.addWidget(self.status)
        lay.addLayout(row)
        self.rights_banner = QLabel()
        self.rights_banner.setWordWrap(True)
        self.rights_banner.setStyleSheet("background: #fff3cd; color: #5c4300; padding: 4px;"
                                         " border-bottom: 1px solid #e0c36a")
        lay.addWidget(self.rights_banner)
        lay.addWidget(self.view, 1)
        self.rights_text = ""
        self._show_rights()

    # ------------------------------------------------------------------ rights
    def _slide_words(self) -> dict:
        p = self.provider
        return {"levels": p.info.get("levels"), "mpp": p.info.get("mpp"),
                "layers": p.stored_layers, "versions": p.info.get("versions"),
                "unlimited": p.unlimited}

    def _show_rights(self) -> None:
        p = self.provider
        self.rights_text = (explain_slide_rights(p.rights, **self._slide_words())
                            if p.limited else "")
        self.rights_banner.setText(self.rights_text)
        self.rights_banner.setVisible(bool(self.rights_text))

    def _on_limited(self, body: dict) -> None:                 # UI thread
        self._show_rights()
        for name in self.assoc_buttons:
            if not self.provider.associated_permitted(name):
                self._not_permitted(name, "your access to this slide is now limited")
        self.view.rights_changed()
        self.notice.emit(explain_slide_rights_error(body, **self._slide_words()))

    def _not_permitted(self, name: str, reason: str) -> None:
        b = self.assoc_buttons[name]
        b.setText(f"{name.capitalize()}: not permitted")
        b.setToolTip(f"The {name} image is not permitted: {reason}.")
        b.setEnabled(False)
        self.assoc_state[name] = "not permitted"

    def show_associated(self, name: str) -> None:
        """Fetch the label / macro on a worker; show it, or say it is not permitted."""
        from client.slides import NotPermitted

        if self.assoc_state.get(name) == "not permitted":
            self.notice.emit(self.assoc_buttons[name].toolTip())
            return
        prov = self.provider
        task = Task(lambda _ctx: prov.associated(name), name=f"slide-{name}",
                    pool=self.view.loader.pool, priority=INTERACTION, parent=self)

        def shown(rgb) -> None:
            self.assoc_state[name] = "shown"
            ImageDialog(f"{name.capitalize()} image", rgb, self).show()

        def failed(e) -> None:
            if isinstance(e, NotPermitted):
                self._not_permitted(name, e.reason)
                self.notice.emit(f"The {name} image is not permitted: {e.reason}.")
            else:
                self.notice.emit(f"Cannot load the {name} image: {e}")

        task.finished.connect(shown)
        task.failed.connect(failed)
        self._assoc_tasks = [t for t in self._assoc_tasks if not t.done] + [task]
        task.start()

    def closeEvent(self, ev) -> None:
        listeners = getattr(self.provider, "listeners", None)
        if listeners is not None and getattr(self, "_listener", None) in listeners:
            listeners.remove(self._listener)
        self.view.close_view()
        super().closeEvent(ev)


class _FakeKey:
    def __init__(self, key) -> None:
        self._k = key

    def key(self):
        return self._k


def open_slide_window(provider, **kw) -> SlidePane:
    """A top-level slide window (used by the main window and by tests)."""
    pane = SlidePane(provider, **kw)
    pane.setWindowTitle(f"Slide {provider.info.get('label') or provider.info.get('slide_uid')}")
    pane.resize(1100, 800)
    return pane

