"""The MPR layout: three planes and the 3-D pane, 2×2 or one maximised, and how to open it.

:class:`MprLayout` shows axial, coronal and sagittal :class:`~viewer.mprview.MprView`
panes (linked crosshairs, one shared window and slab) and a :class:`~viewer.vrview.VrView`
in a 2×2 grid; double-clicking a pane maximises it (1×1), double-clicking again goes
back. Its toolbar chooses the tool (crosshair / window / distance), the slab (thin, MIP,
MinIP, average, thickness in mm), the window preset, the VR preset and whether the VR is
cut at the crosshair, and resets the planes.

Opening (one call each; they return the :class:`MprWindow`, a top-level window):

* :func:`open_series` — a server series, loaded progressively by a
  :class:`~client.volume_loader.VolumeLoader` (interleaved, H2) or, with
  ``thick_to_thin=True``, by a :class:`~client.volume_loader.SlabVolumeLoader` (P10). The
  panes redraw at each consistent level the server recommends (P9/P11).
* :func:`open_folder` — an image file or folder on disk: the series selection of
  :mod:`imaging.series_select` (M1–M3), a refusal shown as a message box.

The loader runs as a generator in a job of the app's one worker pool (its transfers and
decodes are sub-jobs of the same pool, the reslices too); each yield is handed to the UI
thread through a queued signal, and closing the window cancels it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import wait as futures_wait
from pathlib import Path

import numpy as np
from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QGridLayout, QHBoxLayout, QLabel,
                               QMainWindow, QMessageBox, QPushButton, QProgressBar, QVBoxLayout, QWidget)

from client.pool import INTERACTION, Job, WorkerPool, default_pool
from imaging import windowing
from imaging.mpr import PLANES, MprState
from .mprview import SLAB_NAMES, MprView, ResliceScheduler, Tool
from imaging.volume import Volume
from imaging.vr import PRESETS as VR_PRESETS
from imaging.windowing import header_window, initial_window
from .titles import window_title
from .vrview import VrView

log = logging.getLogger("medview.mprlayout")

__all__ = ["MprLayout", "MprWindow", "LoadRunner", "describe_series", "open_series", "open_folder", "open_volume",
           "mpr_threshold_check"]

PANE_ORDER = ("axial", "coronal", "sagittal", "vr")       # grid order: row by row


class LoadRunner(QObject):
    """Runs a loader's ``run()`` generator as a job of the app's worker pool; each yield
    becomes ``event``. The job shares the loader's cancel token: cancelling the runner,
    the loader or the pool job (``WorkerPool.cancel_where``) stops the load."""

    event = Signal(object)
    failed = Signal(str)
    finished = Signal()
    progress = Signal(int, int)           # bytes received, bytes requested by the transfer

    def __init__(self, loader, parent: QObject | None = None, *,
                 pool: WorkerPool | None = None, priority: int = INTERACTION) -> None:
        super().__init__(parent)
        self.loader = loader
        self.pool = pool or getattr(loader, "pool", None) or default_pool()
        self.priority = priority
        self._job: Job | None = None
        prev = getattr(loader, "on_progress", None)

        def on_progress(p) -> None:
            if prev:
                prev(p)
            try:
                self.progress.emit(int(p.received), int(p.requested))
            except RuntimeError:
                pass
        if hasattr(loader, "on_progress"):
            loader.on_progress = on_progress

    def start(self) -> None:
        self._job = self.pool.submit(lambda _token: self._run(), self.priority, tag=self.loader,
                                     token=getattr(self.loader, "token", None))

    def _run(self) -> None:
        try:
            for ev in self.loader.run():
                self.event.emit(ev)
        except Exception as e:  # noqa: BLE001 - reported to the UI
            log.exception("volume loading failed")
            try:
                self.failed.emit(str(e))
            except RuntimeError:
                pass
        try:
            self.finished.emit()
        except RuntimeError:
            pass

    def cancel(self, wait: float = 5.0) -> None:
        """Stop the load; wait (at most ``wait`` s) for its job to end."""
        self.loader.cancel()
        if self._job is not None:
            self._job.cancel()
            futures_wait([self._job.future], timeout=wait)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the load's job to end (its events are queued to the UI thread and
        delivered after). True when it has ended."""
        if self._job is None:
            return True
        done, _ = futures_wait([self._job.future], timeout=timeout)
        return bool(done)

    def is_running(self) -> bool:
        return self._job is not None and not self._job.future.done()


