"""Volume rendering with VTK, without Qt: presets, scene, offscreen rendering.

:class:`VrScene` shows a :class:`~imaging.volume.Volume` (bound to its voxel array without
a copy; ``refresh()`` after the voxels changed) in patient space: the image carries the
voxel spacing and a user matrix the grid's directions and origin, so oblique and tilted
acquisitions render in their true shape. The camera starts with the anterior view (the
patient faces the viewer, head up, patient's left on screen right).

Presets (:data:`PRESETS`) are transfer functions in modality units: CT bone, CT soft
tissue, CT angio, MIP (maximum intensity along each ray, windowed), MR default (relative
to the data's value range). Cropping (a box in fractions of the volume) and one clip
plane (in patient coordinates) cut the volume open.

Speed and memory: with a software OpenGL (llvmpipe, OSMesa...) the GPU ray caster is very
slow, so a CPU ray caster is used there (``cpu``) and the GPU one on real hardware
(``MEDVIEW_VR_MAPPER=gpu|cpu|cpu-cached`` overrides). On the CPU, unshaded presets (MIP)
go through VTK's multithreaded ``vtkFixedPointVolumeRayCastMapper``; shaded presets
through :mod:`imaging.raycast`, which computes gradients where rays need them: VTK's
mapper would cache 3 bytes of gradient per voxel (1.5× an int16 volume), ``cpu-cached``
keeps that old path for comparison. Both read the volume's own voxel array (the one MPR
reslices), never a copy. The caster's picture is shown as the renderer's background, so
a VTK window (the native widget, offscreen) displays it like any other frame. While the
user interacts, :meth:`VrScene.set_interactive` samples rays and pixels more coarsely;
when still, at full quality.

Offscreen (``medview render``, tests, the widget's image mode): :func:`offscreen_window`
tries the platform's default window when a display is present, then EGL, then OSMesa,
and raises :class:`VrUnavailable` naming what failed.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .volume import Volume

log = logging.getLogger("medview.vr")

__all__ = ["VrPreset", "PRESETS", "MAPPERS", "preset", "VrUnavailable", "offscreen_window",
           "offscreen_backend", "VrScene", "projection_rotation"]


@dataclass(frozen=True)
class VrPreset:
    """A volume rendering preset. Points are (value, r, g, b) and (value, opacity), in
    modality units, or in fractions of the value range when ``relative``."""

    name: str
    colors: tuple[tuple[float, float, float, float], ...]
    opacity: tuple[tuple[float, float], ...]
    blend: str = "composite"             # or "mip"
    shade: bool = True
    relative: bool = False
    ambient: float = 0.2
    diffuse: float = 0.8
    specular: float = 0.3


PRESETS: tuple[VrPreset, ...] = (
    VrPreset("CT bone",
             ((-1000, 0, 0, 0), (150, 0.55, 0.25, 0.15), (300, 0.88, 0.60, 0.29), (1000, 1, 0.94, 0.95),
              (3000, 1, 1, 1)),
             ((-1000, 0), (150, 0), (300, 0.15), (1000, 0.85), (3000, 0.9))),
    VrPreset("CT soft tissue",
             ((-1000, 0, 0, 0), (-500, 0.55, 0.25, 0.15), (-100, 0.85, 0.6, 0.45), (40, 0.9, 0.45, 0.35),
              (300, 1, 0.9, 0.8), (3000, 1, 1, 1)),
             ((-1000, 0), (-600, 0), (-400, 0.02), (-100, 0.08), (40, 0.25), (300, 0.6), (3000, 0.8))),
    VrPreset("CT angio",
             ((-1000, 0, 0, 0), (100, 0.4, 0.05, 0.05), (250, 0.9, 0.25, 0.15), (500, 1, 0.85, 0.7),
              (3000, 1, 1, 1)),
             ((-1000, 0), (120, 0), (200, 0.25), (450, 0.7), (3000, 0.85))),
    VrPreset("MIP", ((0.0, 0, 0, 0), (1.0, 1, 1, 1)), ((0.0, 1.0), (1.0, 1.0)), blend="mip",
             shade=False, relative=True),
    VrPreset("MR default",
             ((0.0, 0, 0, 0), (0.25, 0.5, 0.4, 0.35), (0.6, 0.95, 0.85, 0.75), (1.0, 1, 1, 1)),
             ((0.0, 0), (0.15, 0), (0.35, 0.08), (0.7, 0.4), (1.0, 0.8)), relative=True),
)


def preset(name: str) -> VrPreset:
    for p in PRESETS:
        if p.name.lower() == name.lower():
            return p
    raise KeyError(f"unknown VR preset {name!r}; known: {', '.join(p.name for p in PRESETS)}")


def projection_rotation(a: float, b: float) -> np.ndarray:
    """For ``--view mip|vr --angles A,B``: turn the patient ``A`` degrees about the
    head-foot axis (z), then tilt ``B`` degrees about the left-right axis (x)."""
    from .mpr import rotation_matrix

    return rotation_matrix((1, 0, 0), b) @ rotation_matrix((0, 0, 1), a)


# --------------------------------------------------------------------------- offscreen
class VrUnavailable(RuntimeError):
    """No OpenGL context could be made for volume rendering (with what was tried)."""


_probe_lock = threading.Lock()
_backends: dict[bool, str] = {}
_failures: list[str] = []


def _candidates(headless: bool = False) -> list[str]:
    """Window classes to try; ``headless`` puts EGL and OSMesa before the display's own
    (X/GLX) window — for a pane whose desktop context was found unable to render."""
    forced = os.environ.get("VTK_DEFAULT_OPENGL_WINDOW")
    out = [forced] if forced else []
    if os.environ.get("DISPLAY") and "vtkXOpenGLRenderWindow" not in out and not headless:
        out.append("vtkXOpenGLRenderWindow")
    for name in ("vtkEGLRenderWindow", "vtkOSOpenGLRenderWindow"):
        if name not in out:
            out.append(name)
    if headless and os.environ.get("DISPLAY") and "vtkXOpenGLRenderWindow" not in out:
        out.append("vtkXOpenGLRenderWindow")
    return out


def _make_window(name: str):
    import vtkmodules.vtkRenderingOpenGL2 as gl

    cls = getattr(gl, name, None)
    if cls is None:
        raise VrUnavailable(f"{name} is not part of this VTK build")
    return cls()


def _works(name: str) -> str | None:
    """None when an offscreen window of class ``name`` renders, else the problem."""
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import vtkRenderer, vtkWindowToImageFilter

    try:
        rw = _make_window(name)
        rw.SetOffScreenRendering(1)
        rw.SetSize(4, 4)
        ren = vtkRenderer()
        ren.SetBackground(1.0, 0.0, 0.0)
        rw.AddRenderer(ren)
        rw.Render()
        grab = vtkWindowToImageFilter()
        grab.SetInput(rw)
        grab.Update()
        px = vtk_to_numpy(grab.GetOutput().GetPointData().GetScalars())
        rw.Finalize()
        if px.size == 0 or int(px[0][0]) < 200:
            return "renders nothing"
    except Exception as e:  # noqa: BLE001 - any failure means: try the next one
        return str(e) or type(e).__name__
    return None


def offscreen_backend(headless: bool = False) -> str:
    """The render window class used offscreen (probed once per process; ``headless``:
    EGL/OSMesa preferred over the display's window, see :func:`_candidates`)."""
    with _probe_lock:
        if headless not in _backends:
            for name in _candidates(headless):
                problem = _works(name)
                if problem is None:
                    _backends[headless] = name
                    break
                _failures.append(f"{name}: {problem}")
                log.info("offscreen OpenGL %s unusable: %s", name, problem)
            else:
                raise VrUnavailable("no offscreen OpenGL for volume rendering: tried "
                                    + "; ".join(_failures)
                                    + " (install libEGL or libOSMesa, or run with a display)")
        return _backends[headless]


def offscreen_window(size: tuple[int, int], headless: bool = False):
    """A new offscreen vtkRenderWindow of ``size`` (w, h)."""
    rw = _make_window(offscreen_backend(headless))
    rw.SetOffScreenRendering(1)
    rw.SetSize(int(size[0]), int(size[1]))
    return rw


def is_software_gl(render_window) -> bool:
    """True for a software OpenGL (no GPU): the CPU ray caster is then much faster.

    An offscreen window is rendered once first so that its OpenGL context (and the
    renderer string) exists; an on-screen window must have been initialised."""
    try:
        caps = render_window.ReportCapabilities() or ""
        if "renderer string" not in caps and render_window.GetOffScreenRendering():
            render_window.Render()
            caps = render_window.ReportCapabilities() or ""
    except Exception:  # noqa: BLE001
        return True
    low = caps.lower()
    if "renderer string" not in low:
        return False                 # unknown yet (a desktop window): assume hardware
    return any(k in low for k in ("llvmpipe", "softpipe", "swrast", "software rasterizer"))


# --------------------------------------------------------------------------- scene
MAPPERS = ("gpu", "cpu", "cpu-cached")
_TABLE_SIZE = 4096


class _CasterState:
    """What :mod:`imaging.raycast` keeps between frames: the block summary of the volume,
    the lookup tables of the preset, the last picture and the texture showing it."""

    def __init__(self) -> None:
        self.active = False
        self.ranges: tuple[np.ndarray, np.ndarray] | None = None   # per 8³ block min / max
        self.value_range: tuple[float, float] | None = None
        self.tables: tuple | None = None                 # (rgb, opacity, lo, scale, step, nonempty)
        self.picture: np.ndarray | None = None           # uint8 (h, w, 3), top row first
        self.shown: np.ndarray | None = None             # uint8 (H, W, 3), bottom row first
        self.texture = None
        self.texture_image = None

    def volume_changed(self) -> None:
        self.ranges = None
        self.value_range = None
        self.tables = None

    def tables_changed(self) -> None:
        self.tables = None


@dataclass
class _Quality:
    image_sample: float = 1.0
    sample: float = 1.0


class VrScene:
    """A volume in a VTK renderer (see the module docstring)."""

    def __init__(self, volume: Volume, render_window=None, *, mapper: str | None = None) -> None:
        from vtkmodules.util.numpy_support import numpy_to_vtk
        from vtkmodules.vtkCommonDataModel import vtkImageData
        from vtkmodules.vtkCommonMath import vtkMatrix4x4
        from vtkmodules.vtkRenderingCore import (vtkColorTransferFunction, vtkRenderer, vtkVolume,
                                                 vtkVolumeProperty)
        from vtkmodules.vtkCommonDataModel import vtkPiecewiseFunction
        # the OpenGL implementations must be registered before a renderer is made
        # (without them vtkRenderer is the abstract base class and rendering crashes)
        import vtkmodules.vtkRenderingOpenGL2  # noqa: F401
        import vtkmodules.vtkRenderingVolumeOpenGL2  # noqa: F401

        self.volume = volume
        g = volume.geometry
        nz, ny, nx = volume.shape
        sx, sy, sz = g.spacing
        image = vtkImageData()
        image.SetDimensions(nx, ny, nz)
        image.SetSpacing(sx, sy, sz)
        image.SetOrigin(0.0, 0.0, 0.0)
        image.GetPointData().SetScalars(numpy_to_vtk(volume.data.reshape(-1), deep=False))
        self.image = image
        m = vtkMatrix4x4()
        directions = g.matrix / np.array([sx, sy, sz])
        for r in range(3):
            for c in range(3):
                m.SetElement(r, c, float(directions[r, c]))
            m.SetElement(r, 3, float(g.origin[r]))
        self.render_window = render_window if render_window is not None else offscreen_window((512, 512))
        self.renderer = vtkRenderer()
        self.renderer.SetBackground(0.0, 0.0, 0.0)
        self.render_window.AddRenderer(self.renderer)
        kind = (mapper or os.environ.get("MEDVIEW_VR_MAPPER") or "").lower()
        if kind not in MAPPERS:
            kind = "cpu" if is_software_gl(self.render_window) else "gpu"
        self.mapper_kind = kind
        if kind == "gpu":
            from vtkmodules.vtkRenderingVolume import vtkGPUVolumeRayCastMapper as Mapper
        else:
            from vtkmodules.vtkRenderingVolume import vtkFixedPointVolumeRayCastMapper as Mapper
        self.mapper = Mapper()
        self.mapper.SetInputData(image)
        self.mapper.SetAutoAdjustSampleDistances(0)
        if kind != "gpu":
            self.mapper.SetNumberOfThreads(max(1, os.cpu_count() or 1))
        self.ctf = vtkColorTransferFunction()
        self.otf = vtkPiecewiseFunction()
        self.prop = vtkVolumeProperty()
        self.prop.SetColor(self.ctf)
        self.prop.SetScalarOpacity(self.otf)
        self.prop.SetInterpolationTypeToLinear()
        self.actor = vtkVolume()
        self.actor.SetMapper(self.mapper)
        self.actor.SetProperty(self.prop)
        self.actor.SetUserMatrix(m)
        self.renderer.AddVolume(self.actor)
        # the caster needs 2 voxels along each axis (a lone slice stays with VTK's mapper)
        self.caster = _CasterState() if kind == "cpu" and min(volume.shape) >= 2 else None
        if self.caster is not None:
            from .raycast import warm_up_async

            warm_up_async(volume.data.dtype)          # the compiler runs while the UI builds
            self.renderer.AddObserver("StartEvent", self._cast_for_renderer)
        self.preset: VrPreset = PRESETS[0]
        self.window: tuple[float, float] | None = None
        self.window_from_user = False        # set_window()/an explicit preset window
        base = float(min(g.spacing))
        self.still = _Quality(1.0, base)
        self.moving = _Quality(2.5, base * 3.0)
        self.interactive = False
        self.crop: tuple[tuple[float, float], ...] | None = None
        self.crop_index: tuple[np.ndarray, np.ndarray] | None = None
        self.clip: tuple[np.ndarray, np.ndarray] | None = None
        self._clip_plane = None
        self._apply_quality()
        self.set_preset("MR default" if volume.modality.upper() not in ("CT", "") else "CT bone")
        self.reset_camera()

    # ------------------------------------------------------------------ data
    def refresh(self) -> None:
        """The voxels changed in place (a progressive update): render them next time.

        The scalar array itself is marked modified: VTK caches an array's value range
        until then, and the CPU ray caster maps voxels to its tables through that range
        (a range cached while the volume was still empty renders everything black)."""
        self.image.GetPointData().GetScalars().Modified()
        self.image.Modified()
        if self.caster is not None:
            self.caster.volume_changed()
        if self.preset.relative:
            self.set_preset(self.preset.name)

    # ------------------------------------------------------------------ look
    def _to_storage(self, v: float) -> float:
        return (v - self.volume.offset) / self.volume.scale

    def set_preset(self, name: str | VrPreset, window: tuple[float, float] | None = None) -> None:
        """Apply a preset; ``window`` (centre, width in modality units) drives MIP."""
        p = name if isinstance(name, VrPreset) else preset(name)
        self.preset = p
        if window is not None:
            self.window = window
            self.window_from_user = True
        if p.relative:
            if p.blend == "mip" and not self.window_from_user:
                self.window = self.projection_window()
            if p.blend == "mip" and self.window is not None:
                c, w = self.window
                lo, hi = c - w / 2, c + w / 2
            else:
                lo, hi = self._robust_range()
            to_value = lambda f: lo + f * (hi - lo)  # noqa: E731
        else:
            to_value = lambda f: f  # noqa: E731
        self.ctf.RemoveAllPoints()
        for v, r, g, b in p.colors:
            self.ctf.AddRGBPoint(self._to_storage(to_value(v)), r, g, b)
        self.otf.RemoveAllPoints()
        for v, a in p.opacity:
            self.otf.AddPoint(self._to_storage(to_value(v)), a)
        self.prop.SetAmbient(p.ambient)
        self.prop.SetDiffuse(p.diffuse)
        self.prop.SetSpecular(p.specular)
        casting = self.caster is not None and p.shade and p.blend != "mip"
        # VTK's CPU mapper never shades in "cpu" mode (its gradient cache is the memory saved)
        self.prop.SetShade(int(p.shade and not casting))
        if self.caster is not None:
            self.caster.active = casting
            self.caster.tables_changed()
            self.actor.SetVisibility(not casting)
            self.renderer.SetTexturedBackground(casting)
        if p.blend == "mip":
            self.mapper.SetBlendModeToMaximumIntensity()
        else:
            self.mapper.SetBlendModeToComposite()

    def set_window(self, center: float, width: float) -> None:
        """The shared window (used by the MIP preset from now on)."""
        self.window = (float(center), max(float(width), 1.0))
        self.window_from_user = True
        if self.preset.blend == "mip":
            self.set_preset(self.preset)

    def projection_window(self) -> tuple[float, float] | None:
        """The MIP's own window: :func:`imaging.windowing.initial_window` of the maximum
        projection of the volume along the viewing direction of the anterior view."""
        from .windowing import initial_window

        data = self.volume.data
        step = max(1, int(round((data.size / 2_000_000) ** (1 / 3))))
        proj = data[::step, :, ::step].max(axis=1)          # (z, x): along the rows (A-P)
        return initial_window(values=self.volume.to_modality(proj), projection=True)

    def value_range_text(self) -> str:
        """In words: from which value the preset shows anything, and the volume's highest
        value (why a frame can stay black)."""
        unit = "HU" if self.volume.modality.upper() == "CT" else ""
        step = max(1, self.volume.data.size // 200_000)
        top = float(self.volume.to_modality(self.volume.data.reshape(-1)[::step]).max())
        if self.preset.relative:
            return f"relative to the data; highest value {top:.0f} {unit}".rstrip()
        start = self.preset.opacity[0][0]
        for v, a in self.preset.opacity:
            if a > 0:
                break
            start = v
        return f"from {start:.0f} {unit} up; this volume reaches {top:.0f} {unit}".replace("  ", " ").strip()

    def _robust_range(self) -> tuple[float, float]:
        data = self.volume.data
        step = max(1, data.size // 200_000)
        sample = self.volume.to_modality(data.reshape(-1)[::step])
        lo, hi = np.percentile(sample, [1.0, 99.8])
        return float(lo), float(max(hi, lo + 1.0))

    # ------------------------------------------------------------------ cutting
    def set_crop(self, box: Sequence[Sequence[float]] | None) -> None:
        """Keep only ``box`` = ((x0, x1), (y0, y1), (z0, z1)) in fractions of the volume
        (index axes: columns, rows, slices); None shows everything."""
        if box is None:
            self.crop = None
            self.crop_index = None
            self.mapper.CroppingOff()
            return
        nz, ny, nx = self.volume.shape
        sx, sy, sz = self.volume.geometry.spacing
        planes = []
        for (a, b), n, s in zip(box, (nx, ny, nz), (sx, sy, sz)):
            a, b = sorted((min(max(a, 0.0), 1.0), min(max(b, 0.0), 1.0)))
            planes += [a * (n - 1) * s, b * (n - 1) * s]
        self.crop = tuple((planes[i], planes[i + 1]) for i in (0, 2, 4))
        self.crop_index = (np.array(planes[0::2]) / (sx, sy, sz), np.array(planes[1::2]) / (sx, sy, sz))
        self.mapper.SetCroppingRegionPlanes(*planes)
        self.mapper.SetCroppingRegionFlagsToSubVolume()
        self.mapper.CroppingOn()

    def set_clip_plane(self, origin: Sequence[float] | None, normal: Sequence[float] | None = None) -> None:
        """Cut away what lies on the ``normal`` side of the plane through ``origin``
        (patient coordinates); None removes the cut."""
        from vtkmodules.vtkCommonDataModel import vtkPlane

        self.mapper.RemoveAllClippingPlanes()
        if origin is None:
            self.clip = None
            return
        n = -np.asarray(normal, float) / np.linalg.norm(normal)     # VTK keeps the normal side
        plane = vtkPlane()
        plane.SetOrigin(*map(float, origin))
        plane.SetNormal(*map(float, n))
        self.mapper.AddClippingPlane(plane)
        self._clip_plane = plane
        self.clip = (np.asarray(origin, float), -n)

    # ------------------------------------------------------------------ camera
    def reset_camera(self, rotation: np.ndarray | None = None) -> None:
        """Anterior view (optionally turned by ``rotation``), the whole volume in view."""
        r = np.eye(3) if rotation is None else np.asarray(rotation, float)
        cam = self.renderer.GetActiveCamera()
        c = self.volume.geometry.center
        direction = r @ np.array([0.0, 1.0, 0.0])           # looking posterior
        up = r @ np.array([0.0, 0.0, 1.0])                   # head up
        cam.SetFocalPoint(*map(float, c))
        cam.SetPosition(*map(float, c - direction * 1000.0))
        cam.SetViewUp(*map(float, up))
        bounds = self.actor.GetBounds()         # also when the actor is hidden (cast frames)
        self.renderer.ResetCamera(bounds)
        cam.SetParallelProjection(False)
        self.renderer.ResetCameraClippingRange(bounds)

    def rotate(self, azimuth: float, elevation: float) -> None:
        cam = self.renderer.GetActiveCamera()
        cam.Azimuth(azimuth)
        cam.Elevation(elevation)
        cam.OrthogonalizeViewUp()
        self.renderer.ResetCameraClippingRange()

    def zoom(self, factor: float) -> None:
        self.renderer.GetActiveCamera().Dolly(factor)
        self.renderer.ResetCameraClippingRange()

    def pan(self, dx: float, dy: float) -> None:
        """Move the view by a fraction (dx, dy) of its width/height."""
        cam = self.renderer.GetActiveCamera()
        fp = np.array(cam.GetFocalPoint())
        pos = np.array(cam.GetPosition())
        up = np.array(cam.GetViewUp())
        d = fp - pos
        dist = np.linalg.norm(d)
        right = np.cross(d / dist, up)
        height = 2 * dist * np.tan(np.radians(cam.GetViewAngle() / 2))
        shift = (-dx * right + dy * up) * height
        cam.SetFocalPoint(*(fp + shift))
        cam.SetPosition(*(pos + shift))

    # ------------------------------------------------------------------ quality
    def set_interactive(self, on: bool) -> None:
        """Coarser sampling while the user drags; full quality when still."""
        self.interactive = bool(on)
        self._apply_quality()

    def _apply_quality(self) -> None:
        q = self.moving if self.interactive else self.still
        self.mapper.SetImageSampleDistance(q.image_sample)
        self.mapper.SetSampleDistance(q.sample)

    # ------------------------------------------------------------------ cast frames
    def _caster_tables(self, step: float):
        """Colour / opacity tables over the volume's value range, corrected for ``step``,
        and which blocks they leave empty (cached until the preset, window, voxels or
        sample distance change)."""
        from . import raycast

        c = self.caster
        data = self.volume.data
        if c.ranges is None:
            c.ranges = raycast.block_ranges(data)
            c.value_range = (float(c.ranges[0].min()), float(c.ranges[1].max()))
        if c.tables is not None and c.tables[4] == step:
            return c.tables
        lo, hi = c.value_range
        hi = max(hi, lo + 1.0)
        n = int(min(_TABLE_SIZE, hi - lo + 1)) if np.issubdtype(data.dtype, np.integer) else _TABLE_SIZE
        n = max(n, 2)
        rgb = np.empty(3 * n)
        self.ctf.GetTable(lo, hi, n, rgb)
        rgb = rgb.reshape(n, 3).astype(np.float32)
        opacity = np.empty(n)
        self.otf.GetTable(lo, hi, n, opacity)
        unit = float(self.prop.GetScalarOpacityUnitDistance()) or 1.0
        alpha = (1.0 - np.power(1.0 - np.clip(opacity, 0.0, 1.0), step / unit)).astype(np.float32)
        scale = (n - 1) / (hi - lo)
        nonempty = raycast.nonempty_blocks(c.ranges[0], c.ranges[1], alpha, lo, scale)
        c.tables = (rgb, alpha, lo, scale, step, nonempty)
        return c.tables

    def _cast_for_renderer(self, _obj=None, _event=None) -> None:
        """Renderer StartEvent: cast the picture for the current camera and viewport and
        put it in the background texture."""
        c = self.caster
        if c is None or not c.active:
            return
        w, h = self.renderer.GetSize()
        if w < 1 or h < 1:
            return
        c.picture = self.cast_picture((w, h))
        self._show_picture(c.picture, (w, h))

    def cast_picture(self, size: tuple[int, int], *, shade: bool = True) -> np.ndarray:
        """The shaded (``shade``) picture of the current view at ``size`` (w, h) as uint8
        (h', w', 3), top row first; h', w' are smaller while interacting (the image sample
        distance)."""
        from . import raycast

        q = self.moving if self.interactive else self.still
        w, h = int(size[0]), int(size[1])
        cw, ch = max(1, int(round(w / q.image_sample))), max(1, int(round(h / q.image_sample)))
        rgb, alpha, lo, scale, step, nonempty = self._caster_tables(float(q.sample))
        g = self.volume.geometry
        cam = self.renderer.GetActiveCamera()
        pos = np.array(cam.GetPosition())
        view = np.array(cam.GetFocalPoint()) - pos
        view /= np.linalg.norm(view)
        depth = (g.corners() - pos) @ view                  # the volume between near and far
        far = max(float(depth.max()), 1e-3) * 1.01 + 1.0
        near = max(float(depth.min()) * 0.99 - 1.0, far * 1e-4)
        cam.SetClippingRange(near, far)
        world_to_ndc = _np_matrix(cam.GetCompositeProjectionTransformMatrix(w / h, -1.0, 1.0))
        ndc_to_index = np.linalg.inv(g.affine) @ np.linalg.inv(world_to_ndc)
        nz, ny, nx = self.volume.shape
        box = (np.zeros(3), np.array([nx - 1.0, ny - 1.0, nz - 1.0]))
        if self.crop_index is not None:
            box = (np.maximum(box[0], self.crop_index[0]), np.minimum(box[1], self.crop_index[1]))
        plane = None
        if self.clip is not None:
            origin, normal = self.clip
            keep = -np.asarray(normal, float)           # keep n·(p - origin) >= 0
            plane = np.concatenate((g.matrix.T @ keep, [keep @ (np.asarray(g.origin) - origin)]))
        light = self._light()
        ambient = self.prop.GetAmbient() * float(np.mean(light.GetAmbientColor()))
        intensity = float(light.GetIntensity())
        lighting = raycast.ShadeParams(shade, ambient * intensity, self.prop.GetDiffuse() * intensity,
                                    self.prop.GetSpecular() * intensity, self.prop.GetSpecularPower())
        return raycast.cast(self.volume.data, rgb, alpha, lo, scale, ndc_to_index, g.matrix,
                            size=(cw, ch), box=box, plane=plane, step_mm=float(q.sample),
                            nonempty=nonempty, shade=lighting, light=-view, out=self.caster.picture)

    def _light(self):
        """The renderer's first light, or the headlight VTK would make (its ambient colour
        is black: VTK's volume shading then shows no ambient term, nor does the caster)."""
        from vtkmodules.vtkRenderingCore import vtkLight

        lights = self.renderer.GetLights()
        lights.InitTraversal()
        return lights.GetNextItem() or vtkLight()

    def _show_picture(self, picture: np.ndarray, size: tuple[int, int]) -> None:
        from vtkmodules.util.numpy_support import numpy_to_vtk
        from vtkmodules.vtkCommonDataModel import vtkImageData
        from vtkmodules.vtkRenderingCore import vtkTexture

        c = self.caster
        w, h = size
        picture = _enlarge(picture, size)
        if c.shown is None or c.shown.shape[:2] != (h, w):
            c.shown = np.empty((h, w, 3), np.uint8)
            c.texture_image = vtkImageData()
            c.texture_image.SetDimensions(w, h, 1)
            c.texture_image.GetPointData().SetScalars(numpy_to_vtk(c.shown.reshape(-1, 3), deep=False))
            c.texture = vtkTexture()
            c.texture.SetInputData(c.texture_image)
            c.texture.InterpolateOff()
            self.renderer.SetBackgroundTexture(c.texture)
        c.shown[...] = picture[::-1]
        c.texture_image.GetPointData().GetScalars().Modified()
        c.texture_image.Modified()

    # ------------------------------------------------------------------ output
    def render(self) -> None:
        self.render_window.Render()

    def to_array(self) -> np.ndarray:
        """Render and return the picture as (h, w, 3) uint8, top row first."""
        from vtkmodules.util.numpy_support import vtk_to_numpy
        from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

        if self.caster is not None and self.caster.active:
            # the cast picture is what the window's background would show: no OpenGL needed
            w, h = self.render_window.GetSize()
            return _enlarge(self.cast_picture((w, h)), (w, h)).copy()
        self.render_window.Render()
        grab = vtkWindowToImageFilter()
        grab.SetInput(self.render_window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        img = grab.GetOutput()
        w, h, _ = img.GetDimensions()
        arr = vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)[..., :3]
        return np.ascontiguousarray(arr[::-1])

    def set_size(self, w: int, h: int) -> None:
        self.render_window.SetSize(max(1, int(w)), max(1, int(h)))

    def close(self) -> None:
        try:
            self.renderer.RemoveAllViewProps()
            self.render_window.RemoveRenderer(self.renderer)
        except Exception:  # noqa: BLE001
            pass


def _enlarge(picture: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``picture`` (h', w', 3) at ``size`` (w, h): the coarse frames while interacting are
    enlarged (nearest pixel), full-size ones returned as they are."""
    w, h = size
    ph, pw, _ = picture.shape
    if (ph, pw) == (h, w):
        return picture
    yi = np.minimum(((np.arange(h) + 0.5) * ph / h).astype(np.intp), ph - 1)
    xi = np.minimum(((np.arange(w) + 0.5) * pw / w).astype(np.intp), pw - 1)
    return picture[yi][:, xi]


def _np_matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def render_volume(volume: Volume, *, size: tuple[int, int] = (512, 512), preset_name: str | None = None,
                  rotation: np.ndarray | None = None, window: tuple[float, float] | None = None,
                  crop=None, interactive: bool = False) -> np.ndarray:
    """One offscreen picture of a volume (for ``medview render --view vr`` and tests)."""
    scene = VrScene(volume, offscreen_window(size))
    try:
        if preset_name:
            scene.set_preset(preset_name, window)
        elif window is not None:
            scene.set_window(*window)
        scene.set_crop(crop)
        scene.reset_camera(rotation)
        scene.set_interactive(interactive)
        return scene.to_array()
    finally:
        scene.close()
        scene.render_window.Finalize()
