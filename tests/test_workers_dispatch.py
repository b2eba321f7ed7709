"""The UI-thread dispatcher is shared by every window (and every test): one call that
raises must not leave it scheduled-but-asleep, or every later window waits for ever."""
from __future__ import annotations

import pytest

from waits import WAIT_MS


class _Abort(BaseException):
    """Not an Exception: as KeyboardInterrupt, or a test failure raised inside a slot."""


@pytest.mark.qt_no_exception_capture
def test_dispatcher_drains_after_a_call_raised(qtbot):
    from viewer.workers import Dispatcher

    d = Dispatcher()
    got = []

    def boom():
        raise _Abort()

    d.post(boom)
    d.post(got.append, 1)
    qtbot.waitUntil(lambda: got == [1], timeout=WAIT_MS)
    d.post(got.append, 2)                       # and later posts still wake it
    qtbot.waitUntil(lambda: got == [1, 2], timeout=WAIT_MS)
    assert d.pending() == 0
