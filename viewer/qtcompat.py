"""Work-around for a defect of the installed Qt binding, detected at run time.

PySide6 6.12.0 (abi3 wheels) running on CPython 3.11 returns ``None``, ``True`` and
``False`` from its methods without giving the caller a reference — as if they were
immortal, which they only are from CPython 3.12 on. Every ``setText()``, ``update()``,
``QTimer.singleShot()``, ``signal.emit()``... then takes one reference away from those
singletons, and after enough calls the interpreter aborts with "Fatal Python error:
none_dealloc" (or "bool_dealloc"). PySide6 6.11.3 does not do this.

:func:`apply` probes for the defect once and, only if it is there, gives the three
singletons the immortality the binary assumes: their reference counts are raised by
2**40, far more than a process can ever take away. It changes nothing else. Importing
:mod:`viewer.workers` (hence the main window) or running ``medview snapshot`` applies
it. The real fix is a PySide6 version other than 6.12.0 on CPython < 3.12.
"""
from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger("medview.qtcompat")

__all__ = ["apply", "defect_present"]

_PIN = 1 << 40
_state: dict[str, bool] = {}


def defect_present() -> bool:
    """True when calling into PySide6 loses references to None/True/False."""
    if "defect" not in _state:
        from PySide6.QtCore import QObject, Signal

        class _Probe(QObject):
            sig = Signal()

        probe = _Probe()
        none, true = sys.getrefcount(None), sys.getrefcount(True)
        for _ in range(8):
            probe.setObjectName("probe")    # returns None
            probe.sig.emit()                # returns True
        _state["defect"] = (sys.getrefcount(None) - none <= -8
                            or sys.getrefcount(True) - true <= -8)
    return _state["defect"]


def apply() -> bool:
    """Pin None/True/False if the defect is present (once per process); returns whether
    the work-around is in force."""
    if "applied" in _state:
        return _state["applied"]
    applied = sys.version_info < (3, 12) and defect_present()
    if applied:
        for singleton in (None, True, False):
            # CPython object header: ob_refcnt is the first field, at id(obj)
            ctypes.c_ssize_t.from_address(id(singleton)).value += _PIN
        log.info("PySide6 %s loses references to None/True/False on CPython %d.%d: "
                 "singletons pinned", _pyside_version(), *sys.version_info[:2])
    _state["applied"] = applied
    return applied


def _pyside_version() -> str:
    try:
        import PySide6

        return PySide6.__version__
    except Exception:  # noqa: BLE001
        return "?"