class MprLayout(QWidget):
    """Three MPR panes and the VR pane (see the module docstring)."""

    layoutChanged = Signal(str)          # "2x2" or the maximised pane's name

    def __init__(self, volume: Volume, parent: QWidget | None = None, *, sync: bool = False,
                 window: tuple[float, float] | None = None, vr: bool = True,
                 pool: WorkerPool | None = None) -> None:
        super().__init__(parent)
        self.volume = volume
        self.pool = pool or default_pool()
        self.state = MprState(volume)
        self.state.mapper = self.pool.mapper(INTERACTION)     # reslice bands in the pool
        # the header's window when usable, else decided from the voxels once they arrive
        head = header_window(*window) if window is not None else None
        if head is not None:
            self.state.window = head
        self._window_decided = head is not None
        self._deciding_window = False
        self.scheduler = None if sync else ResliceScheduler(self, self.pool)
        self.views: dict[str, MprView] = {
            name: MprView(self.state, name, self.scheduler, self, sync=sync) for name in PLANES}
        self.decide_window()                     # a volume that already holds voxels
        self.vr = VrView(volume, self) if vr else None
        self.panes: dict[str, QWidget] = dict(self.views)
        if self.vr is not None:
            self.panes["vr"] = self.vr
        self.maximised: str | None = None
        self._shown_version = -1
        self.state.subscribe(self._on_state)
        self._build()
        for w in self.panes.values():
            w.doubleClicked.connect(self.toggle_maximise)

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        bar = QHBoxLayout()
        bar.setContentsMargins(4, 2, 4, 2)
        self.tool_box = QComboBox(self)
        for label, tool in (("Crosshair", Tool.CROSSHAIR), ("Window/level", Tool.WINDOW),
                            ("Distance (mm)", Tool.DISTANCE)):
            self.tool_box.addItem(label, tool)
        self.tool_box.currentIndexChanged.connect(lambda _i: self.set_tool(self.tool_box.currentData()))
        self.slab_mode = QComboBox(self)
        self.slab_mode.addItem("Thin", None)
        for mode in ("mip", "minip", "avg"):
            self.slab_mode.addItem(SLAB_NAMES[mode], mode)
        self.slab_mm = QDoubleSpinBox(self)
        self.slab_mm.setRange(0.0, 200.0)
        self.slab_mm.setSingleStep(1.0)
        self.slab_mm.setValue(10.0)
        self.slab_mm.setSuffix(" mm")
        self.slab_mode.currentIndexChanged.connect(lambda _i: self._slab_changed())
        self.slab_mm.valueChanged.connect(lambda _v: self._slab_changed())
        self.window_box = QComboBox(self)
        self.window_box.addItem("Window…", None)
        for p in windowing.CT_PRESETS:
            self.window_box.addItem(f"{p.name} ({p.width:g}/{p.center:g})", (p.center, p.width))
        self.window_box.currentIndexChanged.connect(self._window_preset)
        self.vr_box = QComboBox(self)
        for p in VR_PRESETS:
            self.vr_box.addItem(p.name)
        if self.vr is not None and self.vr.scene is not None:
            self.vr_box.setCurrentText(self.vr.scene.preset.name)
        self.vr_box.currentTextChanged.connect(self.set_vr_preset)
        self.vr_box.setEnabled(self.vr is not None)
        self.clip_box = QCheckBox("Cut 3D at crosshair", self)
        self.clip_box.toggled.connect(lambda _on: self._update_clip())
        self.clip_box.setEnabled(self.vr is not None)
        reset = QPushButton("Reset", self)
        reset.clicked.connect(self.reset)
        self.status = QLabel("", self)
        self.progress = QProgressBar(self)
        self.progress.setMaximumWidth(160)
        self.progress.setTextVisible(False)
        self.progress.hide()
        for w in (QLabel("Tool", self), self.tool_box, QLabel("Slab", self), self.slab_mode, self.slab_mm,
                  self.window_box, QLabel("3D", self), self.vr_box, self.clip_box, reset):
            bar.addWidget(w)
        bar.addStretch(1)
        bar.addWidget(self.status)
        bar.addWidget(self.progress)
        self.grid = QGridLayout()
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.grid.setSpacing(2)
        for k, name in enumerate(PANE_ORDER):
            if name in self.panes:
                self.grid.addWidget(self.panes[name], k // 2, k % 2)
        for k in range(2):
            self.grid.setRowStretch(k, 1)
            self.grid.setColumnStretch(k, 1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addLayout(bar)
        lay.addLayout(self.grid, 1)

    # ------------------------------------------------------------------ layout
    def toggle_maximise(self, name: str) -> None:
        """Maximise pane ``name`` (1×1), or go back to 2×2 if it is maximised."""
        self.set_layout("2x2" if self.maximised == name else name)

    def set_layout(self, which: str) -> None:
        """``"2x2"`` or the name of the pane to show alone."""
        if which != "2x2" and which not in self.panes:
            raise ValueError(f"unknown pane {which!r}")
        self.maximised = None if which == "2x2" else which
        for name, w in self.panes.items():
            w.setVisible(self.maximised is None or name == self.maximised)
        # the rows and columns of hidden panes keep their stretch in a QGridLayout: give the
        # whole grid to the maximised pane, whichever cell it sits in
        cell = None if self.maximised is None else PANE_ORDER.index(self.maximised)
        for k in range(2):
            self.grid.setRowStretch(k, 1 if cell is None or cell // 2 == k else 0)
            self.grid.setColumnStretch(k, 1 if cell is None or cell % 2 == k else 0)
        self.layoutChanged.emit(which)

    def layout_name(self) -> str:
        return self.maximised or "2x2"

    # ------------------------------------------------------------------ controls
    def set_tool(self, tool: str) -> None:
        for v in self.views.values():
            v.set_tool(tool)
        i = self.tool_box.findData(tool)
        if i >= 0 and i != self.tool_box.currentIndex():
            self.tool_box.setCurrentIndex(i)

    def _slab_changed(self) -> None:
        mode = self.slab_mode.currentData()
        self.state.set_slab(0.0 if mode is None else self.slab_mm.value(), mode or self.state.slab_mode)

    def set_slab(self, thickness: float, mode: str | None) -> None:
        """Thick slab of ``thickness`` mm combined by ``mode`` (None: thin slices)."""
        self.slab_mm.blockSignals(True)
        self.slab_mm.setValue(thickness)
        self.slab_mm.blockSignals(False)
        i = self.slab_mode.findData(mode)
        self.slab_mode.setCurrentIndex(max(i, 0))
        self._slab_changed()

    def _window_preset(self, _index: int) -> None:
        data = self.window_box.currentData()
        if data is not None:
            self.state.set_window(*data)

    def set_vr_preset(self, name: str) -> None:
        if self.vr is not None:
            # a MIP preset chooses its own window from the projection until the user drags one
            self.vr.set_preset(name, None)

    def _update_clip(self) -> None:
        if self.vr is None:
            return
        if self.clip_box.isChecked():
            self.vr.set_clip_plane(self.state.center, -self.state.normal("coronal"))
        else:
            self.vr.set_clip_plane(None)

    def reset(self) -> None:
        self.state.reset()
        for v in self.views.values():
            v.fit()
        if self.vr is not None:
            self.vr.reset_camera()

    def decide_window(self) -> bool:
        """Without a usable header window: the percentile window of the voxels that have
        arrived (:func:`imaging.windowing.initial_window`), chosen once. True when decided."""
        if self._window_decided:
            return True
        vol = self.volume
        have = vol.own_slots() if hasattr(vol, "own_slots") else np.arange(vol.shape[0])
        if len(have) == 0:
            return False
        step = max(1, len(have) // 16)
        sample = vol.to_modality(vol.data[np.asarray(have)[::step]])
        chosen = initial_window(None, None, sample)
        if chosen is None:
            return False
        self._window_decided = True
        self._deciding_window = True
        try:
            self.state.set_window(*chosen)
        finally:
            self._deciding_window = False
        return True

    def _on_state(self, kind: str) -> None:
        if self.vr is None:
            return
        if kind == "window" and self._deciding_window:
            return                      # the initial window is not a user's choice for the MIP
        if kind == "window" and self.state.window:
            self.vr.set_window(*self.state.window)
        elif kind in ("center", "planes", "reset") and self.clip_box.isChecked():
            self._update_clip()
        elif kind == "volume":
            self.vr.refresh()

    # ------------------------------------------------------------------ progressive data
    def volume_changed(self, text: str = "") -> None:
        """New voxel data (a consistent level): every pane redraws."""
        self.decide_window()
        self.state.volume_changed()
        if text:
            self.status.setText(text)

    def on_load_event(self, ev) -> None:
        q = ev.update.quality if ev.update else None
        done = bool(ev.final)
        layers = f" — {ev.layers} layer(s)" if ev.layers else ""        # none from disk
        route = " — HTJ2K copies" if ev.route == "htj2k" else ""
        text = f"{ev.stage.name}{layers}{route}" + (" — complete" if done else "")
        if ev.why:                                # which route the full stage took, and why
            self.status.setToolTip(f"full quality: {ev.why}")
        if ev.update is not None and ev.update.version > self._shown_version:
            self._shown_version = ev.update.version
            self.volume_changed(text)
        else:
            self.status.setText(text)
        if done:
            self.progress.hide()
        log.debug("volume level %s (%s)", q, text)

    def on_progress(self, received: int, requested: int) -> None:
        if requested > 0:
            self.progress.show()
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(1000 * min(received, requested) / requested))

    def close_layout(self) -> None:
        self.state.unsubscribe(self._on_state)
        for v in self.views.values():
            v.detach()
        if self.vr is not None:
            self.vr.close_scene()
        if self.scheduler is not None:
            self.scheduler.shutdown()


class MprWindow(QMainWindow):
    """A top-level window holding one :class:`MprLayout` and its loader."""

    closed = Signal()

    def __init__(self, layout: MprLayout, title: str, runner: LoadRunner | None = None,
                 parent: QWidget | None = None, memory=None) -> None:
        super().__init__(parent)
        self.setWindowTitle(title)
        self.mpr = layout
        self.runner = runner
        # the volume counts against the app's one memory budget while the window is open
        # (pinned: an open volume is never evicted; series images and tiles make room)
        self._memory = memory
        self._hold = None
        if memory is not None:
            self._hold = memory.register(self)
            memory.pin(self._hold, ["volume"])
            memory.charge(self._hold, "volume", volume_nbytes(layout.volume))
        self.load_events: list = []           # every LoadEvent shown, in order
        self.setCentralWidget(layout)
        self.resize(1200, 900)
        if runner is not None:
            runner.event.connect(self._on_event, Qt.ConnectionType.QueuedConnection)
            runner.progress.connect(layout.on_progress, Qt.ConnectionType.QueuedConnection)
            runner.failed.connect(self._failed, Qt.ConnectionType.QueuedConnection)

    def _on_event(self, ev) -> None:
        self.mpr.on_load_event(ev)
        self.load_events.append(ev)

    def _failed(self, message: str) -> None:
        self.mpr.status.setText(f"loading failed: {message}")

    def drop(self, key) -> None:
        """Never called for the pinned volume (the budget's holder protocol)."""

    def closeEvent(self, event) -> None:  # noqa: N802
        if self.runner is not None:     # the load may be in a network read: cancelled,
            self.runner.cancel(wait=0)  # it ends on its own, the UI thread does not wait
        self.mpr.close_layout()
        if self._hold is not None:
            self._memory.unregister(self._hold)
            self._hold = None
        self.closed.emit()
        super().closeEvent(event)


# --------------------------------------------------------------------------- opening
def mpr_threshold_check(count: int, threshold: int = 10) -> str | None:
    """The M3 refusal message for a series of ``count`` usable images, or None."""
    if count < threshold:
        return (f"MPR needs at least {threshold} images of one series; this series has "
                f"{count} usable image(s).")
    return None


def _refuse(parent: QWidget | None, message: str, show: bool) -> None:
    if show:
        QMessageBox.warning(parent, "MPR not possible", message)
    raise RuntimeError(message)


def volume_nbytes(volume: Volume) -> int:
    """What a volume holds in memory (its voxels and per-slice bookkeeping)."""
    return int(sum(getattr(getattr(volume, name, None), "nbytes", 0)
                   for name in ("data", "own")))


def open_volume(volume: Volume, *, title: str = "MPR", parent: QWidget | None = None,
                window: tuple[float, float] | None = None, runner: LoadRunner | None = None,
                sync: bool = False, vr: bool = True, show: bool = True,
                memory=None, pool: WorkerPool | None = None) -> MprWindow:
    """An :class:`MprWindow` on a volume already in memory (filled or being filled);
    ``memory``: the app's :class:`~imaging.memory.MemoryBudget` the volume counts in;
    ``pool``: the app's worker pool (default: :func:`client.pool.default_pool`, which
    the app's backend installs)."""
    layout = MprLayout(volume, sync=sync, window=window, vr=vr,
                       pool=pool or (runner.pool if runner is not None else None))
    win = MprWindow(layout, title, runner, parent, memory=memory)
    if show:
        win.show()
    if runner is not None:
        runner.start()
    return win


def describe_series(session, series_uid: str, cache=None):
    """The :class:`~client.series.SeriesData` of a server series for :func:`open_series`
    (one metadata request and cache reads: call from a worker). It declares its cache to
    the server on its first request."""
    from client.series import SeriesData

    series = SeriesData(session, cache, series_uid)
    series.declare_needed = True
    return series


def open_series(session, series_uid: str, *, cache=None, series=None, parent: QWidget | None = None,
                thick_to_thin: bool = False, threshold: int = 10, show: bool = True,
                sync: bool = False, vr: bool = True, show_errors: bool = True,
                memory=None, pool: WorkerPool | None = None) -> MprWindow:
    """Open a server series in MPR, loaded progressively (see the module docstring).

    ``series`` (required): the :class:`~client.series.SeriesData` the app already holds
    for this series (share it: packets received for the stack view are reused, and the
    server's model of what this session holds stays right), or one made by
    :func:`describe_series` in a worker — describing a series is a request and cache
    reads, never done here on the UI thread.
    ``thick_to_thin`` loads through the server's slab pyramid (built on first use, on the
    loader's thread). Raises RuntimeError (after a message box unless ``show_errors`` is
    False) when the series cannot form a volume or has fewer than ``threshold`` usable
    images.
    """
    from imaging.volume import VolumeError
    from client.volume_loader import SlabVolumeLoader, VolumeLoader, geometry_refusal, usable_images

    if series is None:
        raise ValueError("open_series needs the series described: run describe_series "
                         "in a worker (a request: never on the UI thread)")
    flagged = geometry_refusal(series.images)
    if flagged:
        _refuse(parent, flagged, show_errors)
    keep, _notes = usable_images(series.images)
    refusal = mpr_threshold_check(len(keep), threshold)
    if refusal:
        _refuse(parent, refusal, show_errors)
    modality = str(series.info.get("Modality") or "")
    try:
        if thick_to_thin:
            from client.slabs import SlabSeries

            loader = SlabVolumeLoader(lambda: SlabSeries(session, cache, series_uid), series.images,
                                      modality=modality, pool=pool)
            loader.volume.series_uid = series_uid
        else:
            loader = VolumeLoader(series, pool=pool)
    except VolumeError as e:
        _refuse(parent, f"This series cannot be shown in MPR: {e}", show_errors)
    info = series.info
    title = window_title("MPR", dict(info, SeriesInstanceUID=series_uid))
    first = series.images[keep[0]]
    window = header_window(first.get("WindowCenter"), first.get("WindowWidth"))
    return open_volume(loader.volume, title=title, parent=parent, window=window,
                       runner=LoadRunner(loader, pool=loader.pool), sync=sync, vr=vr, show=show,
                       memory=memory)


def open_folder(path: str | Path, *, parent: QWidget | None = None, catalogue=None,
                threshold: int = 10, show: bool = True, sync: bool = False, vr: bool = True,
                show_errors: bool = True, report: Callable[[str], None] | None = None) -> MprWindow:
    """Open the series of an image file (or the main series of a folder) in MPR.
    The folder scan reads files: from a UI, run :func:`series_select.select_series` in a
    worker and hand its result to :func:`open_selection` instead."""
    from imaging.series_select import select_series

    sel = select_series(path, threshold=threshold, catalogue=catalogue)
    return open_selection(sel, parent=parent, show=show, sync=sync, vr=vr,
                          show_errors=show_errors, report=report)


def open_selection(sel, *, parent: QWidget | None = None, show: bool = True, sync: bool = False,
                   vr: bool = True, show_errors: bool = True,
                   report: Callable[[str], None] | None = None, memory=None,
                   pool: WorkerPool | None = None) -> MprWindow:
    """Open a finished series selection in MPR (refused with a message when too small)."""
    if report:
        report(sel.report())
    if sel.refusal:
        _refuse(parent, sel.refusal, show_errors)
    from client.volume_loader import FolderVolumeLoader

    loader = FolderVolumeLoader(sel)
    ref = sel.kept[0]
    win = open_volume(loader.volume, title=window_title("MPR", {
                          "PatientName": ref.patient_name, "SeriesDescription": ref.series_description,
                          "Modality": ref.modality, "SeriesNumber": ref.series_number,
                          "SeriesInstanceUID": ref.series_uid}),
                      parent=parent, sync=sync, vr=vr, show=show,
                      runner=LoadRunner(loader, pool=pool), window=ref.window, memory=memory)
    if sel.warnings:
        win.mpr.status.setToolTip("\n".join(sel.warnings))
        win.mpr.status.setText("; ".join(sel.warnings)[:120])
    return win
