"""Prior studies (seed 001): which are relevant, the worklist prefetch that recalls them
from the archive, the client's prior list and background fetch, and the comparison view."""
from __future__ import annotations

import json

import pytest

from priorsutil import PRIOR_CT_DATE, make_priors_store
from server.priors import Exam, WorklistError, read_worklist, relevant_priors


@pytest.fixture(scope="module")
def pstore(tmp_path_factory):
    return make_priors_store(tmp_path_factory.mktemp("priors"))


def test_worklist_csv_and_json(tmp_path):
    (tmp_path / "w.csv").write_text("PatientID,ScheduledDate,Modality\nP1,2024-01-15,ct\n"
                                    "P2,20240116,MR\n")
    assert read_worklist(tmp_path / "w.csv") == [Exam("P1", "20240115", "CT", None, 2),
                                                 Exam("P2", "20240116", "MR", None, 3)]  # file lines
    (tmp_path / "w.json").write_text(json.dumps({"exams": [
        {"patient_id": "P1", "date": "2024-01-15", "modality": "CT", "body_part": "chest"}]}))
    assert read_worklist(tmp_path / "w.json") == [Exam("P1", "20240115", "CT", "CHEST", 1)]
    for text, msg in (("PatientID,Modality\nP1,CT\n", "row 2: missing date"),
                      ("patient_id,date,modality\nP1,15.01.2024,CT\n", "is not YYYY-MM-DD"),
                      ('[{"patient_id": "P1"}]', "exam 1: missing date, modality"),
                      ("{not json", "not valid JSON"), ("", "no exams")):
        (tmp_path / "bad").write_text(text)
        with pytest.raises(WorklistError, match=msg):
            read_worklist(tmp_path / "bad")


def test_relevant_priors_order(pstore):
    from server.store import Store

    cur = pstore["current"]
    with Store(pstore["store"]) as st:
        got = relevant_priors(st.catalogue, Exam(cur["patient"], cur["date"], "CT", "CHEST"))
        # the earlier CT first although the MR study is more recent; never the current one
        assert [p["StudyInstanceUID"] for p in got] == [pstore["prior"]["study"],
                                                        pstore["other"]["study"]]
        assert [p["same_modality"] for p in got] == [True, False]
        # a date before every prior: none
        assert relevant_priors(st.catalogue, Exam(cur["patient"], "20200101", "CT")) == []
        # another patient (and a wildcard is not a patient): none
        assert relevant_priors(st.catalogue, Exam("*", "20990101", "CT")) == []


