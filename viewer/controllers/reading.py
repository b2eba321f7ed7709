"""The reading dock: the version / quality / purpose selector and its one-sentence
reason, the priors panel, diagnosis status, notes, annotations and report (server
policy, issue 5; prior studies, seed 001). Every policy call is a server round trip and
runs in the worker pool."""
from __future__ import annotations

from PySide6.QtCore import QObject, Qt
from PySide6.QtWidgets import QDockWidget, QFrame, QScrollArea, QVBoxLayout, QWidget

from client.pool import INTERACTION

from ..policy_panel import DiagnosisPanel, PolicyController, VersionSelector, measurement_annotation
from ..priors_panel import PriorsController, PriorsPanel
from ..workers import Task

__all__ = ["ReadingDock", "ReadingController"]


class ReadingDock(QDockWidget):
    """The dock's panes, in a scroll area that never forces the window's height."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Reading", parent)
        self.setObjectName("reading")
        self.diagnosis_panel = DiagnosisPanel(self)
        self.version_selector = VersionSelector(self)
        self.priors_panel = PriorsPanel(self)
        box = QWidget(self)
        lay = QVBoxLayout(box)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.version_selector)
        lay.addWidget(self.priors_panel)
        lay.addWidget(self.diagnosis_panel, 1)
        scroll = QScrollArea(self)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(box)
        # never sideways: the dock is as wide as the panel's widest row (tabs, buttons)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setMinimumWidth(box.minimumSizeHint().width()
                               + scroll.verticalScrollBar().sizeHint().width() + 4)
        self.setWidget(scroll)


class ReadingController(QObject):
    """The policy and priors controllers of the dock, following the shown series.

    Uses of the window: ``backend``, ``stack``, ``series_ctl``, ``open_series`` (another
    version of the shown series) and its status bar."""

    def __init__(self, window, dock: ReadingDock) -> None:
        super().__init__(window)
        self.w = window
        self.policy = PolicyController(dock.diagnosis_panel, dock.version_selector,
                                       runner=self.run, parent=window)
        # another version of the shown series: same slice, zoom, pan and window
        self.policy.selectionChanged.connect(lambda uid, _sel: window.open_series(uid, keep_view=True))
        self.policy.notice.connect(lambda m: self._message(m, 6000))
        self.policy.failed.connect(lambda m: self._message(m, 8000))
        self.policy.recallingChanged.connect(
            lambda on, m: self._message(m or ("Recalling from the archive…" if on else ""),
                                        0 if on else 4000))
        self.policy.set_measurement_source(self.current_measurement_annotation)
        self.priors = PriorsController(dock.priors_panel, lambda: window.backend,
                                       runner=self.run, parent=window)
        self.priors.stateChanged.connect(
            lambda _s, st, _d: st == "recalling"
            and self._message("A prior study is recalling from archive…", 6000))

    def _message(self, text: str, ms: int) -> None:
        self.w.statusBar().showMessage(text, ms)

    def run(self, fn, done, failed) -> None:
        """Run a policy call (a server round trip) off the UI thread."""
        task = Task(lambda _ctx: fn(), name="policy", pool=self.w.backend.pool,
                    priority=INTERACTION, parent=self)
        task.finished.connect(done)
        task.failed.connect(failed)
        task.start()

    def current_measurement_annotation(self) -> dict | None:
        stack, series = self.w.stack, self.w.series_ctl
        ms = stack.measurements()
        index = stack.current_index()
        if not ms or index is None or series.series_info is None or series.series_uid is None:
            return None
        return measurement_annotation(ms[-1], series.series_info.images[index], series.series_uid)

    def set_session(self, session) -> None:
        from client.policy import PolicyClient

        self.policy.set_client(PolicyClient(session))

    def open_series(self, loader) -> None:
        self.policy.open_series(loader.sd)
        self.priors.open_series(loader)

    def close_series(self) -> None:
        self.policy.close_series()
        self.priors.close_series()
