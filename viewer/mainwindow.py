"""The desktop app's main window: study browser, progressive stack view, progress panel,
cine, tools, local import, settings.

The window builds the widgets, menus, shortcuts and settings and wires them to small
controllers (:mod:`viewer.controllers`), each owning one concern: the shown series and its
loader, transfers and the status bar, connecting, the study browser's requests, local
files, the reading dock, window presets, 3-D and slides. Loading logic is
:class:`client.series_loader.SeriesLoader`, the connection and import are
:class:`viewer.services.Backend`, and everything that waits on the network, reads files
or decodes runs in the worker pool or a :class:`viewer.workers.Task`; results come back as
queued signals.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, Signal
from PySide6.QtGui import QAction, QActionGroup, QCloseEvent, QKeySequence
from PySide6.QtWidgets import QApplication, QDockWidget, QMainWindow, QMessageBox, QVBoxLayout, QWidget

from client.series_loader import SeriesLoader
from imaging.model import SeriesInfo

from .browser import StudyBrowser
from .controllers.browse import BrowseController
from .controllers.connection import ConnectionController
from .controllers.files import FilesController
from .controllers.preferences import show_preferences
from .controllers.presets import PresetController
from .controllers.reading import ReadingController, ReadingDock
from .controllers.series import SeriesController
from .controllers.slides import SlideController
from .controllers.threed import ThreeDController
from .controllers.transfers import TransferController
from .dialogs import AppSettings, PreferencesDialog, ShortcutsDialog, about_text
from .progress import TransferPanel
from .services import Backend
from .stackview import VIEW_SHORTCUTS, MouseMode, StackView
from .workers import LoaderBridge, Task

__all__ = ["AppConfig", "MainWindow", "VIEW_SHORTCUTS"]


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
        self.setWindowTitle("MedView")
        self.setAcceptDrops(True)
        self.bridge = LoaderBridge(self)
        self._build_panes()
        self.series_ctl = SeriesController(self)
        self.transfers = TransferController(self)
        self.reading = ReadingController(self, self.reading_dock)
        self.policy, self.priors = self.reading.policy, self.reading.priors
        self.browsing = BrowseController(self)
        self.thumbs = self.browsing.thumbs
        self.files = FilesController(self)
        self.presets = PresetController(self)
        self.threed = ThreeDController(self)
        self.slides = SlideController(self)
        self.connection = ConnectionController(self)
        self._build_actions()
        self._build_menus_and_toolbars()
        self._wire()
        self.connection.set_connected_ui(False)
        geometry, state = self.settings.geometry(), self.settings.state()
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            self.resize(*first_size(self.screen()))
        if state is not None:
            self.restoreState(state)

    # ================================================================== building
    def _build_panes(self) -> None:
        self.stack = StackView(self)
        self.panel = p = TransferPanel(self)
        self.level_bar, self.bytes_bar, self.res_label = p.level_bar, p.bytes_bar, p.res_label
        self.strip, self.transfer_label = p.strip, p.transfer_label
        self.cancel_button, self.cine_bar = p.cancel_button, p.cine_bar
        central = QWidget(self)
        layout = QVBoxLayout(central)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.stack, 1)
        layout.addWidget(p)
        self.setCentralWidget(central)

        self.browser = StudyBrowser(self)
        dock = self.browser_dock = QDockWidget("Studies", self)
        dock.setObjectName("studies")
        dock.setWidget(self.browser)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, dock)
        # reading dock: version/quality/purpose, priors, diagnosis, notes, report (issue 5)
        self.reading_dock = ReadingDock(self)
        self.diagnosis_panel = self.reading_dock.diagnosis_panel
        self.version_selector = self.reading_dock.version_selector
        self.priors_panel = self.reading_dock.priors_panel
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.reading_dock)

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
        self.act_open_folder = A("Open &folder…", self.files.choose_folder, QKeySequence.StandardKey.Open,
                                 "Import a folder of DICOM files into the local store")
        self.act_import_files = A("&Import files…", self.files.choose_files, "Ctrl+Shift+O",
                                  "Import DICOM files into the local store")
        self.act_connect = A("&Connect to server…", lambda: self.connection.ask_login(), None,
                             "Log in to another image server")
        self.act_export = A("&Export study…", self.files.choose_export, "Ctrl+E",
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
        self.act_cancel = A("&Cancel transfer", self.transfers.cancel_or_resume, "Ctrl+.",
                            "Stop the transfers of this series (press again to resume)")
        self.act_default_window = A("&Default window", self.presets.default_window, "Ctrl+0",
                                    "The DICOM window (or soft tissue for CT)")
        self.act_auto_window = A("&Auto window (histogram)", self.presets.auto_window, "Ctrl+Shift+A",
                                 "Window from the 1st-99th percentile of the image")
        self.act_save_preset = A("&Save window as preset…", self.presets.save_preset, None,
                                 "Add the current window to the presets")
        self.act_shortcuts = A("&Keyboard shortcuts", self.show_shortcuts, QKeySequence.StandardKey.HelpContents,
                               "List the keyboard shortcuts")
        self.act_about = A("&About MedView", self.show_about, None, "Version and credits")
        self.act_mpr = A("Open in &MPR", lambda: self.open_mpr(), "Ctrl+M",
                         "Open the series in MPR and 3-D (2×2 layout)")
        self.act_mpr_slabs = A("Open in MPR, &thick to thin", lambda: self.open_mpr(True),
                               "Ctrl+Shift+M", "MPR loaded as thick slabs first, then thinner")
        self.act_mpr_folder = A("Open &folder in MPR…", self.threed.open_mpr_folder, None,
                                "Select a series from a folder of DICOM files and open it in MPR")
        self.act_open_slide = A("Open &slide…", self.slides.choose_slide, "Ctrl+Shift+S",
                                "Open a whole-slide image from the server (pathology)")
        self.act_station = A("Station &worklist", self.slides.show_station_worklist, None,
                             "The exams assigned to this reading station (--station)")
        self.act_station.setVisible(bool(self.config.station))

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
        bar.addMenu("&3D").addActions([self.act_mpr, self.act_mpr_slabs, self.act_mpr_folder])
        self.window_menu = bar.addMenu("&Window")
        bar.addMenu("&Tools").addActions(list(self.tool_actions.values()))
        bar.addMenu("&Help").addActions([self.act_shortcuts, self.act_about])

        tools = self.addToolBar("Tools")
        tools.setObjectName("tools")
        tools.addActions(list(self.tool_actions.values()))
        view = self.addToolBar("View")
        view.setObjectName("view")
        view.addWidget(self.presets.attach(self.window_menu))
        view.addActions([self.act_invert, self.act_rot_left, self.act_rot_right, self.act_flip_h,
                         self.act_flip_v, self.act_fit, self.act_one, self.act_reset_view])

    def _wire(self) -> None:
        b, series, transfers, browser = self.bridge, self.series_ctl, self.transfers, self.browser
        b.opened.connect(series.on_opened)
        b.imageStatus.connect(transfers.on_image_status)
        b.seriesStatus.connect(transfers.on_series_status)
        b.stageChanged.connect(transfers.on_stage)
        b.stageChanged.connect(self.priors.on_stage)
        b.decoded.connect(series.on_decoded)
        b.cineLevel.connect(series.on_cine_level)
        b.stateChanged.connect(transfers.on_loader_state)
        b.failed.connect(transfers.on_loader_failed)
        self.serverBusy.connect(transfers.show_server_busy)      # queued: emitted by workers
        self.thumbs.ready.connect(browser.set_thumbnail)
        browser.queryRequested.connect(self.browsing.run_query)
        browser.thumbnailsWanted.connect(self.browsing.want_thumbnails)
        browser.seriesActivated.connect(self.open_series)
        browser.remoteQueryRequested.connect(self.browsing.run_remote_query)
        browser.retrieveRequested.connect(self.browsing.retrieve_study)
        self.stack.sliceRequested.connect(series.on_slice_requested)
        self.stack.regionRequested.connect(series.on_region_requested)
        self.stack.displayedSizeChanged.connect(lambda _w, _h: series.reduce_timer.start())
        self.stack.viewStateChanged.connect(lambda _s: series.reduce_timer.start())
        self.strip.sliceClicked.connect(self.stack.request_slice)
        self.cancel_button.clicked.connect(transfers.cancel_or_resume)
        self.cine_bar.frameChanged.connect(series.on_cine_frame)
        self.cine_bar.playingChanged.connect(series.on_cine_playing)
        self.cine_bar.consistent_box.toggled.connect(series.on_consistent_toggled)

    # ================================================================== the controllers' faces
    @property
    def loader(self) -> SeriesLoader | None:
        """The loader of the series in the stack view."""
        return self.series_ctl.loader

    @property
    def series_info(self) -> SeriesInfo | None:
        return self.series_ctl.series_info

    @property
    def series_uid(self) -> str | None:
        return self.series_ctl.series_uid

    def start(self) -> None:
        """Connect as configured: the bundled server, or the login dialog for --server."""
        self.connection.start()

    def connect_to(self, url: str, user: str = "local", password: str | None = None,
                   interactive: bool = False) -> Task:
        return self.connection.connect_to(url, user, password, interactive)

    def adopt_server(self, server, own: bool = False) -> Task:
        return self.connection.adopt_server(server, own)

    def open_series(self, uid: str, keep_view: bool = False) -> SeriesLoader | None:
        return self.series_ctl.open_series(uid, keep_view)

    def import_paths(self, paths: list[str | Path]) -> Task | None:
        return self.files.import_paths(paths)

    def export_study(self, study_uid: str, out: str | Path) -> Task:
        return self.files.export_study(study_uid, out)

    def open_mpr(self, thick_to_thin: bool = False):
        return self.threed.open_mpr(thick_to_thin)

    def open_mpr_folder(self) -> None:
        self.threed.open_mpr_folder()

    def open_slide(self, slide_uid: str) -> Task | None:
        return self.slides.open_slide(slide_uid)

    def preset_action(self, name: str) -> QAction | None:
        return self.presets.preset_action(name)

    def set_tool(self, mode: MouseMode) -> None:
        self.stack.set_mouse_mode(mode)
        self.tool_actions[MouseMode(mode)].setChecked(True)

    def dragEnterEvent(self, event) -> None:  # noqa: N802 (Qt API)
        self.files.drag_enter(event)

    def dropEvent(self, event) -> None:  # noqa: N802
        self.files.drop(event)

    # ================================================================== dialogs
    def show_preferences(self) -> PreferencesDialog:
        return show_preferences(self)

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
        return [w for w in self.threed.windows + self.slides.windows
                if w is not None and w.isVisible()]

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        """Stop what this window started: the MPR and slide windows, transfers, pool,
        bundled server. The main window closing ends the application. The window goes at
        once: logging out, stopping the bundled server and closing the cache run on a
        shutdown thread (``backend.shut_down`` is set when they finished; ``medview``
        waits for it, bounded, after the event loop ended)."""
        self.connection.closing = True
        self.settings.set_layout(self.saveGeometry(), self.saveState())
        self.settings.sync()
        for w in self.other_windows():
            w.close()                        # each cancels its own loader / tile fetches
        self.threed.windows, self.slides.windows = [], []
        self.series_ctl.close_loader()
        self.thumbs.cancel_all()
        self.backend.close_in_background()
        super().closeEvent(event)
