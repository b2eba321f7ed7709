"""A shading CPU ray caster that reads the volume's own voxel array (issue 15).

VTK's CPU ray caster (``vtkFixedPointVolumeRayCastMapper``) shades from a gradient cache
it builds over the whole volume: 2 bytes of encoded normal and 1 byte of gradient
magnitude per voxel, 1.5× an int16 volume on top of it. This caster computes the
gradient where a ray needs it, so what it keeps besides the shared voxel array is
bounded by the picture, the lookup tables and a block summary of 1/512 of the voxels.

* Rays come from the camera's composite projection (NDC → index space), so perspective
  and parallel views, the volume's spacing, directions and origin (patient LPS) are those
  VTK itself would use.
* Each sample: trilinear value → colour and opacity tables (post-classification);
  opacity corrected for the sample distance (``1 - (1 - a) ** (step / unit)``); where the
  opacity is non-zero the 8 corner voxels get their central-difference gradients (6
  reads each, turned into patient space), are lit by the headlight (two-sided: diffuse ·
  |n·l| and specular · |n·l|^power; a zero gradient gets neither) and their light is
  interpolated trilinearly, as VTK's CPU mapper does from its cached normals; colour ·
  (ambient + diffuse) + specular.
  Front-to-back compositing stops at 99 % opacity.
* Empty space: the minimum and maximum of each 8³ block (with a one-voxel overlap) tell
  which blocks the opacity table leaves empty; rays jump over those.
* Cropping is a box in index space, the clip plane a half space in index space.

Compiled by numba (cached on disk after the first run), in parallel over picture rows.
"""
from __future__ import annotations

import math
import threading

import numba as nb
import numpy as np

__all__ = ["BLOCK", "block_ranges", "nonempty_blocks", "cast", "ShadeParams", "warm_up", "warm_up_async"]

BLOCK = 8
_lock = threading.Lock()        # numba's default thread pool runs one parallel call at a time


@nb.njit(cache=True, parallel=True, nogil=True)
def _block_minmax(vol, block, lo, hi):
    nz, ny, nx = vol.shape
    bz, by, bx = lo.shape
    for k in nb.prange(bz):
        for j in range(by):
            for i in range(bx):
                mn = vol[min(k * block, nz - 1), min(j * block, ny - 1), min(i * block, nx - 1)]
                mx = mn
                for z in range(k * block, min((k + 1) * block + 1, nz)):
                    for y in range(j * block, min((j + 1) * block + 1, ny)):
                        for x in range(i * block, min((i + 1) * block + 1, nx)):
                            v = vol[z, y, x]
                            if v < mn:
                                mn = v
                            if v > mx:
                                mx = v
                lo[k, j, i] = mn
                hi[k, j, i] = mx


