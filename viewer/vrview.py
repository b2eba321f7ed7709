"""VrView: the volume rendering pane (VTK inside Qt).

Two ways to show the :class:`~imaging.vr.VrScene`, chosen when the widget is made:

* **native** — a ``QVTKRenderWindowInteractor`` (VTK draws into the widget's own window,
  trackball camera: left rotate, middle pan, right/wheel zoom). Used on a desktop Qt
  platform (xcb, windows, cocoa).
* **image** — VTK renders into an offscreen window (EGL or OSMesa, see
  :func:`imaging.vr.offscreen_backend`) and the widget paints the picture; the mouse drives
  the camera through the same scene methods. Used on the ``offscreen``/``minimal``
  platforms (tests, headless), on Wayland, or with ``MEDVIEW_VR_BACKEND=image``.

Both lower the sampling while the user drags and render at full quality once the mouse
is released. :meth:`VrView.refresh` re-renders after the volume refined (a progressive
level). When no OpenGL context can be had at all, the pane says so instead of crashing.
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QGuiApplication, QImage, QPainter
from PySide6.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from imaging.vr import VrScene, VrUnavailable, offscreen_window
from imaging.volume import Volume

log = logging.getLogger("medview.vrview")

__all__ = ["VrView", "backend_for_platform"]

NATIVE_PLATFORMS = ("xcb", "windows", "cocoa")
_MAX_SIDE = 1024


def backend_for_platform() -> str:
    """``"native"`` or ``"image"`` for the running Qt platform (env override:
    ``MEDVIEW_VR_BACKEND``)."""
    forced = os.environ.get("MEDVIEW_VR_BACKEND", "").lower()
    if forced in ("native", "image"):
        return forced
    platform = QGuiApplication.platformName().lower() if QGuiApplication.instance() else ""
    return "native" if platform in NATIVE_PLATFORMS else "image"


class _ImageCanvas(QWidget):
    """Paints the offscreen picture; mouse events go to the owner."""

    def __init__(self, owner: "VrView") -> None:
        super().__init__(owner)
        self.owner = owner
        self.setAttribute(Qt.WidgetAttribute.WA_OpaquePaintEvent)
        self.setMouseTracking(False)
        self.image: QImage | None = None
        self._buffer: np.ndarray | None = None

    def set_array(self, rgb: np.ndarray) -> None:
        self._buffer = np.ascontiguousarray(rgb)
        h, w, _ = self._buffer.shape
        self.image = QImage(self._buffer.data, w, h, 3 * w, QImage.Format.Format_RGB888)
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802
        p = QPainter(self)
        p.fillRect(self.rect(), Qt.GlobalColor.black)
        if self.image is not None:
            p.drawImage(QRectF(0, 0, self.width(), self.height()), self.image)
        if self.owner.message:
            p.setPen(QColor(235, 235, 235))
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, self.owner.message)
        p.setPen(QColor(150, 150, 255))
        p.drawText(QPointF(6, 16), f"3D  {self.owner.preset_name()}")
        p.end()

    def mousePressEvent(self, e):  # noqa: N802
        self.owner._press(e)

    def mouseMoveEvent(self, e):  # noqa: N802
        self.owner._move(e)

    def mouseReleaseEvent(self, e):  # noqa: N802
        self.owner._release(e)

    def mouseDoubleClickEvent(self, e):  # noqa: N802
        if e.button() == Qt.MouseButton.LeftButton:
            self.owner.doubleClicked.emit("vr")

    def wheelEvent(self, e):  # noqa: N802
        self.owner._wheel(e)

    def resizeEvent(self, e):  # noqa: N802
        super().resizeEvent(e)
        self.owner.schedule(still=True)


class VrView(QWidget):
    """The 3-D pane (see the module docstring)."""

    doubleClicked = Signal(str)
    rendered = Signal()

    def __init__(self, volume: Volume | None = None, parent: QWidget | None = None, *,
                 backend: str | None = None) -> None:
        super().__init__(parent)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(64, 64)
        self.backend = backend or backend_for_platform()
        self.scene: VrScene | None = None
        self.message = ""
        self.render_count = 0
        self._drag: tuple[Qt.MouseButton, QPointF] | None = None
        self._pending_still = True
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._render_now)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self._native = None
        self._canvas: _ImageCanvas | None = None
        if self.backend == "native":
            try:
                self._make_native()
            except Exception as e:  # noqa: BLE001 - fall back to the image mode
                log.warning("native VTK widget unavailable (%s): image mode", e)
                self.backend = "image"
        if self.backend == "image":
            self._canvas = _ImageCanvas(self)
            lay.addWidget(self._canvas)
        if volume is not None:
            self.set_volume(volume)

    # ------------------------------------------------------------------ set up
    def _make_native(self) -> None:
        import vtkmodules.qt

        vtkmodules.qt.PyQtImpl = "PySide6"
        import vtkmodules.vtkRenderingOpenGL2  # noqa: F401 (OpenGL classes for the factory)
        from vtkmodules.qt.QVTKRenderWindowInteractor import QVTKRenderWindowInteractor
        from vtkmodules.vtkInteractionStyle import vtkInteractorStyleTrackballCamera

        w = QVTKRenderWindowInteractor(self)
        self.layout().addWidget(w)
        style = vtkInteractorStyleTrackballCamera()
        w.SetInteractorStyle(style)
        # the style announces the start and end of a rotation, pan or zoom
        style.AddObserver("StartInteractionEvent", lambda *_: self._interacting(True))
        style.AddObserver("EndInteractionEvent", lambda *_: self._interacting(False))
        self._style = style
        self._native = w
        w.mouseDoubleClickEvent = self._native_double_click

    def _native_double_click(self, e) -> None:
        if e.button() == Qt.MouseButton.LeftButton:
            self.doubleClicked.emit("vr")

    def set_volume(self, volume: Volume) -> None:
        """Show ``volume`` (the scene is built once; later calls rebuild it)."""
        if self.scene is not None:
            self.scene.close()
            self.scene = None
        try:
            if self._native is not None:
                self._native.Initialize()          # the context first: the mapper choice asks it
                self.scene = VrScene(volume, self._native.GetRenderWindow())
            else:
                self.scene = VrScene(volume, offscreen_window(self._size()))
            self.message = ""
        except (VrUnavailable, RuntimeError) as e:
            self.scene = None
            self.message = f"Volume rendering unavailable: {e}"
            log.warning("%s", self.message)
        self.schedule(still=True)

    # ------------------------------------------------------------------ commands
    def preset_name(self) -> str:
        return self.scene.preset.name if self.scene else ""

    def set_preset(self, name: str, window: tuple[float, float] | None = None) -> None:
        if self.scene:
            self.scene.set_preset(name, window)
            self.schedule(still=True)

    def set_window(self, center: float, width: float) -> None:
        if self.scene:
            self.scene.set_window(center, width)
            if self.scene.preset.blend == "mip":
                self.schedule(still=True)

    def set_crop(self, box) -> None:
        if self.scene:
            self.scene.set_crop(box)
            self.schedule(still=True)

    def set_clip_plane(self, origin, normal=None) -> None:
        if self.scene:
            self.scene.set_clip_plane(origin, normal)
            self.schedule(still=True)

    def reset_camera(self, rotation=None) -> None:
        if self.scene:
            self.scene.reset_camera(rotation)
            self.schedule(still=True)

    def refresh(self) -> None:
        """The volume refined: show the new voxels."""
        if self.scene:
            self.scene.refresh()
            self.schedule(still=True)

    # ------------------------------------------------------------------ rendering
    def _size(self) -> tuple[int, int]:
        ratio = self.devicePixelRatioF()
        return (max(1, min(int(self.width() * ratio), _MAX_SIDE)),
                max(1, min(int(self.height() * ratio), _MAX_SIDE)))

    def schedule(self, still: bool = False) -> None:
        """Render soon (coalesced)."""
        self._pending_still = self._pending_still or still
        if not self._timer.isActive():
            self._timer.start(0)

    def render_now(self) -> None:
        self._timer.stop()
        self._render_now()

    def _render_now(self) -> None:
        if self.scene is None:
            if self._canvas is not None:
                self._canvas.update()
            return
        if self._native is not None:
            self._native.GetRenderWindow().Render()
        else:
            self.scene.set_size(*self._size())
            self._canvas.set_array(self.scene.to_array())
        self.render_count += 1
        self._pending_still = False
        self.rendered.emit()

    def grab_array(self) -> np.ndarray:
        """The picture, (h, w, 3) uint8: the last one (image mode) or read back from the
        render window (native mode)."""
        if self._canvas is not None and self._canvas._buffer is not None:
            return self._canvas._buffer.copy()
        if self._native is not None and self.scene is not None:
            return self.scene.to_array()
        img = self.grab().toImage().convertToFormat(QImage.Format.Format_RGB888)
        arr = np.frombuffer(img.constBits(), np.uint8).reshape(img.height(), img.bytesPerLine())
        return arr[:, : img.width() * 3].reshape(img.height(), img.width(), 3).copy()

    def _interacting(self, on: bool) -> None:
        if self.scene:
            self.scene.set_interactive(on)
            if not on and self._native is not None:
                self._native.GetRenderWindow().Render()

    # ------------------------------------------------------------------ image-mode mouse
    def _press(self, e) -> None:
        if self.scene is None:
            return
        self._drag = (e.button(), e.position())
        self.scene.set_interactive(True)

    def _move(self, e) -> None:
        if self._drag is None or self.scene is None:
            return
        button, last = self._drag
        pos = e.position()
        dx, dy = pos.x() - last.x(), pos.y() - last.y()
        self._drag = (button, pos)
        w, h = max(self.width(), 1), max(self.height(), 1)
        if button == Qt.MouseButton.LeftButton:
            self.scene.rotate(-dx * 180.0 / w, dy * 180.0 / h)
        elif button == Qt.MouseButton.RightButton:
            self.scene.zoom(math.exp(-dy * 0.01))
        elif button == Qt.MouseButton.MiddleButton:
            self.scene.pan(dx / w, dy / h)
        self.schedule()

    def _release(self, e) -> None:
        if self._drag is None:
            return
        self._drag = None
        if self.scene is not None:
            self.scene.set_interactive(False)
        self.schedule(still=True)

    def _wheel(self, e) -> None:
        if self.scene is None:
            return
        delta = e.angleDelta().y()
        if delta:
            self.scene.zoom(1.1 ** (delta / 120))
            self.schedule(still=True)

    # ------------------------------------------------------------------ closing
    def close_scene(self) -> None:
        self._timer.stop()
        if self.scene is not None:
            self.scene.close()
            if self._native is None:
                self.scene.render_window.Finalize()
            self.scene = None
        if self._native is not None:
            try:
                self._native.Finalize()
            except Exception:  # noqa: BLE001
                pass

    def closeEvent(self, event) -> None:  # noqa: N802
        self.close_scene()
        super().closeEvent(event)
