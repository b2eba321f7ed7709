"""Data the viewer widgets receive: series and image metadata, decoded (partial) images.

Plain dataclasses, no Qt. The client library (or a test) builds them; the widgets only
read them. Coordinates called *full-res* are pixel coordinates of the full-resolution
image: x = column, y = row, pixel ``(row i, column j)`` covers ``[j, j+1) x [i, i+1)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ImageMeta", "SeriesInfo", "DecodedImage", "PixelGrid"]


def _first(value: Any) -> Any:
    """First item of a DICOM multi-value (list, tuple or backslash string), else the value."""
    if isinstance(value, str) and "\\" in value:
        return value.split("\\")[0]
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _float_or_none(value: Any) -> float | None:
    value = _first(value)
    if value is None or value == "":
        return None
    return float(value)


def _int_or_none(value: Any) -> int | None:
    value = _first(value)
    if value is None or value == "":
        return None
    return int(float(value))


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """A DICOM multi-valued decimal as a tuple of ``n`` floats, or None when absent/short."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.split("\\")
    items = tuple(float(v) for v in value)
    return items if len(items) >= n else None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


#: Attribute keywords whose flags (see server.ingest.value_flags) concern geometry.
GEOMETRY_KEYWORDS = ("PixelSpacing", "ImagerPixelSpacing", "SliceThickness",
                     "SpacingBetweenSlices", "ImagePositionPatient", "ImageOrientationPatient")


@dataclass
class ImageMeta:
    """Metadata of one image (slice or frame) of a series, as the server lists it."""

    index: int
    sop_instance_uid: str
    frame: int
    rows: int
    columns: int
    samples_per_pixel: int
    photometric: str  # MONOCHROME1 / MONOCHROME2 / RGB
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) in mm
    image_position: tuple[float, float, float] | None
    image_orientation: tuple[float, ...] | None  # six direction cosines (row, then column)
    slice_thickness: float | None
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    rescale_type: str | None = None
    window_center: float | None = None
    window_width: float | None = None
    instance_number: int | None = None
    modality: str | None = None  # optional; usually taken from the series
    # Impossible header values the server flagged at ingest ("PixelSpacing: zero or
    # negative (0\\0)", ...); geometry ones forbid mm measurements and MPR.
    geometry_flags: tuple[str, ...] = ()
    # Another file with this SOP Instance UID and other content waits in the quarantine.
    conflict: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageMeta:
        """Build from one entry of the server's ``series_images`` list (DICOM keywords).

        Missing keys give None or the defaults; multi-valued window values keep the first.
        """
        spacing = _floats(d.get("PixelSpacing"), 2)
        position = _floats(d.get("ImagePositionPatient"), 3)
        orientation = _floats(d.get("ImageOrientationPatient"), 6)
        slope = _float_or_none(d.get("RescaleSlope"))
        intercept = _float_or_none(d.get("RescaleIntercept"))
        rescale_type = d.get("RescaleType")
        return cls(
            index=int(d.get("index", 0)),
            sop_instance_uid=_text(d.get("SOPInstanceUID")),
            frame=int(d.get("frame") or 0),
            rows=int(d.get("Rows") or 0),
            columns=int(d.get("Columns") or 0),
            samples_per_pixel=int(d.get("SamplesPerPixel") or 1),
            photometric=_text(d.get("PhotometricInterpretation")) or "MONOCHROME2",
            pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
            image_position=(position[0], position[1], position[2]) if position else None,
            image_orientation=orientation[:6] if orientation else None,
            slice_thickness=_float_or_none(d.get("SliceThickness")),
            rescale_slope=1.0 if slope is None else slope,
            rescale_intercept=0.0 if intercept is None else intercept,
            rescale_type=str(rescale_type) if rescale_type else None,
            window_center=_float_or_none(d.get("WindowCenter")),
            window_width=_float_or_none(d.get("WindowWidth")),
            instance_number=_int_or_none(d.get("InstanceNumber")),
            modality=_text(d.get("Modality")) or None,
            geometry_flags=tuple(str(f) for f in (d.get("geometry_flags") or ())),
            conflict=bool(d.get("conflict")),
        )

    @property
    def geometry_flagged(self) -> bool:
        """True when the geometry (spacing, thickness, position, orientation) is
        impossible: no measurement in mm, no MPR."""
        return any(f.split(":", 1)[0] in GEOMETRY_KEYWORDS for f in self.geometry_flags)

    @property
    def mm_spacing(self) -> tuple[float, float] | None:
        """PixelSpacing when it may be used for measurements in mm, else None."""
        return None if self.geometry_flagged else self.pixel_spacing

    @property
    def is_color(self) -> bool:
        """True for colour images (more than one sample per pixel or an RGB/YBR photometric)."""
        return self.samples_per_pixel > 1 or not self.photometric.startswith("MONOCHROME")

    @property
    def is_monochrome1(self) -> bool:
        """True when the lowest value must be displayed white (PS3.3 C.7.6.3.1.2)."""
        return self.photometric == "MONOCHROME1"

    @property
    def normal(self) -> tuple[float, float, float] | None:
        """Slice normal (row cosine x column cosine) in patient LPS, or None."""
        if not self.image_orientation:
            return None
        r = np.asarray(self.image_orientation[:3], float)
        c = np.asarray(self.image_orientation[3:6], float)
        n = np.cross(r, c)
        norm = float(np.linalg.norm(n))
        if norm == 0.0:
            return None
        return tuple(float(v) for v in n / norm)  # type: ignore[return-value]

    @property
    def slice_location(self) -> float | None:
        """Position of the slice along its normal in mm (falls back to z), or None."""
        if self.image_position is None:
            return None
        normal = self.normal
        if normal is None:
            return float(self.image_position[2])
        return float(np.dot(self.image_position, normal))


