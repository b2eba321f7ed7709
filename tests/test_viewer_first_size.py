"""The main window's first size fits the screen (a 1366×768 laptop showed its status bar
cut off below the screen edge)."""
from __future__ import annotations

from PySide6.QtCore import QRect

from viewer.mainwindow import first_size


class _Screen:
    def __init__(self, w: int, h: int) -> None:
        self._r = QRect(0, 0, w, h)

    def availableGeometry(self) -> QRect:  # noqa: N802 - Qt's name
        return self._r


def test_first_size_fits_the_screen():
    assert first_size(_Screen(1920, 1040)) == (1280, 860)
    w, h = first_size(_Screen(1366, 768))
    assert w <= 1366 - 16 and h <= 768 - 48
    assert first_size(None) == (1280, 860)


def test_main_window_opens_within_the_screen(qtbot, tmp_path):
    """No saved geometry: the window is no larger than the screen's available area."""
    from PySide6.QtCore import QSettings

    from viewer.mainwindow import AppConfig, MainWindow

    settings = QSettings(str(tmp_path / "medview.ini"), QSettings.Format.IniFormat)
    win = MainWindow(AppConfig(cache_path=None), settings)
    qtbot.addWidget(win)
    room = win.screen().availableGeometry()
    assert win.width() <= room.width() and win.height() <= room.height()
