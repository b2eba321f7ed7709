"""Quality that follows the measured link (V8): the client measures throughput over active
transfer time and latency from its own transfers, reports them with its free memory and
processors, and ``version=auto`` follows; the Reading dock says what was chosen and why."""
from __future__ import annotations


import pytest

from client.link import ContextReporter, LinkMeter, free_memory_mb, machine_facts
from client.policy import PolicyClient
from client.policy_text import explain_choice
from client.series import SeriesData
from client.session import Session
from netsim import slow_packet_streams
from policyutil import clear_tables, copy_store, series_uid, study_uid
from server.embedded import EmbeddedServer
from waits import WAIT_MS, wait_for


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_meter_counts_active_time_only():
    clock = Clock()
    m = LinkMeter(min_bytes=1000, clock=clock)

    def body(pieces, wait):             # a response body whose pieces take `wait` s each
        for p in pieces:
            clock.t += wait
            yield p
    assert m.throughput_bps is None
    for _ in m.timed(body([b"x" * 1000] * 4, 0.001)):
        pass
    assert m.throughput_bps == pytest.approx(1000 * 8 / 0.001)
    clock.t += 60.0                      # a minute without transfers: not link time
    for _ in m.timed(body([b"x" * 1000] * 4, 0.001)):
        clock.t += 0.5                   # the client's own work between reads: not either
    assert m.throughput_bps == pytest.approx(1000 * 8 / 0.001)
    assert m.total_bytes == 8000 and m.total_active_s == pytest.approx(0.008)


def test_meter_counts_overlapping_streams_once():
    clock = Clock()
    m = LinkMeter(min_bytes=1, clock=clock)
    # two streams wait at the same time: the union of their waits is the active time
    def body_b():
        yield b"b" * 500                  # arrives while stream a is waiting

    ib = m.timed(body_b())

    def body_a():
        clock.t += 0.005
        next(ib)                          # b's whole read happens inside a's wait
        clock.t += 0.005
        yield b"a" * 500

    ia = m.timed(body_a())
    assert next(ia) == b"a" * 500
    assert m.throughput_bps == pytest.approx(1000 * 8 / 0.01)
    assert m.total_active_s == pytest.approx(0.01) and m.total_bytes == 1000
    assert list(ia) == [] and list(ib) == []


def test_meter_window_and_latency():
    clock = Clock()
    m = LinkMeter(window_bytes=10_000, min_bytes=1, clock=clock)
    m.add(1.0, 10_000)                    # an old slow transfer...
    m.add(0.01, 10_000)                   # ...falls out of the window
    assert m.throughput_bps == pytest.approx(10_000 * 8 / 0.01)
    for s in (0.030, 0.012, 0.050):
        m.record_latency(s)
    assert m.latency_ms == pytest.approx(12.0)
    assert set(m.snapshot()) == {"link_bps", "latency_ms"}


def test_machine_facts():
    facts = machine_facts()
    assert facts["cpus"] >= 1 and 0 < facts["memory_mb"] == pytest.approx(free_memory_mb(), rel=0.5)


