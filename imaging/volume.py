"""One voxel array in patient coordinates, filled progressively. No Qt.

:func:`build_geometry` turns the slices of a series (ImagePositionPatient,
ImageOrientationPatient, PixelSpacing) into a regular grid: voxel ``(x, y, z)`` (column,
row, slot) sits at ``origin + x*axes[:, 0] + y*axes[:, 1] + z*axes[:, 2]`` (patient LPS,
mm). ``axes[:, 2]`` is the fitted step from slot to slot, so a gantry tilt gives a sheared
grid and every slice keeps its true position. Slices are placed in the slot nearest to
their position along the slice normal; a slot no slice lands in (a gap, a slice not
loaded yet) is filled from its neighbours.

:class:`Volume` holds the voxels in **one** array ``data[z, y, x]``, no per-slice copies.
Values are modality values (HU for CT) through one linear map: ``modality = data * scale
+ offset``. :func:`choose_storage` picks the narrowest exact form, so the array is as
large as the raw pixel data (at most 1.5× with the bookkeeping):

* the rescaled values fit a 8/16-bit integer exactly (CT: slope 1, integer intercept)
  → stored as modality values (``scale = 1, offset = 0``);
* one common slope/intercept that does not give integers → the stored values, with
  ``scale = slope, offset = intercept``;
* slopes or intercepts that differ per slice (PET, some MR) → re-quantised to int16 with one
  common linear map (values within range/65000 of the originals).

Progressive updates (H2, P9): :meth:`Volume.set_slice` takes a slice at any resolution
(upsampled bilinearly to the grid) with a *quality*; a slice never replaces one of higher
quality (STYLE 9). Slots without data of their own are interpolated from the nearest
slices that have some, and replaced once their own data arrives. Updates made inside
:meth:`Volume.batch` are announced once, as one :class:`VolumeUpdate`, to the
subscribers — the consistent sets the server recommends to render.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "VolumeError",
    "SliceGeometry",
    "VolumeGeometry",
    "build_geometry",
    "Storage",
    "choose_storage",
    "quality_key",
    "NO_DATA",
    "VolumeUpdate",
    "Volume",
    "GridPlacement",
    "volume_for_slices",
]

NO_DATA = -1
"""Quality of a slot holding no data of its own."""

MAX_SLOTS_PER_SLICE = 3
"""Refuse grids with more than this many slots per slice (slices far apart)."""


class VolumeError(ValueError):
    """The slices cannot form a volume (with the reason)."""


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class SliceGeometry:
    """Where one slice lies: the DICOM plane attributes."""

    position: tuple[float, float, float]            # ImagePositionPatient (mm)
    orientation: tuple[float, ...]                  # ImageOrientationPatient (6 cosines)
    pixel_spacing: tuple[float, float]              # (row spacing, column spacing) mm
    rows: int
    columns: int
    thickness: float | None = None                  # SliceThickness / SpacingBetweenSlices

    @property
    def row_dir(self) -> np.ndarray:
        """Direction of increasing column index (across a row)."""
        v = np.asarray(self.orientation[:3], float)
        return v / np.linalg.norm(v)

    @property
    def col_dir(self) -> np.ndarray:
        """Direction of increasing row index (down a column)."""
        v = np.asarray(self.orientation[3:6], float)
        return v / np.linalg.norm(v)

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row_dir, self.col_dir)
        return n / np.linalg.norm(n)


@dataclass(frozen=True)
class VolumeGeometry:
    """A regular (possibly sheared) grid in patient space; index order (x, y, z)."""

    shape: tuple[int, int, int]                     # (nz, ny, nx): the array shape
    origin: tuple[float, float, float]              # patient position of voxel (0, 0, 0)
    axes: tuple[tuple[float, ...], ...]             # 3x3, rows = patient step of x, y, z

    @property
    def matrix(self) -> np.ndarray:
        """3x3 matrix M with patient = origin + M @ (x, y, z)."""
        return np.asarray(self.axes, float).T

    @property
    def affine(self) -> np.ndarray:
        """4x4 homogeneous index (x, y, z, 1) → patient matrix."""
        a = np.eye(4)
        a[:3, :3] = self.matrix
        a[:3, 3] = self.origin
        return a

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Length (mm) of one step along x, y, z."""
        m = self.matrix
        return tuple(float(np.linalg.norm(m[:, i])) for i in range(3))  # type: ignore[return-value]

    def direction(self, i: int) -> np.ndarray:
        m = self.matrix
        return m[:, i] / np.linalg.norm(m[:, i])

    @property
    def normal(self) -> np.ndarray:
        """Slice normal (row direction × column direction)."""
        n = np.cross(self.direction(0), self.direction(1))
        return n / np.linalg.norm(n)

    @property
    def slice_spacing(self) -> float:
        """Distance between slot planes along the normal (mm)."""
        return float(abs(np.dot(self.matrix[:, 2], self.normal)))

    @property
    def tilt_degrees(self) -> float:
        """Angle between the slot step and the slice normal (gantry tilt)."""
        step = self.direction(2)
        return float(math.degrees(math.acos(min(1.0, abs(float(np.dot(step, self.normal)))))))

    def index_to_patient(self, xyz) -> np.ndarray:
        """Index coordinates (..., 3) in (x, y, z) order → patient points (..., 3)."""
        xyz = np.asarray(xyz, float)
        return xyz @ self.matrix.T + np.asarray(self.origin)

    def patient_to_index(self, points) -> np.ndarray:
        """Patient points (..., 3) → continuous index coordinates (x, y, z)."""
        p = np.asarray(points, float) - np.asarray(self.origin)
        return p @ np.linalg.inv(self.matrix).T

    def corners(self) -> np.ndarray:
        """The 8 corner voxel centres in patient space (8, 3)."""
        nz, ny, nx = self.shape
        idx = np.array([[x, y, z] for z in (0, nz - 1) for y in (0, ny - 1) for x in (0, nx - 1)], float)
        return self.index_to_patient(idx)

    @property
    def center(self) -> np.ndarray:
        nz, ny, nx = self.shape
        return self.index_to_patient([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2])

    def contains_index(self, xyz, margin: float = 0.5) -> np.ndarray:
        nz, ny, nx = self.shape
        xyz = np.asarray(xyz, float)
        lo = -margin
        return ((xyz[..., 0] >= lo) & (xyz[..., 0] <= nx - 1 + margin)
                & (xyz[..., 1] >= lo) & (xyz[..., 1] <= ny - 1 + margin)
                & (xyz[..., 2] >= lo) & (xyz[..., 2] <= nz - 1 + margin))

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "origin": list(self.origin),
                "axes": [list(a) for a in self.axes], "spacing": list(self.spacing)}


