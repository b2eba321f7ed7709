"""MprView: one MPR pane (axial, coronal or sagittal, any angle) of a shared MprState.

The widget holds no geometry of its own beyond its zoom and pan: the plane, the
crosshair centre, the slab and the window live in :class:`~imaging.mpr.MprState`, which
every pane subscribes to (and unsubscribes from in ``closeEvent``). Reslicing runs on a
:class:`ResliceScheduler` — in the app's worker pool, one at a time, the latest request
per pane wins, results come back to the UI thread through a queued signal — or
synchronously (``sync=True``, for tests and offscreen snapshots).

Mouse: left button = the current tool: *crosshair* (drag the centre to move it, drag a
line away from the centre to rotate the other two planes — oblique and double-oblique
planes), *window* (level/width, shared by all panes) or *distance* (measure in mm, kept
in patient coordinates); middle = pan; right = zoom; wheel = move through the volume
along this pane's normal (Ctrl+wheel = zoom); double-click = maximise/restore (the layout
listens to :attr:`MprView.doubleClicked`). Keys: Up/Down and Page Up/Down scroll, F fit,
R reset the planes.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass

import numpy as np
from PySide6.QtCore import QObject, QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QFont, QFontMetricsF, QImage, QPainter, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from client.pool import INTERACTION, Job, WorkerPool, default_pool
from imaging import windowing
from imaging.mpr import MprState, PlaneGeometry, display_uint8, plane_labels

from .stackpaint import draw_text_lines

__all__ = ["ResliceScheduler", "MprView", "Tool", "PLANE_COLORS", "SLAB_NAMES", "Measurement3D"]

PLANE_COLORS = {"axial": QColor(230, 70, 70), "coronal": QColor(80, 200, 90),
                "sagittal": QColor(240, 200, 60)}
_TEXT = QColor(235, 235, 235)
_MEASURE = QColor(255, 215, 0)
SLAB_NAMES = {"avg": "Average", "mip": "MIP", "minip": "MinIP"}
_GRAB_CENTER = 10.0      # px: a press this close to the centre moves it
_GRAB_LINE = 7.0         # px: a press this close to a line (away from the centre) rotates
_MAX_SIDE = 1024         # reslice at most this many pixels per side


class Tool:
    CROSSHAIR = "crosshair"
    WINDOW = "window"
    DISTANCE = "distance"


@dataclass(frozen=True)
class Measurement3D:
    """A distance between two patient points (mm)."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]

    @property
    def length(self) -> float:
        return float(np.linalg.norm(np.subtract(self.p1, self.p0)))


# --------------------------------------------------------------------------- scheduler
class ResliceScheduler(QObject):
    """Reslices in the app's worker pool, one at a time (INTERACTION class); per key only
    the latest request runs (older ones are dropped unseen). ``submit`` from the UI
    thread; the callback runs on the UI thread. No thread of its own: one pool job drains
    the requests while there are any."""

    _done = Signal(object)

    def __init__(self, parent: QObject | None = None, pool: WorkerPool | None = None) -> None:
        super().__init__(parent)
        self.pool = pool or default_pool()
        self._cv = threading.Condition()
        self._jobs: dict[object, tuple] = {}
        self._job: Job | None = None             # the pool job draining the requests
        self._stop = False
        self._done.connect(self._deliver, Qt.ConnectionType.QueuedConnection)

    def submit(self, key, fn, callback) -> None:
        with self._cv:
            if self._stop:
                return
            self._jobs.pop(key, None)                   # supersede, keep arrival order fair
            self._jobs[key] = (fn, callback)
            if self._job is None or self._job.future.done():
                self._job = self.pool.submit(self._drain, INTERACTION, tag=self)

    def pending(self) -> int:
        with self._cv:
            return len(self._jobs)

    def _drain(self, token) -> None:
        while True:
            with self._cv:
                if self._stop or token.cancelled or not self._jobs:
                    self._job = None
                    self._cv.notify_all()
                    return
                key = next(iter(self._jobs))
                fn, callback = self._jobs.pop(key)
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - delivered to the callback
                result = e
            try:
                self._done.emit((callback, result))
            except RuntimeError:      # the scheduler was deleted
                with self._cv:
                    self._stop = True

    def _deliver(self, item) -> None:
        callback, result = item
        try:
            callback(result)
        except RuntimeError:          # the pane was closed while its reslice ran
            pass

    def shutdown(self, wait: float = 2.0) -> None:
        """Drop the requests; wait (at most ``wait`` s) for a reslice that is running."""
        with self._cv:
            self._stop = True
            self._jobs.clear()
            job = self._job
        if job is not None:
            job.cancel()
            futures_wait([job.future], timeout=wait)


