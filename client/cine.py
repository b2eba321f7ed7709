"""Cine playback logic: frame rate, loop/bounce stepping, consistent-level playback. No Qt.

Consistent mode (SPEC P9): a series plays at one uniform level, the highest level every
slice has reached. A level is either an int (e.g. quality layers) or a tuple such as
``(resolution, layers)``; tuple levels combine component-wise, because a slice holding
(r, q) can be shown at any (r' <= r, q' <= q).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

__all__ = ["CineMode", "next_frame", "common_level", "CineFrame", "CineController"]

Level = Any  # int or tuple of ints
T = TypeVar("T")


class CineMode(str, Enum):
    """How playback continues at the end of the series."""

    LOOP = "loop"  # ... N-2, N-1, 0, 1 ...
    BOUNCE = "bounce"  # ... N-2, N-1, N-2 ... 1, 0, 1 ...


def next_frame(current: int, count: int, mode: CineMode = CineMode.LOOP, direction: int = 1) -> tuple[int, int]:
    """The frame after ``current`` and the direction to continue in.

    ``direction`` is +1 or -1. With one frame (or none) the index stays put.
    """
    if count <= 1:
        return 0, direction
    direction = 1 if direction >= 0 else -1
    current = min(max(current, 0), count - 1)
    target = current + direction
    if 0 <= target < count:
        return target, direction
    if mode is CineMode.BOUNCE:
        direction = -direction
        return current + direction, direction
    return target % count, direction


def common_level(levels: Sequence[Level | None]) -> Level | None:
    """The level every slice has reached: the minimum (component-wise for tuples).

    None when there are no slices or one of them has nothing yet.
    """
    if not levels or any(level is None for level in levels):
        return None
    if all(isinstance(level, tuple) for level in levels):
        return tuple(min(parts) for parts in zip(*levels))
    return min(levels)


@dataclass(frozen=True)
class CineFrame(Generic[T]):
    """One step of playback: which slice, at which level (None = best available), image."""

    index: int
    level: Level | None
    image: T | None


class CineController(Generic[T]):
    """Playback state; the caller drives it with a timer at :attr:`interval_ms`.

    ``image_at(index, level)`` returns the slice's image at a level (``level=None``: the
    best available) or None when it cannot be shown at that level. ``levels()`` returns
    the level reached by every slice. Both are optional: without them :meth:`step` just
    advances the index (consistent mode needs ``levels`` and waits without it).
    """

    MIN_FPS = 0.5
    MAX_FPS = 120.0

    def __init__(
        self,
        count: int = 0,
        fps: float = 10.0,
        mode: CineMode = CineMode.LOOP,
        consistent: bool = False,
        image_at: Callable[[int, Level | None], T | None] | None = None,
        levels: Callable[[], Sequence[Level | None]] | None = None,
    ) -> None:
        self.count = count
        self.fps = fps
        self.mode = mode
        self.consistent = consistent
        self.image_at = image_at
        self.levels = levels
        self.current = 0
        self.direction = 1

    @property
    def fps(self) -> float:
        return self._fps

    @fps.setter
    def fps(self, value: float) -> None:
        self._fps = min(max(float(value), self.MIN_FPS), self.MAX_FPS)

    @property
    def interval_ms(self) -> int:
        """Timer interval for the frame rate."""
        return max(1, round(1000.0 / self._fps))

    def seek(self, index: int) -> None:
        """Continue from ``index`` (e.g. after the user scrolled while paused)."""
        self.current = min(max(int(index), 0), max(self.count - 1, 0))

    def play_level(self) -> Level | None:
        """The level frames are shown at: the common level in consistent mode, else None."""
        if not self.consistent:
            return None
        return common_level(self.levels()) if self.levels is not None else None

    def step(self) -> CineFrame[T] | None:
        """Advance one frame and return it, or None when nothing can be shown.

        In consistent mode playback waits (returns None, index unchanged) until every
        slice has reached a common level and the next slice can be shown at it.
        """
        if self.count <= 0:
            return None
        level = self.play_level()
        if self.consistent and level is None:
            return None
        index, direction = next_frame(self.current, self.count, self.mode, self.direction)
        image = self.image_at(index, level) if self.image_at is not None else None
        if self.image_at is not None and image is None and self.consistent:
            return None
        self.current, self.direction = index, direction
        return CineFrame(index, level, image)
