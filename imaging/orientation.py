"""Orientation labels (L/R, A/P, H/F) for the edges of a displayed image. No Qt.

DICOM patient coordinates are LPS: +x towards the patient's Left, +y Posterior, +z Head.
ImageOrientationPatient holds the direction of increasing column index (pointing right
across the stored image) and of increasing row index (pointing down).

The view's rotation and flips are an orthogonal 2x2 integer matrix ``M`` with
``screen_direction = M @ image_direction`` (x right, y down). Rotations are applied in
quarter turns clockwise as seen on screen; flips act on what the user sees (screen axes),
whatever the rotation before them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Matrix2",
    "IDENTITY",
    "compose",
    "rotation_matrix",
    "FLIP_H",
    "FLIP_V",
    "view_matrix",
    "transpose",
    "direction_label",
    "EdgeLabels",
    "edge_labels",
    "DEFAULT_THRESHOLD",
]

Matrix2 = tuple[int, int, int, int]
"""Row-major 2x2 matrix ``(a, b, c, d)`` = ``[[a, b], [c, d]]``."""

IDENTITY: Matrix2 = (1, 0, 0, 1)
_ROTATE_CW: Matrix2 = (0, -1, 1, 0)  # screen right (1, 0) -> down (0, 1), y pointing down
FLIP_H: Matrix2 = (-1, 0, 0, 1)
FLIP_V: Matrix2 = (1, 0, 0, -1)

DEFAULT_THRESHOLD = 0.25
"""A patient axis contributes a letter when its direction-cosine magnitude reaches this
(about 14.5 degrees out of the plane); letters are ordered by magnitude."""

_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))  # (negative, positive) per LPS axis


def compose(outer: Matrix2, inner: Matrix2) -> Matrix2:
    """Matrix product ``outer @ inner`` (``inner`` applied first)."""
    a, b, c, d = outer
    e, f, g, h = inner
    return (a * e + b * g, a * f + b * h, c * e + d * g, c * f + d * h)


def transpose(m: Matrix2) -> Matrix2:
    """Transpose, which is the inverse of an orthogonal matrix."""
    return (m[0], m[2], m[1], m[3])


def rotation_matrix(quarter_turns: int) -> Matrix2:
    """Rotation by ``quarter_turns`` x 90 degrees clockwise on screen (negative = counter)."""
    m = IDENTITY
    for _ in range(quarter_turns % 4):
        m = compose(_ROTATE_CW, m)
    return m


def view_matrix(rotation: int = 0, flip_h: bool = False, flip_v: bool = False) -> Matrix2:
    """Matrix for a rotation (quarter turns clockwise) followed by screen flips."""
    m = rotation_matrix(rotation)
    if flip_h:
        m = compose(FLIP_H, m)
    if flip_v:
        m = compose(FLIP_V, m)
    return m


def direction_label(
    vector: Sequence[float], threshold: float = DEFAULT_THRESHOLD, max_letters: int = 3
) -> str:
    """Letters for a patient-space direction, strongest component first (e.g. ``"LP"``)."""
    parts = sorted(
        ((abs(v), axis, v) for axis, v in enumerate(vector[:3])), key=lambda t: t[0], reverse=True
    )
    letters = [_LETTERS[axis][v > 0] for magnitude, axis, v in parts if magnitude >= threshold]
    if not letters and parts and parts[0][0] > 0:  # degenerate input: keep the strongest
        magnitude, axis, v = parts[0]
        letters = [_LETTERS[axis][v > 0]]
    return "".join(letters[:max_letters])


@dataclass(frozen=True)
class EdgeLabels:
    """Labels for the middle of each edge of the displayed image."""

    left: str
    right: str
    top: str
    bottom: str


def edge_labels(
    image_orientation: Sequence[float] | None,
    matrix: Matrix2 = IDENTITY,
    threshold: float = DEFAULT_THRESHOLD,
) -> EdgeLabels | None:
    """Edge labels for an image with ``image_orientation`` shown through ``matrix``.

    Returns None when the orientation is unknown (no ImageOrientationPatient).
    """
    if not image_orientation or len(image_orientation) < 6:
        return None
    row = [float(v) for v in image_orientation[:3]]
    col = [float(v) for v in image_orientation[3:6]]
    inverse = transpose(matrix)

    def label(sx: int, sy: int) -> str:
        ix = inverse[0] * sx + inverse[1] * sy
        iy = inverse[2] * sx + inverse[3] * sy
        patient = [ix * r + iy * c for r, c in zip(row, col)]
        return direction_label(patient, threshold)

    return EdgeLabels(left=label(-1, 0), right=label(1, 0), top=label(0, -1), bottom=label(0, 1))
