"""Which images form the volume for MPR: series selection from a folder or an image. No Qt.

SPEC M1–M3. Starting from the image on screen (a file) or from a folder:

1. **Find** the DICOM files of the folder: a ``.dcm`` suffix or the Part 10 preamble
   (``DICM`` at byte 128). Anything else (PNG, JPEG, text...) is skipped with a reason.
2. **Match** the reference image: same Patient Name, then Study Instance UID, then Series
   Instance UID; then the auxiliary identifiers Series Number, Body Part Examined and
   Modality must agree too (a disagreement means a mislabelled file: skipped).
3. **Clean**: localizers/scouts, images whose orientation or size differs from the series,
   colour images, exact duplicates (the same SOP Instance UID twice) and second images at
   an occupied position are skipped. Enhanced multi-frame images give one image per frame,
   each with its own position.
4. **Gaps** in Instance Number are looked for up the folder tree (``search_levels``
   parents, their sub-folders included) and then in the catalogue (any
   :class:`CatalogueSource`, e.g. :class:`ServerCatalogue`); what is still missing is
   reported.
5. **Order** along the slice normal (positions, not Instance Numbers), and warn on
   irregular spacing, gaps in position, gantry tilt and mixed orientations.
6. **Refuse** MPR below ``threshold`` images (10 by default) with a message that says
   what was found.

:func:`select_series` returns a :class:`SeriesSelection` (kept, skipped, recovered,
missing, warnings, refusal); :meth:`SeriesSelection.build_volume` reads the pixels into a
:class:`~imaging.volume.Volume`.
"""
from __future__ import annotations

import io
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from codestream.ranges import format_ranges
from imaging import dicom

from .volume import SliceGeometry, Volume, VolumeError, build_geometry, volume_for_slices
from .windowing import header_window

log = logging.getLogger("medview.series_select")

__all__ = [
    "DEFAULT_THRESHOLD",
    "MprRefused",
    "Candidate",
    "Skipped",
    "SeriesSelection",
    "CatalogueSource",
    "ServerCatalogue",
    "has_dicom_preamble",
    "looks_like_dicom",
    "read_candidates",
    "scan_folder",
    "select_series",
]