def block_ranges(vol: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Minimum and maximum of each ``block``³ block of ``vol`` (z, y, x), each block
    including the first voxel of the next one (what trilinear sampling in it reads)."""
    shape = tuple(-(-n // block) for n in vol.shape)
    lo = np.empty(shape, vol.dtype)
    hi = np.empty(shape, vol.dtype)
    with _lock:
        _block_minmax(vol, block, lo, hi)
    return lo, hi


def nonempty_blocks(lo: np.ndarray, hi: np.ndarray, opacity: np.ndarray, table_lo: float,
                    table_scale: float) -> np.ndarray:
    """True for the blocks whose value range meets a non-zero entry of ``opacity``."""
    n = len(opacity)
    cum = np.concatenate(([0], np.cumsum(opacity > 0)))
    a = np.clip(np.floor((lo.astype(np.float64) - table_lo) * table_scale), 0, n - 1).astype(np.int64)
    b = np.clip(np.ceil((hi.astype(np.float64) - table_lo) * table_scale), 0, n - 1).astype(np.int64)
    return (cum[b + 1] - cum[a]) > 0


class ShadeParams:
    """Lighting of one frame (VTK's volume property words)."""

    def __init__(self, shade: bool, ambient: float, diffuse: float, specular: float, power: float) -> None:
        self.values = np.array([1.0 if shade else 0.0, ambient, diffuse, specular, power], np.float64)


@nb.njit(inline="always")
def _cell(vol, x, y, z):
    """The trilinear cell of point (x, y, z) (clamped into the volume): its first corner
    and the fractions along each axis."""
    nz, ny, nx = vol.shape
    x = min(max(x, 0.0), nx - 1.0)
    y = min(max(y, 0.0), ny - 1.0)
    z = min(max(z, 0.0), nz - 1.0)
    x0 = min(int(x), nx - 2)
    y0 = min(int(y), ny - 2)
    z0 = min(int(z), nz - 2)
    return x0, y0, z0, x - x0, y - y0, z - z0


@nb.njit(inline="always")
def _trilinear(vol, x, y, z):
    x0, y0, z0, fx, fy, fz = _cell(vol, x, y, z)
    c00 = vol[z0, y0, x0] * (1 - fx) + vol[z0, y0, x0 + 1] * fx
    c01 = vol[z0, y0 + 1, x0] * (1 - fx) + vol[z0, y0 + 1, x0 + 1] * fx
    c10 = vol[z0 + 1, y0, x0] * (1 - fx) + vol[z0 + 1, y0, x0 + 1] * fx
    c11 = vol[z0 + 1, y0 + 1, x0] * (1 - fx) + vol[z0 + 1, y0 + 1, x0 + 1] * fx
    c0 = c00 * (1 - fy) + c01 * fy
    c1 = c10 * (1 - fy) + c11 * fy
    return c0 * (1 - fz) + c1 * fz


@nb.njit(inline="always")
def _voxel_light(vol, i, j, k, normal_to_world, light, shading):
    """Diffuse and specular light at voxel (i, j, k) from its central-difference gradient
    (one-sided at the border); a zero gradient gets none (ambient only)."""
    nz, ny, nx = vol.shape
    gx = 0.5 * (float(vol[k, j, min(i + 1, nx - 1)]) - float(vol[k, j, max(i - 1, 0)]))
    gy = 0.5 * (float(vol[k, min(j + 1, ny - 1), i]) - float(vol[k, max(j - 1, 0), i]))
    gz = 0.5 * (float(vol[min(k + 1, nz - 1), j, i]) - float(vol[max(k - 1, 0), j, i]))
    wx = normal_to_world[0, 0] * gx + normal_to_world[0, 1] * gy + normal_to_world[0, 2] * gz
    wy = normal_to_world[1, 0] * gx + normal_to_world[1, 1] * gy + normal_to_world[1, 2] * gz
    wz = normal_to_world[2, 0] * gx + normal_to_world[2, 1] * gy + normal_to_world[2, 2] * gz
    gn = math.sqrt(wx * wx + wy * wy + wz * wz)
    if gn == 0.0:
        return 0.0, 0.0
    ndl = abs(wx * light[0] + wy * light[1] + wz * light[2]) / gn
    spec = shading[3] * ndl ** shading[4] if shading[3] > 0.0 else 0.0
    return shading[2] * ndl, spec


@nb.njit(inline="always")
def _corner_shading(vol, x, y, z, normal_to_world, light, shading):
    """Light at a sample: that of its 8 corner voxels, trilinearly weighted (as VTK's CPU
    mapper shades: lighting interpolated, not the normal)."""
    x0, y0, z0, fx, fy, fz = _cell(vol, x, y, z)
    diff = 0.0
    spec = 0.0
    for c in range(8):
        dx = c & 1
        dy = (c >> 1) & 1
        dz = (c >> 2) & 1
        w = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy) * (fz if dz else 1.0 - fz)
        if w > 0.0:
            d, s = _voxel_light(vol, x0 + dx, y0 + dy, z0 + dz, normal_to_world, light, shading)
            diff += w * d
            spec += w * s
    return diff, spec


@nb.njit(cache=True, parallel=True, nogil=True, fastmath=True)
def _cast(vol, rgb, alpha, table_lo, table_scale, ndc_to_index, index_to_world, normal_to_world,
          box_lo, box_hi, plane, step_mm, far_t, nonempty, block, shading, light, mip, out):
    nz, ny, nx = vol.shape
    h, w, _ = out.shape
    n_table = alpha.shape[0]
    bz, by, bx = nonempty.shape
    for j in nb.prange(h):
        yn = 1.0 - (j + 0.5) / h * 2.0
        for i in range(w):
            xn = (i + 0.5) / w * 2.0 - 1.0
            m = ndc_to_index
            hw0 = m[3, 0] * xn + m[3, 1] * yn - m[3, 2] + m[3, 3]
            hw1 = m[3, 0] * xn + m[3, 1] * yn + m[3, 2] + m[3, 3]
            bx_ = m[0, 0] * xn + m[0, 1] * yn + m[0, 3]
            by_ = m[1, 0] * xn + m[1, 1] * yn + m[1, 3]
            bz_ = m[2, 0] * xn + m[2, 1] * yn + m[2, 3]
            px = (bx_ - m[0, 2]) / hw0
            py = (by_ - m[1, 2]) / hw0
            pz = (bz_ - m[2, 2]) / hw0
            dx = (bx_ + m[0, 2]) / hw1 - px
            dy = (by_ + m[1, 2]) / hw1 - py
            dz = (bz_ + m[2, 2]) / hw1 - pz
            lw = 0.0
            for a in range(3):
                s = index_to_world[a, 0] * dx + index_to_world[a, 1] * dy + index_to_world[a, 2] * dz
                lw += s * s
            lw = math.sqrt(lw)
            out[j, i, 0] = 0
            out[j, i, 1] = 0
            out[j, i, 2] = 0
            if lw <= 0.0:
                continue
            sx = dx * (step_mm / lw)                  # index-space step of one sample
            sy = dy * (step_mm / lw)
            sz = dz * (step_mm / lw)
            t0 = 0.0
            t1 = min(lw / step_mm, far_t)
            empty = False
            for a in range(3):
                pa = px if a == 0 else (py if a == 1 else pz)
                sa = sx if a == 0 else (sy if a == 1 else sz)
                if sa != 0.0:
                    ta = (box_lo[a] - pa) / sa
                    tb = (box_hi[a] - pa) / sa
                    t0 = max(t0, min(ta, tb))
                    t1 = min(t1, max(ta, tb))
                elif pa < box_lo[a] or pa > box_hi[a]:
                    empty = True
            f0 = plane[0] * px + plane[1] * py + plane[2] * pz + plane[3]
            fs = plane[0] * sx + plane[1] * sy + plane[2] * sz
            if fs == 0.0:
                if f0 < 0.0:
                    empty = True
            elif fs > 0.0:
                t0 = max(t0, -f0 / fs)
            else:
                t1 = min(t1, -f0 / fs)
            if empty or t0 > t1:
                continue
            cr = 0.0
            cg = 0.0
            cb = 0.0
            acc = 0.0
            best = -1e300
            t = t0
            while t <= t1:
                x = px + t * sx
                y = py + t * sy
                z = pz + t * sz
                if not mip:
                    ib = min(max(int(x), 0), nx - 1) // block
                    jb = min(max(int(y), 0), ny - 1) // block
                    kb = min(max(int(z), 0), nz - 1) // block
                    if not nonempty[kb, jb, ib]:
                        # jump to the first sample past this block
                        jump = 1e300
                        if sx > 0.0:
                            jump = min(jump, ((ib + 1) * block - x) / sx)
                        elif sx < 0.0:
                            jump = min(jump, (ib * block - x) / sx)
                        if sy > 0.0:
                            jump = min(jump, ((jb + 1) * block - y) / sy)
                        elif sy < 0.0:
                            jump = min(jump, (jb * block - y) / sy)
                        if sz > 0.0:
                            jump = min(jump, ((kb + 1) * block - z) / sz)
                        elif sz < 0.0:
                            jump = min(jump, (kb * block - z) / sz)
                        t += max(1.0, math.floor(jump) + 1.0)
                        continue
                v = _trilinear(vol, x, y, z)
                if mip:
                    if v > best:
                        best = v
                    t += 1.0
                    continue
                k = int((v - table_lo) * table_scale + 0.5)
                k = min(max(k, 0), n_table - 1)
                a_s = alpha[k]
                if a_s > 0.0:
                    r = rgb[k, 0]
                    g = rgb[k, 1]
                    b = rgb[k, 2]
                    if shading[0] > 0.0:
                        diff, spec = _corner_shading(vol, x, y, z, normal_to_world, light, shading)
                        lit = shading[1] + diff
                        r = min(r * lit + spec, 1.0)
                        g = min(g * lit + spec, 1.0)
                        b = min(b * lit + spec, 1.0)
                    wgt = (1.0 - acc) * a_s
                    cr += wgt * r
                    cg += wgt * g
                    cb += wgt * b
                    acc += wgt
                    if acc > 0.99:
                        break
                t += 1.0
            if mip:
                if best > -1e300:
                    k = int((best - table_lo) * table_scale + 0.5)
                    k = min(max(k, 0), n_table - 1)
                    cr = rgb[k, 0] * alpha[k]
                    cg = rgb[k, 1] * alpha[k]
                    cb = rgb[k, 2] * alpha[k]
            out[j, i, 0] = min(int(cr * 255.0 + 0.5), 255)
            out[j, i, 1] = min(int(cg * 255.0 + 0.5), 255)
            out[j, i, 2] = min(int(cb * 255.0 + 0.5), 255)


def cast(vol: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, table_lo: float, table_scale: float,
         ndc_to_index: np.ndarray, index_to_world: np.ndarray, *, size: tuple[int, int],
         box: tuple[np.ndarray, np.ndarray], plane: np.ndarray | None, step_mm: float,
         nonempty: np.ndarray, shade: ShadeParams, light: np.ndarray, mip: bool = False,
         out: np.ndarray | None = None) -> np.ndarray:
    """Ray cast ``vol`` (z, y, x; read in place, never copied) into an (h, w, 3) uint8
    picture, top row first.

    ``rgb`` (n, 3) and ``alpha`` (n,) are the colour and (sample-distance corrected)
    opacity tables over stored values ``table_lo + k / table_scale``; ``ndc_to_index``
    maps the camera's normalised device coordinates to voxel indices (x, y, z, 1);
    ``index_to_world`` is the 3×3 linear part index → patient mm; ``box`` the index-space
    box rays stay in; ``plane`` (a, b, c, d) keeps a·x + b·y + c·z + d ≥ 0 in index space;
    ``light`` the unit direction towards the headlight in patient space."""
    w, h = int(size[0]), int(size[1])
    if out is None or out.shape != (h, w, 3) or out.dtype != np.uint8:
        out = np.empty((h, w, 3), np.uint8)
    if min(vol.shape) < 2:
        raise ValueError("ray casting needs at least 2 voxels along each axis")
    normal_to_world = np.linalg.inv(index_to_world).T
    pl = np.zeros(4) if plane is None else np.asarray(plane, np.float64)
    if plane is None:
        pl[3] = 1.0
    with _lock:
        _cast(vol, np.ascontiguousarray(rgb, np.float32), np.ascontiguousarray(alpha, np.float32),
              float(table_lo), float(table_scale), np.ascontiguousarray(ndc_to_index, np.float64),
              np.ascontiguousarray(index_to_world, np.float64), np.ascontiguousarray(normal_to_world, np.float64),
              np.asarray(box[0], np.float64), np.asarray(box[1], np.float64), pl, float(step_mm), 1e30,
              nonempty, BLOCK, shade.values, np.asarray(light, np.float64), bool(mip), out)
    return out


def warm_up(dtype) -> None:
    """Compile the kernels for voxels of ``dtype`` (or load them from numba's disk cache)
    on a tiny volume, so that the first real frame does not wait for the compiler."""
    vol = np.zeros((4, 4, 4), dtype)
    lo, hi = block_ranges(vol)
    alpha = np.zeros(2, np.float32)
    cast(vol, np.zeros((2, 3), np.float32), alpha, 0.0, 1.0, np.eye(4), np.eye(3), size=(2, 2),
         box=(np.zeros(3), np.full(3, 3.0)), plane=None, step_mm=1.0,
         nonempty=nonempty_blocks(lo, hi, alpha, 0.0, 1.0), shade=ShadeParams(True, 0, 1, 0, 10),
         light=np.array([0.0, 1.0, 0.0]))


_warming: dict[str, threading.Thread] = {}


def warm_up_async(dtype) -> None:
    """:func:`warm_up` in a background thread (once per dtype and process)."""
    key = np.dtype(dtype).str
    with _lock:
        if key in _warming:
            return
        t = _warming[key] = threading.Thread(target=warm_up, args=(dtype,), name="raycast-warm-up",
                                             daemon=True)
    t.start()