def test_prefetch_worklist_recalls_archived_priors(pstore, tmp_path, capsys):
    from server.cli import main
    from server.store import Store
    from server.tiers import Tiers
    from policyutil import copy_store

    store = copy_store(pstore["store"], tmp_path / "store")
    assert main(["migrate", "--store", str(store), "--days", "0", "--min-status", "1",
                 "--quiet"]) == 0
    prior = pstore["prior"]["series"]

    def states(uid):
        with Store(store) as st:
            t = Tiers(st)
            try:
                return sorted({tier.state for _pk, tier in t.frame_states(uid).values()})
            finally:
                t.close()
    assert states(prior) == ["archived"]
    cur = pstore["current"]
    wl = tmp_path / "worklist.csv"
    wl.write_text(f"patient_id,date,modality\n{cur['patient']},2024-01-15,CT\n"
                  "NOBODY,2024-01-15,CT\n")
    capsys.readouterr()
    assert main(["prefetch", "--store", str(store), "--worklist", str(wl), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["exams"] == 2 and [p["study"] for p in out["priors"]] == [pstore["prior"]["study"]]
    assert out["frames_recalled"] == 6 and out["errors"] == []
    assert states(prior) == ["recalled"]
    # the current study and the other modality stay in the archive
    assert states(cur["series"]) == ["archived"] and states(pstore["other"]["series"]) == ["archived"]
    assert states(pstore["next"]["series"]) == ["archived"]
    # a second run: nothing left to recall
    assert main(["prefetch", "--store", str(store), "--worklist", str(wl), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["frames_recalled"] == 0 and out["frames_hot"] == 6
    # the recalled prior reads back bit for bit
    with Store(store) as st:
        t = Tiers(st)
        import hashlib
        for row in st.catalogue.series_images(prior):
            assert hashlib.sha256(t.read_codestream(row)).hexdigest() == row["codestream_sha256"]
        t.close()
    # a broken worklist: exit 2, nothing done
    (tmp_path / "bad.csv").write_text("patient_id,modality\nX,CT\n")
    assert main(["prefetch", "--store", str(store), "--worklist", str(tmp_path / "bad.csv")]) == 2
    assert "missing date" in capsys.readouterr().err


# ---------------------------------------------------------------- client side
def _archived_server(pstore, where, site_policy: str | None = None):
    """A server on a private copy of the store whose studies are in the archive (with
    ``site_policy`` as the store's own policy.toml)."""
    from policyutil import copy_store
    from server.cli import main
    from server.embedded import EmbeddedServer
    from client.policy import PolicyClient
    from client.session import Session

    store = copy_store(pstore["store"], where / "store")
    if site_policy is not None:
        (store / "policy.toml").write_text(site_policy)
    assert main(["migrate", "--store", str(store), "--days", "0", "--min-status", "1",
                 "--quiet"]) == 0
    srv = EmbeddedServer(str(store)).start()
    srv.p = pstore
    pc = PolicyClient(Session(srv.url))
    for name in ("prior", "other"):        # read studies: every version may be sent
        pc.set_status(pstore[name]["study"], 2)
    return srv


@pytest.fixture(scope="module")
def psrv(pstore, tmp_path_factory):
    srv = _archived_server(pstore, tmp_path_factory.mktemp("psrv"))
    yield srv
    srv.stop()


@pytest.fixture()
def fresh_srv(pstore, tmp_path):
    """As ``psrv``, with nothing recalled yet by other tests."""
    srv = _archived_server(pstore, tmp_path)
    yield srv
    srv.stop()


def test_client_lists_priors_most_relevant_first(psrv):
    from client.priors import find_priors
    from client.series import SeriesData
    from client.session import Session

    s = Session(psrv.url)
    cur = SeriesData(s, None, psrv.p["current"]["series"])
    priors = find_priors(s, cur.info)
    assert [p["StudyInstanceUID"] for p in priors] == [psrv.p["prior"]["study"],
                                                      psrv.p["other"]["study"]]
    assert priors[0]["compare"]["SeriesInstanceUID"] == psrv.p["prior"]["series"]
    assert priors[0]["same_modality"] and not priors[1]["same_modality"]
    assert priors[0]["StudyDate"] == PRIOR_CT_DATE


def test_slice_sync_by_position_or_relative():
    from client.priors import SliceSync

    same = SliceSync([0.0, 1.0, 2.0, 3.0], [0.4, 2.6, 5.0], "1.2", "1.2")
    assert same.by_position and [same.map(i) for i in range(4)] == [0, 0, 1, 1]
    assert "patient position" in same.words
    other = SliceSync([0.0, 1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0], "1.2", "1.3")
    assert not other.by_position and [other.map(i) for i in range(5)] == [0, 0, 1, 2, 2]
    assert "relative position" in other.words and "differ" in other.words
    assert not SliceSync([0.0, None], [1.0, 2.0], "1", "1").by_position   # no positions


def test_prior_fetcher_recalls_and_fetches_within_budget(psrv):
    from client.priors import PriorFetcher, find_priors
    from client.series import SeriesData
    from client.session import Session

    s = Session(psrv.url)
    cur = SeriesData(s, None, psrv.p["current"]["series"])
    priors = find_priors(s, cur.info)
    heard = []
    made = {}

    def get(uid):
        made[uid] = made.get(uid) or SeriesData(s, None, uid)
        return made[uid]
    details = []
    f = PriorFetcher(get, budget_bytes=10 << 20, on_state=lambda st, state, d: (
        heard.append((st, state)), details.append((state, d))))
    states = f.run(priors[:1])
    prior = psrv.p["prior"]["study"]
    seq = [state for st, state in heard if st == prior]
    assert seq[0] == "waiting" and seq[-1] == "ready" and states[prior] == "ready"
    assert "recalling" not in seq and "archived" not in seq
    # the comparison version is V2 (about 1:20) by default, and the state says so; its
    # layers are the hot ones (keep_hot V2), so no recall
    sd = made[psrv.p["prior"]["series"]]
    assert sd.selection == {"purpose": "comparison"}
    assert details[-1][1]["version"] == "V2" and 15 < details[-1][1]["ratio"] < 30
    need, layers = f.estimate(sd)
    v2 = next(v for v in sd.versions if v["name"] == "V2")
    assert layers == v2["layers"] and all(sd.levels(i)[0] == layers for i in range(len(sd)))
    # asking for the lossless version needs the archive: "archived", then "recalling"
    heard.clear()
    f2 = PriorFetcher(get, budget_bytes=10 << 20, purpose="diagnosis",
                      on_state=lambda st, state, d: heard.append((st, state)))
    sd.select()
    f2.run(priors[:1])
    seq = [state for st, state in heard if st == prior]
    assert seq[:3] == ["waiting", "archived", "fetching"] and "recalling" in seq
    assert seq[-1] == "ready"
    assert all(sd.levels(i)[0] == sd.images[i]["nlayers"] for i in range(len(sd)))
    # a budget too small for a prior: skipped, nothing fetched
    heard.clear()
    f3 = PriorFetcher(lambda uid: SeriesData(s, None, uid), budget_bytes=100,
                      on_state=lambda st, state, d: heard.append((st, state, d)))
    assert f3.run(priors[1:])[psrv.p["other"]["study"]] == "skipped"
    assert heard[-1][2]["reason"] == "memory budget"


def test_prior_fetch_is_given_up_when_the_reader_turns_away(psrv):
    """Opening another series cancels the fetch ahead (the controller's token): the prior
    being fetched goes back to waiting, the ones after it are not fetched, nothing more
    arrives; the fetch of the next series' preview respects the same token and budget."""
    from client.pool import CancelToken
    from client.priors import PriorFetcher, find_priors
    from client.series import Cancelled, SeriesData
    from client.session import Session

    s = Session(psrv.url)
    priors = find_priors(s, SeriesData(s, None, psrv.p["current"]["series"]).info)
    assert len(priors) == 2
    token = CancelToken()
    heard = []

    def on_state(study, state, _detail):
        heard.append((study, state))
        if state == "fetching":
            token.cancel()                    # the reader opened another series
    made = {}
    f = PriorFetcher(lambda uid: made.setdefault(uid, SeriesData(s, None, uid)),
                     budget_bytes=10 << 20, on_state=on_state)
    states = f.run(priors, token)
    first, second = (p["StudyInstanceUID"] for p in priors)
    assert states == {first: "waiting", second: "waiting"}
    assert (second, "fetching") not in heard and (first, "ready") not in heard
    sd = made[priors[0]["compare"]["SeriesInstanceUID"]]
    v2 = next(v for v in sd.versions if v["name"] == "V2")
    assert not all(sd.levels(i)[0] >= v2["layers"] for i in range(len(sd)))
    with pytest.raises(Cancelled):
        f.preview(psrv.p["next"]["series"], token)
    # the next series' preview within the budget: fetched; beyond it: not
    assert PriorFetcher(lambda uid: SeriesData(s, None, uid), budget_bytes=1).preview(
        psrv.p["next"]["series"]) is False
    nxt = SeriesData(s, None, psrv.p["next"]["series"])
    assert PriorFetcher(lambda uid: nxt, budget_bytes=10 << 20).preview(nxt.uid) is True
    assert all(nxt.levels(i)[1] == 0 for i in range(len(nxt)))


def test_prior_in_the_archive_at_the_comparison_version_says_recalling(pstore, tmp_path, qtbot):
    """A store whose policy keeps only V3 hot: the comparison version (V2) of an archived
    prior must be recalled; the prior's line in the Reading dock says "recalling from
    archive" with the version, then "ready for comparison" with it."""
    from client.priors import PriorFetcher, find_priors
    from client.series import SeriesData
    from client.session import Session
    from viewer.priors_panel import PriorsPanel

    srv = _archived_server(pstore, tmp_path, '[storage]\nkeep_hot = "V3"\n')
    try:
        s = Session(srv.url)
        cur = SeriesData(s, None, pstore["current"]["series"])
        priors = find_priors(s, cur.info)
        panel = PriorsPanel()
        qtbot.addWidget(panel)
        panel.set_priors(priors)
        lines = []

        def on_state(study, state, detail):       # the controller queues this to the UI
            panel.set_state(study, state, detail)
            lines.append(panel.list.item(0).text())
        made = {}
        f = PriorFetcher(lambda uid: made.setdefault(uid, SeriesData(s, None, uid)),
                         budget_bytes=10 << 20, on_state=on_state)
        assert f.run(priors[:1])[pstore["prior"]["study"]] == "ready"
        said = [line.split(" — ", 1)[1] for line in lines]
        assert said[1] == "in the archive: being recalled"
        assert any(x.startswith("recalling from archive… (V2, about 1:") for x in said), said
        assert said[-1].startswith("ready for comparison (V2, about 1:")
        sd = made[pstore["prior"]["series"]]
        v2 = next(v for v in sd.versions if v["name"] == "V2")
        assert all(sd.levels(i)[0] == v2["layers"] for i in range(len(sd)))
    finally:
        srv.stop()


# ---------------------------------------------------------------- viewer (offscreen)
class Backend:
    """What the window's backend offers the controller: session, registry, pool."""

    def __init__(self, url):
        from client.pool import WorkerPool
        from client.session import Session
        from client.series_loader import SeriesRegistry
        from viewer.services import POOL_CAPS

        self.session = Session(url)
        self.registry = SeriesRegistry(self.session, None)
        self.pool = WorkerPool(4, POOL_CAPS)

    def close(self):
        self.pool.shutdown()
        self.session.logout()


def task_runner(pool):
    from viewer.workers import Task

    def run(fn, done, failed):
        t = Task(lambda _ctx: fn(), name="test", pool=pool)
        t.finished.connect(done)
        t.failed.connect(failed)
        t.start()
    return run


def test_priors_panel_lists_states_and_asks_to_compare(qtbot):
    from viewer.priors_panel import PriorsPanel

    panel = PriorsPanel()
    qtbot.addWidget(panel)
    assert not panel.compare_1x2.isEnabled() and panel.title.text() == "Prior studies: none"
    priors = [{"StudyInstanceUID": "1.1", "StudyDate": "20230110", "ModalitiesInStudy": ["CT"],
               "StudyDescription": "CT CHEST", "compare": {"SeriesInstanceUID": "1.1.1"}},
              {"StudyInstanceUID": "1.2", "StudyDate": "20220301", "ModalitiesInStudy": ["CT"],
               "compare": {"SeriesInstanceUID": "1.2.1"}}]
    panel.set_priors(priors)
    assert panel.list.item(0).text() == "2023-01-10 · CT · CT CHEST"
    panel.set_state("1.1", "recalling")
    assert panel.list.item(0).text().endswith("— recalling from archive…")
    panel.set_state("1.2", "skipped", {"reason": "memory budget"})
    assert "not loaded ahead (memory budget)" in panel.list.item(1).text()
    with qtbot.waitSignal(panel.compareRequested) as sig:
        panel.compare_1x2.click()
    assert [p["StudyInstanceUID"] for p in sig.args[0]] == ["1.1"] and sig.args[1] == "1x2"
    with qtbot.waitSignal(panel.compareRequested) as sig:
        panel.compare_2x2.click()
    assert [p["StudyInstanceUID"] for p in sig.args[0]] == ["1.1", "1.2"] and sig.args[1] == "2x2"


def test_controller_fetches_priors_after_preview_before_fill(qtbot, psrv):
    from client.series_loader import BACKGROUND, PREVIEW, SeriesLoader
    from viewer.priors_panel import PriorsController, PriorsPanel
    from viewer.workers import LoaderBridge
    from waits import WAIT_MS

    be = Backend(psrv.url)
    try:
        panel = PriorsPanel()
        qtbot.addWidget(panel)
        ctl = PriorsController(panel, lambda: be, runner=task_runner(be.pool))
        bridge = LoaderBridge()
        events = []
        bridge.stageChanged.connect(lambda _l, st, state, _m: events.append((st.kind, state)))
        bridge.stageChanged.connect(ctl.on_stage)
        ctl.stateChanged.connect(lambda s, st, _d: events.append(("prior:" + st, s)))
        bridge.opened.connect(lambda loader, *_: ctl.open_series(loader))
        loader = SeriesLoader(be.registry, psrv.p["current"]["series"], be.pool, bridge,
                              viewport=(128, 128), chunk=2, neighbours=1)
        loader.start()
        prior = psrv.p["prior"]["study"]
        qtbot.waitUntil(lambda: panel.state_of(prior) == "ready", timeout=WAIT_MS)
        qtbot.waitUntil(lambda: loader.state == "idle" and ("background", "complete") in events,
                        timeout=WAIT_MS)
        kinds = [e[0] for e in events]
        # the preview, then the priors at the comparison version, then the fill
        assert kinds.index(PREVIEW) < kinds.index("prior:fetching")
        assert kinds.index("prior:ready") < kinds.index(BACKGROUND)
        assert panel.list.count() == 2 and "ready for comparison" in panel.list.item(0).text()
        sd = be.registry.peek(psrv.p["prior"]["series"])
        assert sd.selection == {"purpose": "comparison"}
        # the next series of the hanging order got its preview, before the fill too
        assert ctl.next_uid == psrv.p["next"]["series"] and ctl.next_fetched
        nxt = be.registry.peek(ctl.next_uid)
        assert all(nxt.levels(i)[1] >= 0 for i in range(len(nxt)))
        # the comparison window: current left, the prior right
        view = ctl.compare(panel.priors[:1], "1x2")      # deletes itself when closed
        qtbot.waitUntil(lambda: all(p.info is not None for p in view.panes), timeout=WAIT_MS)
        assert [p.uid for p in view.panes] == [psrv.p["current"]["series"], psrv.p["prior"]["series"]]
        assert view.panes[1].title.text().startswith("Prior 1: 2023-01-10 · CT")
        view.close()
        ctl.close_series()
        loader.close()
    finally:
        be.close()


def _opened_view(qtbot, be, current, priors, layout="1x2", before_start=None):
    from viewer.compare import ComparisonView
    from waits import WAIT_MS

    view = ComparisonView(be.registry, be.pool, current, priors, layout)
    qtbot.addWidget(view)
    if before_start is not None:
        before_start(view)
    view.resize(900, 500)
    view.show()
    with qtbot.waitSignal(view.opened, timeout=WAIT_MS):
        view.start()
    for pane in view.panes:
        qtbot.waitUntil(lambda pane=pane: pane.view.decoded() is not None, timeout=WAIT_MS)
    return view


def test_comparison_scrolls_together_and_keeps_measurements_apart(qtbot, fresh_srv):
    from imaging.measure import MeasureKind, Measurement
    from viewer.policy_panel import measurement_annotation
    from waits import WAIT_MS

    be = Backend(fresh_srv.url)
    try:
        cur, prior = fresh_srv.p["current"]["series"], fresh_srv.p["prior"]["series"]
        recalls = []
        view = _opened_view(qtbot, be, cur, [prior], before_start=lambda v: v._recall.connect(
            lambda pane, on: recalls.append((pane.role, on, pane.title.text()))))
        a, b = view.panes
        # the prior's lossless layers are in the archive: its pane says so while recalling
        qtbot.waitUntil(lambda: ("Prior 1", False) in [r[:2] for r in recalls], timeout=WAIT_MS)
        mine = [r for r in recalls if r[0] == "Prior 1"]
        assert mine[0][1] is True and mine[0][2].endswith("— recalling from archive…")
        assert not b.recalling and "recalling" not in b.title.text()
        # different frames of reference: relative position along the stack, said on screen
        assert "relative position" in view.banner.text()
        a.view.request_slice(7)                      # the last of 8 -> the last of 6
        assert b.view.target_index() == 5
        qtbot.waitUntil(lambda: b.view.current_index() == 5, timeout=WAIT_MS)
        a.view.request_slice(3)
        assert b.view.target_index() == view.map_slice(0, 1, 3) == 2
        b.view.request_slice(0)                      # either pane leads
        assert a.view.target_index() == 0
        # scrolling on its own
        view.sync_scroll.setChecked(False)
        assert view.banner.text() == "Each pane scrolls on its own."
        a.view.request_slice(4)
        assert b.view.target_index() == 0
        # window together (optional)
        view.sync_window.setChecked(True)
        a.view.set_window(300.0, 1500.0)
        assert b.view.window() == (300.0, 1500.0)
        view.sync_zoom.setChecked(True)
        a.view.zoom_by(2.0)
        assert b.view.view_state().zoom == pytest.approx(a.view.view_state().zoom)
        # a measurement belongs to its own pane, series and study
        m = Measurement(MeasureKind.DISTANCE, (1, 1), (20, 20), b.view.current_index())
        b.view.add_measurement(m)
        assert b.view.measurements() and not a.view.measurements()
        ann = measurement_annotation(m, b.view.meta(), b.uid)
        assert ann["series"] == prior and b.study == fresh_srv.p["prior"]["study"] != a.study
        view.close()
        # the same frame of reference (the series against itself): by patient position
        same = _opened_view(qtbot, be, cur, [cur])
        assert "patient position" in same.banner.text()
        same.panes[0].view.request_slice(5)
        assert same.panes[1].view.target_index() == 5
        same.close()
        # 2x2: the current top left, then the priors
        grid = _opened_view(qtbot, be, cur, [prior, fresh_srv.p["other"]["series"]], "2x2")
        assert len(grid.panes) == 3 and [p.role for p in grid.panes] == ["Current", "Prior 1", "Prior 2"]
        grid.close()
    finally:
        be.close()


def test_main_window_reading_dock_lists_priors_and_compares(qtbot, tmp_path, psrv):
    from PySide6.QtCore import QSettings

    from viewer.mainwindow import AppConfig, MainWindow
    from waits import WAIT_MS

    settings = QSettings(str(tmp_path / "medview.ini"), QSettings.Format.IniFormat)
    win = MainWindow(AppConfig(cache_path=None), settings)
    win.resize(1100, 800)
    win.show()
    qtbot.waitExposed(win)
    try:
        with qtbot.waitSignal(win.connected, timeout=WAIT_MS):
            win.connect_to(psrv.url)
        win.open_series(psrv.p["current"]["series"])
        panel = win.priors_panel
        qtbot.waitUntil(lambda: panel.list.count() == 2, timeout=WAIT_MS)
        qtbot.waitUntil(lambda: panel.state_of(psrv.p["prior"]["study"]) == "ready", timeout=WAIT_MS)
        with qtbot.waitSignal(win.priors.comparisonOpened, timeout=WAIT_MS) as sig:
            panel.compare_1x2.click()
        view = sig.args[0]
        qtbot.waitUntil(lambda: all(p.view.decoded() is not None for p in view.panes),
                        timeout=WAIT_MS)
        assert [p.uid for p in view.panes] == [psrv.p["current"]["series"], psrv.p["prior"]["series"]]
        view.close()
    finally:
        win.close()