@dataclass
class GridPlacement:
    """What :func:`build_geometry` found: the grid, the slot of each slice (in the
    caller's order) and warnings."""

    geometry: VolumeGeometry
    slots: list[int]
    warnings: list[str] = field(default_factory=list)


def build_geometry(slices: Sequence[SliceGeometry], *, irregular_tolerance: float = 0.1,
                   tilt_tolerance_deg: float = 0.5) -> GridPlacement:
    """Grid for ``slices`` (any order; they must share orientation, size and spacing).

    The slot step is the median distance between neighbouring slices along the normal;
    each slice goes into the nearest slot. Warns on irregular spacing (a slice more than
    ``irregular_tolerance`` of a step off its slot), on gaps (empty slots) and on gantry
    tilt; raises :class:`VolumeError` on mixed orientations or sizes, two slices in one
    slot, or a grid much longer than the slices can fill.
    """
    if not slices:
        raise VolumeError("no slices")
    ref = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (ref.rows, ref.columns):
            raise VolumeError(f"slices differ in size: {ref.columns}x{ref.rows} and {s.columns}x{s.rows}")
        if not np.allclose(s.orientation[:6], ref.orientation[:6], atol=1e-3):
            raise VolumeError("slices differ in orientation (ImageOrientationPatient)")
        if not np.allclose(s.pixel_spacing, ref.pixel_spacing, rtol=1e-3):
            raise VolumeError(f"slices differ in pixel spacing: {ref.pixel_spacing} and {s.pixel_spacing}")
    warnings: list[str] = []
    normal = ref.normal
    pos = np.array([s.position for s in slices], float)
    d = pos @ normal
    order = np.argsort(d, kind="stable")
    ds = d[order]
    row_sp, col_sp = float(ref.pixel_spacing[0]), float(ref.pixel_spacing[1])
    n = len(slices)
    if n == 1:
        thick = float(ref.thickness or min(row_sp, col_sp) or 1.0)
        slots = [0]
        step_vec = normal * thick
        origin = pos[0]
    else:
        gaps = np.diff(ds)
        positive = gaps[gaps > 1e-4]
        if positive.size == 0:
            raise VolumeError("all slices lie at the same position")
        step = float(np.median(positive))
        if step <= 1e-4:
            raise VolumeError("slices lie at (nearly) the same positions")
        rel = (ds - ds[0]) / step
        slot_sorted = np.rint(rel).astype(int)
        if len(set(slot_sorted.tolist())) != n:
            raise VolumeError("two slices fall into the same place along the slice normal "
                              "(duplicates or two acquisitions mixed): select one series")
        nz = int(slot_sorted[-1]) + 1
        if nz > MAX_SLOTS_PER_SLICE * n:
            raise VolumeError(f"the slices are spread over {nz} slots of {step:.2f} mm for only {n} "
                              "slices: not one contiguous volume")
        off = float(np.max(np.abs(rel - slot_sorted)))
        if off > irregular_tolerance:
            warnings.append(f"irregular slice spacing: slices up to {off * step:.2f} mm away from a "
                            f"regular {step:.2f} mm grid (placed at the nearest position)")
        if nz > n:
            warnings.append(f"{nz - n} gap(s) in the slice positions: "
                            "interpolated from the neighbouring slices")
        # least-squares step vector (keeps the in-plane drift of a gantry tilt)
        ps = pos[order]
        t = slot_sorted.astype(float)
        tm = t.mean()
        step_vec = ((t - tm)[:, None] * (ps - ps.mean(axis=0))).sum(axis=0) / ((t - tm) ** 2).sum()
        origin = ps.mean(axis=0) - tm * step_vec
        slots = [0] * n
        for k, idx in enumerate(order):
            slots[int(idx)] = int(slot_sorted[k])
    axes = (tuple(ref.row_dir * col_sp), tuple(ref.col_dir * row_sp), tuple(float(v) for v in step_vec))
    geom = VolumeGeometry((max(slots) + 1, ref.rows, ref.columns),
                          tuple(float(v) for v in origin), axes)  # type: ignore[arg-type]
    if n > 1 and geom.tilt_degrees > tilt_tolerance_deg:
        warnings.append(f"gantry tilt of {geom.tilt_degrees:.1f}°: the volume is sheared so that "
                        "every slice keeps its true position")
    return GridPlacement(geom, slots, warnings)


