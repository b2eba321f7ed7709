"""The stack view's interaction tools: what a mouse drag, the wheel and the keys do.

As in Cornerstone3D (tools bound to mouse buttons) and napari (mouse callbacks), each
drag action is a small tool object; :class:`StackInput` hands it the view's events. The
tools change the view only through its public methods (``set_window``, ``pan_by``,
``zoom_by``, ``add_measurement``, ``request_region``, ``step_slice``...), so the view stays
the one owner of the state and of the signals.
(``view`` is the :class:`~viewer.stackview.StackView`; typed as its base class so that
this module does not import the view that imports it.)

Mouse: left button = the current :class:`MouseMode` (window/level by default), middle =
pan, right = zoom, wheel = previous/next slice, Ctrl+wheel = zoom, double click = fit.
Keys: arrows / Page Up / Page Down / Home / End = slices, I invert, R / Shift+R rotate,
H / V flip, F fit, 1 one-to-one, 0 reset view, Delete remove last measurement, Esc cancel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QKeyEvent, QMouseEvent, QWheelEvent
from PySide6.QtWidgets import QWidget

from imaging import windowing
from imaging.measure import Measurement, MeasureKind
from imaging.viewstate import region_between

__all__ = ["MouseMode", "VIEW_SHORTCUTS", "Drag", "Shape", "DragTool", "WindowLevelTool", "PanTool",
           "ZoomTool", "MeasureTool", "RegionTool", "TOOLS", "StackInput"]

WHEEL_STEP = 120  # angleDelta units per wheel notch
DRAG_ZOOM_RATE = 0.01  # zoom factor exp(rate) per pixel of vertical right-drag
WHEEL_ZOOM = 1.15
MIN_SHAPE_PX = 3.0  # shorter drags do not create measurements or regions


class MouseMode(str, Enum):
    """What the left mouse button does."""

    WINDOW = "window"
    PAN = "pan"
    ZOOM = "zoom"
    DISTANCE = "distance"
    RECT_ROI = "rect"
    ELLIPSE_ROI = "ellipse"
    REGION = "region"  # select a rectangle to fetch at full resolution


VIEW_SHORTCUTS: tuple[tuple[str, str], ...] = (
    ("Wheel, ↑ ↓ ← →", "Previous / next slice"),
    ("Page Up / Page Down", "Move a tenth of the series"),
    ("Home / End", "First / last slice"),
    ("Left drag", "Current tool (window/level by default)"),
    ("Middle drag", "Pan"),
    ("Right drag, Ctrl+wheel", "Zoom"),
    ("Double click", "Fit to window"),
    ("Delete", "Remove the last measurement on this slice"),
    ("Esc", "Abandon the shape being drawn"),
)
"""Bindings the stack view handles itself (listed in Help → Keyboard shortcuts)."""


@dataclass
class Drag:
    """A drag in progress: widget points (start, last) and full-res image points."""

    tool: DragTool
    button: Qt.MouseButton
    start: QPointF
    last: QPointF
    image_start: tuple[float, float]
    image_end: tuple[float, float]


@dataclass(frozen=True)
class Shape:
    """A shape to draw while dragging, in full-res image points; ``region`` marks a
    region-at-full-resolution selection (drawn dashed) rather than a measurement."""

    kind: MeasureKind
    p0: tuple[float, float]
    p1: tuple[float, float]
    region: bool = False


class DragTool:
    """What a drag with one button does. ``draws``: the tool draws a shape (cross cursor;
    a double click does not fit the view)."""

    mode: MouseMode
    draws = False

    def move(self, view: QWidget, drag: Drag, dx: float, dy: float) -> None:
        """The mouse moved by (dx, dy) widget pixels; ``drag.image_end`` is the new point."""

    def finish(self, view: QWidget, drag: Drag, long_enough: bool) -> None:
        """The button was released at ``drag.image_end``."""

    def preview(self, drag: Drag) -> Shape | None:
        """The shape to draw while dragging, if any."""
        return None


class WindowLevelTool(DragTool):
    mode = MouseMode.WINDOW

    def move(self, view: QWidget, drag: Drag, dx: float, dy: float) -> None:
        window = view.window()
        if window is not None:
            view.set_window(*windowing.drag_window(*window, dx, dy, view.value_range()))


class PanTool(DragTool):
    mode = MouseMode.PAN

    def move(self, view: QWidget, drag: Drag, dx: float, dy: float) -> None:
        view.pan_by(dx, dy)


class ZoomTool(DragTool):
    """Drag up to zoom in, down to zoom out, around the point first pressed."""

    mode = MouseMode.ZOOM

    def move(self, view: QWidget, drag: Drag, dx: float, dy: float) -> None:
        view.zoom_by(math.exp(-dy * DRAG_ZOOM_RATE), drag.start)


class _ShapeTool(DragTool):
    draws = True

    def move(self, view: QWidget, drag: Drag, dx: float, dy: float) -> None:
        view.update()


class MeasureTool(_ShapeTool):
    """Distance line, rectangle or ellipse ROI, added to the shown slice on release."""

    def __init__(self, mode: MouseMode, kind: MeasureKind) -> None:
        self.mode, self.kind = mode, kind

    def finish(self, view: QWidget, drag: Drag, long_enough: bool) -> None:
        meta = view.meta()
        if long_enough and meta is not None:
            view.add_measurement(Measurement(self.kind, drag.image_start, drag.image_end, meta.index))

    def preview(self, drag: Drag) -> Shape:
        return Shape(self.kind, drag.image_start, drag.image_end)


class RegionTool(_ShapeTool):
    """Select a rectangle to fetch at full resolution and quality."""

    mode = MouseMode.REGION

    def finish(self, view: QWidget, drag: Drag, long_enough: bool) -> None:
        meta = view.meta()
        if long_enough and meta is not None:
            region = region_between(drag.image_start, drag.image_end, meta.columns, meta.rows)
            if region is not None:
                view.request_region(*region)

    def preview(self, drag: Drag) -> Shape:
        return Shape(MeasureKind.RECT, drag.image_start, drag.image_end, region=True)


TOOLS: dict[MouseMode, DragTool] = {
    tool.mode: tool
    for tool in (
        WindowLevelTool(), PanTool(), ZoomTool(), RegionTool(),
        MeasureTool(MouseMode.DISTANCE, MeasureKind.DISTANCE),
        MeasureTool(MouseMode.RECT_ROI, MeasureKind.RECT),
        MeasureTool(MouseMode.ELLIPSE_ROI, MeasureKind.ELLIPSE),
    )
}


class StackInput:
    """One view's input state (left-button mode, the drag in progress, the cursor, the
    wheel remainder); the view forwards its mouse, wheel and key events here."""

    def __init__(self, view: QWidget) -> None:
        self.view = view
        self.mode = MouseMode.WINDOW
        self.drag: Drag | None = None
        self.cursor: tuple[float, float] | None = None  # full-res image point under the mouse
        self._wheel_accumulator = 0

    def set_mode(self, mode: MouseMode | str) -> None:
        """Choose what the left button does (abandons a drag in progress)."""
        self.mode = MouseMode(mode)
        self.drag = None

    def draws(self) -> bool:
        """The left button draws a shape."""
        return TOOLS[self.mode].draws

    def cancel(self) -> None:
        self.drag = None

    def preview(self) -> Shape | None:
        """The shape being drawn, if any."""
        return self.drag.tool.preview(self.drag) if self.drag is not None else None

    def _tool_for(self, button: Qt.MouseButton) -> DragTool | None:
        if button == Qt.MouseButton.LeftButton:
            return TOOLS[self.mode]
        if button == Qt.MouseButton.MiddleButton:
            return TOOLS[MouseMode.PAN]
        if button == Qt.MouseButton.RightButton:
            return TOOLS[MouseMode.ZOOM]
        return None

    # ---- events: each returns False when the view should pass the event on ----------
    def press(self, event: QMouseEvent) -> bool:
        tool = self._tool_for(event.button())
        if tool is None or self.drag is not None:
            return False
        pos = event.position()
        start = self.view.widget_to_image(pos)
        self.drag = Drag(tool, event.button(), pos, pos, start, start)
        event.accept()
        return True

    def move(self, event: QMouseEvent) -> None:
        pos = event.position()
        self.cursor = self.view.widget_to_image(pos)
        drag = self.drag
        if drag is None:
            self.view.update()
            return
        dx, dy = pos.x() - drag.last.x(), pos.y() - drag.last.y()
        drag.last = pos
        drag.image_end = self.cursor
        drag.tool.move(self.view, drag, dx, dy)

    def release(self, event: QMouseEvent) -> bool:
        drag = self.drag
        if drag is None or event.button() != drag.button:
            return False
        self.drag = None
        pos = event.position()
        drag.image_end = self.view.widget_to_image(pos)
        long_enough = math.hypot(pos.x() - drag.start.x(), pos.y() - drag.start.y()) >= MIN_SHAPE_PX
        drag.tool.finish(self.view, drag, long_enough)
        self.view.update()
        event.accept()
        return True

    def double_click(self, event: QMouseEvent) -> bool:
        if event.button() == Qt.MouseButton.LeftButton and not self.draws():
            self.view.fit()
            return True
        return False

    def leave(self) -> None:
        self.cursor = None
        self.view.update()

    def wheel(self, event: QWheelEvent) -> None:
        delta = event.angleDelta().y()
        if event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            if delta:
                self.view.zoom_by(WHEEL_ZOOM ** (delta / WHEEL_STEP), event.position())
            event.accept()
            return
        self._wheel_accumulator += delta
        steps = int(self._wheel_accumulator / WHEEL_STEP)
        if steps:
            self._wheel_accumulator -= steps * WHEEL_STEP
            self.view.step_slice(-steps)  # wheel towards the user (negative delta) = next slice
        event.accept()

    def key(self, event: QKeyEvent) -> bool:
        view, K = self.view, Qt.Key
        shift = bool(event.modifiers() & Qt.KeyboardModifier.ShiftModifier)
        actions = {
            K.Key_Down: lambda: view.step_slice(1), K.Key_Right: lambda: view.step_slice(1),
            K.Key_Up: lambda: view.step_slice(-1), K.Key_Left: lambda: view.step_slice(-1),
            K.Key_PageDown: lambda: view.step_slice(view.page_size()),
            K.Key_PageUp: lambda: view.step_slice(-view.page_size()),
            K.Key_Home: lambda: view.request_slice(0),
            K.Key_End: lambda: view.request_slice(view.slice_count() - 1),
            K.Key_I: view.toggle_invert,
            K.Key_R: lambda: view.rotate(-1 if shift else 1),
            K.Key_H: view.flip_horizontal,
            K.Key_V: view.flip_vertical,
            K.Key_F: view.fit,
            K.Key_1: view.one_to_one,
            K.Key_0: view.reset_view,
            K.Key_Delete: view.remove_last_measurement,
            K.Key_Backspace: view.remove_last_measurement,
        }
        action = actions.get(event.key())
        if action is None and event.key() == K.Key_Escape and self.drag is not None:
            action = self._abandon
        if action is None:
            return False
        action()
        event.accept()
        return True

    def _abandon(self) -> None:
        self.drag = None
        self.view.update()
