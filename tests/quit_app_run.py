"""Run by test_viewer_quit.py as a subprocess: the real ``medview`` app (viewer.cli.main,
the bundled server on STORE) opens a series and an MPR window, and while the MPR volume
is loading File → Quit is triggered. The process's exit code is the app's.

    python tests/quit_app_run.py STORE SERIES_UID SLIDE_UID

A slide window (parentless, like in the app) is opened too: it alone kept the process
alive after the main window closed.
"""
from __future__ import annotations

import sys
import time

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication


def main() -> int:
    store, uid, slide_uid = sys.argv[1], sys.argv[2], sys.argv[3]
    app = QApplication(sys.argv[:1])
    from viewer.cli import main as medview
    from viewer.mainwindow import MainWindow

    state = {"stage": "connect"}

    def drive() -> None:
        wins = [w for w in app.topLevelWidgets() if isinstance(w, MainWindow)]
        if not wins:
            return
        win = wins[0]
        st = state["stage"]
        if st == "connect" and win.backend.session is not None:
            win.open_series(uid)
            state["stage"] = "series"
        elif st == "series" and win.loader is not None and win.series_uid == uid:
            # a window, or the task describing the series first (the window opens when it ends)
            win.open_mpr()
            state["stage"] = "mpr"
        elif st == "mpr" and any(w.isVisible() for w in win.threed.windows):
            win.open_slide(slide_uid)
            state["stage"] = "slide"
        elif st == "slide" and any(w.isVisible() for w in win.slides.windows):
            print(f"quit at {time.monotonic():.3f} with windows: "
                  f"{sorted(type(w).__name__ for w in app.topLevelWidgets() if w.isVisible())}",
                  flush=True)
            state["stage"] = "quit"
            win.act_quit.trigger()

    timer = QTimer()
    timer.timeout.connect(drive)
    timer.start(50)
    code = medview(["--store", store])
    print(f"event loop left at {time.monotonic():.3f} (stage {state['stage']}), code {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
