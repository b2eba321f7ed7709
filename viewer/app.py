"""``medview`` (no sub-command): the desktop application.

Without ``--server`` it starts the bundled image server on a free loopback port with the
default store (``--store`` to choose another; the sample study is created on first run,
off the UI thread) and logs in as the local user. With ``--server URL`` it shows a login
dialog. Closing the window stops what the app started.
"""
from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["run_gui", "config_from_args", "tune_runtime"]

SWITCH_INTERVAL_S = 0.0002


def tune_runtime() -> None:
    """Process settings for a responsive UI next to busy worker threads.

    The worker threads parse packet streams in Python and hold the GIL while they do;
    CPython hands the GIL over to a waiting thread only every ``switchinterval`` (5 ms by
    default, so a UI event could wait 5 ms per busy worker). 1 ms keeps the event loop's
    latency low at a small cost in throughput.
    """
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def config_from_args(args):
    """The window's :class:`~viewer.mainwindow.AppConfig` from ``medview`` arguments."""
    from client.appdirs import default_cache_path, default_data_dir
    from .mainwindow import AppConfig

    return AppConfig(
        server_url=getattr(args, "server", None),
        user=getattr(args, "user", None) or "local",
        password=getattr(args, "password", None),
        store_dir=Path(args.store) if getattr(args, "store", None) else default_data_dir() / "store",
        cache_path=None if getattr(args, "no_cache", False) else (
            Path(args.cache) if getattr(args, "cache", None) else default_cache_path()),
        station=getattr(args, "station", None),
        station_cache=Path(args.station_cache) if getattr(args, "station_cache", None) else None,
    )


def run_gui(args) -> int:
    """Open the main window and run the event loop; returns the exit code."""
    from PySide6.QtCore import QCoreApplication, QTimer
    from PySide6.QtWidgets import QApplication

    from .dialogs import APPLICATION, ORGANISATION, app_version
    from .mainwindow import MainWindow

    QCoreApplication.setOrganizationName(ORGANISATION)
    QCoreApplication.setApplicationName(APPLICATION)
    QCoreApplication.setApplicationVersion(app_version())
    tune_runtime()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    window = MainWindow(config_from_args(args))
    window.show()
    QTimer.singleShot(0, window.start)      # connect once the window is on screen
    code = app.exec()
    # the window closed at once; its shutdown thread logs out, stops the bundled server
    # and closes the cache: wait for it here (the UI is gone), bounded, and say so if not
    window.backend.close_in_background()
    window.backend.wait_closed(CLOSE_WAIT_S)
    _exit_watchdog(code)
    return code


EXIT_GRACE_S = 5.0
CLOSE_WAIT_S = 15.0     # logout (2 s) + running jobs ending + bundled server stopping


def _exit_watchdog(code: int) -> None:
    """After the event loop ended (Quit, last window closed): if a worker thread still
    blocks the interpreter's exit (a network read that ignores cancelling) after
    :data:`EXIT_GRACE_S`, name it in the log and end the process with ``code``."""
    import logging
    import os
    import threading

    def watch() -> None:
        if done.wait(EXIT_GRACE_S):
            return
        busy = [t.name for t in threading.enumerate()
                if t.is_alive() and not t.daemon and t is not threading.main_thread()]
        logging.getLogger("medview.app").warning("exiting although threads still run: %s",
                                                 ", ".join(busy) or "none")
        logging.shutdown()
        os._exit(code)

    done = threading.Event()
    import atexit

    atexit.register(done.set)           # runs only after the non-daemon threads were joined
    threading.Thread(target=watch, name="medview-exit-watchdog", daemon=True).start()