class FakePolicy:
    """Records the contexts sent (the reporter's rules, without a server)."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def set_context(self, **kw):
        self.sent.append(kw)
        return {k: v for k, v in kw.items() if v is not None}


def test_reporter_reports_at_start_and_on_material_change():
    clock = Clock()
    m = LinkMeter(min_bytes=1, clock=clock)
    mem = {"memory_mb": 8000.0, "cpus": 4}
    pol = FakePolicy()
    heard = []
    r = ContextReporter(pol, m, machine=lambda: dict(mem), run=lambda fn: fn(),
                        on_report=heard.append)
    assert r.maybe_report() and pol.sent[-1]["link_bps"] is None and pol.sent[-1]["cpus"] == 4
    assert not r.maybe_report()                    # nothing changed
    m.add(1.0, 1_000_000)                          # 8 Mbit/s measured: first known -> sent
    assert len(pol.sent) == 2 and pol.sent[-1]["link_bps"] == pytest.approx(8e6)
    m.add(1.0, 1_100_000)                          # +5 %: not material
    assert len(pol.sent) == 2
    mem["memory_mb"] = 7000.0                      # -12 %: not material
    assert not r.maybe_report()
    mem["memory_mb"] = 4000.0                      # half: material
    assert r.maybe_report() and pol.sent[-1]["memory_mb"] == 4000.0
    m.add(0.01, 8_000_000)                         # much faster: material
    assert len(pol.sent) == 4 and pol.sent[-1]["link_bps"] > 5e7
    assert heard == [{k: v for k, v in s.items() if v is not None} for s in pol.sent]
    r.close()
    m.add(10.0, 8_000_000)
    assert len(pol.sent) == 4                      # closed: no longer listening


def test_choice_in_one_sentence():
    versions = [{"name": "V1", "purpose": "diagnosis", "lossless": True},
                {"name": "V3", "purpose": "reference", "target_ratio": 50, "actual_ratio": 49.4}]
    auto = {"version": "V3", "why": "A slow link (under 5 Mbit/s) gets the smallest version",
            "facts": "link 2.9 Mbit/s"}
    text = explain_choice(None, {"version": "auto"}, auto, versions)
    assert text == ("Automatic choice V3 – reference, about 1:50, because a slow link (under "
                    "5 Mbit/s) gets the smallest version (link 2.9 Mbit/s).")
    assert explain_choice({"name": "V1", "lossless": True}, {"version": "V1"}) == \
        "Loading V1 – , original quality (lossless), as you chose."
    assert "no rule applies" in explain_choice(None, {"version": "auto"},
                                              {"version": "V1", "why": ""}, versions)
    # no version chosen, a slow link: the adaptive plan in words
    assert explain_choice(None, {}, auto, versions) == (
        "Best allowed: measured link 2.9 Mbit/s, so the images come as V3 – reference, "
        "about 1:50 first and in full quality once you pause.")
    assert explain_choice(None, {}, {"version": "V1"}, versions) == \
        "Loading the original quality: no version was chosen."


# ---------------------------------------------------------------- against a server
@pytest.fixture(scope="module")
def lsrv(ct_store, tmp_path_factory):
    store = copy_store(ct_store, tmp_path_factory.mktemp("link") / "store")
    clear_tables(store, ("diag_revision", "diag_item", "study_status_history", "study_status"))
    srv = EmbeddedServer(str(store)).start()
    srv.study, srv.series = study_uid(store), series_uid(store)
    # a read study: the automatic choice follows the link (an unread one is always V1)
    PolicyClient(Session(srv.url)).set_status(srv.study, 2)
    yield srv
    srv.stop()


MACHINE = {"memory_mb": 8192.0, "cpus": 4}     # fixed, so that only the link decides


def _measure_and_report(url: str, series: str) -> tuple[Session, ContextReporter, dict]:
    s = Session(url)
    r = ContextReporter(PolicyClient(s), s.link, machine=lambda: dict(MACHINE),
                        run=lambda fn: fn())
    sd = SeriesData(s, None, series)
    end = sd.transfer().run()                 # everything: the meter measures it
    assert end["reason"] == "complete" or end.get("bytes_sent", 0) > 0
    assert s.link.throughput_bps is not None and s.link.latency_ms is not None
    wait_for(lambda: r.sent and r.sent.get("link_bps"), what="the context report")
    return s, r, sd


def test_auto_picks_a_lower_version_on_a_slow_link(lsrv, monkeypatch):
    slow_packet_streams(monkeypatch, piece=4096, delay=0.012)     # about 2.7 Mbit/s at best
    s, r, sd = _measure_and_report(lsrv.url, lsrv.series)
    assert s.link.throughput_bps < 5e6
    ctx = PolicyClient(s).me()["context"]
    assert ctx["link_bps"] == pytest.approx(s.link.throughput_bps, rel=0.6)
    assert ctx["latency_ms"] >= 0 and ctx["cpus"] == 4
    auto = PolicyClient(s).versions(lsrv.series)["auto"]
    assert auto["version"] == "V3" and "slow link" in auto["why"]
    # a transfer asking for version=auto gets V3 and says why
    sd.select(version="auto")
    heard = []
    sd.listeners.append(lambda kind, msg: heard.append((kind, msg)))
    sd.transfer(comps=[0]).run()
    (v,) = [m for k, m in heard if k == "version"]
    assert v["name"] == "V3" and "slow link" in v["why"] and sd.auto["version"] == "V3"


def test_auto_picks_the_full_version_on_a_fast_link(lsrv):
    s, r, _sd = _measure_and_report(lsrv.url, lsrv.series)
    assert s.link.throughput_bps >= 50e6        # loopback, not throttled
    auto = PolicyClient(s).versions(lsrv.series)["auto"]
    assert auto["version"] == "V1"


def test_reading_dock_says_what_was_chosen_and_why(qtbot, lsrv, monkeypatch):
    from viewer.policy_panel import DiagnosisPanel, PolicyController, VersionSelector

    slow_packet_streams(monkeypatch, piece=4096, delay=0.012)
    panel, sel = DiagnosisPanel(), VersionSelector()
    qtbot.addWidget(panel)
    qtbot.addWidget(sel)
    ctl = PolicyController(panel, sel)
    s = Session(lsrv.url)
    with qtbot.waitSignal(ctl.contextChanged, timeout=WAIT_MS) as sig:
        ctl.set_client(PolicyClient(s))             # reported at session start
    assert sig.args[0]["cpus"] >= 1 and "memory_mb" in sig.args[0]
    ctl.reporter.machine = lambda: dict(MACHINE)
    sd = SeriesData(s, None, lsrv.series)
    ctl.open_series(sd)
    sel.combo.setCurrentIndex(sel.combo.findData({"version": "auto"}))
    assert sd.selection == {"version": "auto"}
    # the loader's transfers measure the link; the report changes the automatic choice
    with qtbot.waitSignal(ctl.contextChanged, timeout=WAIT_MS,
                          check_params_cb=lambda c: c.get("link_bps") is not None):
        sd.transfer(comps=[0, 1, 2]).run()
    qtbot.waitUntil(lambda: "V3" in sel.why.text(), timeout=WAIT_MS)
    assert sel.why.text().startswith("Automatic choice V3") and "slow link" in sel.why.text()
    assert "Mbit/s" in sel.why.toolTip()
    with qtbot.waitSignal(ctl._event, timeout=WAIT_MS,
                          check_params_cb=lambda k, _m: k == "version"):
        sd.transfer(comps=[3]).run()
    assert sel.why.text().startswith("Automatic choice V3")
    ctl.set_client(None)
