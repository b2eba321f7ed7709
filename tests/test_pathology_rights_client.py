"""The slide client within the user's rights (SPEC P7): :class:`client.slides.
RemoteSlide` never asks beyond them (checked on the wire — every request recorded — and
in the server's audit: no 403 in normal use), learns rights that change mid-session and
asks again within them; the slide pane says what is limited in plain words and keeps
working; label and macro say "not permitted"; ``medview render --slide --server`` beyond
the rights exits 1 with the reason."""
# ruff: noqa: F811 - the env fixture of test_rights_slides is shared by import
from __future__ import annotations


import numpy as np
import pytest
from test_rights_slides import PASSWORD, env, stored, user_with  # noqa: F401 - fixture

from client.rights import RightsLimited
from client.session import Session
from client.slides import NOT_PERMITTED, LocalSlide, NotPermitted, RemoteSlide
from server.rights import Rule
from waits import WAIT_MS, wait_for

TIMEOUT = WAIT_MS


class Wire:
    """Every request a session makes: (method, path, params)."""

    def __init__(self, session: Session) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        real = session.request

        def request(method, path, **kw):
            self.calls.append((method, path, dict(kw.get("params") or {})))
            return real(method, path, **kw)

        session.request = request

    def packets(self) -> list[dict]:
        return [p for _m, path, p in self.calls if path.startswith("/jpip/slides/")]


def session_of(env, *rules: Rule, **rule) -> tuple[str, Session, Wire]:
    name, _sid = user_with(env, *rules, **rule)
    s = Session(env["url"], name, PASSWORD)
    return name, s, Wire(s)


def pane_of(qtbot, env, size: tuple[int, int] | None = None, **rule):
    """(slide pane of slide ``a`` for a new user with ``rule``, its RemoteSlide, the
    wire, the user name)."""
    from viewer.slideview import open_slide_window

    name, s, wire = session_of(env, **rule)
    rs = RemoteSlide(s, env["a"]["slide_uid"])
    pane = open_slide_window(rs)
    qtbot.addWidget(pane)
    if size:
        pane.resize(*size)
    pane.show()
    return pane, rs, wire, name


def audit(env, name: str) -> list[dict]:
    """The user's packet requests as the server audited them (streams are audited when
    they end: wait for them)."""
    auth = env["srv"].app.state.server.auth
    rows: list[dict] = []

    def settled():
        rows[:] = auth.audit_rows(user=name, action="fetch")
        return all(r["outcome"] != "pending" for r in rows)

    wait_for(settled, what="the audit rows of the streams")
    return rows


def reference(env, slide, level, x, y, w, h, layers=0):
    return LocalSlide(stored(env, slide)).read_level(level, x, y, w, h, layers=layers)


# --------------------------------------------------------------------------- provider
def test_limited_user_asks_nothing_beyond(env):
    a = env["a"]
    name, s, wire = session_of(env, max_layers=2, max_reduce_min=1)
    rs = RemoteSlide(s, a["slide_uid"])
    assert rs.max_layers == 2 and rs.stored_layers == 4 and rs.finest_level == 1
    assert rs.limited and rs.unlimited is False
    # the coarser levels, "all layers" meaning all the rights allow: exactly the stored
    # picture at 2 layers
    got = rs.read_level(1, 0, 0, 320, 256)
    assert np.array_equal(got, reference(env, a, 1, 0, 0, 320, 256, layers=2))
    assert rs.read_level(2, 0, 0, 160, 128).shape == (128, 160, 3)
    rs.fetch(1, [0, 1], 4)                              # asked for 4: kept to 2
    # level 0 is finer than allowed: refused before anything is asked
    n = len(wire.calls)
    with pytest.raises(RightsLimited) as e:
        rs.read_level(0, 0, 0, 64, 64)
    assert "level 0 is finer" in e.value.message and len(wire.calls) == n
    assert rs.beyond(0) and rs.beyond(1, layers=3) and rs.beyond(1) is None
    # on the wire: never a level below 1, never more than 2 layers
    sent = wire.packets()
    assert sent and all(p["level"] >= 1 and p["layers"] <= 2 for p in sent)
    # and the server saw no request beyond the rights
    rows = audit(env, name)
    assert rows and {r["outcome"] for r in rows} == {"ok"}
    assert all(r["detail"]["level"] >= 1 for r in rows)
    assert not rs.refused
    s.logout()


