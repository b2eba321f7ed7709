"""Byte counts, transfer speed and time left for the progress widgets. No Qt."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["format_bytes", "format_duration", "TransferSnapshot", "TransferRate", "level_fraction"]


def format_bytes(n: float) -> str:
    """Human byte count in kB/MB/GB (powers of 1000), e.g. ``"1.5 MB"``."""
    n = float(n)
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000.0
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def format_duration(seconds: float | None) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``; ``"–"`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "–"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def level_fraction(level: float | None, maximum: float) -> float:
    """Level reached as a fraction 0..1 of the maximum (None = nothing yet)."""
    if level is None or maximum <= 0:
        return 0.0
    return min(max(float(level) / float(maximum), 0.0), 1.0)


@dataclass(frozen=True)
class TransferSnapshot:
    """State of a transfer after one update."""

    received: int
    requested: int
    total: int
    elapsed_s: float
    speed: float | None  # bytes per second, None until measurable
    time_left_s: float | None

    def text(self) -> str:
        """E.g. ``"1.2 MB / 3.4 MB (of 10.0 MB) · 800 kB/s · 3 s left"``."""
        parts = [f"{format_bytes(self.received)} / {format_bytes(self.requested)}"]
        if self.total and self.total != self.requested:
            parts[0] += f" (of {format_bytes(self.total)})"
        if self.speed is not None:
            parts.append(f"{format_bytes(self.speed)}/s")
        if self.received >= self.requested > 0:
            parts.append("done")
        elif self.time_left_s is not None:
            parts.append(f"{format_duration(self.time_left_s)} left")
        return " · ".join(parts)


class TransferRate:
    """Speed over a sliding time window and the time left for the requested bytes.

    Feed it cumulative ``(received, requested, total, elapsed_s)`` updates; the speed is
    measured over the last ``window_s`` seconds (the whole transfer until then).
    """

    def __init__(self, window_s: float = 3.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def reset(self) -> None:
        self._samples.clear()

    def update(self, received: int, requested: int, total: int, elapsed_s: float) -> TransferSnapshot:
        """Record one update and return the derived snapshot."""
        if self._samples and (elapsed_s < self._samples[-1][0] or received < self._samples[-1][1]):
            self._samples.clear()  # a new transfer started
        if not self._samples:
            self._samples.append((0.0, 0))
        self._samples.append((float(elapsed_s), int(received)))
        while len(self._samples) > 2 and self._samples[1][0] <= elapsed_s - self.window_s:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        dt = elapsed_s - t0
        speed = (received - b0) / dt if dt > 0 else None
        remaining = max(requested - received, 0)
        if remaining == 0:
            time_left = 0.0
        elif speed:
            time_left = remaining / speed
        else:
            time_left = None
        return TransferSnapshot(int(received), int(requested), int(total), float(elapsed_s), speed, time_left)
