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

A desktop OpenGL context that cannot render (a GLX visual that reads back nothing, a
driver whose volume mapper draws black) is detected and the pane falls back to the image
mode: a test frame (a known background colour) is rendered and read back when the native
widget is set up, and after the first full-quality frame of a volume the picture is
compared once with an offscreen rendering of the same scene. A pane that shows nothing
says why in words (no OpenGL, or nothing of the volume inside the preset's range).
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QGuiApplication, QImage, QPainter
from PySide6.QtWidgets import QLabel, QSizePolicy, QVBoxLayout, QWidget

from imaging.vr import VrScene, VrUnavailable, offscreen_window
from imaging.volume import Volume

log = logging.getLogger("medview.vrview")

__all__ = ["VrView", "backend_for_platform", "frame_is_blank"]

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


def frame_is_blank(rgb: np.ndarray | None, threshold: int = 8) -> bool:
    """True when a rendered picture shows nothing (every pixel darker than ``threshold``)."""
    return rgb is None or rgb.size == 0 or int(rgb.max()) < threshold


def _read_back(render_window) -> np.ndarray:
    """The back buffer of ``render_window`` as (h, w, 3) uint8."""
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    grab = vtkWindowToImageFilter()
    grab.SetInput(render_window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    img = grab.GetOutput()
    w, h, _ = img.GetDimensions()
    return vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)[..., :3]


def native_test_frame(render_window) -> str | None:
    """Render a test frame (a pure red background) in ``render_window`` and read it
    back: None when it shows, else what went wrong."""
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401
    from vtkmodules.vtkRenderingCore import vtkRenderer

    ren = vtkRenderer()
    ren.SetBackground(1.0, 0.0, 0.0)
    render_window.AddRenderer(ren)
    try:
        render_window.Render()
        px = _read_back(render_window)
    except Exception as e:  # noqa: BLE001 - any failure means: this context is unusable
        return f"the test frame failed ({e or type(e).__name__})"
    finally:
        render_window.RemoveRenderer(ren)
    if px.size == 0:
        return "the test frame read back no pixels"
    mean = px.reshape(-1, 3).mean(axis=0)
    if mean[0] < 200 or mean[1] > 60 or mean[2] > 60:
        return f"the test frame read back {tuple(int(v) for v in mean)} instead of red"
    return None


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
        self.fallback_reason = ""            # why the native widget was given up, if it was
        self._checked_native = False         # the first full frame was compared offscreen
        self.note = QLabel(self)             # why the pane shows nothing (native mode)
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: #ebebeb; background: #202020; padding: 4px;")
        self.note.hide()
        if self.backend == "native":
            try:
                self._make_native()
            except Exception as e:  # noqa: BLE001 - fall back to the image mode
                log.warning("native VTK widget unavailable (%s): image mode", e)
                self.fallback_reason = f"no desktop OpenGL widget ({e})"
                self.backend = "image"
        if self.backend == "image":
            self._make_canvas()
        lay.addWidget(self.note)
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

    def _make_canvas(self) -> None:
        self._canvas = _ImageCanvas(self)
        self.layout().insertWidget(0, self._canvas)

    def _fall_back_to_image(self, reason: str) -> None:
        """Give up the native widget (its context cannot render): render offscreen into
        an image the pane paints, keeping preset, window, cuts and camera."""
        log.warning("desktop OpenGL cannot render the volume (%s): offscreen rendering", reason)
        self.fallback_reason = reason
        old = self.scene
        keep = None
        if old is not None:
            cam = old.renderer.GetActiveCamera()
            keep = (old.preset, old.window, old.crop, old.clip,
                    cam.GetPosition(), cam.GetFocalPoint(), cam.GetViewUp(), cam.GetViewAngle())
            old.close()
            self.scene = None
        if self._native is not None:
            w = self._native
            self._native = None
            try:
                w.Finalize()
            except Exception:  # noqa: BLE001
                pass
            w.hide()
            w.setParent(None)
            w.deleteLater()
        self.backend = "image"
        self._make_canvas()
        self._canvas.show()
        volume = old.volume if old is not None else None
        if volume is None:
            return
        self.set_volume(volume)
        if self.scene is not None and keep is not None:
            p, window, crop, clip, pos, fp, up, angle = keep
            self.scene.set_preset(p, window)
            self.scene.set_crop(None if crop is None else self._crop_fractions(crop))
            if clip is not None:
                self.scene.set_clip_plane(clip[0], clip[1])
            cam = self.scene.renderer.GetActiveCamera()
            cam.SetPosition(*pos)
            cam.SetFocalPoint(*fp)
            cam.SetViewUp(*up)
            cam.SetViewAngle(angle)
            self.scene.renderer.ResetCameraClippingRange()

    def _crop_fractions(self, crop) -> tuple:
        nz, ny, nx = self.scene.volume.shape
        sx, sy, sz = self.scene.volume.geometry.spacing
        return tuple((a / max((n - 1) * s, 1e-9), b / max((n - 1) * s, 1e-9))
                     for (a, b), n, s in zip(crop, (nx, ny, nz), (sx, sy, sz)))

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
                problem = native_test_frame(self._native.GetRenderWindow())
                if problem is not None:
                    self._fall_back_to_image(problem)
                    self.set_volume(volume)
                    return
                self.scene = VrScene(volume, self._native.GetRenderWindow())
            else:
                # after a failed desktop context: EGL/OSMesa before the display's GLX
                self.scene = VrScene(volume, offscreen_window(self._size(), headless=bool(self.fallback_reason)))
            self.set_message("")
        except (VrUnavailable, RuntimeError) as e:
            self.scene = None
            self.set_message(f"Volume rendering unavailable: {e}")
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
        still = self._pending_still and not self.scene.interactive
        if self._native is not None:
            rw = self._native.GetRenderWindow()
            rw.Render()
            if still and not self._checked_native and self._volume_has_data() and self._exposed():
                self._checked_native = True
                if self._native_frame_wrong():
                    self._fall_back_to_image("the desktop OpenGL context renders the volume black "
                                             "while offscreen rendering shows it")
                    self._render_now()
                    return
            frame = _read_back(rw) if still else None
        else:
            self.scene.set_size(*self._size())
            frame = self.scene.to_array()
            self._canvas.set_array(frame)
        if still:
            self._explain(frame)
        self.render_count += 1
        self._pending_still = False
        self.rendered.emit()

    def _exposed(self) -> bool:
        """The native window is on screen (an unmapped window reads back nothing)."""
        handle = self.window().windowHandle()
        return bool(self._native.isVisible() and handle is not None and handle.isExposed()
                    and self._native.width() > 1 and self._native.height() > 1)

    def _volume_has_data(self) -> bool:
        v = self.scene.volume if self.scene else None
        if v is None:
            return False
        own = getattr(v, "own", None)
        return bool(np.any(own)) if own is not None else True

    def _native_frame_wrong(self) -> bool:
        """The native frame is blank while an offscreen rendering of the same scene is
        not (checked once per pane: it costs one extra rendering)."""
        if not frame_is_blank(_read_back(self._native.GetRenderWindow())):
            return False
        try:
            probe = VrScene(self.scene.volume, offscreen_window(self._size(), headless=True),
                            mapper=self.scene.mapper_kind)
        except (VrUnavailable, RuntimeError):
            return False                         # nothing better to fall back to
        try:
            probe.set_preset(self.scene.preset, self.scene.window)
            cam, mine = probe.renderer.GetActiveCamera(), self.scene.renderer.GetActiveCamera()
            cam.SetPosition(*mine.GetPosition())
            cam.SetFocalPoint(*mine.GetFocalPoint())
            cam.SetViewUp(*mine.GetViewUp())
            probe.renderer.ResetCameraClippingRange()
            return not frame_is_blank(probe.to_array())
        finally:
            probe.close()
            probe.render_window.Finalize()

    def _explain(self, frame: np.ndarray | None) -> None:
        """Say in words why a full-quality frame shows nothing (empty otherwise)."""
        text = ""
        if frame is not None and frame_is_blank(frame) and self.scene is not None:
            if not self._volume_has_data():
                text = "Waiting for the volume's data…"
            else:
                text = (f"Nothing of this volume falls in the range the “{self.scene.preset.name}” "
                        f"preset shows ({self.scene.value_range_text()}); choose another 3D preset.")
        self.set_message(text, overlay=self._native is not None)

    def set_message(self, text: str, overlay: bool = False) -> None:
        """The words the pane shows when it cannot show a picture ('' clears them)."""
        self.message = text
        self.note.setText(text)
        self.note.setVisible(bool(text) and (overlay or self._canvas is None))
        if self._canvas is not None:
            self._canvas.update()

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