def test_region_rights_only_allowed_parts_are_asked(env):
    a = env["a"]
    allowed = (0, 0, 300, 200)
    name, s, wire = session_of(env, regions=[allowed])
    rs = RemoteSlide(s, a["slide_uid"])
    assert rs.allowed_regions(0) == [allowed] and rs.allowed_regions(1) == [(0, 0, 150, 100)]
    px = rs.read_level(0, 0, 0, 640, 512)
    # inside: the scanned pixels (lossless); outside: grey, never sent
    assert np.array_equal(px[:200, :300], reference(env, a, 0, 0, 0, 300, 200))
    assert (px[200:] == NOT_PERMITTED).all() and (px[:, 300:] == NOT_PERMITTED).all()
    sent = wire.packets()
    assert sent and all("roff" in p for p in sent)
    for p in sent:                                      # every request inside the region
        x, y = map(int, p["roff"].split(","))
        w, h = map(int, p["rsiz"].split(","))
        assert x >= 0 and y >= 0 and x + w <= 300 and y + h <= 200, p
        assert set(map(int, p["comps"].split(","))) <= {0, 1}     # tiles 2-5 never asked
    # a coarser level: the region scaled
    lv1 = rs.read_level(1, 0, 0, 320, 256)
    assert np.array_equal(lv1[:100, :150], reference(env, a, 1, 0, 0, 150, 100))
    assert rs.beyond(0) and rs.beyond(0, (250, 150, 100, 100)) and not rs.beyond(0, (10, 10, 50, 50))
    assert {r["outcome"] for r in audit(env, name)} == {"ok"}
    # whole images need unlimited rights: "not permitted", without asking
    n = len(wire.calls)
    assert not rs.associated_permitted("label")
    with pytest.raises(NotPermitted) as e:
        rs.associated("label")
    assert "not permitted" in str(e.value) and len(wire.calls) == n
    s.logout()


def test_rights_changed_mid_session_are_learnt_and_kept(env):
    a = env["a"]
    auth = env["srv"].app.state.server.auth
    name, s, wire = session_of(env)                     # no limit yet
    rs = RemoteSlide(s, a["slide_uid"])
    heard = []
    rs.listeners.append(lambda kind, body: heard.append((kind, body)))
    assert rs.limited is None and rs.max_layers == 4
    rs.read_level(2, 0, 0, 160, 128, layers=1)
    # the administrator limits the user while the slide is open
    auth.set_rule(Rule(name, "*", max_layers=2))
    rs.fetch(1, [0, 1], 0)                               # all layers: refused, learnt, asked again
    assert [k for k, _b in heard] == ["limited"] and heard[0][1]["max_layers"] == 2
    assert rs.max_layers == 2 and rs.limited["max_layers"] == 2
    assert [p["layers"] for p in wire.packets()[-2:]] == [4, 2]
    assert rs.held_layers(1, 0) == 2
    # from now on within them: no further refusal
    rs.read_level(2, 0, 0, 160, 128)
    denied = [r for r in audit(env, name) if r["outcome"] == "denied"]
    assert len(denied) == 1
    # now the resolution too: the level asked may not be had any more
    auth.set_rule(Rule(name, "*", max_layers=2, max_reduce_min=1))
    with pytest.raises(RightsLimited):
        rs.read_level(0, 0, 0, 300, 300)
    assert rs.finest_level == 1 and len(heard) == 2
    n = len(wire.calls)
    with pytest.raises(RightsLimited):                  # known now: not even asked
        rs.fetch(0, [0], 1)
    assert len(wire.calls) == n
    assert len([r for r in audit(env, name) if r["outcome"] == "denied"]) == 2
    s.logout()