@dataclass
class SeriesInfo:
    """One series and its images, in display order."""

    patient_name: str = ""
    patient_id: str = ""
    study_date: str = ""
    study_description: str = ""
    series_description: str = ""
    modality: str = ""
    series_uid: str = ""
    body_part: str = ""
    images: list[ImageMeta] = field(default_factory=list)

    _KEYS = {
        "patient_name": "PatientName",
        "patient_id": "PatientID",
        "study_date": "StudyDate",
        "study_description": "StudyDescription",
        "series_description": "SeriesDescription",
        "modality": "Modality",
        "series_uid": "SeriesInstanceUID",
        "body_part": "BodyPartExamined",
    }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], images: Sequence[Mapping[str, Any]] | None = None) -> SeriesInfo:
        """Build from a series dict (DICOM keywords or the snake_case field names).

        ``images`` (or ``d["images"]``) is the list of image dicts; images without a
        ``Modality`` of their own inherit the series modality.
        """
        values = {name: _text(d.get(name, d.get(keyword))) for name, keyword in cls._KEYS.items()}
        image_dicts = images if images is not None else d.get("images", ())
        metas = [m if isinstance(m, ImageMeta) else ImageMeta.from_dict(m) for m in image_dicts]
        for meta in metas:
            if meta.modality is None and values["modality"]:
                meta.modality = values["modality"]
        return cls(images=metas, **values)

    def lists(self, meta: ImageMeta) -> bool:
        """True when ``meta`` is the image this series lists at ``meta.index`` (same SOP
        instance and frame); a series that lists no images takes any image."""
        if not self.images:
            return True
        if not 0 <= meta.index < len(self.images):
            return False
        listed = self.images[meta.index]
        return (listed.sop_instance_uid, listed.frame) == (meta.sop_instance_uid, meta.frame)


@dataclass(frozen=True)
class PixelGrid:
    """Where the pixels of a decoded array sit in full-res coordinates.

    Array pixel ``(i, j)`` covers full-res ``[x0 + j*sx, x0 + (j+1)*sx)`` horizontally and
    ``[y0 + i*sy, y0 + (i+1)*sy)`` vertically. ``width``/``height`` is the covered
    full-res rectangle, clipped to the image.
    """

    x0: float
    y0: float
    sx: float
    sy: float
    width: float
    height: float

    def to_array(self, x_full: float, y_full: float) -> tuple[int, int]:
        """Array (row, column) of the pixel holding full-res point (x, y)."""
        return math.floor((y_full - self.y0) / self.sy), math.floor((x_full - self.x0) / self.sx)

    def contains(self, x_full: float, y_full: float) -> bool:
        """True when full-res point (x, y) lies inside the covered rectangle."""
        return self.x0 <= x_full < self.x0 + self.width and self.y0 <= y_full < self.y0 + self.height


@dataclass
class DecodedImage:
    """A (possibly partial) decode result for one image of the series.

    ``pixels`` are stored values (codestream offset undone, before rescale), (H, W) or
    (H, W, 3). They may be at a lower resolution than ``rows x columns``: with ``reduce``
    r the shape is about ``ceil(rows / 2**r)``. With ``region`` = (x, y, w, h) the array is
    a patch covering that full-res rectangle (normally at full resolution).
    """

    index: int
    pixels: np.ndarray
    layers: int
    max_layers: int
    reduce: int = 0
    region: tuple[int, int, int, int] | None = None

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def is_region(self) -> bool:
        return self.region is not None

    def grid(self, meta: ImageMeta) -> PixelGrid:
        """The full-res placement of this array (see :class:`PixelGrid`)."""
        if self.region is not None:
            x, y, w, h = self.region
            return PixelGrid(float(x), float(y), w / self.width, h / self.height, float(w), float(h))
        factor = 2 ** self.reduce
        sx = factor if math.ceil(meta.columns / factor) == self.width else meta.columns / self.width
        sy = factor if math.ceil(meta.rows / factor) == self.height else meta.rows / self.height
        return PixelGrid(0.0, 0.0, float(sx), float(sy), float(meta.columns), float(meta.rows))

    def quality_key(self) -> tuple[int, int]:
        """Ordering key: higher is better (finer resolution, then more layers)."""
        return (-self.reduce, self.layers)
