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
    from .cli import default_cache_path, default_data_dir
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
    return app.exec()