DEFAULT_THRESHOLD = 10
"""Fewest images MPR accepts (M3)."""

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference of a direction cosine for two images to count as parallel."""

LOCALIZER_TYPES = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM"}


class MprRefused(Exception):
    """MPR cannot be built from what was found (the message says why)."""


# --------------------------------------------------------------------------- candidates
def has_dicom_preamble(path: str | Path) -> bool:
    """True when the file has the DICOM Part 10 magic ``DICM`` at byte 128."""
    return dicom.has_preamble(dicom.read_head(path))


def looks_like_dicom(path: str | Path) -> bool:
    """A ``.dcm`` suffix (any case), the preamble magic, or (without a preamble) a
    plausible dataset start (M1; the one check of :mod:`imaging.dicom`, as ingest)."""
    return Path(path).suffix.lower() == ".dcm" or dicom.is_dicom_file(path)


_get = dicom.get            # attribute values of foreign files, never raising


def _floats(v: Any, n: int) -> tuple[float, ...] | None:
    if v is None or v == "":
        return None
    try:
        out = tuple(float(x) for x in (v if not isinstance(v, (str, bytes)) else str(v).split("\\")))
    except (TypeError, ValueError):
        return None
    return out if len(out) >= n else None


def _float(v: Any) -> float | None:
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        v = v[0] if len(v) else None
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None


def _int(v: Any) -> int | None:
    f = _float(v)
    return None if f is None else int(round(f))


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v).strip()


_group_value = dicom.group_value    # enhanced multi-frame functional groups


@dataclass
class Candidate:
    """One image (a file, or one frame of an enhanced multi-frame file) as its header
    describes it."""

    path: Path | None
    frame: int | None                       # frame index of a multi-frame file, else None
    source: str                             # "folder", "parent folder", "catalogue"
    sop_uid: str
    patient_name: str
    patient_id: str
    study_uid: str
    series_uid: str
    series_number: int | None
    body_part: str
    modality: str
    series_description: str
    instance_number: int | None
    image_type: tuple[str, ...]
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    samples_per_pixel: int
    slope: float
    intercept: float
    bits_stored: int
    bits_allocated: int
    signed: bool
    thickness: float | None
    data: bytes | None = None               # file content (catalogue candidates)
    window: tuple[float, float] | None = None   # usable WindowCenter/WindowWidth, else None

    @property
    def name(self) -> str:
        base = str(self.path) if self.path is not None else f"catalogue:{self.sop_uid}"
        return base if self.frame is None else f"{base} [frame {self.frame + 1}]"

    @property
    def key(self) -> tuple[str, int]:
        return (self.sop_uid, self.frame or 0)

    @property
    def is_localizer(self) -> bool:
        return any(t.upper() in LOCALIZER_TYPES for t in self.image_type)

    @property
    def normal(self) -> np.ndarray | None:
        if not self.orientation:
            return None
        n = np.cross(self.orientation[:3], self.orientation[3:6])
        norm = np.linalg.norm(n)
        return n / norm if norm > 0 else None

    @property
    def stored_range(self) -> tuple[int, int]:
        b = max(1, self.bits_stored)
        return (-(1 << (b - 1)), (1 << (b - 1)) - 1) if self.signed else (0, (1 << b) - 1)

    def slice_geometry(self) -> SliceGeometry:
        if self.position is None or self.orientation is None or self.pixel_spacing is None:
            raise VolumeError(f"{self.name} has no ImagePositionPatient / "
                              "ImageOrientationPatient / PixelSpacing")
        return SliceGeometry(self.position, self.orientation, self.pixel_spacing, self.rows,
                             self.columns, self.thickness)

    def dataset(self, *, pixels: bool = True):
        import pydicom

        src = io.BytesIO(self.data) if self.data is not None else str(self.path)
        return pydicom.dcmread(src, stop_before_pixels=not pixels, force=True)

    def load_stored(self, ds=None) -> np.ndarray:
        """Stored pixel values of this image (before rescale)."""
        ds = ds if ds is not None else self.dataset()
        arr = ds.pixel_array
        if self.frame is not None or (arr.ndim == 3 and self.samples_per_pixel == 1):
            arr = arr[self.frame or 0]
        return arr


@dataclass
class Skipped:
    """An image (or file) left out, and why."""

    name: str
    reason: str


def _candidates_from_dataset(ds, path: Path | None, source: str, data: bytes | None = None,
                             ) -> list[Candidate]:
    frames = _int(_get(ds, "NumberOfFrames")) or 1
    enhanced = frames > 1 and _get(ds, "PerFrameFunctionalGroupsSequence") is not None
    spp = _int(_get(ds, "SamplesPerPixel")) or 1
    common = dict(
        path=path, source=source, sop_uid=_text(_get(ds, "SOPInstanceUID")),
        patient_name=_text(_get(ds, "PatientName")), patient_id=_text(_get(ds, "PatientID")),
        study_uid=_text(_get(ds, "StudyInstanceUID")), series_uid=_text(_get(ds, "SeriesInstanceUID")),
        series_number=_int(_get(ds, "SeriesNumber")), body_part=_text(_get(ds, "BodyPartExamined")).upper(),
        modality=_text(_get(ds, "Modality")).upper(),
        series_description=_text(_get(ds, "SeriesDescription")),
        instance_number=_int(_get(ds, "InstanceNumber")),
        image_type=tuple(t.strip() for t in _text(_get(ds, "ImageType")).split("\\") if t.strip()),
        rows=_int(_get(ds, "Rows")) or 0, columns=_int(_get(ds, "Columns")) or 0,
        samples_per_pixel=spp, bits_stored=_int(_get(ds, "BitsStored")) or 16,
        bits_allocated=_int(_get(ds, "BitsAllocated")) or 16,
        signed=bool(_int(_get(ds, "PixelRepresentation")) or 0), data=data,
    )
    out = []
    for f in range(frames if enhanced else 1):
        fr = f if enhanced else None

        def attr(keyword: str, seq: str, n: int | None = None):
            v = _group_value(ds, fr, seq, keyword) if enhanced else None
            if v is None:
                v = _get(ds, keyword)
            return _floats(v, n) if n else v

        slope = _float(attr("RescaleSlope", "PixelValueTransformationSequence"))
        intercept = _float(attr("RescaleIntercept", "PixelValueTransformationSequence"))
        thickness = _float(attr("SpacingBetweenSlices", "PixelMeasuresSequence")) or \
            _float(attr("SliceThickness", "PixelMeasuresSequence"))
        ps = attr("PixelSpacing", "PixelMeasuresSequence", 2)
        window = header_window(attr("WindowCenter", "FrameVOILUTSequence"),
                               attr("WindowWidth", "FrameVOILUTSequence"))
        out.append(Candidate(
            window=window,
            frame=fr, position=attr("ImagePositionPatient", "PlanePositionSequence", 3),
            orientation=attr("ImageOrientationPatient", "PlaneOrientationSequence", 6),
            pixel_spacing=(ps[0], ps[1]) if ps else None,
            slope=1.0 if slope is None else slope, intercept=0.0 if intercept is None else intercept,
            thickness=thickness, **common))
    if not enhanced and frames > 1:
        # a classic multi-frame without per-frame positions cannot be placed in space
        for c in out:
            c.position = None
    return out


def read_candidates(path: str | Path, source: str = "folder") -> list[Candidate] | Skipped:
    """The images of one file, or why it was skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not looks_like_dicom(path):
        return Skipped(str(path), "not a DICOM file (no .dcm suffix, no DICM preamble)")
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=not has_dicom_preamble(path))
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, AttributeError) as e:
        return Skipped(str(path), f"not readable as DICOM: {e}")
    if not _get(ds, "SOPInstanceUID") or _get(ds, "Rows") is None:
        return Skipped(str(path), "no image in this DICOM file")
    return _candidates_from_dataset(ds, path, source)


