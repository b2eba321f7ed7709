"""Prior studies in the Reading dock (seed 001): the list, its states, and the controller
that finds the priors when a series opens, fetches them in the background at the
comparison version and opens the comparison window.

Order of the network work for a newly opened series: its preview (the loader), then the
priors at the comparison version (:class:`client.priors.PriorFetcher`, one pool job) and
the preview of the study's next series (the hanging order: Series Number), then the
series' background fill (the controller holds the loader's prefetch meanwhile).
The priors' bytes come out of the same memory budget as the decoded images of the
current series (``SeriesLoader`` decoded budget minus what the current series needs).

Wiring (``viewer/controllers/reading.py``): :class:`PriorsPanel` sits in the Reading
dock; the reading controller makes the :class:`PriorsController` with the backend getter
and its runner and calls ``open_series(loader)`` / ``close_series()`` as the series
controller opens and closes a series; the window connects the loader bridge's
``stageChanged`` to ``on_stage``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import (QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QPushButton,
                               QVBoxLayout, QWidget)

from client.policy_text import prior_line
from client.priors import PriorFetcher, find_priors, next_series

from client.series_loader import PREVIEW

log = logging.getLogger("medview.priors")

__all__ = ["PriorsPanel", "PriorsController", "PRIORS_AHEAD"]

PRIORS_AHEAD = 3
"""Priors fetched ahead (enough for a 2×2 comparison)."""

_ROLE = Qt.ItemDataRole.UserRole


class PriorsPanel(QWidget):
    """The patient's earlier studies, most relevant first, with their state."""

    compareRequested = Signal(list, str)
    """(prior study rows, "1x2" | "2x2"): show them next to the current series."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = QLabel("Prior studies", self)
        self.list = QListWidget(self)
        self.list.setMaximumHeight(110)
        self.compare_1x2 = QPushButton("Compare 1×2", self)
        self.compare_2x2 = QPushButton("Compare 2×2", self)
        self.compare_1x2.setToolTip("Current on the left, the selected (or most recent) prior on the right")
        self.compare_2x2.setToolTip("Current top left, then up to three priors from the selected one")
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.compare_1x2)
        row.addWidget(self.compare_2x2)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.title)
        lay.addWidget(self.list)
        lay.addLayout(row)
        self.priors: list[dict] = []
        self.states: dict[str, tuple[str, dict]] = {}
        self.compare_1x2.clicked.connect(lambda: self._compare("1x2"))
        self.compare_2x2.clicked.connect(lambda: self._compare("2x2"))
        self.list.itemDoubleClicked.connect(lambda _it: self._compare("1x2"))
        self.set_priors([])

    def set_priors(self, priors: list[dict] | None, searching: bool = False) -> None:
        self.priors = [p for p in priors or [] if p.get("compare")]
        self.states = {}
        self.list.clear()
        for p in self.priors:
            item = QListWidgetItem(prior_line(p))
            item.setData(_ROLE, p["StudyInstanceUID"])
            self.list.addItem(item)
        if self.priors:
            self.list.setCurrentRow(0)
            self.title.setText(f"Prior studies ({len(self.priors)})")
        else:
            self.title.setText("Prior studies: looking…" if searching else "Prior studies: none")
        self.compare_1x2.setEnabled(bool(self.priors))
        self.compare_2x2.setEnabled(len(self.priors) >= 1)

    def set_state(self, study: str, state: str, detail: dict | None = None) -> None:
        self.states[study] = (state, dict(detail or {}))
        for i, p in enumerate(self.priors):
            if p["StudyInstanceUID"] == study:
                self.list.item(i).setText(prior_line(p, state, detail))

    def state_of(self, study: str) -> str | None:
        return self.states.get(study, (None, {}))[0]

    def _compare(self, layout: str) -> None:
        if not self.priors:
            return
        start = max(self.list.currentRow(), 0)
        chosen = self.priors[start:start + (1 if layout == "1x2" else 3)]
        self.compareRequested.emit(chosen, layout)


class PriorsController(QObject):
    """Finds, fetches ahead and compares priors for the series the window shows."""

    stateChanged = Signal(str, str, dict)      # study, state, detail (UI thread)
    comparisonOpened = Signal(object)          # the ComparisonView
    _state = Signal(str, str, dict)            # from the fetch job

    def __init__(self, panel: PriorsPanel, backend: Callable[[], Any],
                 runner: Callable | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.panel = panel
        self.backend = backend              # () -> the window's backend (session, registry, pool)
        self.runner = runner
        self.loader = None
        self.priors: list[dict] = []
        self.fetcher: PriorFetcher | None = None
        self.next_uid: str | None = None     # the next series of the hanging order
        self.next_fetched = False
        self._fetch_started = False
        self._token = None
        self.views: list = []
        self._state.connect(self._on_state, Qt.ConnectionType.QueuedConnection)
        panel.compareRequested.connect(self.compare)

    # ---------------------------------------------------------------- the current series
    def open_series(self, loader) -> None:
        """A series opened (its loader has its description): look for priors."""
        self.close_series()
        self.loader = loader
        sd = loader.sd
        if sd is None:
            return
        loader.set_prefetch(False)            # the fill waits for the priors
        self.panel.set_priors([], searching=True)
        session = self.backend().session
        info = dict(sd.info)

        def find() -> tuple[list[dict], str | None]:
            return find_priors(session, info), next_series(session, info)

        def done(found) -> None:
            if self.loader is not loader:
                return
            priors, self.next_uid = found
            self.priors = [p for p in priors if p.get("compare")]
            self.panel.set_priors(self.priors)
            if not self.priors and not self.next_uid:
                self._release()
            elif self._preview_done():
                self.fetch_ahead()

        def failed(e: BaseException) -> None:
            log.warning("prior studies: %s", e)
            if self.loader is loader:
                self.panel.set_priors([])
                self._release()
        self._run(find, done, failed)

    def close_series(self) -> None:
        if self._token is not None:
            self._token.cancel()
        self._token = None
        self.loader, self.priors, self.fetcher = None, [], None
        self.next_uid: str | None = None
        self._fetch_started = False
        self.panel.set_priors([])

    def _release(self) -> None:
        """Let the current series' background fill go on."""
        if self.loader is not None and not self.loader.closed:
            self.loader.set_prefetch(self._prefetch_wanted())

    def _prefetch_wanted(self) -> bool:
        settings = getattr(self.parent(), "settings", None)
        try:
            return bool(settings.prefetch()) if settings is not None else True
        except Exception:  # noqa: BLE001 - settings unavailable: the default
            return True

    def _preview_done(self) -> bool:
        lv = self.loader.levels() if self.loader is not None else []
        return bool(lv) and all(r >= 0 for _q, r in lv)

    def on_stage(self, loader, stage, state: str, _message: str = "") -> None:
        """The loader bridge's ``stageChanged``: the preview done (its last request,
        or as far as the link brings it while the reader is active) starts the priors."""
        if (loader is self.loader and stage.kind == PREVIEW and state == "complete"
                and (self.priors or self.next_uid)
                and not any(st.kind == PREVIEW for st in loader.plan())):
            self.fetch_ahead()

    def budget(self) -> int:
        """Bytes left in the one memory budget for priors."""
        ld = self.loader
        if ld is None or ld.sd is None:
            return 0
        total = ld.decoded_budget
        ims = ld.sd.images
        need = sum((im["Columns"] * im["Rows"] * 4) >> (2 * (ld.reduce or 0)) for im in ims)
        return max(total - need, 0)

    def fetch_ahead(self) -> None:
        """Fetch the first priors at the comparison version and the preview of the next
        series of the hanging order (Series Number), then release the fill."""
        if self._fetch_started or self.loader is None:
            return
        self._fetch_started = True
        backend = self.backend()
        loader = self.loader
        from client.pool import CancelToken

        token = self._token = CancelToken()
        self.fetcher = PriorFetcher(backend.registry.get, self.budget(), reduce=loader.reduce,
                                    on_state=lambda s, st, d: self._state.emit(s, st, dict(d)))
        priors = self.priors[:PRIORS_AHEAD]
        fetcher = self.fetcher
        nxt = self.next_uid

        def job() -> bool:
            fetcher.run(priors, token)
            return bool(nxt) and not token.cancelled and fetcher.preview(nxt, token)

        def done(next_fetched) -> None:
            if self.loader is loader:
                self.next_fetched = bool(next_fetched)
                self._release()
        self._run(job, done, lambda e: done(False))

    def _on_state(self, study: str, state: str, detail: dict) -> None:
        self.panel.set_state(study, state, detail)
        self.stateChanged.emit(study, state, detail)

    def _run(self, fn, done, failed) -> None:
        if self.runner is not None:
            self.runner(fn, done, failed)
            return
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001
            failed(e)
            return
        done(result)

    # ---------------------------------------------------------------- comparison
    def compare(self, priors: list[dict], layout: str = "1x2"):
        """Open the comparison window: the current series and these priors."""
        from .compare import ComparisonView

        if self.loader is None or not priors:
            return None
        backend = self.backend()
        uids = [p["compare"]["SeriesInstanceUID"] for p in priors]
        view = ComparisonView(backend.registry, backend.pool, self.loader.uid, uids, layout)
        view.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        view.destroyed.connect(lambda *_: self.views.remove(view) if view in self.views else None)
        self.views.append(view)
        view.resize(1200, 700 if layout == "1x2" else 900)
        view.start()
        view.show()
        self.comparisonOpened.emit(view)
        return view