# --------------------------------------------------------------------------- storage
@dataclass(frozen=True)
class Storage:
    """How voxel values are kept: ``modality = data * scale + offset``."""

    dtype: np.dtype
    scale: float = 1.0
    offset: float = 0.0
    note: str = ""


_INT_TYPES = (np.uint8, np.int8, np.int16, np.uint16)


def _fits(dtype, lo: float, hi: float) -> bool:
    info = np.iinfo(dtype)
    return info.min <= lo and hi <= info.max


def choose_storage(rescales: Sequence[tuple[float, float]], stored_range: tuple[int, int]) -> Storage:
    """Narrowest exact storage for slices with these (slope, intercept) pairs and stored
    values in ``stored_range`` (see the module docstring)."""
    pairs = {(float(s), float(i)) for s, i in rescales} or {(1.0, 0.0)}
    lo, hi = stored_range
    if len(pairs) == 1:
        slope, intercept = next(iter(pairs))
        if float(slope).is_integer() and float(intercept).is_integer():
            mlo, mhi = sorted((lo * slope + intercept, hi * slope + intercept))
            for dt in _INT_TYPES:
                if _fits(dt, mlo, mhi):
                    return Storage(np.dtype(dt), 1.0, 0.0, "modality values")
        for dt in _INT_TYPES:
            if _fits(dt, lo, hi):
                return Storage(np.dtype(dt), slope, intercept, "stored values, one rescale")
    mods = [v * s + i for s, i in pairs for v in (lo, hi)]
    mlo, mhi = min(mods), max(mods)
    span = max(mhi - mlo, 1e-6)
    return Storage(np.dtype(np.int16), span / 65000.0, (mhi + mlo) / 2.0,
                   "re-quantised to 16 bits (rescale differs per slice)")


def quality_key(reduce: int = 0, layers: int = 255, slab_level: int = 0) -> int:
    """Comparable quality of slice data: thinner first (``slab_level``: slabs of
    ``2**slab_level`` slices, 0 = the thin slices), then finer resolution (``reduce``:
    resolution levels discarded), then more quality layers. Higher is better."""
    return ((15 - min(slab_level, 15)) << 16) | ((63 - min(reduce, 63)) << 8) | min(layers, 255)


# --------------------------------------------------------------------------- volume
@dataclass(frozen=True)
class VolumeUpdate:
    """One announced change: which slots changed, the uniform quality reached (the lowest
    own quality over all slices, ``NO_DATA`` while a slot has none), and a label."""

    version: int
    slots: tuple[int, int]                  # [first, last] slot range that changed
    quality: int
    complete: bool                          # every slot holds own data of target quality
    label: str = ""


Listener = Callable[[VolumeUpdate], None]