def scan_folder(folder: str | Path, *, recursive: bool = False, source: str = "folder",
                exclude: Iterable[Path] = (), limit: int = 20000,
                ) -> tuple[list[Candidate], list[Skipped]]:
    """Read the headers of the files in ``folder`` (sorted; sub-folders with
    ``recursive``, except those in ``exclude``)."""
    folder = Path(folder)
    excluded = {Path(p).resolve() for p in exclude}
    files: list[Path] = []
    if recursive:
        for dirpath, dirs, names in os.walk(folder):
            here = Path(dirpath)
            dirs[:] = sorted(d for d in dirs if (here / d).resolve() not in excluded)
            files += [here / n for n in sorted(names)]
            if len(files) > limit:
                break
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    cands: list[Candidate] = []
    skipped: list[Skipped] = []
    for p in files[:limit]:
        r = read_candidates(p, source)
        if isinstance(r, Skipped):
            skipped.append(r)
        else:
            cands += r
    return cands, skipped


# --------------------------------------------------------------------------- catalogue
class CatalogueSource(Protocol):
    """Somewhere missing images can be found (M2)."""

    name: str

    def find(self, ref: Candidate, instance_numbers: set[int]) -> list[Candidate]:
        """Candidates of ``ref``'s series with these Instance Numbers."""


class ServerCatalogue:
    """The image server's catalogue: QIDO lists the instances of the series, WADO-RS
    retrieves the original files of the missing ones (kept in memory)."""

    name = "catalogue"

    def __init__(self, session) -> None:
        self.session = session

    def find(self, ref: Candidate, instance_numbers: set[int]) -> list[Candidate]:
        import pydicom

        try:
            rows = self.session.instances(ref.study_uid, ref.series_uid)
        except Exception as e:  # noqa: BLE001 - the server is optional here
            log.warning("catalogue lookup failed: %s", e)
            return []
        out = []
        for row in rows:
            num = _int(row.get("InstanceNumber"))
            if num not in instance_numbers:
                continue
            sop = row["SOPInstanceUID"]
            try:
                data = self.session.request(
                    "GET", f"/dicomweb/studies/{ref.study_uid}/series/{ref.series_uid}/instances/{sop}").content
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            except Exception as e:  # noqa: BLE001
                log.warning("cannot retrieve instance %s: %s", sop, e)
                continue
            out += _candidates_from_dataset(ds, None, self.name, data)
        return out


