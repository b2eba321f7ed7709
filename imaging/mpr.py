"""Multi-planar reformatting: planes in patient space, reslicing, thick slabs, labels. No Qt.

Conventions (patient coordinates are DICOM LPS: +x Left, +y Posterior, +z Head):

* A :class:`PlaneGeometry` is an output image: pixel ``(row i, column j)`` has its centre
  at ``origin + j * spacing * u + i * spacing * v``; ``u`` points right on screen, ``v``
  down, the normal ``u × v`` into the screen. Pixels are square (``spacing`` mm).
* The three standard panes (radiological convention, patient's right on screen left):
  axial ``u = +x (L), v = +y (P)``; coronal ``u = +x (L), v = -z (F)``; sagittal
  ``u = +y (P), v = -z (F)``.
* :class:`MprState` holds what the panes share: the crosshair centre, each pane's
  plane axes, the slab thickness and mode, the window. Rotating the crosshair in one pane
  turns the *other two* planes about that pane's normal (the pane itself keeps its
  orientation on screen); the three planes stay orthogonal, so two rotations in two panes
  give any double-oblique plane.

:func:`reslice` samples a volume on a plane with trilinear interpolation on worker
threads (2 by default): with vtkImageReslice (multithreaded C++, bound to the voxel array
without a copy), or with ``scipy.ndimage.map_coordinates`` as the reference backend, whose
bands of rows run through the ``mapper`` the caller gives (the app's worker pool, see
:meth:`client.pool.WorkerPool.mapper`; this layer starts no threads). Thick slabs sample
planes along the normal one voxel step apart across the slab and combine them by maximum
(MIP), minimum (MinIP) or mean. Results are float32 modality values (HU for CT); pixels
outside the volume are NaN.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .orientation import EdgeLabels, direction_label
from .volume import Volume, VolumeGeometry

__all__ = [
    "PLANES",
    "BASE_AXES",
    "SLAB_MODES",
    "rotation_matrix",
    "angles_rotation",
    "PlaneGeometry",
    "plane_labels",
    "voxel_step",
    "slab_offsets",
    "fit_plane",
    "reslice",
    "MprState",
    "RESLICE_THREADS",
    "DEFAULT_BACKEND",
    "backend_available",
    "display_uint8",
]

PLANES = ("axial", "coronal", "sagittal")
BASE_AXES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}
SLAB_MODES = ("avg", "mip", "minip")
RESLICE_THREADS = max(1, min(2, os.cpu_count() or 1))
"""Threads :func:`reslice` splits rows over (the benchmark target is for 2 cores)."""

Mapper = Callable[[Callable, Iterable], Iterable]
"""``map(fn, items)``: results in order (the builtin runs them one after the other; the
app gives its worker pool's :meth:`~client.pool.WorkerPool.mapper`)."""


# --------------------------------------------------------------------------- rotations
def rotation_matrix(axis: Sequence[float], degrees: float) -> np.ndarray:
    """Right-handed rotation by ``degrees`` about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = math.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def angles_rotation(a: float, b: float) -> np.ndarray:
    """The rotation of ``--angles A,B``: ``A`` degrees about the patient's left-right axis
    (x: tilts the axial plane towards the coronal), then ``B`` degrees about the
    anterior-posterior axis (y). Both non-zero give a double-oblique plane."""
    return rotation_matrix((0, 1, 0), b) @ rotation_matrix((1, 0, 0), a)


# --------------------------------------------------------------------------- planes
@dataclass(frozen=True)
class PlaneGeometry:
    """An output image in patient space (see the module docstring)."""

    origin: tuple[float, float, float]       # centre of pixel (0, 0)
    u: tuple[float, float, float]            # unit vector, screen right (columns)
    v: tuple[float, float, float]            # unit vector, screen down (rows)
    spacing: float                           # mm per pixel (square pixels)
    shape: tuple[int, int]                   # (rows, columns)

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.u, self.v)
        return n / np.linalg.norm(n)

    @property
    def center(self) -> np.ndarray:
        h, w = self.shape
        return self.pixel_to_patient((h - 1) / 2, (w - 1) / 2)

    def pixel_to_patient(self, row, col) -> np.ndarray:
        """Patient point(s) of (continuous) pixel coordinates; pixel centres are integers."""
        row = np.asarray(row, float)[..., None]
        col = np.asarray(col, float)[..., None]
        s = self.spacing
        return np.asarray(self.origin) + col * s * np.asarray(self.u) + row * s * np.asarray(self.v)

    def patient_to_pixel(self, point) -> tuple[float, float, float]:
        """(row, column, signed distance from the plane in mm) of a patient point."""
        d = np.asarray(point, float) - np.asarray(self.origin)
        return (float(d @ np.asarray(self.v)) / self.spacing,
                float(d @ np.asarray(self.u)) / self.spacing, float(d @ self.normal))

    def labels(self) -> EdgeLabels:
        return plane_labels(self.u, self.v)

    def to_json(self) -> dict:
        return {"origin": list(self.origin), "u": list(self.u), "v": list(self.v),
                "normal": [float(x) for x in self.normal], "spacing": [self.spacing, self.spacing],
                "shape": list(self.shape)}


def plane_labels(u: Sequence[float], v: Sequence[float]) -> EdgeLabels:
    """Orientation letters at the middle of each edge of a plane with screen axes u, v
    (any orientation: an oblique plane gets two or three letters, strongest first)."""
    u = [float(x) for x in u]
    v = [float(x) for x in v]
    return EdgeLabels(left=direction_label([-x for x in u]), right=direction_label(u),
                      top=direction_label([-x for x in v]), bottom=direction_label(v))


def voxel_step(geometry: VolumeGeometry, direction: Sequence[float]) -> float:
    """Distance (mm) along ``direction`` that moves one voxel along the fastest-changing
    index: the natural scroll step and slab sampling step for a plane with that normal."""
    d = np.asarray(direction, float)
    d = d / np.linalg.norm(d)
    per_mm = np.abs(np.linalg.inv(geometry.matrix) @ d)
    return float(1.0 / max(per_mm.max(), 1e-9))


def slab_offsets(geometry: VolumeGeometry, normal: Sequence[float], thickness: float,
                 max_samples: int = 256) -> np.ndarray:
    """Distances (mm) along ``normal`` at which a slab of ``thickness`` is sampled: one
    voxel step apart, symmetric about the plane, at most ``max_samples``."""
    if thickness <= 0:
        return np.zeros(1)
    step = voxel_step(geometry, normal)
    n = int(min(max(1, math.ceil(thickness / step)), max_samples))
    return (np.arange(n) + 0.5) * (thickness / n) - thickness / 2.0


def fit_plane(geometry: VolumeGeometry, u: Sequence[float], v: Sequence[float], *,
              through: Sequence[float] | None = None, spacing: float | None = None,
              max_side: int = 2048) -> PlaneGeometry:
    """A plane with axes u, v through ``through`` (default the volume centre), large
    enough to show the whole volume, with square pixels of ``spacing`` (default the
    smallest voxel spacing)."""
    u = np.asarray(u, float) / np.linalg.norm(u)
    v = np.asarray(v, float) / np.linalg.norm(v)
    n = np.cross(u, v)
    vc = geometry.center
    p = vc if through is None else np.asarray(through, float)
    c = vc + float(np.dot(p - vc, n)) * n            # projection of the volume centre
    s = float(spacing or min(geometry.spacing))
    rel = geometry.corners() - c
    half_u = float(np.abs(rel @ u).max()) + s / 2
    half_v = float(np.abs(rel @ v).max()) + s / 2
    w = int(min(max(1, math.ceil(2 * half_u / s)), max_side))
    h = int(min(max(1, math.ceil(2 * half_v / s)), max_side))
    s = max(s, 2 * half_u / max_side, 2 * half_v / max_side)
    origin = c - (w - 1) / 2 * s * u - (h - 1) / 2 * s * v
    return PlaneGeometry(tuple(origin), tuple(u), tuple(v), s, (h, w))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reslice
def _scipy_rows(data: np.ndarray, o: np.ndarray, du: np.ndarray, dv: np.ndarray,
                rows: tuple[int, int], width: int, offsets: np.ndarray, dn: np.ndarray,
                mode: str) -> np.ndarray:
    """Reference backend: trilinear sampling of rows ``rows`` with map_coordinates."""
    from scipy import ndimage

    r0, r1 = rows
    nz, ny, nx = data.shape
    i = np.arange(r0, r1, dtype=np.float64)[:, None]
    j = np.arange(width, dtype=np.float64)[None, :]
    out = None
    count = None
    for t in offsets:
        base = o + t * dn
        cx = base[0] + i * dv[0] + j * du[0]
        cy = base[1] + i * dv[1] + j * du[1]
        cz = base[2] + i * dv[2] + j * du[2]
        vals = ndimage.map_coordinates(data, (cz, cy, cx), order=1, mode="nearest",
                                       prefilter=False, output=np.float32)
        outside = ((cx < -0.5) | (cx > nx - 0.5) | (cy < -0.5) | (cy > ny - 0.5)
                   | (cz < -0.5) | (cz > nz - 0.5))
        if mode == "avg":
            vals[outside] = 0.0
            if out is None:
                out, count = vals, (~outside).astype(np.float32)
            else:
                out += vals
                count += ~outside
            continue
        vals[outside] = np.nan
        if out is None:
            out = vals
        elif mode == "mip":
            np.fmax(out, vals, out=out)
        else:
            np.fmin(out, vals, out=out)
    if count is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(count > 0, out / np.maximum(count, 1), np.nan).astype(np.float32)
    return out


def _reslice_scipy(data, o, du, dv, dn, offsets, shape, mode, threads,
                   mapper: Mapper) -> np.ndarray:
    h, w = shape
    n = min(max(1, threads), h)
    if n == 1:
        return _scipy_rows(data, o, du, dv, (0, h), w, offsets, dn, mode)
    bounds = [(h * k // n, h * (k + 1) // n) for k in range(n)]
    parts = list(mapper(
        lambda b: _scipy_rows(data, o, du, dv, b, w, offsets, dn, mode), bounds))
    return np.concatenate(parts, axis=0)


class _VtkReslicer:
    """A vtkImageReslice bound (without copying) to one voxel array.

    The input image is the array in *index* space (origin 0, spacing 1), and the reslice
    axes carry the whole plane: any oblique, sheared or anisotropic geometry is one
    general 4x4 matrix. Not thread-safe: one per thread (see :func:`_vtk_reslicer`).
    """

    def __init__(self, data: np.ndarray, threads: int) -> None:
        from vtkmodules.util.numpy_support import numpy_to_vtk
        from vtkmodules.vtkCommonDataModel import vtkImageData
        from vtkmodules.vtkImagingCore import vtkImageReslice
        from vtkmodules.vtkCommonMath import vtkMatrix4x4

        self.data = data
        nz, ny, nx = data.shape
        image = vtkImageData()
        image.SetDimensions(nx, ny, nz)
        image.SetSpacing(1.0, 1.0, 1.0)
        image.SetOrigin(0.0, 0.0, 0.0)
        image.GetPointData().SetScalars(numpy_to_vtk(data.reshape(-1), deep=False))
        self.image = image
        r = vtkImageReslice()
        r.SetInputData(image)
        r.SetOutputDimensionality(2)
        r.SetInterpolationModeToLinear()
        r.SetOutputScalarType(10)            # VTK_FLOAT
        r.SetOutputSpacing(1.0, 1.0, 1.0)
        r.SetOutputOrigin(0.0, 0.0, 0.0)
        r.TransformInputSamplingOff()
        r.AutoCropOutputOff()
        r.BorderOn()                         # half a voxel beyond the edges still samples
        r.SetNumberOfThreads(threads)
        self.reslice = r
        self.axes = vtkMatrix4x4()
        r.SetResliceAxes(self.axes)

    def run(self, o, du, dv, dn, n_samples: int, shape, mode: str, background: float) -> np.ndarray:
        from vtkmodules.util.numpy_support import vtk_to_numpy

        h, w = shape
        for k in range(3):
            self.axes.SetElement(k, 0, float(du[k]))
            self.axes.SetElement(k, 1, float(dv[k]))
            self.axes.SetElement(k, 2, float(dn[k]))
            self.axes.SetElement(k, 3, float(o[k]))
        r = self.reslice
        r.SetOutputExtent(0, w - 1, 0, h - 1, 0, 0)
        # VTK 9.7's fast path for axis-aligned (permutation) axes misplaces slab samples;
        # slabs take the general path, thin slices keep the fast one
        r.SetOptimization(n_samples <= 1)
        r.SetSlabNumberOfSlices(max(1, n_samples))
        r.SetSlabSliceSpacingFraction(1.0)
        {"avg": r.SetSlabModeToMean, "mip": r.SetSlabModeToMax, "minip": r.SetSlabModeToMin}[mode]()
        r.SetBackgroundLevel(background)
        self.image.Modified()                # the voxels may have changed in place
        r.Modified()
        r.Update()
        out = vtk_to_numpy(r.GetOutput().GetPointData().GetScalars())
        return np.array(out, dtype=np.float32, copy=True).reshape(h, w)


_local = threading.local()


def _vtk_reslicer(volume: Volume, threads: int) -> _VtkReslicer:
    cache = getattr(_local, "reslicers", None)
    if cache is None:
        cache = _local.reslicers = {}
    key = id(volume.data)
    item = cache.get(key)
    if item is None or item.data is not volume.data:
        if len(cache) > 4:
            cache.clear()
        item = cache[key] = _VtkReslicer(volume.data, threads)
    return item


def _valid_mask(o, du, dv, shape, dims) -> np.ndarray:
    """Pixels of the central plane that lie inside the volume (half a voxel margin)."""
    h, w = shape
    i = np.arange(h, dtype=np.float64)[:, None]
    j = np.arange(w, dtype=np.float64)[None, :]
    mask = np.ones(shape, bool)
    for k, n in enumerate(dims):
        c = o[k] + i * dv[k] + j * du[k]
        mask &= (c >= -0.5) & (c <= n - 0.5)
    return mask


def backend_available(name: str) -> bool:
    """``"vtk"`` (vtkImageReslice, default) or ``"scipy"`` (map_coordinates, reference)."""
    try:
        if name == "vtk":
            import vtkmodules.vtkImagingCore  # noqa: F401
        elif name == "scipy":
            import scipy.ndimage  # noqa: F401
        else:
            return False
    except ImportError:
        return False
    return True


DEFAULT_BACKEND = "vtk" if backend_available("vtk") else "scipy"
"""The reslice backend used when none is named."""


def reslice(volume: Volume, plane: PlaneGeometry, *, slab: float = 0.0, mode: str = "avg",
            max_samples: int = 256, threads: int | None = None, lock: bool = True,
            backend: str | None = None, mapper: Mapper | None = None) -> np.ndarray:
    """Sample ``volume`` on ``plane``: (rows, columns) float32 modality values, NaN outside.

    ``slab`` > 0 mm makes a thick slab combined by ``mode`` (``avg``, ``mip``, ``minip``),
    sampled one voxel step apart (at most ``max_samples`` planes). ``backend``: ``"vtk"``
    (vtkImageReslice, multithreaded C++) or ``"scipy"`` (map_coordinates, rows split in
    ``threads`` bands run through ``mapper``, default one after the other). The volume lock is held while sampling (``lock``), so a consistent set being
    applied is never seen half done.
    """
    if mode not in SLAB_MODES:
        raise ValueError(f"slab mode must be one of {', '.join(SLAB_MODES)}, got {mode!r}")
    backend = backend or DEFAULT_BACKEND
    if not backend_available(backend):
        raise RuntimeError(f"reslice backend {backend!r} is not available "
                           f"(vtk needs the vtk package, scipy needs scipy)")
    geom = volume.geometry
    minv = np.linalg.inv(geom.matrix)
    s = plane.spacing
    o = minv @ (np.asarray(plane.origin) - np.asarray(geom.origin))
    du = minv @ (np.asarray(plane.u) * s)
    dv = minv @ (np.asarray(plane.v) * s)
    dn = minv @ plane.normal
    offsets = slab_offsets(geom, plane.normal, slab, max_samples)
    n_threads = max(1, threads if threads is not None else RESLICE_THREADS)
    nz, ny, nx = volume.shape

    def run() -> np.ndarray:
        if backend == "scipy":
            return _reslice_scipy(volume.data, o, du, dv, dn, offsets, plane.shape, mode, n_threads,
                                  mapper or map)
        n = len(offsets)
        step = (offsets[1] - offsets[0]) if n > 1 else 1.0
        if n == 1:
            return _vtk_reslicer(volume, n_threads).run(o, du, dv, dn, 1, plane.shape, "avg", np.nan)
        background = {"mip": -3.0e38, "minip": 3.0e38}.get(mode, float(volume._to_storage(
            np.float32(volume.fill_value))))
        out = _vtk_reslicer(volume, n_threads).run(o, du, dv, dn * step, n, plane.shape, mode, background)
        out[~_valid_mask(o, du, dv, plane.shape, (nx, ny, nz))] = np.nan
        out[np.abs(out) > 1.0e38] = np.nan
        return out

    if lock:
        with volume.lock:
            out = run()
    else:
        out = run()
    if volume.scale != 1.0:
        out *= np.float32(volume.scale)
    if volume.offset != 0.0:
        out += np.float32(volume.offset)
    return out


def display_uint8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Windowed grey levels (the DICOM linear window, as :func:`imaging.windowing.apply_window`)
    of a resliced plane; NaN (outside the volume) is black."""
    width = max(float(width), 1.0)
    lo = center - 0.5 - (width - 1.0) / 2.0
    scale = np.float32(255.0 / max(width - 1.0, 1e-6))
    out = (np.asarray(values, np.float32) - np.float32(lo)) * scale
    np.nan_to_num(out, copy=False, nan=0.0)
    np.clip(out, 0.0, 255.0, out=out)
    return np.rint(out).astype(np.uint8)


# --------------------------------------------------------------------------- state
Listener = Callable[[str], None]


class MprState:
    """What the MPR panes share; views subscribe to its change events.

    Events (the string passed to listeners): ``"center"``, ``"planes"`` (a rotation),
    ``"slab"``, ``"window"``, ``"volume"`` (new voxel data), ``"reset"``.
    """

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.center = np.asarray(volume.geometry.center, float)
        self.axes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.slab = 0.0
        self.slab_mode = "avg"
        self.window: tuple[float, float] | None = None
        self.mapper: Mapper | None = None       # where reslice bands run (the app's pool)
        self._listeners: list[Listener] = []
        self._reset_axes()

    # ------------------------------------------------------------------ events
    def subscribe(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def unsubscribe(self, fn: Listener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def emit(self, kind: str) -> None:
        for fn in list(self._listeners):
            fn(kind)

    # ------------------------------------------------------------------ planes
    def _reset_axes(self, rotation: np.ndarray | None = None) -> None:
        r = np.eye(3) if rotation is None else np.asarray(rotation, float)
        self.axes = {name: (r @ np.asarray(u), r @ np.asarray(v)) for name, (u, v) in BASE_AXES.items()}

    def normal(self, name: str) -> np.ndarray:
        u, v = self.axes[name]
        n = np.cross(u, v)
        return n / np.linalg.norm(n)

    def rotate(self, name: str, degrees: float) -> None:
        """Rotate the crosshair in pane ``name``: the other two planes turn about its
        normal through the centre (positive = clockwise on screen)."""
        r = rotation_matrix(self.normal(name), degrees)
        for other in PLANES:
            if other != name:
                u, v = self.axes[other]
                self.axes[other] = (r @ u, r @ v)
        self.emit("planes")

    def set_angles(self, a: float, b: float) -> None:
        """All planes from the standard ones turned by :func:`angles_rotation`."""
        self._reset_axes(angles_rotation(a, b))
        self.emit("planes")

    def is_oblique(self, name: str, tolerance_deg: float = 0.5) -> bool:
        """True when the pane's normal is not along a patient axis."""
        n = np.abs(self.normal(name))
        return math.degrees(math.acos(min(1.0, float(n.max())))) > tolerance_deg

    def crosshair_lines(self, name: str) -> dict[str, tuple[float, float]]:
        """For each other plane, the direction (du, dv) of its line in pane ``name``."""
        n = self.normal(name)
        u, v = self.axes[name]
        out = {}
        for other in PLANES:
            if other == name:
                continue
            d = np.cross(n, self.normal(other))
            norm = np.linalg.norm(d)
            if norm < 1e-9:
                continue
            d /= norm
            out[other] = (float(d @ u), float(d @ v))
        return out

    # ------------------------------------------------------------------ centre
    def set_center(self, point: Sequence[float]) -> None:
        self.center = np.asarray(point, float)
        self.emit("center")

    def scroll(self, name: str, steps: float = 1.0) -> None:
        """Move the centre along pane ``name``'s normal by whole voxel steps."""
        n = self.normal(name)
        self.set_center(self.center + steps * voxel_step(self.volume.geometry, n) * n)

    def step(self, name: str) -> float:
        return voxel_step(self.volume.geometry, self.normal(name))

    # ------------------------------------------------------------------ slab, window
    def set_slab(self, thickness: float, mode: str | None = None) -> None:
        if mode is not None and mode not in SLAB_MODES:
            raise ValueError(f"slab mode must be one of {', '.join(SLAB_MODES)}")
        self.slab = max(0.0, float(thickness))
        if mode is not None:
            self.slab_mode = mode
        self.emit("slab")

    def set_window(self, center: float, width: float) -> None:
        self.window = (float(center), max(float(width), 1.0))
        self.emit("window")

    def volume_changed(self) -> None:
        self.emit("volume")

    def reset(self) -> None:
        self.center = np.asarray(self.volume.geometry.center, float)
        self._reset_axes()
        self.slab = 0.0
        self.emit("reset")

    # ------------------------------------------------------------------ geometry
    def plane(self, name: str, shape: tuple[int, int], spacing: float,
              pan: tuple[float, float] = (0.0, 0.0)) -> PlaneGeometry:
        """The pane's output image: through the crosshair centre, centred on the
        projection of the volume centre moved by ``pan`` (mm along u, v)."""
        u, v = self.axes[name]
        n = np.cross(u, v)
        vc = self.volume.geometry.center
        c = vc + float(np.dot(self.center - vc, n)) * n + pan[0] * u + pan[1] * v
        h, w = shape
        origin = c - (w - 1) / 2 * spacing * u - (h - 1) / 2 * spacing * v
        return PlaneGeometry(tuple(origin), tuple(u), tuple(v), float(spacing), (int(h), int(w)))  # type: ignore[arg-type]

    def fitted(self, name: str, spacing: float | None = None) -> PlaneGeometry:
        """The pane's plane through the centre, large enough for the whole volume."""
        u, v = self.axes[name]
        return fit_plane(self.volume.geometry, u, v, through=self.center, spacing=spacing)

    def render(self, name: str, plane: PlaneGeometry, **kw) -> np.ndarray:
        """Reslice with the shared slab settings."""
        kw.setdefault("mapper", self.mapper)
        return reslice(self.volume, plane, slab=self.slab, mode=self.slab_mode, **kw)