# --------------------------------------------------------------------------- viewer
def test_pane_explains_limits_and_keeps_working(qtbot, env):
    pane, rs, wire, name = pane_of(qtbot, env, (800, 600), max_layers=2, max_reduce_min=1)
    s = rs.session
    v = pane.view
    text = pane.rights_banner.text()
    assert pane.rights_banner.isVisible()
    assert "up to level 1 (1 µm/px)" in text and "2 of 4 quality layers" in text
    assert "Label and macro images are not permitted" in text
    for n in ("label", "macro"):                        # not offered, said in words
        b = pane.assoc_buttons[n]
        assert "not permitted" in b.text() and not b.isEnabled()
        assert pane.assoc_state[n] == "not permitted"
    assert v.mode == "high"                             # not super-resolved unless asked
    # zoomed in past what is allowed: level 1 enlarged, labelled
    v.zoom_to(2.0, (400, 300), animate=False)
    assert v.level() == 1 and v.enlarged() == pytest.approx(4.0)
    vis = v.vp.visible_tiles(1)
    qtbot.waitUntil(lambda: all((c := v.cache.get((1, t))) is not None and c.complete
                                for t in vis), timeout=TIMEOUT)
    t = vis[0]
    tx, ty, tw, th = rs.levels[1].tile_rect(t)
    assert np.array_equal(v.cache.get((1, t)).pixels,
                          reference(env, env["a"], 1, tx, ty, tw, th, 2))
    v.grab()                                            # paints, banner included
    # panning keeps working within the rights
    v.vp.pan_screen(-200, 0)
    v.refresh()
    vis = v.vp.visible_tiles(1)
    qtbot.waitUntil(lambda: all((1, t) in v.cache for t in vis), timeout=TIMEOUT)
    sent = wire.packets()
    assert sent and all(p["level"] >= 1 and p["layers"] <= 2 for p in sent)
    assert {r["outcome"] for r in audit(env, name)} == {"ok"}
    pane.close()
    s.logout()


def test_pane_label_refused_and_rights_learnt(qtbot, env):
    """A user without ``retrieve``: the label's 403 becomes "not permitted"; rights that
    shrank after the client read them are learnt from the first refused request and
    change the banner and the status news."""
    from viewer.slideview import open_slide_window

    a = env["a"]
    auth = env["srv"].app.state.server.auth
    name, s, _wire = session_of(env, actions={"browse", "metadata", "fetch"})
    pane = open_slide_window(RemoteSlide(s, a["slide_uid"]))
    qtbot.addWidget(pane)
    pane.show()
    assert not pane.rights_banner.isVisible() and pane.assoc_buttons["label"].isEnabled()
    with qtbot.waitSignal(pane.notice, timeout=TIMEOUT) as sig:
        pane.assoc_buttons["label"].click()             # fetched on a worker: 403
    assert "not permitted" in sig.args[0]
    assert "not permitted" in pane.assoc_buttons["label"].text()
    assert not pane.assoc_buttons["label"].isEnabled()
    pane.close()
    s.logout()
    # The small test slide is whole on screen at its finest level, so a pane may hold
    # every layer of every tile before a test could change the rights, and then no
    # request would meet the change. So the rights shrink after a new client (a new
    # session: the server's model of the old one holds what the first pane received)
    # read them, and before its pane asks for any tile.
    s = Session(env["url"], name, PASSWORD)
    rs = RemoteSlide(s, a["slide_uid"])
    assert rs.unlimited and rs.max_layers == rs.stored_layers
    auth.set_rule(Rule(name, "*", actions={"browse", "metadata", "fetch"}, max_layers=1))
    pane = open_slide_window(rs)        # its first requests start on the worker pool;
    qtbot.addWidget(pane)               # what they learn reaches the UI thread as events
    with qtbot.waitSignal(pane.notice, timeout=TIMEOUT) as sig:
        pane.show()                     # layer 1 is allowed, all layers are refused
    assert "quality" in sig.args[0] and "within these limits" in sig.args[0]
    assert "1 of 4 quality layer" in pane.rights_banner.text()
    assert pane.rights_banner.isVisible()
    v = pane.view
    vis = v.vp.visible_tiles(v.level())
    qtbot.waitUntil(lambda: all((c := v.cache.get((v.level(), t))) is not None and c.complete
                                for t in vis), timeout=TIMEOUT)
    assert all(v.cache.get((v.level(), t)).layers == 1 for t in vis)
    pane.close()
    s.logout()