# --------------------------------------------------------------------------- selection
@dataclass
class SeriesSelection:
    """What :func:`select_series` found."""

    reference: Candidate | None
    kept: list[Candidate] = field(default_factory=list)          # sorted along the normal
    skipped: list[Skipped] = field(default_factory=list)
    recovered: list[Candidate] = field(default_factory=list)     # found outside the folder
    missing: list[int] = field(default_factory=list)             # Instance Numbers still missing
    warnings: list[str] = field(default_factory=list)
    threshold: int = DEFAULT_THRESHOLD
    refusal: str | None = None
    other_series: dict[str, int] = field(default_factory=dict)   # series UID -> images seen

    @property
    def ok(self) -> bool:
        return self.refusal is None

    def check(self) -> "SeriesSelection":
        """Raise :class:`MprRefused` when MPR must be refused; returns self otherwise."""
        if self.refusal:
            raise MprRefused(self.refusal)
        return self

    def report(self, refusal: bool = True) -> str:
        """Readable summary: kept, skipped (with reasons), recovered, missing, warnings;
        the refusal last (``refusal=False`` leaves it to the caller's error message).
        A refused selection does not claim "missing: none": nothing was checked for."""
        ref = self.reference
        lines = []
        if ref is not None:
            lines.append(f"series {ref.series_uid} ({ref.modality or '?'} #{ref.series_number}, "
                         f"{ref.series_description or 'no description'}) of {ref.patient_name or '?'}")
        lines.append(f"kept {len(self.kept)} image(s)")
        for c in self.recovered:
            lines.append(f"  recovered from the {c.source}: {c.name} (instance {c.instance_number})")
        lines.append(f"skipped {len(self.skipped)}")
        for s in self.skipped:
            lines.append(f"  {s.name}: {s.reason}")
        if self.missing:
            lines.append("missing instance number(s): " + format_ranges(self.missing, ', '))
        elif not self.refusal:
            lines.append("missing: none")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        if self.refusal and refusal:
            lines.append(f"refused: {self.refusal}")
        return "\n".join(lines)

    def slice_geometries(self) -> list[SliceGeometry]:
        return [c.slice_geometry() for c in self.kept]

    def empty_volume(self) -> tuple[Volume, list[int]]:
        """An empty :class:`Volume` for the kept images and the slot of each of them."""
        self.check()
        ref = self.kept[0]
        rng = (min(c.stored_range[0] for c in self.kept), max(c.stored_range[1] for c in self.kept))
        vol, slots = volume_for_slices(
            self.slice_geometries(), [(c.slope, c.intercept) for c in self.kept], rng,
            modality=ref.modality, series_uid=ref.series_uid, slice_ids=list(self.kept),
            raw_bytes_per_voxel=max(1, ref.bits_allocated // 8))
        vol.warnings = list(self.warnings)
        return vol, slots

    def build_volume(self, *, progress: Callable[[int, int], None] | None = None) -> Volume:
        """A :class:`Volume` of the kept images, pixels read (see also
        :class:`client.volume_loader.FolderVolumeLoader` for the interleaved way)."""
        vol, slots = self.empty_volume()
        datasets: dict[object, Any] = {}
        with vol.batch("loaded"):
            for k, (c, slot) in enumerate(zip(self.kept, slots)):
                key = c.path if c.path is not None else c.sop_uid
                ds = datasets.get(key)
                if ds is None:
                    datasets.clear()                    # one multi-frame file at a time
                    ds = datasets[key] = c.dataset()
                vol.set_slice(slot, c.load_stored(ds), slope=c.slope, intercept=c.intercept)
                if progress:
                    progress(k + 1, len(self.kept))
        return vol



def _parallel(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    if a is None or b is None:
        return False
    return bool(np.allclose(a[:6], b[:6], atol=ORIENTATION_TOLERANCE))


def _mismatch(c: Candidate, ref: Candidate) -> str | None:
    """Why ``c`` is not of ``ref``'s series (M1 order), or None."""
    if c.patient_name != ref.patient_name:
        return f"other patient ({c.patient_name or 'no name'})"
    if c.study_uid != ref.study_uid:
        return "other study"
    if c.series_uid != ref.series_uid:
        return f"other series (#{c.series_number}, {c.series_description or c.series_uid})"
    for label, a, b in (("Series Number", c.series_number, ref.series_number),
                        ("Body Part Examined", c.body_part, ref.body_part),
                        ("Modality", c.modality, ref.modality)):
        if a not in (None, "") and b not in (None, "") and a != b:
            return f"same Series Instance UID but {label} {a} differs from {b} (inconsistent file)"
    return None


def _filter(cands: Sequence[Candidate], ref: Candidate, seen: dict[tuple[str, int], Candidate],
            orientation: tuple[float, ...] | None, size: tuple[int, int],
            ) -> tuple[list[Candidate], list[Skipped]]:
    kept, skipped = [], []
    for c in cands:
        why = _mismatch(c, ref)
        if why is None and c.is_localizer:
            why = "localizer/scout image (" + "\\".join(c.image_type) + ")"
        if why is None and c.samples_per_pixel != 1:
            why = "colour image: MPR needs grey-level images"
        if why is None and (c.position is None or c.orientation is None or c.pixel_spacing is None):
            why = "no position, orientation or pixel spacing: cannot be placed in space"
        if why is None and orientation is not None and not _parallel(c.orientation, orientation):
            why = "orientation differs from the series (another plane)"
        if why is None and (c.rows, c.columns) != size:
            why = f"image size {c.columns}x{c.rows} differs from the series ({size[1]}x{size[0]})"
        if why is None and c.key in seen:
            why = f"exact duplicate of {seen[c.key].name} (same SOP Instance UID)"
        if why:
            skipped.append(Skipped(c.name, why))
            continue
        seen[c.key] = c
        kept.append(c)
    return kept, skipped


def _series_orientation(cands: Sequence[Candidate], ref: Candidate) -> tuple[float, ...] | None:
    """The orientation most images of the series share (the reference's if it is one)."""
    same = [c for c in cands if _mismatch(c, ref) is None and not c.is_localizer and c.orientation]
    if not same:
        return ref.orientation
    counts = Counter(tuple(round(v, 3) for v in c.orientation[:6]) for c in same)  # type: ignore[index]
    best, n = counts.most_common(1)[0]
    if ref.orientation and not ref.is_localizer:
        mine = tuple(round(v, 3) for v in ref.orientation[:6])
        if counts.get(mine, 0) == n:
            return ref.orientation
    return best


def _missing_numbers(kept: Sequence[Candidate]) -> list[int]:
    nums = sorted({c.instance_number for c in kept if c.instance_number is not None and c.frame is None})
    if len(nums) < 2:
        return []
    have = set(nums)
    return [n for n in range(nums[0], nums[-1] + 1) if n not in have]


def select_series(start: str | Path, *, series_uid: str | None = None,
                  threshold: int = DEFAULT_THRESHOLD, search_levels: int = 2,
                  catalogue: CatalogueSource | None = None) -> SeriesSelection:
    """Select the images for MPR from an image file (its folder) or a folder.

    From a folder, the series is ``series_uid`` or else the one with the most images.
    See the module docstring for the steps; the result is never an exception: a refusal
    is in :attr:`SeriesSelection.refusal` (call :meth:`SeriesSelection.check`).
    """
    start = Path(start)
    folder = start.parent if start.is_file() else start
    if not folder.is_dir():
        return SeriesSelection(None, refusal=f"{start} is neither an image file nor a folder",
                               threshold=threshold)
    cands, skipped = scan_folder(folder)
    sel = SeriesSelection(None, threshold=threshold)
    ref = _reference_image(sel, start, folder, cands, skipped, series_uid)
    if ref is None:
        return sel
    sel.reference = ref
    orientation = _series_orientation(cands, ref)
    size = (ref.rows, ref.columns)
    seen: dict[tuple[str, int], Candidate] = {}
    kept, rejected = _filter(cands, ref, seen, orientation, size)
    sel.skipped = skipped + rejected
    if sum(1 for s in rejected if "orientation differs" in s.reason):
        sel.warnings.append("mixed orientations in the folder: images of another plane were left out")
    kept += _recover_missing(sel, kept, folder, ref, seen, orientation, size,
                             search_levels, catalogue)
    sel.kept = _order_along_normal(sel, kept, orientation)
    _check_volume(sel, threshold, ref, folder)
    return sel


def _reference_image(sel: SeriesSelection, start: Path, folder: Path, cands, skipped,
                     series_uid: str | None) -> Candidate | None:
    """The image the series is chosen by: the file given, else one of ``series_uid`` or
    of the series with the most grey-level images (ties: the lowest Series Number). None
    with ``sel``'s refusal set when there is none."""
    if start.is_file():
        mine = [c for c in cands if c.path is not None and c.path.resolve() == start.resolve()]
        if not mine:
            why = next((s.reason for s in skipped if Path(s.name).resolve() == start.resolve()),
                       "not a DICOM image")
            sel.skipped = skipped
            sel.refusal = f"{start.name}: {why}"
            return None
        return mine[0]
    pool = [c for c in cands if not c.is_localizer and c.samples_per_pixel == 1]
    if series_uid:
        pool = [c for c in pool if c.series_uid == series_uid]
    if not pool:
        sel.skipped = skipped
        what = f"series {series_uid}" if series_uid else "grey-level DICOM images"
        sel.refusal = f"no {what} found in {folder}"
        return None
    counts = Counter(c.series_uid for c in pool)
    best = max(counts, key=lambda uid: (counts[uid], -min(
        (c.series_number or 0) for c in pool if c.series_uid == uid)))
    sel.other_series = {uid: n for uid, n in counts.items() if uid != best}
    return next(c for c in pool if c.series_uid == best)


def _recover_missing(sel: SeriesSelection, kept, folder: Path, ref, seen, orientation, size,
                     search_levels: int, catalogue: CatalogueSource | None) -> list[Candidate]:
    """M2: gaps in Instance Number, looked for up the folder tree, then in the
    catalogue. Returns the images found (also in ``sel.recovered``); sets ``sel.missing``."""
    missing = set(_missing_numbers(kept))
    found_all: list[Candidate] = []
    scanned = [folder.resolve()]
    parent = folder.resolve()
    for _ in range(max(0, search_levels)):
        if not missing or parent.parent == parent:
            break
        parent = parent.parent
        found, _skip = scan_folder(parent, recursive=True, source="parent folder", exclude=scanned)
        scanned.append(parent)
        wanted = [c for c in found if c.instance_number in missing]
        got, _rej = _filter(wanted, ref, seen, orientation, size)
        for c in got:
            missing.discard(c.instance_number)
        found_all += got
    if missing and catalogue is not None:
        got, _rej = _filter(catalogue.find(ref, set(missing)), ref, seen, orientation, size)
        for c in got:
            missing.discard(c.instance_number)
        found_all += got
    sel.recovered += found_all
    sel.missing = sorted(missing)
    if sel.missing:
        sel.warnings.append(f"{len(sel.missing)} image(s) of the series not found anywhere "
                            f"(instance numbers {format_ranges(sel.missing, ', ')})")
    return found_all


def _order_along_normal(sel: SeriesSelection, kept, orientation) -> list[Candidate]:
    """``kept`` ordered along the normal; positions taken twice keep the lower Instance
    Number (the others go to ``sel.skipped`` with a warning)."""
    normal = np.cross(orientation[:3], orientation[3:6]) if orientation else np.array([0, 0, 1.0])
    kept.sort(key=lambda c: (float(np.dot(c.position, normal)), c.instance_number or 0))
    unique: list[Candidate] = []
    for c in kept:
        if unique and abs(float(np.dot(np.subtract(c.position, unique[-1].position), normal))) < 1e-3:
            sel.skipped.append(Skipped(c.name, f"same position as {unique[-1].name}"))
            note = "images at an occupied position were left out (kept the lower Instance Number)"
            if note not in sel.warnings:
                sel.warnings.append(note)
            continue
        unique.append(c)
    return unique


def _check_volume(sel: SeriesSelection, threshold: int, ref, folder: Path) -> None:
    """Refuse (``sel.refusal``) too few images or images that do not form one volume;
    else add the geometry's warnings."""
    if len(sel.kept) < threshold:
        sel.refusal = (f"MPR needs at least {threshold} images of one series; found "
                       f"{len(sel.kept)} usable image(s) of series #{ref.series_number} "
                       f"({ref.modality or '?'}) in {folder}"
                       + (f", {len(sel.missing)} missing" if sel.missing else ""))
        return
    try:
        placement = build_geometry(sel.slice_geometries())
    except VolumeError as e:
        sel.refusal = f"the images do not form one volume: {e}"
        return
    sel.warnings += placement.warnings
