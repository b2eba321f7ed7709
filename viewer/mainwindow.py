"""The desktop app's main window: study browser, progressive stack view, progress panel,
cine, tools, local import, settings.

The window only orchestrates. Loading logic is :class:`client.series_loader.SeriesLoader`, the
connection and import are :class:`viewer.services.Backend`, and everything that waits
on the network, reads files or decodes runs in the worker pool or a
:class:`viewer.workers.Task`; results come back as queued signals. Signals from a loader
that is no longer the current one (another series was opened) are dropped, and the
stack view refuses images that are not part of its series, so a displayed slice always
belongs to the selected series.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QActionGroup, QCloseEvent, QKeySequence
import shiboken6
from PySide6.QtWidgets import (QDockWidget, QFileDialog, QFrame, QGridLayout, QHBoxLayout,
                               QApplication, QInputDialog, QLabel, QMainWindow, QMenu, QMessageBox,
                               QProgressBar, QProgressDialog, QPushButton, QToolButton,
                               QScrollArea, QVBoxLayout, QWidget)

from client.pool import INTERACTION, VISIBLE

from imaging import windowing
from .browser import StudyBrowser
from .cinebar import CineBar
from .dialogs import (AppSettings, ImportResultDialog, LoginDialog, PreferencesDialog,
                      ShortcutsDialog, about_text)
from client.series_loader import (BACKGROUND, FOCUS, NEAR, PREVIEW, REGION, ImageStatus, SeriesLoader,
                     SeriesStatus, Stage, reduce_for_fit)
from imaging.model import DecodedImage, SeriesInfo
from .policy_panel import DiagnosisPanel, PolicyController, VersionSelector, measurement_annotation
from .priors_panel import PriorsController, PriorsPanel
from .progress import BytesBar, LevelBar, SeriesStrip, TransferLabel
from .services import Backend, ImportOutcome
from .stackview import MouseMode, StackView
from .workers import LoaderBridge, Task, ThumbnailBridge

log = logging.getLogger("medview.window")

__all__ = ["AppConfig", "MainWindow", "VIEW_SHORTCUTS"]

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

FOCUS_SETTLE_MS = 200
"""The network plan moves to the shown slice once scrolling pauses this long (each move
cancels the transfer for the previous slice; the display itself follows at once)."""

PROGRESS_INTERVAL_MS = 150
"""Progress widgets repaint at most this often while a transfer runs (about 7 times a
second: readable, and cheap for the event loop)."""

_STAGE_TEXT = {PREVIEW: "preview of every image", REGION: "region at full resolution",
               FOCUS: "shown image", NEAR: "neighbouring images", BACKGROUND: "rest of the series"}


@dataclass
class AppConfig:
    """How the window connects. ``server_url`` None: start the bundled server on
    ``store_dir`` (the sample study is created there on first run)."""

    server_url: str | None = None
    user: str = "local"
    password: str | None = None
    store_dir: Path | None = None
    cache_path: Path | None = None        # None: no packet cache
    sample: bool = True
    workers: int = 8
    station: str | None = None            # a reading station: its worklist opens (W7)
    station_cache: Path | None = None     # its cache folder (default: the server's word)


def first_size(screen, wanted: tuple[int, int] = (1280, 860)) -> tuple[int, int]:
    """The window's size on a first start: 1280×860, or what the screen has room for
    (its available area less the window frame) on a smaller screen such as 1366×768."""
    if screen is None:
        return wanted
    room = screen.availableGeometry()
    return (min(wanted[0], max(640, room.width() - 16)),
            min(wanted[1], max(480, room.height() - 48)))


class MainWindow(QMainWindow):
    """Study browser + progressive stack view (see the module docstring)."""

    connected = Signal(str)
    connectionFailed = Signal(str)
    serverBusy = Signal(float, int)     # a 503 + Retry-After: pause (s), attempt (any thread)
    seriesOpened = Signal(str)
    slideOpened = Signal(object)        # the slide window (viewer.slideview.SlidePane)
    imageDisplayed = Signal(object)
    """A :class:`DecodedImage` the stack view now shows (base image or region patch)."""
    importFinished = Signal(object)
    loaderStateChanged = Signal(str)

    def __init__(self, config: AppConfig | None = None, settings: QSettings | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.config = config or AppConfig()
        self.settings = AppSettings(settings)
        self.backend = Backend(self.config.cache_path, self.settings.cache_limit_mb() << 20,
                               self.config.workers)
        self.loader: SeriesLoader | None = None
        self.series_info: SeriesInfo | None = None
        self.series_uid: str | None = None
        self._statuses: list[ImageStatus | None] = []
        self._progress_dirty = False
        self._series_status: SeriesStatus | None = None
        self._shown: int | None = None          # slice the view should show now
        self._query_seq = 0
        self._closing = False
        self.last_import_dialog: ImportResultDialog | None = None
        self.setWindowTitle("MedView")
        self.setAcceptDrops(True)

        self.bridge = LoaderBridge(self)
        self.thumbs = ThumbnailBridge(self)
        self._build_central()
        self._build_browser()
        self._build_policy()
        self._build_actions()
        self._build_menus_and_toolbars()
        self._build_status_bar()
        self._wire()
        self._set_connected_ui(False)
        geometry, state = self.settings.geometry(), self.settings.state()
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            self.resize(*first_size(self.screen()))
        if state is not None:
            self.restoreState(state)

    # ================================================================== building
    def _build_central(self) -> None:
        self.stack = StackView(self)
        self.level_bar = LevelBar(self)
        self.bytes_bar = BytesBar(self)
        self.res_label = QLabel("–", self)
        self.strip = SeriesStrip(self)
        self.transfer_label = TransferLabel(self)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setToolTip("Stop the transfers of this series (Ctrl+.); "
                                      "press again to resume")
        self.cancel_button.setEnabled(False)
        self.cine_bar = CineBar(self)

        panel = QFrame(self)
        panel.setFrameShape(QFrame.Shape.StyledPanel)
        grid = QGridLayout(panel)
        grid.setContentsMargins(6, 4, 6, 4)
        grid.addWidget(QLabel("Image", panel), 0, 0)
        grid.addWidget(self.level_bar, 0, 1)
        grid.addWidget(self.bytes_bar, 0, 2)
        grid.addWidget(self.res_label, 0, 3, 1, 2)
        grid.addWidget(QLabel("Series", panel), 1, 0)
        grid.addWidget(self.strip, 1, 1, 1, 2)
        grid.addWidget(self.transfer_label, 1, 3)
        grid.addWidget(self.cancel_button, 1, 4)
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(2, 1)
        # the texts beside the bars wrap rather than squeeze the bars below their text
        for label in (self.res_label, self.transfer_label):
            label.setWordWrap(True)
            label.setMinimumWidth(label.fontMetrics().horizontalAdvance("Shown 0000×0000 ·"))
        cine_row = QHBoxLayout()
        cine_row.addWidget(QLabel("Cine", panel))
        cine_row.addWidget(self.cine_bar, 1)
        grid.addLayout(cine_row, 2, 0, 1, 5)

        central = QWidget(self)
        layout = QVBoxLayout(central)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.stack, 1)
        layout.addWidget(panel)
        self.setCentralWidget(central)

    def _build_browser(self) -> None:
        self.browser = StudyBrowser(self)
        dock = QDockWidget("Studies", self)
        dock.setObjectName("studies")
        dock.setWidget(self.browser)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, dock)
        self.browser_dock = dock

    def _build_policy(self) -> None:
        """Reading dock: version/quality/purpose selector, diagnosis status, notes,
        annotations and report (server policy, issue 5)."""
        self.diagnosis_panel = DiagnosisPanel(self)
        self.version_selector = VersionSelector(self)
        box = QWidget(self)
        lay = QVBoxLayout(box)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.version_selector)
        self.priors_panel = PriorsPanel(self)         # prior studies (seed 001)
        lay.addWidget(self.priors_panel)
        lay.addWidget(self.diagnosis_panel, 1)
        scroll = QScrollArea(self)           # the panel never forces the window's height
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(box)
        # never sideways: the dock is as wide as the panel's widest row (tabs, buttons)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setMinimumWidth(box.minimumSizeHint().width()
                               + scroll.verticalScrollBar().sizeHint().width() + 4)
        dock = QDockWidget("Reading", self)
        dock.setObjectName("reading")
        dock.setWidget(scroll)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
        self.reading_dock = dock
        self.policy = PolicyController(self.diagnosis_panel, self.version_selector,
                                       runner=self._policy_runner, parent=self)
        # another version of the shown series: same slice, zoom, pan and window
        self.policy.selectionChanged.connect(lambda uid, _sel: self.open_series(uid, keep_view=True))
        self.policy.notice.connect(lambda m: self.statusBar().showMessage(m, 6000))
        self.policy.failed.connect(lambda m: self.statusBar().showMessage(m, 8000))
        self.policy.recallingChanged.connect(
            lambda on, m: self.statusBar().showMessage(m or ("Recalling from the archive…" if on else ""), 0 if on else 4000))
        self.policy.set_measurement_source(self._current_measurement_annotation)
        self.serverBusy.connect(self._show_server_busy)      # queued: emitted by workers
        self.priors = PriorsController(self.priors_panel, lambda: self.backend,
                                       runner=self._policy_runner, parent=self)
        self.priors.stateChanged.connect(lambda _s, st, _d: st == "recalling" and self.statusBar()
                                         .showMessage("A prior study is recalling from archive…", 6000))

    def _policy_runner(self, fn, done, failed) -> None:
        """Run a policy call (a server round trip) off the UI thread."""
        task = Task(lambda _ctx: fn(), name="policy", pool=self.backend.pool,
                    priority=INTERACTION, parent=self)
        task.finished.connect(done)
        task.failed.connect(failed)
        task.start()

    def _current_measurement_annotation(self) -> dict | None:
        ms = self.stack.measurements()
        index = self.stack.current_index()
        if not ms or index is None or self.series_info is None or self.series_uid is None:
            return None
        return measurement_annotation(ms[-1], self.series_info.images[index], self.series_uid)

    # ================================================================== MPR (issue 4)
    def open_mpr(self, thick_to_thin: bool = False):
        """Open the current series in the 2×2 MPR + VR layout, sharing the stack view's
        packets (the loader's SeriesData) so nothing is fetched twice."""
        from .mprlayout import open_series

        if self.series_uid is None or self.backend.session is None:
            self.statusBar().showMessage("Open a series first", 4000)
            return None
        sd = self.loader.sd if self.loader is not None and self.loader.uid == self.series_uid else None
        uid, backend = self.series_uid, self.backend

        def show(series):
            try:
                win = open_series(backend.session, uid, cache=backend.cache, series=series,
                                  parent=self, thick_to_thin=thick_to_thin,
                                  memory=backend.memory)
            except RuntimeError:
                return None      # the refusal (too few images, no volume) was shown
            self._mpr_windows = [w for w in getattr(self, "_mpr_windows", []) if w.isVisible()] + [win]
            return win

        if sd is not None:
            return show(sd)
        # the series description is a request: made in the pool, never on the UI thread
        task = Task(lambda _ctx: backend.registry.get(uid), name="mpr-series",
                    pool=backend.pool, priority=INTERACTION, parent=self)
        task.finished.connect(show)
        task.failed.connect(lambda e: self.statusBar().showMessage(f"Cannot open MPR: {e}", 8000))
        self.statusBar().showMessage("Opening MPR…")
        return task.start()

    def open_mpr_folder(self) -> None:
        """Pick a folder; its DICOM files are scanned and the series selected in a worker
        (M1–M3), then the MPR window opens on the UI thread."""
        from .mprlayout import open_selection
        from imaging.series_select import ServerCatalogue, select_series

        folder = QFileDialog.getExistingDirectory(self, "Folder with a DICOM series")
        if not folder:
            return
        catalogue = ServerCatalogue(self.backend.session) if self.backend.session else None
        task = Task(lambda _ctx: select_series(folder, catalogue=catalogue), name="select",
                    pool=self.backend.pool, priority=INTERACTION, parent=self)

        def selected(sel) -> None:
            try:
                win = open_selection(sel, parent=self, memory=self.backend.memory,
                                     report=lambda m: self.statusBar().showMessage(
                                         (m.splitlines() or [""])[0], 8000))
            except RuntimeError:
                return           # the refusal (too few images) was shown
            self._mpr_windows = [w for w in getattr(self, "_mpr_windows", []) if w.isVisible()] + [win]

        task.finished.connect(selected)
        task.failed.connect(lambda e: self.statusBar().showMessage(f"Cannot read the folder: {e}", 8000))
        self.statusBar().showMessage(f"Reading {folder}…")
        task.start()

    # ================================================================== slides (issue 6)
    def choose_slide(self) -> None:
        """List the server's slides (off the UI thread), let the user pick one, open it."""
        session = self.backend.session
        if session is None:
            self.statusBar().showMessage("Not connected", 4000)
            return
        task = Task(lambda _ctx: self.backend.list_slides(), name="slides",
                    pool=self.backend.pool, priority=INTERACTION, parent=self)

        def listed(rows: list[dict]) -> None:
            if not rows:
                QMessageBox.information(self, "MedView", "The server holds no slides.")
                return
            labels = [f"{r.get('patient_id') or '?'} · {r.get('label') or r['slide_uid']} · "
                      f"{r.get('width')}×{r.get('height')} px · {r.get('state') or 'high'} res"
                      + (" · QC FLAGGED" if r.get("qc_status") == "flagged" else "")
                      for r in rows]
            label, ok = QInputDialog.getItem(self, "Open slide", "Slide:", labels, 0, False)
            if ok:
                self.open_slide(rows[labels.index(label)]["slide_uid"])

        task.finished.connect(listed)
        task.failed.connect(lambda e: self.statusBar().showMessage(f"Cannot list slides: {e}", 6000))
        task.start()

    def open_slide(self, slide_uid: str) -> Task | None:
        """Open a slide in its own window; its description is fetched off the UI thread."""
        from client.slides import RemoteSlide

        session = self.backend.session
        if session is None:
            return None
        def load(_ctx):
            provider = RemoteSlide(session, slide_uid)
            # generated tiles: the temporary tier (bundled) or the client-side folder
            return provider, self.backend.sr_cache_for(provider)

        task = Task(load, name="slide", pool=self.backend.pool, priority=INTERACTION,
                    parent=self)

        def opened(loaded) -> None:
            self._show_slide(*loaded)

        def failed(e) -> None:
            if getattr(e, "status", None) == 403:
                from client.policy_text import explain_slide_rights_error

                text = explain_slide_rights_error(e)
            else:
                text = f"Cannot open the slide: {e}"
            self.statusBar().showMessage(text, 10000)

        task.finished.connect(opened)
        task.failed.connect(failed)
        task.start()
        return task

    def _show_slide(self, provider, sr_cache=None):
        """A slide window for an opened provider (UI thread)."""
        from .slideview import open_slide_window

        pane = open_slide_window(provider, sr_cache=sr_cache, cache_bytes=self.backend.memory,
                                 pool=self.backend.pool)
        # the pane's rights banner and news (label refused, rights changed) also go
        # to the status bar, in plain words
        pane.notice.connect(lambda text: self.statusBar().showMessage(text, 15000))
        pane.show()
        if pane.rights_text:
            self.statusBar().showMessage(pane.rights_text, 15000)
        self._slide_windows = [w for w in getattr(self, "_slide_windows", [])
                               if w.isVisible()] + [pane]
        self.slideOpened.emit(pane)
        return pane

    def show_station_worklist(self):
        """The reading station's worklist (``medview --station NAME``), refreshed."""
        from client.stations import Station

        from .worklist import StationWorklistWindow

        if self.backend.session is None or not self.config.station:
            self.statusBar().showMessage("Not connected" if self.config.station else
                                         "This window is not a reading station "
                                         "(start medview --station NAME)", 6000)
            return None
        w = getattr(self, "worklist", None)
        if w is None or w.station.session is not self.backend.session:
            if w is not None:
                w.close()
            station = Station(self.backend.session, self.config.station,
                              self.config.station_cache, packet_cache=self.backend.cache)
            w = self.worklist = StationWorklistWindow(station, self.backend, self)
            w.notice.connect(lambda text: self.statusBar().showMessage(text, 10000))
            w.opened.connect(lambda got, sr: self._show_slide(got.provider, sr))
        w.show()
        w.refresh()
        return w

    def _action(self, text: str, slot, shortcut: str | QKeySequence | None = None,
                tip: str = "", checkable: bool = False) -> QAction:
        action = QAction(text, self)
        if shortcut:
            action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setStatusTip(tip)
            action.setToolTip(f"{tip} ({action.shortcut().toString()})" if shortcut else tip)
        action.setCheckable(checkable)
        if slot is not None:
            action.triggered.connect(slot)
        self.addAction(action)
        return action

    def _build_actions(self) -> None:
        A = self._action
        self.act_open_folder = A("Open &folder…", self.choose_folder, QKeySequence.StandardKey.Open,
                                 "Import a folder of DICOM files into the local store")
        self.act_import_files = A("&Import files…", self.choose_files, "Ctrl+Shift+O",
                                  "Import DICOM files into the local store")
        self.act_connect = A("&Connect to server…", self.ask_login, None,
                             "Log in to another image server")
        self.act_export = A("&Export study…", self.choose_export, "Ctrl+E",
                            "Write the selected study's original DICOM files and a DICOMDIR "
                            "to a folder")
        self.act_prefs = A("&Preferences…", self.show_preferences, QKeySequence.StandardKey.Preferences,
                           "Cache size, background loading, window presets")
        self.act_quit = A("&Quit", self.quit_app, QKeySequence.StandardKey.Quit,
                          "Close every window, stop transfers and the bundled server, and exit")

        self.tool_group = QActionGroup(self)
        self.tool_group.setExclusive(True)
        self.tool_actions: dict[MouseMode, QAction] = {}
        for mode, text, key, tip in (
                (MouseMode.WINDOW, "Window/level", "W", "Left drag changes window and level"),
                (MouseMode.PAN, "Pan", "P", "Left drag moves the image"),
                (MouseMode.ZOOM, "Zoom", "Z", "Left drag zooms"),
                (MouseMode.DISTANCE, "Distance", "D", "Measure a distance in mm"),
                (MouseMode.RECT_ROI, "Rectangle ROI", "B", "Mean and SD in a rectangle"),
                (MouseMode.ELLIPSE_ROI, "Ellipse ROI", "E", "Mean and SD in an ellipse"),
                (MouseMode.REGION, "Region at full resolution", "G",
                 "Draw a rectangle: only that region is fetched at full resolution and quality")):
            act = A(text, lambda _c=False, m=mode: self.set_tool(m), key, tip, checkable=True)
            self.tool_group.addAction(act)
            self.tool_actions[mode] = act
        self.tool_actions[MouseMode.WINDOW].setChecked(True)

        self.act_invert = A("&Invert", lambda: self.stack.toggle_invert(), "I", "Invert grey levels")
        self.act_rot_right = A("Rotate &right", lambda: self.stack.rotate(1), "R", "Rotate 90° clockwise")
        self.act_rot_left = A("Rotate &left", lambda: self.stack.rotate(-1), "Shift+R",
                              "Rotate 90° counter-clockwise")
        self.act_flip_h = A("Flip &horizontal", lambda: self.stack.flip_horizontal(), "H", "Mirror left-right")
        self.act_flip_v = A("Flip &vertical", lambda: self.stack.flip_vertical(), "V", "Mirror top-bottom")
        self.act_fit = A("&Fit", lambda: self.stack.fit(), "F", "Fit the image to the window")
        self.act_one = A("&1:1", lambda: self.stack.one_to_one(), "1", "One image pixel per screen pixel")
        self.act_reset_view = A("Reset &view", lambda: self.stack.reset_view(), "0",
                                "No rotation, flip or invert; fitted; default window")
        self.act_overlays = A("Show &overlays", lambda on: self.stack.set_overlays_visible(on),
                              "Shift+O", "Patient, image and window text on the image", checkable=True)
        self.act_overlays.setChecked(True)
        self.act_clear_measures = A("Clear &measurements", lambda: self.stack.clear_measurements(),
                                    "Ctrl+Delete", "Remove every measurement of this series")
        self.act_play = A("&Play / pause", lambda: self.cine_bar.toggle(), "Space", "Cine play / pause")
        self.act_cancel = A("&Cancel transfer", self.cancel_or_resume, "Ctrl+.",
                            "Stop the transfers of this series (press again to resume)")
        self.act_default_window = A("&Default window", self.default_window, "Ctrl+0",
                                    "The DICOM window (or soft tissue for CT)")
        self.act_auto_window = A("&Auto window (histogram)", self.auto_window, "Ctrl+Shift+A",
                                 "Window from the 1st-99th percentile of the image")
        self.act_save_preset = A("&Save window as preset…", self.save_preset, None,
                                 "Add the current window to the presets")
        self.act_shortcuts = A("&Keyboard shortcuts", self.show_shortcuts, QKeySequence.StandardKey.HelpContents,
                               "List the keyboard shortcuts")
        self.act_about = A("&About MedView", self.show_about, None, "Version and credits")
        self.act_mpr = A("Open in &MPR", lambda: self.open_mpr(), "Ctrl+M",
                         "Open the series in MPR and 3-D (2×2 layout)")
        self.act_mpr_slabs = A("Open in MPR, &thick to thin", lambda: self.open_mpr(True),
                               "Ctrl+Shift+M", "MPR loaded as thick slabs first, then thinner")
        self.act_mpr_folder = A("Open &folder in MPR…", self.open_mpr_folder, None,
                                "Select a series from a folder of DICOM files and open it in MPR")
        self.act_open_slide = A("Open &slide…", self.choose_slide, "Ctrl+Shift+S",
                                "Open a whole-slide image from the server (pathology)")
        self.act_station = A("Station &worklist", self.show_station_worklist, None,
                             "The exams assigned to this reading station (--station)")
        self.act_station.setVisible(bool(self.config.station))
        self.preset_actions: list[QAction] = []

    def _build_menus_and_toolbars(self) -> None:
        bar = self.menuBar()
        m = bar.addMenu("&File")
        for a in (self.act_open_folder, self.act_import_files, self.act_open_slide,
                  self.act_station, None,
                  self.act_export, None, self.act_connect, None,
                  self.act_prefs, None, self.act_quit):
            m.addSeparator() if a is None else m.addAction(a)
        m = bar.addMenu("&View")
        for a in (self.act_fit, self.act_one, self.act_reset_view, None, self.act_rot_right,
                  self.act_rot_left, self.act_flip_h, self.act_flip_v, self.act_invert, None,
                  self.act_overlays, self.act_clear_measures, None, self.act_play, self.act_cancel):
            m.addSeparator() if a is None else m.addAction(a)
        m.addSeparator()
        m.addAction(self.browser_dock.toggleViewAction())
        m = bar.addMenu("&3D")
        for a in (self.act_mpr, self.act_mpr_slabs, self.act_mpr_folder):
            m.addAction(a)
        self.window_menu = bar.addMenu("&Window")
        self.window_menu.setObjectName("window_presets")
        m = bar.addMenu("&Tools")
        for a in self.tool_actions.values():
            m.addAction(a)
        m = bar.addMenu("&Help")
        m.addAction(self.act_shortcuts)
        m.addAction(self.act_about)

        tools = self.addToolBar("Tools")
        tools.setObjectName("tools")
        for a in self.tool_actions.values():
            tools.addAction(a)
        view = self.addToolBar("View")
        view.setObjectName("view")
        self.preset_button = QToolButton(self)
        self.preset_button.setText("Presets")
        self.preset_button.setToolTip("Window presets")
        self.preset_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.preset_menu = QMenu(self)
        self.preset_button.setMenu(self.preset_menu)
        view.addWidget(self.preset_button)
        for a in (self.act_invert, self.act_rot_left, self.act_rot_right, self.act_flip_h,
                  self.act_flip_v, self.act_fit, self.act_one, self.act_reset_view):
            view.addAction(a)
        self.rebuild_presets()

    def _build_status_bar(self) -> None:
        sb = self.statusBar()
        self.busy = QProgressBar(self)
        self.busy.setRange(0, 0)
        self.busy.setMaximumWidth(120)
        self.busy.setVisible(False)
        self.server_label = QLabel("Not connected", self)
        sb.addPermanentWidget(self.busy)
        sb.addPermanentWidget(self.server_label)

    def _wire(self) -> None:
        b = self.bridge
        b.opened.connect(self._on_opened)
        b.imageStatus.connect(self._on_image_status)
        b.seriesStatus.connect(self._on_series_status)
        b.stageChanged.connect(self._on_stage)
        b.stageChanged.connect(self.priors.on_stage)
        b.decoded.connect(self._on_decoded)
        b.cineLevel.connect(self._on_cine_level)
        b.stateChanged.connect(self._on_loader_state)
        b.failed.connect(self._on_loader_failed)
        self.thumbs.ready.connect(self.browser.set_thumbnail)
        self.browser.queryRequested.connect(self._run_query)
        self.browser.thumbnailsWanted.connect(self._want_thumbnails)
        self.browser.seriesActivated.connect(self.open_series)
        self.browser.remoteQueryRequested.connect(self._run_remote_query)
        self.browser.retrieveRequested.connect(self.retrieve_study)
        self.stack.sliceRequested.connect(self._on_slice_requested)
        self.stack.regionRequested.connect(self._on_region_requested)
        self.stack.displayedSizeChanged.connect(lambda _w, _h: self._reduce_timer.start())
        self.stack.viewStateChanged.connect(lambda _s: self._reduce_timer.start())
        self.strip.sliceClicked.connect(self.stack.request_slice)
        self.cancel_button.clicked.connect(self.cancel_or_resume)
        self.cine_bar.frameChanged.connect(self._on_cine_frame)
        self.cine_bar.playingChanged.connect(self._on_cine_playing)
        self.cine_bar.consistent_box.toggled.connect(self._on_consistent_toggled)
        self._focus_timer = QTimer(self)
        self._focus_timer.setSingleShot(True)
        self._focus_timer.setInterval(FOCUS_SETTLE_MS)
        self._focus_timer.timeout.connect(self._move_focus)
        self._progress_timer = QTimer(self)
        self._progress_timer.setSingleShot(True)
        self._progress_timer.setInterval(PROGRESS_INTERVAL_MS)
        self._progress_timer.timeout.connect(self._flush_progress)
        self._reduce_timer = QTimer(self)
        self._reduce_timer.setSingleShot(True)
        self._reduce_timer.setInterval(120)
        self._reduce_timer.timeout.connect(self._update_reduce)

    # ================================================================== connecting
    def start(self) -> None:
        """Connect as configured: the bundled server, or the login dialog for --server."""
        if self.config.server_url:
            if self.config.password is not None:
                self.connect_to(self.config.server_url, self.config.user, self.config.password)
            else:
                self.ask_login(self.config.server_url, self.config.user)
        else:
            self.start_bundled(self.config.store_dir)

    def start_bundled(self, store_dir: Path | None) -> Task:
        """Start the bundled server on ``store_dir`` (sample study on first run), off the
        UI thread, then log in as the local user."""
        from client.appdirs import default_data_dir

        store = Path(store_dir) if store_dir else default_data_dir() / "store"
        self._busy(True, f"Preparing the local store {store} (the sample study is created on "
                         f"first run and takes about 20 s)…")
        dicom = (self.settings.dicom_port(), self.settings.dicom_ae_title())
        task = Task(lambda ctx: self.backend.start_bundled(store, ctx.message,
                                                           sample=self.config.sample,
                                                           dicom_port=dicom[0],
                                                           ae_title=dicom[1]),
                    name="bundled-server", parent=self)
        task.message.connect(lambda m: self.statusBar().showMessage(m))
        task.finished.connect(self._on_connected)
        task.failed.connect(lambda e: self._on_connect_failed(e, interactive=False))
        return task.start()

    def adopt_server(self, server, own: bool = False) -> Task:
        """Use a running embedded server (its store receives imports) and log in."""
        self.backend.adopt_server(server, own=own)
        return self.connect_to(server.url, "local", None, interactive=False)

    def connect_to(self, url: str, user: str = "local", password: str | None = None,
                   interactive: bool = False) -> Task:
        """Log in to ``url`` off the UI thread (``connected`` or ``connectionFailed``)."""
        self._busy(True, f"Connecting to {url}…")
        backend = self.backend

        def login(_ctx) -> str:
            backend.login(url, user, password)
            return url

        task = Task(login, name="login", parent=self)
        task.finished.connect(self._on_connected)
        task.failed.connect(lambda e: self._on_connect_failed(e, interactive, url, user))
        return task.start()

    def ask_login(self, url: str | None = None, user: str | None = None, message: str = "") -> None:
        last_url, last_user = self.settings.last_server()
        dlg = LoginDialog(url or last_url or "http://", user or last_user or "local", message, self)
        if dlg.exec() == LoginDialog.DialogCode.Accepted:
            url, user, password = dlg.values()
            self.connect_to(url, user, password, interactive=True)

    def _on_connected(self, url: str) -> None:
        self._busy(False)
        if self.loader is not None and self.loader.registry is not self.backend.registry:
            # another server (or a new session): nothing of the old one stays on screen
            self._close_loader()
            self.series_info = None
            self.stack.set_series(None)
            self.strip.set_count(0)
        self.thumbs.cancel_all()
        self.browser.clear_thumbnails()
        s = self.backend.session
        if self.backend.server is None:          # a remote server: offer it next time
            self.settings.set_last_server(url, s.username)
        where = "bundled server" if self.backend.own_server else url
        self.server_label.setText(f"{s.username} @ {where}")
        self.statusBar().showMessage(f"Connected to {url} as {s.username}", 5000)
        s.on_busy = self.serverBusy.emit          # client.session retries, we say so
        self._set_connected_ui(True)
        from client.policy import PolicyClient
        self.policy.set_client(PolicyClient(s))
        self.browser.refresh()
        self._refresh_pacs_sources()
        if self.config.station:
            self.show_station_worklist()
        self.connected.emit(url)

    def _show_server_busy(self, pause: float, attempt: int) -> None:
        self.statusBar().showMessage(
            f"Server busy, retrying in {pause:.0f} s (attempt {attempt})…",
            int(pause * 1000) + 2000)

    def _on_connect_failed(self, error: BaseException, interactive: bool, url: str = "",
                           user: str = "") -> None:
        self._busy(False)
        message = str(error)
        self.statusBar().showMessage(f"Not connected: {message}")
        self.connectionFailed.emit(message)
        if self._closing:
            return
        if interactive:
            self.ask_login(url, user, message)
        else:
            QMessageBox.critical(self, "MedView", f"Could not connect:\n{message}")

    def _set_connected_ui(self, on: bool) -> None:
        can_import = on and self.backend.can_import
        for a in (self.act_open_folder, self.act_import_files, self.act_export):
            a.setEnabled(can_import)
            a.setToolTip(a.statusTip() if can_import else
                         "Import goes into the bundled server's store; connected to a "
                         "remote server, import is disabled")
        self.browser.setEnabled(on)

    # ================================================================== browser
    def _run_query(self, queries: list[dict]) -> None:
        if not self.backend.connected:
            return
        self._query_seq += 1
        seq = self._query_seq
        backend = self.backend

        def work(_ctx):
            studies = backend.studies(queries)
            return studies, backend.series_of([s["StudyInstanceUID"] for s in studies])

        task = Task(work, name="query", pool=backend.pool, priority=VISIBLE, parent=self)

        def done(result) -> None:
            if seq == self._query_seq:          # a newer search supersedes this one
                self.browser.set_results(*result)

        def failed(error) -> None:
            if seq == self._query_seq:
                self.browser.set_error(f"Search failed: {error}")

        task.finished.connect(done)
        task.failed.connect(failed)
        task.start()

    # ================================================================== remote PACS
    def _refresh_pacs_sources(self) -> None:
        backend = self.backend
        t = Task(lambda _ctx: backend.pacs_names(), name="pacs-names", pool=backend.pool,
                 parent=self)
        t.finished.connect(self.browser.set_pacs_sources)
        t.start()

    def _run_remote_query(self, pacs: str, queries: list[dict]) -> None:
        self._query_seq += 1
        seq = self._query_seq
        backend, title = self.backend, self.settings.dicom_ae_title()
        task = Task(lambda _ctx: backend.pacs_studies(pacs, queries, title), name="pacs-query",
                    pool=backend.pool, priority=VISIBLE, parent=self)
        task.finished.connect(lambda rows: seq == self._query_seq
                              and self.browser.set_remote_results(rows))
        task.failed.connect(lambda e: seq == self._query_seq
                            and self.browser.set_error(f"{pacs}: {e}"))
        task.start()

    def retrieve_study(self, pacs: str, study_uid: str) -> Task:
        """C-GET a study from the PACS into the local store, progress in the status bar
        with a cancel button; then it is listed (and opened) from the image server."""
        backend, title = self.backend, self.settings.dicom_ae_title()
        bar = self.statusBar()
        cancel = QPushButton("Cancel retrieve", self)
        bar.addPermanentWidget(cancel)
        task = Task(lambda ctx: backend.pacs_retrieve(pacs, study_uid, ae_title=title,
                                                      progress=ctx.progress,
                                                      cancelled=lambda: ctx.cancelled),
                    name="pacs-retrieve", parent=self)
        self.retrieve_task = task

        def on_cancel() -> None:
            task.cancel()
            cancel.setEnabled(False)
            bar.showMessage(f"Cancelling the retrieve from {pacs}…")

        def finish(counts) -> None:
            bar.removeWidget(cancel)
            cancel.deleteLater()
            bar.showMessage(f"Retrieved from {pacs}: {counts['completed']} received, "
                            f"{counts['imported']} new, {counts['failed']} failed"
                            + (" (cancelled)" if task.cancelled else ""), 10000)
            self.browser.source.setCurrentIndex(0)        # back to the server's studies
            if counts["imported"] or counts["duplicates"]:
                self.open_study(study_uid)

        def fail(error) -> None:
            bar.removeWidget(cancel)
            cancel.deleteLater()
            bar.showMessage(f"Retrieve from {pacs} failed: {error}", 15000)

        cancel.clicked.connect(on_cancel)
        task.progress.connect(lambda d, t: bar.showMessage(
            f"Retrieving from {pacs}: {d} of {t} instances"))
        task.finished.connect(finish)
        task.failed.connect(fail)
        bar.showMessage(f"Retrieving study {study_uid} from {pacs}…")
        return task.start()

    # ================================================================== export
    def choose_export(self) -> None:
        study = self.browser.selected_study()
        if study is None:
            QMessageBox.information(self, "Export", "Select a study (or one of its series) "
                                    "in the study browser first.")
            return
        folder = QFileDialog.getExistingDirectory(self, "Export the study into an empty folder")
        if folder:
            self.export_study(study, folder)

    def export_study(self, study_uid: str, out: str | Path) -> Task:
        """Original files and a DICOMDIR into ``out``, off the UI thread."""
        backend, bar = self.backend, self.statusBar()
        task = Task(lambda ctx: backend.export_study(study_uid, out, progress=ctx.progress),
                    name="export", parent=self)
        task.progress.connect(lambda d, t: bar.showMessage(f"Exporting: {d} of {t} files"))
        task.finished.connect(lambda rep: bar.showMessage(rep.summary(), 10000))
        task.failed.connect(lambda e: QMessageBox.critical(self, "Export failed", str(e)))
        return task.start()

    def _want_thumbnails(self, uids: list[str]) -> None:
        if self.backend.registry is None:
            return
        for uid in uids[:200]:
            self.thumbs.request(self.backend.pool, self.backend.registry, uid)

    # ================================================================== series
    def open_series(self, uid: str, keep_view: bool = False) -> SeriesLoader | None:
        """Show series ``uid``: the old series' transfers are cancelled and nothing of it
        is shown any more; the new one loads progressively. ``keep_view`` (the same series
        reopened, e.g. in another version): keep the slice, zoom, pan and window."""
        if self.backend.registry is None:
            return None
        keep = None
        if keep_view and uid == self.series_uid and self.series_info is not None:
            keep = (self._shown, self.stack.snapshot())
        self._keep_view = keep
        self._close_loader()
        self._focus_timer.stop()
        self.series_uid = uid
        self.series_info = None
        self._statuses = []
        self._shown = 0
        self.stack.set_series(None)
        self.strip.set_count(0)
        self._progress_timer.stop()
        self._progress_dirty = False
        self._series_status = None
        self.transfer_label.reset()
        self.level_bar.set_levels(0, 0, 0)
        self.bytes_bar.set_bytes(0, 0, 0)
        self.res_label.setText("–")
        self.loader = SeriesLoader(self.backend.registry, uid, self.backend.pool, self.bridge,
                                   focus=keep[0] if keep else 0, viewport=self._viewport(),
                                   prefetch=self.settings.prefetch(),
                                   decoded_budget=self.backend.memory)
        self.loader.set_cine_consistent(self.cine_bar.consistent_box.isChecked())
        self.loader.start()
        self.browser.select_series(uid)
        self._busy(True, "Opening the series…")
        return self.loader

    def open_study(self, study_uid: str) -> None:
        """Open the first series of a study (after an import)."""
        backend = self.backend
        task = Task(lambda _ctx: backend.session.series(study_uid), name="study",
                    pool=backend.pool, parent=self)

        def done(rows: list[dict]) -> None:
            if rows:
                self.open_series(rows[0]["SeriesInstanceUID"])

        task.finished.connect(done)
        task.failed.connect(lambda e: self.statusBar().showMessage(f"Cannot open the study: {e}"))
        task.start()

    def _close_loader(self) -> None:
        self.cine_bar.pause()
        self.policy.close_series()
        self.priors.close_series()
        if self.loader is not None:
            self.loader.close()
            self.loader = None

    def _viewport(self) -> tuple[int, int]:
        ratio = self.stack.devicePixelRatioF()
        return max(1, round(self.stack.width() * ratio)), max(1, round(self.stack.height() * ratio))

    def _current(self, loader) -> bool:
        return loader is self.loader and loader is not None and not loader.closed

    def _on_opened(self, loader, info: dict, images: list[dict], statuses: list[ImageStatus]) -> None:
        if not self._current(loader):
            return
        series = SeriesInfo.from_dict(info, images)
        self.series_info = series
        self.stack.set_series(series)
        keep, self._keep_view = getattr(self, "_keep_view", None), None
        if keep is not None:
            self.stack.restore(keep[1])
        self._statuses = list(statuses)
        self._shown = loader.focus
        self.strip.set_count(len(images))
        self._refresh_strip()
        self.strip.set_current(self._shown)
        self.cine_bar.set_count(len(images))
        self.cine_bar.set_current(self._shown)
        self.cine_bar.set_sources(loader.cine_frame, loader.cine_levels)
        self.rebuild_presets()
        self._update_bars()
        if loader.sd is not None:
            self.policy.open_series(loader.sd)
            self.priors.open_series(loader)
        from .titles import series_name, window_title

        desc = series_name(info)
        self.setWindowTitle(window_title("MedView", info))
        self.statusBar().showMessage(f"Series {desc}: {len(images)} images", 4000)
        self.seriesOpened.emit(loader.uid)

    def _on_slice_requested(self, index: int) -> None:
        loader = self.loader
        if loader is None or self.series_info is None:
            return
        self._shown = index
        best, patches = loader.set_focus(index, fetch=False)
        self._focus_timer.start()          # the plan follows once scrolling settles
        if best is not None:
            self._show(best)
        elif (st := loader.image_status(index)) is not None and st.res < 0:
            self.stack.clear_image()       # nothing of it yet: never leave another slice up
        for p in patches:
            self._show(p)
        self.cine_bar.set_current(index)
        self._mark_progress()

    def _move_focus(self) -> None:
        """Scrolling has settled: the shown slice (then its neighbours) comes first."""
        if self.loader is not None and self._shown is not None:
            self.loader.set_focus(self._shown)

    def _show(self, image: DecodedImage) -> bool:
        if self.series_info is None or not 0 <= image.index < len(self.series_info.images):
            return False
        if self.stack.set_image(image, self.series_info.images[image.index]):
            self.imageDisplayed.emit(image)
            self._mark_progress()
            return True
        return False

    def _on_decoded(self, loader, image: DecodedImage) -> None:
        if self._current(loader) and image.index == self._shown:
            if self.cine_bar.is_playing() and self.cine_bar.controller.consistent:
                return          # consistent cine shows only frames at the common level
            self._show(image)

    def _on_region_requested(self, x: int, y: int, w: int, h: int) -> None:
        if self.loader is None or self._shown is None:
            return
        self.loader.request_region(self._shown, (x, y, w, h))
        self.statusBar().showMessage(f"Fetching region {w}×{h} at {x},{y} at full resolution…", 4000)

    def _on_image_status(self, loader, status: ImageStatus) -> None:
        if not self._current(loader) or status.index >= len(self._statuses):
            return
        self._statuses[status.index] = status
        self._mark_progress()

    def _mark_progress(self) -> None:
        """The progress widgets are out of date: refresh them soon."""
        self._progress_dirty = True
        if not self._progress_timer.isActive():
            self._progress_timer.start()

    def _flush_progress(self) -> None:
        """Progress widgets follow the transfer and the scrolling every
        PROGRESS_INTERVAL_MS (a transfer reports far more often than anyone can read,
        and each repaint costs)."""
        if self._progress_dirty:
            self._progress_dirty = False
            self._refresh_strip()
            if self._shown is not None:
                self.strip.set_current(self._shown)
            self._update_bars()
        status = self._series_status
        if status is not None:
            self._series_status = None
            self.transfer_label.update_transfer(status.held, status.requested, status.total,
                                                status.elapsed)
            self.transfer_label.setToolTip(f"{status.images_done} of {status.count} images "
                                           f"complete for this viewport")

    def _refresh_strip(self) -> None:
        levels = [s.level if s is not None else None for s in self._statuses]
        maximum = max((s.max_level for s in self._statuses if s is not None), default=1)
        self.strip.set_levels(levels, maximum)

    def _update_bars(self) -> None:
        st = self._statuses[self._shown] if (
            self._shown is not None and 0 <= self._shown < len(self._statuses)) else None
        if st is None:
            return
        self.level_bar.set_levels(st.layers, st.requested_layers, st.max_layers)
        self.bytes_bar.set_bytes(st.held_bytes, st.requested_bytes, st.total_bytes)
        meta = self.series_info.images[st.index] if self.series_info else None
        if meta is None:
            return

        def size(r: int) -> str:
            f = 1 << max(st.numres - 1 - r, 0)
            return f"{math.ceil(meta.columns / f)}×{math.ceil(meta.rows / f)}"

        shown = self.stack.decoded()
        text = f"Held {size(st.res) if st.res >= 0 else 'nothing'} · needed {size(st.target_res)}"
        if shown is not None and shown.index == st.index:
            text = f"Shown {shown.width}×{shown.height} · " + text
        self.res_label.setText(text)

    def _on_series_status(self, loader, status: SeriesStatus) -> None:
        if not self._current(loader):
            return
        self._series_status = status
        if status.stage is None:            # the end of a stage: show it now
            self._flush_progress()
        elif not self._progress_timer.isActive():
            self._progress_timer.start()

    def _on_stage(self, loader, stage: Stage, state: str, message: str) -> None:
        if not self._current(loader):
            return
        n = len(stage.comps) if stage.comps is not None else loader.count
        what = _STAGE_TEXT.get(stage.kind, stage.kind)
        if state == "started":
            self.statusBar().showMessage(f"Fetching {what} ({n} image{'s' if n != 1 else ''})…")
        elif state == "failed":
            self.statusBar().showMessage(f"Transfer of the {what} failed: {message}")

    def _on_loader_state(self, loader, state: str) -> None:
        if not self._current(loader):
            return
        self._busy(state == "loading")
        self.cancel_button.setEnabled(state in ("loading", "paused", "failed"))
        self.cancel_button.setText("Resume" if state in ("paused", "failed") else "Cancel")
        self._flush_progress()
        if state == "idle":
            self.statusBar().showMessage("Series loaded for this view", 4000)
            self._evict_cache()
        elif state == "paused":
            self.statusBar().showMessage("Transfers stopped (press Resume to continue)")
        self.loaderStateChanged.emit(state)

    def _on_loader_failed(self, loader, message: str) -> None:
        if self._current(loader):
            self.statusBar().showMessage(message)

    def cancel_or_resume(self) -> None:
        """Cancel the series' transfers, or resume them after a cancel."""
        loader = self.loader
        if loader is None:
            return
        if loader.state == "loading":
            loader.cancel()
        else:
            loader.resume()

    def _update_reduce(self) -> None:
        """V4: tell the loader the resolution the viewport needs now."""
        loader, series = self.loader, self.series_info
        if loader is None or series is None or not series.images:
            return
        meta = series.images[0]
        numres = self._statuses[0].numres if self._statuses and self._statuses[0] else 1
        if self.stack.decoded() is not None:
            reduce = self.stack.useful_reduce(max_reduce=numres - 1)
        else:
            reduce = reduce_for_fit(meta.columns, meta.rows, *self._viewport(), numres)
        if reduce != loader.reduce:
            loader.set_reduce(reduce)
            self._statuses = list(loader.statuses())
            self._refresh_strip()
            self._update_bars()

    def _evict_cache(self) -> None:
        if self.backend.cache is None or self.loader is None or self.loader.sd is None:
            return
        keep = {im["key"] for im in self.loader.sd.images}
        backend = self.backend
        Task(lambda _ctx: backend.evict_cache(keep), name="evict", pool=backend.pool,
             parent=self).start()

    # ================================================================== cine
    def _on_cine_frame(self, index: int, level, image) -> None:
        if self.series_info is None:
            return
        self._shown = index
        if image is not None:
            self._show(image)
        self._mark_progress()

    def _on_cine_playing(self, playing: bool) -> None:
        if playing or self.loader is None or self._shown is None:
            return
        shown = self._shown
        self.stack.request_slice(shown)       # emits sliceRequested unless already the target
        if self.loader.focus != shown or self.stack.decoded() is None:
            self._on_slice_requested(shown)
        else:
            best = self.loader.best(shown)
            if best is not None:
                self._show(best)

    def _on_consistent_toggled(self, on: bool) -> None:
        if self.loader is not None:
            self.loader.set_cine_consistent(on)

    def _on_cine_level(self, loader, level) -> None:
        if self._current(loader):
            self.statusBar().showMessage(
                f"Consistent cine level: resolution {level[0]}, {level[1]} layer"
                f"{'s' if level[1] != 1 else ''}", 3000)

    # ================================================================== tools, window
    def set_tool(self, mode: MouseMode) -> None:
        self.stack.set_mouse_mode(mode)
        self.tool_actions[MouseMode(mode)].setChecked(True)

    def rebuild_presets(self) -> None:
        """Window menu and preset button from the saved presets (CT presets apply to CT;
        other modalities use the DICOM window or the histogram)."""
        modality = (self.series_info.modality if self.series_info else "") or ""
        for a in self.preset_actions:
            self.removeAction(a)
            a.deleteLater()
        self.preset_actions = []
        self.window_menu.clear()
        self.preset_menu.clear()
        for i, preset in enumerate(self.settings.presets()):
            act = QAction(f"{preset.name}  (L {preset.center:g} W {preset.width:g})", self)
            act.setData(preset)
            if i < 9:
                act.setShortcut(QKeySequence(f"Ctrl+{i + 1}"))
            act.setEnabled(modality.upper() in ("CT", ""))
            act.triggered.connect(lambda _c=False, p=preset: self.apply_window(p.center, p.width))
            self.addAction(act)
            self.preset_actions.append(act)
        for menu in (self.window_menu, self.preset_menu):
            for act in self.preset_actions:
                menu.addAction(act)
            menu.addSeparator()
            menu.addAction(self.act_default_window)
            menu.addAction(self.act_auto_window)
            menu.addSeparator()
            menu.addAction(self.act_save_preset)

    def preset_action(self, name: str) -> QAction | None:
        for act in self.preset_actions:
            if act.data().name.lower() == name.lower():
                return act
        return None

    def apply_window(self, center: float, width: float) -> None:
        if self.stack.decoded() is None:
            return
        self.stack.set_window(center, width)
        self.statusBar().showMessage(windowing.window_label(center, width), 2000)

    def default_window(self) -> None:
        self.stack.reset_window()

    def auto_window(self) -> None:
        img, meta = self.stack.decoded(), self.stack.meta()
        if img is None or meta is None or img.pixels.ndim != 2:
            return
        values = windowing.modality_values(img.pixels, meta.rescale_slope, meta.rescale_intercept)
        self.apply_window(*windowing.histogram_window(values))

    def save_preset(self) -> None:
        window = self.stack.window()
        if window is None:
            return
        name, ok = QInputDialog.getText(self, "Save window preset", "Name:")
        if ok and name.strip():
            presets = [p for p in self.settings.presets() if p.name != name.strip()]
            presets.append(windowing.WindowPreset(name.strip(), *window))
            self.settings.set_presets(presets)
            self.rebuild_presets()

    # ================================================================== import
    def choose_folder(self) -> None:
        if not self._check_import():
            return
        folder = QFileDialog.getExistingDirectory(self, "Import a folder of DICOM files")
        if folder:
            self.import_paths([folder])

    def choose_files(self) -> None:
        if not self._check_import():
            return
        files, _ = QFileDialog.getOpenFileNames(self, "Import DICOM files")
        if files:
            self.import_paths(files)

    def _check_import(self) -> bool:
        if self.backend.can_import:
            return True
        QMessageBox.information(
            self, "Import",
            f"Import adds files to the bundled local server's store. You are connected to "
            f"{self.backend.url or 'no server'}, which keeps its own store, so import is "
            f"disabled. Start medview without --server to import files.")
        return False

    def import_paths(self, paths: list[str | Path]) -> Task | None:
        """Import files/folders into the local store, with a cancellable progress dialog,
        then list what happened per file and open the (first) imported study."""
        if not self._check_import():
            return None
        backend = self.backend
        dialog = QProgressDialog("Looking for DICOM files…", "Cancel", 0, 0, self)
        dialog.setWindowTitle("Import")
        dialog.setWindowModality(Qt.WindowModality.WindowModal)
        dialog.setMinimumDuration(0)
        dialog.setAutoClose(False)
        dialog.setAutoReset(False)
        self.import_progress = dialog

        def work(ctx):
            return backend.import_paths(paths, progress=ctx.progress, log_fn=ctx.message,
                                        cancelled=lambda: ctx.cancelled)

        task = Task(work, name="import", parent=self)

        def on_progress(done: int, total: int) -> None:
            dialog.setMaximum(max(total, 1))
            dialog.setValue(min(done, max(total, 1)))

        def on_cancel() -> None:
            task.cancel()
            dialog.setLabelText("Cancelling after the files in progress…")

        def finish(outcome: ImportOutcome) -> None:
            dialog.canceled.disconnect(on_cancel)
            dialog.close()
            self._import_done(outcome)

        def fail(error: BaseException) -> None:
            dialog.canceled.disconnect(on_cancel)
            dialog.close()
            QMessageBox.critical(self, "Import failed", str(error))

        task.progress.connect(on_progress)
        task.message.connect(lambda m: dialog.setLabelText(m if len(m) < 110 else "…" + m[-108:]))
        dialog.canceled.connect(on_cancel)
        task.finished.connect(finish)
        task.failed.connect(fail)
        dialog.show()
        return task.start()

    def _import_done(self, outcome: ImportOutcome) -> None:
        r = outcome.report
        self.statusBar().showMessage(f"Import: {r.summary()}" +
                                     (" (cancelled)" if outcome.cancelled else ""), 8000)
        dlg = ImportResultDialog(outcome, self)
        dlg.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
        dlg.openRequested.connect(self.open_study)
        self.last_import_dialog = dlg
        dlg.show()
        self.browser.refresh()
        if outcome.studies:
            self.open_study(outcome.studies[0])
        self.importFinished.emit(outcome)

    def dragEnterEvent(self, event) -> None:  # noqa: N802 (Qt API)
        urls = event.mimeData().urls() if event.mimeData().hasUrls() else []
        if urls and all(u.isLocalFile() for u in urls):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:  # noqa: N802
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self.import_paths(paths)

    # ================================================================== dialogs
    def show_preferences(self) -> PreferencesDialog:
        backend = self.backend
        dlg = PreferencesDialog(self.settings, backend.cache_path, self)

        def refresh_usage() -> None:
            t = Task(lambda _ctx: backend.cache_usage(), name="cache-usage", pool=backend.pool, parent=self)
            # the dialog may be closed (and deleted) before the figure arrives
            t.finished.connect(lambda u: shiboken6.isValid(dlg) and dlg.set_usage(*u))
            t.failed.connect(lambda e: shiboken6.isValid(dlg) and dlg.cache_use.setText(f"unknown ({e})"))
            t.start()

        def clear() -> None:
            if QMessageBox.question(self, "Clear cache", "Delete every cached packet? Images "
                                    "will be fetched again from the server.") != QMessageBox.StandardButton.Yes:
                return
            dlg.cache_use.setText("Clearing…")
            t = Task(lambda _ctx: backend.clear_cache(), name="cache-clear", parent=self)
            t.finished.connect(lambda _r: refresh_usage())
            t.start()

        dlg.clearCacheRequested.connect(clear)
        refresh_usage()

        def accepted() -> None:
            dlg.save()
            limit = self.settings.cache_limit_mb() << 20
            Task(lambda _ctx: backend.set_cache_limit(limit), name="cache-limit", parent=self).start()
            if self.loader is not None:
                self.loader.set_prefetch(self.settings.prefetch())
            self.rebuild_presets()
            if backend.server is not None and backend.own_server:
                port, title = self.settings.dicom_port(), self.settings.dicom_ae_title()
                t = Task(lambda _ctx: backend.set_dicom(port, title), name="dicom", parent=self)
                t.finished.connect(lambda _r: self.statusBar().showMessage(
                    f"DICOM listener {title} on port {port}" if port else "DICOM listener off"))
                t.failed.connect(lambda e: self.statusBar().showMessage(
                    f"DICOM listener not started: {e}"))
                t.start()

        dlg.accepted.connect(accepted)
        dlg.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
        dlg.open()
        return dlg

    def shortcut_rows(self) -> list[tuple[str, str]]:
        rows = []
        for a in self.actions():
            keys = a.shortcut().toString(QKeySequence.SequenceFormat.NativeText)
            if keys:
                rows.append((keys, a.text().replace("&", "").split("  (")[0]))
        return sorted(rows, key=lambda r: r[1].lower()) + list(VIEW_SHORTCUTS)

    def show_shortcuts(self) -> ShortcutsDialog:
        dlg = ShortcutsDialog(self.shortcut_rows(), self)
        dlg.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
        dlg.open()
        return dlg

    def show_about(self) -> None:
        QMessageBox.about(self, "About MedView", about_text())

    def _busy(self, on: bool, message: str | None = None) -> None:
        self.busy.setVisible(on)
        if message:
            self.statusBar().showMessage(message)

    # ================================================================== closing
    def quit_app(self) -> None:
        """File → Quit: close every window (MPR, slides), cancel transfers and workers,
        stop the bundled server and leave the event loop (exit code 0)."""
        self.close()
        app = QApplication.instance()
        if app is not None:
            app.quit()

    def other_windows(self) -> list[QWidget]:
        """The MPR and slide windows this window opened that are still open."""
        return [w for w in getattr(self, "_mpr_windows", []) + getattr(self, "_slide_windows", [])
                if w is not None and w.isVisible()]

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        """Stop what this window started: the MPR and slide windows, transfers, pool,
        bundled server. The main window closing ends the application."""
        self._closing = True
        self.settings.set_layout(self.saveGeometry(), self.saveState())
        self.settings.sync()
        for w in self.other_windows():
            w.close()                        # each cancels its own loader / tile fetches
        self._mpr_windows, self._slide_windows = [], []
        self._close_loader()
        self.thumbs.cancel_all()
        self.backend.close()
        super().closeEvent(event)