def test_main_window_status_bar_says_the_limits(qtbot, env, tmp_path):
    from PySide6.QtCore import QSettings

    from viewer.mainwindow import AppConfig, MainWindow

    a = env["a"]
    name, _sid = user_with(env, max_layers=2, max_reduce_min=1)
    settings = QSettings(str(tmp_path / "medview.ini"), QSettings.Format.IniFormat)
    w = MainWindow(AppConfig(cache_path=None), settings)
    qtbot.addWidget(w)
    try:
        with qtbot.waitSignal(w.connected, timeout=TIMEOUT):
            w.connect_to(env["url"], name, PASSWORD)
        with qtbot.waitSignal(w.slideOpened, timeout=TIMEOUT) as sig:
            w.open_slide(a["slide_uid"])
        pane = sig.args[0]
        qtbot.addWidget(pane)
        assert "Your rights allow this slide up to level 1" in w.statusBar().currentMessage()
        pane.close()
    finally:
        w.close()


# --------------------------------------------------------------------------- render
def test_render_beyond_rights_exits_1_with_the_reason(env, tmp_path, capsys):
    from PIL import Image

    from viewer.cli import main as medview

    a = env["a"]
    name, _sid = user_with(env, max_layers=2, max_reduce_min=1)
    out = tmp_path / "r.png"
    base = ["render", "--slide", a["slide_uid"], "--server", env["url"], "--user", name,
            "--password", PASSWORD, "--out", str(out)]
    assert medview(base + ["--level", "0"]) == 1
    err = capsys.readouterr().err
    assert "beyond your rights: level 0 is finer" in err and "Traceback" not in err
    assert "Your rights allow this slide up to level 1 (1 µm/px)" in err
    assert medview(base + ["--level", "1", "--layers", "3"]) == 1
    assert "3 quality layers asked, your rights allow 2 of 4" in capsys.readouterr().err
    assert not out.exists()
    # within the rights: rendered, and told that the layers were limited
    assert medview(base + ["--level", "1", "--region", "10,10,100,80"]) == 0
    assert "2 of 4 quality layers" in capsys.readouterr().err
    im = Image.open(out)
    assert np.array_equal(np.asarray(im.convert("RGB")),
                          reference(env, a, 1, 10, 10, 100, 80, layers=2))
    assert im.text["MedView-Layers"].startswith("2 of 4")
    # a region right: the whole level or a region outside it is beyond, inside works
    name, _sid = user_with(env, regions=[(0, 0, 300, 200)])
    base[6] = name
    assert medview(base + ["--level", "0"]) == 1
    err = capsys.readouterr().err
    assert "only part of this slide" in err and "--region" in err
    assert medview(base + ["--level", "0", "--region", "250,150,100,100"]) == 1
    assert "not inside the part of the slide your rights allow" in capsys.readouterr().err
    assert medview(base + ["--level", "1", "--region", "0,0,150,100"]) == 0


def test_super_resolution_only_when_asked_and_from_the_allowed_level(qtbot, env):
    pane, rs, wire, name = pane_of(qtbot, env, (360, 300), max_reduce_min=1)
    s = rs.session
    v = pane.view
    v.zoom_to(1.0, (180, 150), animate=False)
    assert v.mode == "high" and v.sr_active() is None and v.enlarged() == pytest.approx(2.0)
    v.apply_mode("low")                                 # the user asks for SR
    assert v.sr_active() == 2 and v.enlarged() is None
    vis = v.sr_tiles_visible()
    assert v.sr.width == rs.levels[1].width              # generated from level 1
    qtbot.waitUntil(lambda: any(("sr",) + k in v.cache for k in vis), timeout=WAIT_MS)
    assert all(c.generated for k in vis if (c := v.cache.get(("sr",) + k)) is not None)
    assert all(p["level"] >= 1 for p in wire.packets())
    assert {r["outcome"] for r in audit(env, name)} == {"ok"}
    pane.close()
    s.logout()