# --------------------------------------------------------------------------- view
@dataclass
class _Drag:
    action: str
    button: Qt.MouseButton
    start: QPointF
    last: QPointF
    angle: float = 0.0
    p0: tuple | None = None


class MprView(QWidget):
    """One pane of the MPR layout (see the module docstring)."""

    doubleClicked = Signal(str)
    """The pane name: maximise or restore it."""
    rendered = Signal(str)
    """A new picture is on screen (the pane name)."""
    measurementAdded = Signal(object)

    def __init__(self, state: MprState, name: str, scheduler: ResliceScheduler | None = None,
                 parent: QWidget | None = None, *, sync: bool = False) -> None:
        super().__init__(parent)
        self.state = state
        self.name = name
        self.scheduler = scheduler
        self.sync = sync or scheduler is None
        self.setAttribute(Qt.WidgetAttribute.WA_OpaquePaintEvent)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setMouseTracking(True)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(64, 64)
        self.tool = Tool.CROSSHAIR
        self.zoom = 1.0                        # 1 = the volume fits the pane
        self.pan = (0.0, 0.0)                  # mm along the plane's u and v
        self.measurements: list[Measurement3D] = []
        self._seq = 0
        self._shown_seq = 0
        self._plane: PlaneGeometry | None = None      # geometry of the picture on screen
        self._values: np.ndarray | None = None        # modality values of that picture
        self._image: QImage | None = None
        self._buffer: np.ndarray | None = None
        self._image_window: tuple[float, float] | None = None
        self._drag: _Drag | None = None
        self._cursor: QPointF | None = None
        font = QFont(self.font())
        font.setPointSizeF(9.0)
        self._font = font
        state.subscribe(self._on_state)

    # ------------------------------------------------------------------ state
    def _on_state(self, kind: str) -> None:
        if kind == "window":
            self._image = None                          # re-window only
            self.update()
            return
        self.request()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        self.state.unsubscribe(self._on_state)
        super().closeEvent(event)

    def detach(self) -> None:
        """Stop listening to the state (the layout calls it when it closes)."""
        self.state.unsubscribe(self._on_state)

    # ------------------------------------------------------------------ geometry
    def _fit_spacing(self, w: int, h: int) -> float:
        u, v = self.state.axes[self.name]
        corners = self.state.volume.geometry.corners()
        rel = corners - self.state.volume.geometry.center
        extent_u = float(np.ptp(rel @ u)) + min(self.state.volume.spacing)
        extent_v = float(np.ptp(rel @ v)) + min(self.state.volume.spacing)
        return max(extent_u / max(w, 1), extent_v / max(h, 1))

    def target_plane(self) -> PlaneGeometry:
        """The plane this pane should show now (device-pixel resolution, capped)."""
        ratio = self.devicePixelRatioF()
        w = max(1, min(int(round(self.width() * ratio)), _MAX_SIDE))
        h = max(1, min(int(round(self.height() * ratio)), _MAX_SIDE))
        spacing = self._fit_spacing(w, h) / self.zoom
        return self.state.plane(self.name, (h, w), spacing, self.pan)

    def plane(self) -> PlaneGeometry | None:
        """Geometry of the picture on screen."""
        return self._plane

    def values(self) -> np.ndarray | None:
        """Modality values of the picture on screen (NaN outside the volume)."""
        return self._values

    def widget_to_patient(self, pos: QPointF) -> np.ndarray:
        plane = self._plane or self.target_plane()
        sx = plane.shape[1] / max(self.width(), 1)
        sy = plane.shape[0] / max(self.height(), 1)
        return plane.pixel_to_patient(pos.y() * sy - 0.5, pos.x() * sx - 0.5)

    def patient_to_widget(self, point) -> tuple[QPointF, float]:
        plane = self._plane or self.target_plane()
        row, col, dist = plane.patient_to_pixel(point)
        sx = max(self.width(), 1) / plane.shape[1]
        sy = max(self.height(), 1) / plane.shape[0]
        return QPointF((col + 0.5) * sx, (row + 0.5) * sy), dist

    # ------------------------------------------------------------------ rendering
    def request(self) -> None:
        """Reslice for the current state (latest request wins)."""
        if self.width() <= 0 or self.height() <= 0:
            return
        self._seq += 1
        seq = self._seq
        plane = self.target_plane()
        state = self.state
        name = self.name

        def work():
            return plane, state.render(name, plane)

        def done(result) -> None:
            if isinstance(result, Exception):
                return
            self._show(seq, *result)

        if self.sync:
            done(work())
        else:
            self.scheduler.submit(self.name, work, done)

    def _show(self, seq: int, plane: PlaneGeometry, values: np.ndarray) -> None:
        if seq < self._shown_seq:
            return
        self._shown_seq = seq
        self._plane = plane
        self._values = values
        self._image = None
        self.update()
        self.rendered.emit(self.name)

    def window(self) -> tuple[float, float]:
        """The shared window; until one is chosen (no usable header, voxels still on
        their way), the percentile window of this plane (:func:`windowing.initial_window`),
        kept once the plane has data with a spread."""
        if self.state.window is None:
            chosen = windowing.initial_window(None, None, self._values)
            if chosen is None:
                return (40.0, 400.0) if self.state.volume.modality.upper() == "CT" else (0.0, 1.0)
            self.state.window = chosen
        return self.state.window

    def _qimage(self) -> QImage | None:
        if self._values is None:
            return None
        win = self.window()
        if self._image is None or self._image_window != win:
            self._buffer = np.ascontiguousarray(display_uint8(self._values, *win))
            h, w = self._buffer.shape
            self._image = QImage(self._buffer.data, w, h, w, QImage.Format.Format_Grayscale8)
            self._image_window = win
        return self._image

    def grab_array(self) -> np.ndarray:
        """The pane as drawn (overlays included), (h, w, 3) uint8: for tests."""
        img = self.grab().toImage().convertToFormat(QImage.Format.Format_RGB888)
        arr = np.frombuffer(img.constBits(), np.uint8).reshape(img.height(), img.bytesPerLine())
        return arr[:, : img.width() * 3].reshape(img.height(), img.width(), 3).copy()

    # ------------------------------------------------------------------ painting
    def paintEvent(self, event) -> None:  # noqa: N802
        p = QPainter(self)
        p.fillRect(self.rect(), Qt.GlobalColor.black)
        img = self._qimage()
        if img is not None:
            p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
            p.drawImage(QRectF(0, 0, self.width(), self.height()), img)
            self._paint_crosshair(p)
            self._paint_measurements(p)
        self._paint_text(p)
        p.end()

    def center_on_screen(self) -> QPointF:
        return self.patient_to_widget(self.state.center)[0]

    def _line_ends(self, du: float, dv: float) -> tuple[QPointF, QPointF]:
        c = self.center_on_screen()
        span = 2.0 * (self.width() + self.height())
        return (QPointF(c.x() - du * span, c.y() - dv * span), QPointF(c.x() + du * span, c.y() + dv * span))

    def _paint_crosshair(self, p: QPainter) -> None:
        c = self.center_on_screen()
        gap = 12.0
        for other, (du, dv) in self.state.crosshair_lines(self.name).items():
            pen = QPen(PLANE_COLORS[other], 1.2)
            pen.setCosmetic(True)
            p.setPen(pen)
            a, b = self._line_ends(du, dv)
            p.drawLine(a, QPointF(c.x() - du * gap, c.y() - dv * gap))
            p.drawLine(QPointF(c.x() + du * gap, c.y() + dv * gap), b)
        frame = QPen(PLANE_COLORS[self.name], 2.0)
        p.setPen(frame)
        p.setBrush(Qt.BrushStyle.NoBrush)
        p.drawRect(QRectF(1, 1, self.width() - 2, self.height() - 2))

    def _paint_measurements(self, p: QPainter) -> None:
        tol = 0.5 * self.state.step(self.name)
        items = list(self.measurements)
        if self._drag is not None and self._drag.action == Tool.DISTANCE and self._drag.p0 is not None:
            items.append(Measurement3D(self._drag.p0, tuple(self.widget_to_patient(self._drag.last))))
        for m in items:
            a, da = self.patient_to_widget(m.p0)
            b, db = self.patient_to_widget(m.p1)
            if abs(da) > tol or abs(db) > tol:
                continue
            pen = QPen(_MEASURE, 1.5)
            pen.setCosmetic(True)
            p.setPen(pen)
            p.drawLine(a, b)
            self._text(p, QPointF(max(a.x(), b.x()) + 6, min(a.y(), b.y())), [f"{m.length:.1f} mm"], _MEASURE)

    def overlay_lines(self) -> dict[str, list[str]]:
        """The overlay texts: corners and orientation labels (for tests and snapshots)."""
        st = self.state
        title = self.name.capitalize() + (" (oblique)" if st.is_oblique(self.name) else "")
        top_left = [title]
        if st.slab > 0:
            top_left.append(f"{SLAB_NAMES[st.slab_mode]} {st.slab:.1f} mm")
        n = st.normal(self.name)
        top_left.append(f"{float(np.dot(st.center, n)):+.1f} mm")
        c, w = st.window or (None, None)
        bottom_left = [windowing.window_label(c, w)] if c is not None else []
        u, v = st.axes[self.name]
        labels = plane_labels(u, v)
        return {"top_left": top_left, "bottom_left": bottom_left,
                "labels": [labels.left, labels.right, labels.top, labels.bottom]}

    def _text(self, p: QPainter, at: QPointF, lines: list[str], color: QColor = _TEXT,
              right: bool = False) -> None:
        draw_text_lines(p, self._font, at, lines, color, right)

    def _paint_text(self, p: QPainter) -> None:
        fm = QFontMetricsF(self._font)
        lines = self.overlay_lines()
        m = 6.0
        w, h = float(self.width()), float(self.height())
        self._text(p, QPointF(m, m), lines["top_left"], PLANE_COLORS[self.name])
        self._text(p, QPointF(m, h - m - fm.lineSpacing() * len(lines["bottom_left"])), lines["bottom_left"])
        left, right, top, bottom = lines["labels"]
        self._text(p, QPointF((w - fm.horizontalAdvance(top)) / 2, m), [top])
        self._text(p, QPointF((w - fm.horizontalAdvance(bottom)) / 2, h - m - fm.lineSpacing()), [bottom])
        self._text(p, QPointF(m, (h - fm.lineSpacing()) / 2), [left])
        self._text(p, QPointF(w - m, (h - fm.lineSpacing()) / 2), [right], right=True)

    # ------------------------------------------------------------------ tools
    def set_tool(self, tool: str) -> None:
        self.tool = tool
        self.setCursor(Qt.CursorShape.CrossCursor if tool == Tool.DISTANCE else Qt.CursorShape.ArrowCursor)

    def fit(self) -> None:
        self.zoom = 1.0
        self.pan = (0.0, 0.0)
        self.request()

    def add_measurement(self, p0, p1) -> Measurement3D:
        m = Measurement3D(tuple(map(float, p0)), tuple(map(float, p1)))
        self.measurements.append(m)
        self.measurementAdded.emit(m)
        self.update()
        return m

    def _hit(self, pos: QPointF) -> str:
        """What a press at ``pos`` grabs: "center", "line" or "" (elsewhere)."""
        c = self.center_on_screen()
        d = math.hypot(pos.x() - c.x(), pos.y() - c.y())
        if d <= _GRAB_CENTER:
            return "center"
        for du, dv in self.state.crosshair_lines(self.name).values():
            # distance from the line through c with direction (du, dv)
            if abs((pos.x() - c.x()) * dv - (pos.y() - c.y()) * du) <= _GRAB_LINE:
                return "line"
        return ""

    # ------------------------------------------------------------------ events
    def resizeEvent(self, event) -> None:  # noqa: N802
        super().resizeEvent(event)
        self.request()

    def mousePressEvent(self, event) -> None:  # noqa: N802
        pos = event.position()
        button = event.button()
        if button == Qt.MouseButton.LeftButton:
            action = self.tool
            if action == Tool.CROSSHAIR:
                hit = self._hit(pos)
                if hit == "line":
                    action = "rotate"
                else:
                    action = "move"
                    if hit != "center":
                        self._move_center_to(pos)
        elif button == Qt.MouseButton.MiddleButton:
            action = "pan"
        elif button == Qt.MouseButton.RightButton:
            action = "zoom"
        else:
            return super().mousePressEvent(event)
        c = self.center_on_screen()
        drag = _Drag(action, button, pos, pos, math.atan2(pos.y() - c.y(), pos.x() - c.x()))
        if action == Tool.DISTANCE:
            drag.p0 = tuple(self.widget_to_patient(pos))
        self._drag = drag
        event.accept()

    def _move_center_to(self, pos: QPointF) -> None:
        """Move the crosshair centre within this pane's plane to the point under ``pos``."""
        p = self.widget_to_patient(pos)
        n = self.state.normal(self.name)
        c = self.state.center
        self.state.set_center(p + float(np.dot(c - p, n)) * n)

    def mouseMoveEvent(self, event) -> None:  # noqa: N802
        pos = event.position()
        self._cursor = pos
        drag = self._drag
        if drag is None:
            return
        dx, dy = pos.x() - drag.last.x(), pos.y() - drag.last.y()
        drag.last = pos
        if drag.action == "move":
            self._move_center_to(pos)
        elif drag.action == "rotate":
            c = self.center_on_screen()
            angle = math.atan2(pos.y() - c.y(), pos.x() - c.x())
            delta = math.degrees((angle - drag.angle + math.pi) % (2 * math.pi) - math.pi)
            drag.angle = angle
            if delta:
                self.state.rotate(self.name, delta)
        elif drag.action == Tool.WINDOW:
            c, w = self.window()
            vr = float(np.nanmax(self._values) - np.nanmin(self._values)) if self._values is not None else 1000.0
            self.state.set_window(*windowing.drag_window(c, w, dx, dy, vr))
        elif drag.action == "pan":
            plane = self._plane or self.target_plane()
            scale = plane.spacing * plane.shape[1] / max(self.width(), 1)
            self.pan = (self.pan[0] - dx * scale, self.pan[1] - dy * scale)
            self.request()
        elif drag.action == "zoom":
            self.zoom = min(max(self.zoom * math.exp(-dy * 0.01), 0.1), 40.0)
            self.request()
        elif drag.action == Tool.DISTANCE:
            self.update()

    def mouseReleaseEvent(self, event) -> None:  # noqa: N802
        drag = self._drag
        if drag is None or event.button() != drag.button:
            return super().mouseReleaseEvent(event)
        self._drag = None
        pos = event.position()
        if drag.action == Tool.DISTANCE and drag.p0 is not None:
            if math.hypot(pos.x() - drag.start.x(), pos.y() - drag.start.y()) >= 3:
                self.add_measurement(drag.p0, self.widget_to_patient(pos))
        self.update()
        event.accept()

    def mouseDoubleClickEvent(self, event) -> None:  # noqa: N802
        if event.button() == Qt.MouseButton.LeftButton:
            self._drag = None
            self.doubleClicked.emit(self.name)
            event.accept()
        else:
            super().mouseDoubleClickEvent(event)

    def wheelEvent(self, event) -> None:  # noqa: N802
        delta = event.angleDelta().y()
        if not delta:
            return
        if event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            self.zoom = min(max(self.zoom * 1.15 ** (delta / 120), 0.1), 40.0)
            self.request()
        else:
            self.state.scroll(self.name, 1 if delta > 0 else -1)
        event.accept()

    def keyPressEvent(self, event) -> None:  # noqa: N802
        K = Qt.Key
        steps = {K.Key_Up: 1, K.Key_Down: -1, K.Key_PageUp: 10, K.Key_PageDown: -10}
        key = event.key()
        if key in steps:
            self.state.scroll(self.name, steps[key])
        elif key == K.Key_F:
            self.fit()
        elif key == K.Key_R:
            self.state.reset()
        else:
            return super().keyPressEvent(event)
        event.accept()
