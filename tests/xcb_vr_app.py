"""Run by test_viewer_vr.py in a subprocess under Xvfb with the real xcb platform: the
main window opens a series, 3D → Open in MPR shows the 3D layout, and the VR pane's
pixels are read back from the X server (what the user sees). Prints one JSON line.

    python tests/xcb_vr_app.py STORE_DIR SERIES_UID OUT_DIR
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from PySide6.QtCore import QPoint, QSettings, Qt
from PySide6.QtGui import QImage
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication

LIMIT_S = 240.0          # generous: only reached when something is broken


def wait(app, cond, what: str) -> None:
    end = time.monotonic() + LIMIT_S
    while not cond():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        app.processEvents()
        QTest.qWait(20)


def screen_pixels(widget) -> np.ndarray:
    """The widget's area as the X server shows it (native GL windows included)."""
    top_left = widget.mapToGlobal(QPoint(0, 0))
    img = widget.screen().grabWindow(0, top_left.x(), top_left.y(), widget.width(),
                                     widget.height()).toImage()
    img = img.convertToFormat(QImage.Format.Format_RGB888)
    a = np.frombuffer(img.constBits(), np.uint8, img.bytesPerLine() * img.height())
    return a.reshape(img.height(), img.bytesPerLine())[:, : img.width() * 3].reshape(
        img.height(), img.width(), 3).copy()


def main() -> int:
    store, uid, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    app = QApplication(sys.argv[:1])
    from server.embedded import EmbeddedServer
    from viewer.mainwindow import AppConfig, MainWindow

    result: dict = {"platform": app.platformName()}
    srv = EmbeddedServer(str(store)).start()
    settings = QSettings(str(out / "medview.ini"), QSettings.Format.IniFormat)
    win = MainWindow(AppConfig(cache_path=None), settings)
    try:
        win.resize(1000, 760)
        win.show()
        QTest.qWaitForWindowExposed(win)
        win.connect_to(srv.url)
        wait(app, lambda: win.backend.session is not None, "the connection")
        win.open_series(uid)
        wait(app, lambda: win.loader is not None and win.loader.state == "idle", "the series")
        mpr = win.open_mpr()
        mpr.resize(900, 700)
        QTest.qWaitForWindowExposed(mpr)
        wait(app, lambda: bool(mpr.load_events) and mpr.load_events[-1].final, "the volume")
        vr = mpr.mpr.vr
        result.update(backend=vr.backend, fallback=vr.fallback_reason, message=vr.message)

        def shown() -> bool:
            px = screen_pixels(vr)
            result["vr_max"] = int(px.max())
            result["vr_lit"] = float((px.max(axis=2) > 40).mean())
            return result["vr_lit"] > 0.01
        wait(app, lambda: vr.render_count > 0 and shown(), "a picture in the VR pane")
        mpr.screen().grabWindow(0).save(str(out / "xcb-3d-layout.png"))

        # double-click maximises the VR pane over the whole grid
        target = vr._native if vr._native is not None else vr._canvas
        QTest.mouseDClick(target, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                          QPoint(target.width() // 2, target.height() // 2))
        wait(app, lambda: mpr.mpr.layout_name() == "vr", "the maximised layout")
        lay = mpr.mpr
        area = lambda: (lay.width(), lay.height() - lay.grid.geometry().top())  # noqa: E731
        result["visible"] = [n for n, w in lay.panes.items() if w.isVisible()]
        wait(app, lambda: vr.width() >= area()[0] - 4 and vr.height() >= area()[1] - 4,
             "the VR pane to fill the grid")
        wait(app, shown, "a picture in the maximised VR pane")
        result.update(max_size=[vr.width(), vr.height()], grid=list(area()))
        mpr.screen().grabWindow(0).save(str(out / "xcb-vr-maximised.png"))
        mpr.close()
    finally:
        win.close()
        srv.stop()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