def _upsample(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear, pixel-area aligned: low-resolution pixel (i, j) covers full-resolution
    pixels [i*f, (i+1)*f) (the JPEG 2000 reduce grid)."""
    if a.shape == shape:
        return a
    from scipy import ndimage

    h, w = shape
    fy, fx = a.shape[0] / h, a.shape[1] / w
    yy = (np.arange(h, dtype=np.float32) + 0.5) * fy - 0.5
    xx = (np.arange(w, dtype=np.float32) + 0.5) * fx - 0.5
    # separable: rows then columns (cheap, exact bilinear)
    tmp = ndimage.map_coordinates(a.astype(np.float32), np.meshgrid(yy, np.arange(a.shape[1], dtype=np.float32),
                                                                    indexing="ij"), order=1, mode="nearest")
    return ndimage.map_coordinates(tmp, np.meshgrid(np.arange(h, dtype=np.float32), xx, indexing="ij"),
                                   order=1, mode="nearest")


class Volume:
    """Voxels of one series in patient space (see the module docstring).

    ``slice_ids`` names what each slot is filled from (for example the image index in the
    series), None for slots no slice lands in.
    """

    def __init__(self, geometry: VolumeGeometry, storage: Storage | None = None, *,
                 modality: str = "", series_uid: str = "", fill_value: float | None = None,
                 slice_ids: Sequence[object | None] | None = None,
                 raw_bytes_per_voxel: int | None = None) -> None:
        self.geometry = geometry
        self.storage = storage or Storage(np.dtype(np.int16))
        self.modality = modality
        self.series_uid = series_uid
        nz, ny, nx = geometry.shape
        self.scale = float(self.storage.scale)
        self.offset = float(self.storage.offset)
        if fill_value is None:
            fill_value = -1024.0 if modality.upper() == "CT" else 0.0
        self.fill_value = float(fill_value)
        self.data = np.empty(geometry.shape, self.storage.dtype)
        self.data[...] = self._to_storage(np.float32(self.fill_value))
        self.own = np.full(nz, NO_DATA, np.int32)           # quality of the slot's own data
        self.slice_ids = list(slice_ids) if slice_ids is not None else [None] * nz
        self.raw_bytes_per_voxel = raw_bytes_per_voxel or self.data.itemsize
        self.lock = threading.RLock()
        self.version = 0
        self.target_quality = quality_key()     # what counts as complete (see VolumeUpdate)
        self.warnings: list[str] = []
        self._listeners: list[Listener] = []
        self._batch_depth = 0
        self._dirty: list[int] = []

    # ------------------------------------------------------------------ basics
    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    def memory_bytes(self) -> int:
        """Bytes held by the volume: the voxel array and the per-slot bookkeeping."""
        return int(self.data.nbytes + self.own.nbytes)

    def raw_bytes(self) -> int:
        """Bytes of the raw pixel data the volume stands for."""
        nz, ny, nx = self.shape
        return nz * ny * nx * self.raw_bytes_per_voxel

    def to_modality(self, values: np.ndarray) -> np.ndarray:
        """Stored voxel values → modality values (float32)."""
        v = np.asarray(values, np.float32)
        if self.scale != 1.0:
            v = v * np.float32(self.scale)
        if self.offset != 0.0:
            v = v + np.float32(self.offset)
        return v

    def modality_array(self) -> np.ndarray:
        """The whole volume in modality units (float32 copy; for tests and small data)."""
        with self.lock:
            return self.to_modality(self.data)

    def _to_storage(self, modality: np.ndarray) -> np.ndarray:
        v = np.asarray(modality, np.float32)
        if self.scale != 1.0 or self.offset != 0.0:
            v = (v - np.float32(self.offset)) / np.float32(self.scale)
        if np.issubdtype(self.storage.dtype, np.integer):
            info = np.iinfo(self.storage.dtype)
            v = np.clip(np.rint(v), info.min, info.max)
        return v.astype(self.storage.dtype)

    def value_range(self) -> tuple[float, float]:
        with self.lock:
            lo, hi = float(self.data.min()), float(self.data.max())
        a, b = self.to_modality(np.array([lo, hi]))
        return (float(min(a, b)), float(max(a, b)))

    # ------------------------------------------------------------------ listeners
    def subscribe(self, fn: Listener) -> None:
        """Call ``fn(update)`` after every announced change (on the updating thread)."""
        self._listeners.append(fn)

    def unsubscribe(self, fn: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    # ------------------------------------------------------------------ updates
    @contextlib.contextmanager
    def batch(self, label: str = "") -> Iterator[None]:
        """Group updates: neighbours are re-interpolated and listeners called once."""
        with self.lock:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
                if self._batch_depth == 0:
                    self._flush(label)

    def set_slice(self, slot: int, stored: np.ndarray, *, slope: float = 1.0,
                  intercept: float = 0.0, quality: int | None = None) -> bool:
        """Put the data of one slice into slot ``slot``; returns False when refused.

        ``stored`` is (h, w) stored values at any resolution (upsampled to the grid when
        smaller); ``slope``/``intercept`` its modality rescale. Refused when the slot
        already holds data of higher ``quality`` (default: best possible).
        """
        q = quality_key() if quality is None else int(quality)
        nz, ny, nx = self.shape
        if not 0 <= slot < nz:
            raise IndexError(f"slot {slot} outside the volume (0-{nz - 1})")
        stored = np.asarray(stored)
        if stored.ndim != 2:
            raise VolumeError(f"a slice must be a 2-D grey-level array, got shape {stored.shape}")
        with self.lock:
            if q < self.own[slot]:
                return False
            values = stored.astype(np.float32)
            if slope != 1.0:
                values *= np.float32(slope)
            if intercept != 0.0:
                values += np.float32(intercept)
            if values.shape != (ny, nx):
                values = _upsample(values, (ny, nx))
            self.data[slot] = self._to_storage(values)
            self.own[slot] = q
            self._dirty.append(slot)
            if self._batch_depth == 0:
                self._flush("")
            return True

    def _flush(self, label: str) -> None:
        if not self._dirty:
            return
        lo, hi = min(self._dirty), max(self._dirty)
        self._dirty.clear()
        lo, hi = self._refill_around(lo, hi)
        self.version += 1
        owned = self.own[self.own != NO_DATA]
        uniform = int(owned.min()) if owned.size == self.own.size else NO_DATA
        complete = bool(self.own.size) and uniform >= self.target_quality
        update = VolumeUpdate(self.version, (lo, hi), uniform, complete, label)
        for fn in list(self._listeners):
            fn(update)

    def _refill_around(self, lo: int, hi: int) -> tuple[int, int]:
        """Re-interpolate the slots without data between the owned slots around lo..hi."""
        have = np.flatnonzero(self.own != NO_DATA)
        if have.size == 0:
            return lo, hi
        nz = self.shape[0]
        left = have[have < lo]
        right = have[have > hi]
        a = int(left[-1]) if left.size else 0
        b = int(right[0]) if right.size else nz - 1
        prev = None
        for z in range(a, b + 1):
            if self.own[z] != NO_DATA:
                if prev is not None and z - prev > 1:
                    self._interpolate(prev, z)
                elif prev is None and z > a:
                    self.data[a:z] = self.data[z]
                prev = z
        if prev is not None and prev < b:
            self.data[prev + 1:b + 1] = self.data[prev]
        return a, b

    def _interpolate(self, p: int, q: int) -> None:
        dp = self.data[p].astype(np.float32)
        dq = self.data[q].astype(np.float32)
        integer = np.issubdtype(self.data.dtype, np.integer)
        for z in range(p + 1, q):
            w = (z - p) / (q - p)
            v = dp * np.float32(1 - w) + dq * np.float32(w)
            self.data[z] = np.rint(v) if integer else v

    # ------------------------------------------------------------------ status
    def own_slots(self) -> np.ndarray:
        """Slots holding data of their own."""
        return np.flatnonzero(self.own != NO_DATA)

    def filled_slots(self) -> np.ndarray:
        """Slots showing data interpolated from their neighbours."""
        return np.flatnonzero(self.own == NO_DATA)

    def uniform_quality(self) -> int:
        """The lowest own quality over all slots (``NO_DATA`` while one has none)."""
        return int(self.own.min()) if self.own.size else NO_DATA


def volume_for_slices(slices: Sequence[SliceGeometry], rescales: Sequence[tuple[float, float]],
                      stored_range: tuple[int, int], *, modality: str = "", series_uid: str = "",
                      slice_ids: Sequence[object] | None = None,
                      raw_bytes_per_voxel: int = 2) -> tuple[Volume, list[int]]:
    """An empty :class:`Volume` for these slices; returns it and each slice's slot."""
    placement = build_geometry(slices)
    storage = choose_storage(rescales, stored_range)
    ids: list[object | None] = [None] * placement.geometry.shape[0]
    for k, slot in enumerate(placement.slots):
        ids[slot] = slice_ids[k] if slice_ids is not None else k
    vol = Volume(placement.geometry, storage, modality=modality, series_uid=series_uid,
                 slice_ids=ids, raw_bytes_per_voxel=raw_bytes_per_voxel)
    vol.warnings = list(placement.warnings)
    return vol, placement.slots
