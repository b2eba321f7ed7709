"""Text of the four corner overlays of an image view, as radiology viewers lay them out.

No Qt: the widget only draws the lines this module returns.

- top left: patient name, patient ID, study date, study description
- top right: series description, modality/body part, image number, slice position, thickness
- bottom left: window, zoom, the quality layers held (``L n/N``) and the resolution shown
- bottom right: position and value under the cursor
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .measure import PixelValue
from .model import DecodedImage, ImageMeta, SeriesInfo
from .windowing import window_label

__all__ = ["Corners", "format_person_name", "format_date", "format_value", "corner_lines"]


@dataclass
class Corners:
    """Lines of text per corner, top to bottom."""

    top_left: list[str] = field(default_factory=list)
    top_right: list[str] = field(default_factory=list)
    bottom_left: list[str] = field(default_factory=list)
    bottom_right: list[str] = field(default_factory=list)

    def all_lines(self) -> list[str]:
        return [*self.top_left, *self.top_right, *self.bottom_left, *self.bottom_right]

    def text(self) -> str:
        return "\n".join(self.all_lines())


def format_person_name(name: str) -> str:
    """DICOM PN ``Family^Given^Middle^Prefix^Suffix`` as ``"FAMILY, Given Middle"``."""
    if not name:
        return ""
    alphabetic = name.split("=")[0]
    parts = [p.strip() for p in alphabetic.split("^")]
    family, rest = parts[0], " ".join(p for p in parts[1:3] if p)
    return f"{family}, {rest}" if rest else family


def format_date(value: str) -> str:
    """DICOM DA ``YYYYMMDD`` as ``YYYY-MM-DD`` (anything else unchanged)."""
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def format_value(value: PixelValue) -> str:
    """E.g. ``"40 HU (1064)"``, ``"312"``, ``"RGB 200 10 30"``."""
    if value.unit == "RGB":
        return "RGB " + " ".join(f"{v:.0f}" for v in value.modality_value)  # type: ignore[union-attr]
    modality_value = float(value.modality_value)  # type: ignore[arg-type]
    text = f"{modality_value:.0f}" if modality_value.is_integer() else f"{modality_value:.2f}"
    if value.unit:
        text += f" {value.unit}"
    if float(value.stored) != modality_value:  # type: ignore[arg-type]
        text += f" ({float(value.stored):.0f})"  # type: ignore[arg-type]
    return text


def corner_lines(
    series: SeriesInfo | None,
    meta: ImageMeta | None,
    decoded: DecodedImage | None,
    *,
    window: tuple[float, float] | None = None,
    zoom: float | None = None,
    patches: Sequence[DecodedImage] = (),
    cursor: tuple[float, float, PixelValue | None] | None = None,
) -> Corners:
    """Corner overlay lines for the displayed image.

    ``window`` is (center, width); ``zoom`` is full-res pixels to device pixels (1 = 1:1);
    ``cursor`` is (x, y, value) in full-res pixels, value None outside the data.
    """
    corners = Corners()
    if series is not None:
        corners.top_left += [line for line in (
            format_person_name(series.patient_name),
            f"ID: {series.patient_id}" if series.patient_id else "",
            format_date(series.study_date),
            series.study_description,
        ) if line]
        corners.top_right += [line for line in (
            series.series_description,
            " ".join(p for p in (series.modality, series.body_part) if p),
        ) if line]
    if meta is not None:
        count = len(series.images) if series is not None and series.images else None
        number = f"Im: {meta.index + 1}" + (f" / {count}" if count else "")
        if meta.instance_number is not None:
            number += f"  (#{meta.instance_number})"
        corners.top_right.append(number)
        location = meta.slice_location
        if location is not None:
            corners.top_right.append(f"Pos: {location:.1f} mm")
        if meta.slice_thickness:
            corners.top_right.append(f"Thk: {meta.slice_thickness:g} mm")
        if window is not None and not meta.is_color:
            corners.bottom_left.append(window_label(*window))
        if meta.conflict:
            corners.top_left.append("⚠ UID CONFLICT: another file with this SOP Instance "
                                    "UID is in quarantine")
        if meta.geometry_flags:
            corners.top_left.append("⚠ IMPOSSIBLE VALUES: " + "; ".join(meta.geometry_flags[:2])
                                    + (" …" if len(meta.geometry_flags) > 2 else ""))
    if zoom is not None:
        corners.bottom_left.append(f"Zoom: {zoom:.2f}")
    if decoded is not None:
        corners.bottom_left.append(
            f"L {decoded.layers}/{decoded.max_layers}  {decoded.width}×{decoded.height}"
            + (f" (1/{2 ** decoded.reduce})" if decoded.reduce else "")
        )
    for patch in patches:
        x, y, w, h = patch.region  # type: ignore[misc]
        corners.bottom_left.append(f"ROI {w}×{h} @ {x},{y}  L {patch.layers}/{patch.max_layers}")
    if cursor is not None:
        x, y, value = cursor
        corners.bottom_right.append(f"X {int(x)}  Y {int(y)}")
        if value is not None:
            corners.bottom_right.append(format_value(value))
    return corners
