"""MPR geometry against analytic phantoms: round spheres, known oblique planes, labels."""
from __future__ import annotations

import math

import numpy as np
import pytest

from imaging import mpr
from imaging.mpr import MprState, PlaneGeometry, fit_plane, plane_labels, reslice, rotation_matrix
from imaging.volume import (SliceGeometry, Storage, Volume, VolumeError, build_geometry,
                           volume_for_slices)

BACKENDS = [b for b in ("vtk", "scipy") if mpr.backend_available(b)]


def _oblique_iop(rz=0.0, rx=0.0):
    r = rotation_matrix((0, 0, 1), rz) @ rotation_matrix((1, 0, 0), rx)
    return tuple(r @ np.array([1.0, 0, 0])) + tuple(r @ np.array([0, 1.0, 0]))


def phantom(fn, *, n=40, size=48, spacing=(1.0, 1.0), step=2.0, iop=(1, 0, 0, 0, 1, 0),
            origin=(-24.0, -24.0, -40.0), tilt=(0.0, 0.0), storage=None) -> Volume:
    """A volume whose voxel at patient point p holds fn(p) (float32 unless ``storage``)."""
    row = np.asarray(iop[:3], float)
    col = np.asarray(iop[3:6], float)
    normal = np.cross(row, col)
    slices = []
    for k in range(n):
        pos = np.asarray(origin) + k * step * normal + k * np.asarray([tilt[0], tilt[1], 0.0])
        slices.append(SliceGeometry(tuple(pos), tuple(iop), spacing, size, size, step))
    vol, slots = volume_for_slices(slices, [(1.0, 0.0)] * n, (-32768, 32767))
    if storage is not None:
        vol = Volume(vol.geometry, storage)
    else:
        vol = Volume(vol.geometry, Storage(np.dtype(np.float32)))
    nz, ny, nx = vol.shape
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    pts = vol.geometry.index_to_patient(np.stack([x, y, z], -1).astype(float))
    vol.data[...] = fn(pts).astype(vol.data.dtype)
    vol.own[:] = 1
    return vol


def ramp_sphere(center, radius, width=3.0, inside=1000.0):
    """A ball with a linear edge ramp: value > inside/2 exactly within ``radius``."""
    def fn(p):
        r = np.linalg.norm(p - np.asarray(center), axis=-1)
        return np.clip((radius - r) / width + 0.5, 0.0, 1.0) * inside
    return fn


def disc_stats(img: np.ndarray, spacing: float, threshold: float):
    """Area-equivalent radius (mm) and the ratio of the principal axes of the region."""
    mask = np.nan_to_num(img, nan=0.0) > threshold
    ys, xs = np.nonzero(mask)
    area = mask.sum() * spacing * spacing
    cov = np.cov(np.stack([xs, ys]).astype(float))
    ev = np.linalg.eigvalsh(cov)
    return math.sqrt(area / math.pi), math.sqrt(ev[1] / ev[0]), (xs.mean(), ys.mean())


# ---------------------------------------------------------------------------- geometry
def test_build_geometry_sorts_places_and_warns():
    iop = (1, 0, 0, 0, 1, 0)
    zs = [10.0, 0.0, 2.5, 7.5, 5.0, 20.0]            # shuffled; a gap between 10 and 20
    sl = [SliceGeometry((0.0, 0.0, z), iop, (0.5, 0.5), 8, 8) for z in zs]
    pl = build_geometry(sl)
    assert pl.geometry.spacing == pytest.approx((0.5, 0.5, 2.5))
    assert pl.slots == [4, 0, 1, 3, 2, 8]
    assert pl.geometry.shape == (9, 8, 8)
    assert any("gap" in w for w in pl.warnings)
    irregular = [SliceGeometry((0.0, 0.0, z), iop, (0.5, 0.5), 8, 8) for z in (0, 2.5, 5.0, 8.4, 10.0)]
    assert any("irregular" in w for w in build_geometry(irregular).warnings)
    with pytest.raises(VolumeError, match="same place"):
        build_geometry(sl + [SliceGeometry((0.0, 0.0, 5.2), iop, (0.5, 0.5), 8, 8)])
    with pytest.raises(VolumeError, match="orientation"):
        build_geometry(sl + [SliceGeometry((0.0, 0.0, 30.0), (0, 1, 0, 0, 0, -1), (0.5, 0.5), 8, 8)])


def test_tilted_and_oblique_grids_keep_true_positions():
    vol = phantom(lambda p: p[..., 0] * 0, iop=_oblique_iop(25, 15), tilt=(0.3, -0.2))
    g = vol.geometry
    assert g.tilt_degrees > 5
    # every slot's first voxel is where its slice said it was
    row, col = np.asarray(_oblique_iop(25, 15)[:3]), np.asarray(_oblique_iop(25, 15)[3:])
    n = np.cross(row, col)
    for k in (0, 17, 39):
        want = np.array([-24.0, -24.0, -40.0]) + k * 2.0 * n + k * np.array([0.3, -0.2, 0])
        np.testing.assert_allclose(g.index_to_patient([0, 0, k]), want, atol=1e-9)
    np.testing.assert_allclose(g.patient_to_index(g.index_to_patient([3.5, 7.25, 11.0])), [3.5, 7.25, 11.0])


# ---------------------------------------------------------------------------- spheres
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 1, 0), _oblique_iop(30, 20)], ids=["axial-acq", "oblique-acq"])
def test_sphere_stays_round_in_every_plane(backend, iop):
    center, radius = np.array([1.5, -2.0, -2.0]), 12.0
    kw = dict(iop=iop, spacing=(0.8, 0.8), step=1.6, size=52, n=40)
    vol = phantom(ramp_sphere(center, radius), origin=centered_origin(center, **kw), **kw)
    state = MprState(vol)
    state.set_center(center)
    for a, b in [(0.0, 0.0), (30.0, 0.0), (25.0, 40.0), (-60.0, 15.0)]:
        state.set_angles(a, b)
        for name in mpr.PLANES:
            plane = state.plane(name, (96, 96), 0.5)
            img = reslice(vol, plane, backend=backend)
            r, ratio, (cx, cy) = disc_stats(img, 0.5, 500.0)
            assert r == pytest.approx(radius, rel=0.03), (a, b, name)
            assert ratio < 1.05, (a, b, name)
            # the disc is centred where the sphere centre projects
            row, col, dist = plane.patient_to_pixel(center)
            assert abs(dist) < 1e-6
            assert (cx, cy) == pytest.approx((col, row), abs=0.6)


def centered_origin(center, *, iop, spacing, step, size, n):
    """ImagePositionPatient of the first slice for a grid centred on ``center``."""
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:6], float)
    normal = np.cross(row, col)
    half = (size - 1) / 2
    return tuple(np.asarray(center) - row * spacing[1] * half - col * spacing[0] * half
                 - normal * step * (n - 1) / 2)


def test_sphere_off_the_plane_shows_a_smaller_disc_and_mip_finds_it():
    center, radius = np.array([0.0, 0.0, -2.0]), 10.0
    vol = phantom(ramp_sphere(center, radius, width=1.0))
    state = MprState(vol)
    state.set_center(center + np.array([0.0, 0.0, 6.0]))           # 6 mm above the centre
    plane = state.plane("axial", (80, 80), 0.5)
    r_thin, _, _ = disc_stats(reslice(vol, plane), 0.5, 500.0)
    assert r_thin == pytest.approx(math.sqrt(radius ** 2 - 36), abs=0.5)
    state.set_slab(14.0, "mip")                                     # reaches the centre
    r_mip, _, _ = disc_stats(state.render("axial", plane), 0.5, 500.0)
    assert r_mip == pytest.approx(radius, abs=0.6)
    state.set_slab(14.0, "minip")                                   # and above the ball
    assert np.nanmax(state.render("axial", plane)) < 1.0


# ---------------------------------------------------------------------------- known values
LINEAR = np.array([3.0, -2.0, 5.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_oblique_plane_samples_known_values(backend):
    """A linear field is reproduced exactly by trilinear interpolation: every pixel of a
    double-oblique plane through a tilted, obliquely acquired grid must hold a·p + b."""
    vol = phantom(lambda p: p @ LINEAR + 100.0, iop=_oblique_iop(20, 10), tilt=(0.25, 0.1),
                  spacing=(0.9, 0.7), step=1.5)
    u = rotation_matrix((0, 0, 1), 35) @ rotation_matrix((1, 1, 0), 28) @ np.array([1.0, 0, 0])
    v = rotation_matrix((0, 0, 1), 35) @ rotation_matrix((1, 1, 0), 28) @ np.array([0, 1.0, 0])
    plane = fit_plane(vol.geometry, u, v, spacing=0.6)
    img = reslice(vol, plane, backend=backend)
    rows, cols = np.nonzero(~np.isnan(img))
    assert rows.size > 0.3 * img.size
    pts = plane.pixel_to_patient(rows, cols)
    # within the half-voxel border values are extended, not extrapolated: check inside
    inside = vol.geometry.contains_index(vol.geometry.patient_to_index(pts), margin=0.0)
    assert inside.mean() > 0.9
    rows, cols, pts = rows[inside], cols[inside], pts[inside]
    want = pts @ LINEAR + 100.0
    np.testing.assert_allclose(img[rows, cols], want, atol=2e-3)
    # outside the volume is NaN: the corners of a plane covering the rotated volume
    assert np.isnan(img[0, 0]) or np.isnan(img[-1, -1])


def test_slab_average_of_a_linear_field_is_the_central_plane_and_backends_agree():
    vol = phantom(lambda p: p @ LINEAR + 100.0)
    state = MprState(vol)
    state.set_angles(15, -10)
    plane = state.plane("coronal", (40, 40), 0.8)
    thin = reslice(vol, plane)
    state.set_slab(6.0, "avg")
    for backend in BACKENDS:
        thick = state.render("coronal", plane, backend=backend)
        inner = ~np.isnan(thick) & ~np.isnan(thin)
        inner[:4], inner[-4:], inner[:, :4], inner[:, -4:] = False, False, False, False
        np.testing.assert_allclose(thick[inner], thin[inner], atol=2e-3)
    if len(BACKENDS) == 2:
        state.set_slab(6.0, "mip")
        a = state.render("coronal", plane, backend="vtk")
        b = state.render("coronal", plane, backend="scipy")
        ok = ~np.isnan(a) & ~np.isnan(b)
        np.testing.assert_allclose(a[ok], b[ok], atol=2e-3)


def test_integer_storage_and_rescale_are_applied():
    st = Storage(np.dtype(np.uint16), 0.5, -1000.0)
    vol = phantom(lambda p: p[..., 2] * 0 + 2400, storage=st)       # stored 2400 -> 200
    img = reslice(vol, fit_plane(vol.geometry, (1, 0, 0), (0, 0, -1)))
    assert np.nanmax(img) == pytest.approx(200.0) and np.nanmin(img) == pytest.approx(200.0)


# ---------------------------------------------------------------------------- labels
def test_orientation_labels_of_the_standard_and_oblique_planes():
    vol = phantom(lambda p: p[..., 0] * 0)
    state = MprState(vol)
    lab = {n: plane_labels(*state.axes[n]) for n in mpr.PLANES}
    assert (lab["axial"].left, lab["axial"].right, lab["axial"].top, lab["axial"].bottom) == ("R", "L", "A", "P")
    assert (lab["coronal"].left, lab["coronal"].right, lab["coronal"].top, lab["coronal"].bottom) == ("R", "L", "H", "F")
    assert (lab["sagittal"].left, lab["sagittal"].right, lab["sagittal"].top, lab["sagittal"].bottom) == ("A", "P", "H", "F")
    state.set_angles(30, 0)                   # axial tilted about L-R: P goes towards H
    ax = plane_labels(*state.axes["axial"])
    assert (ax.top, ax.bottom, ax.left, ax.right) == ("AF", "PH", "R", "L")
    state.set_angles(30, 40)                  # double oblique: three letters on the sides
    ax = plane_labels(*state.axes["axial"])
    assert len(ax.left) >= 2 and len(ax.bottom) >= 2
    assert state.is_oblique("axial") and state.is_oblique("coronal")


def test_labels_follow_an_oblique_acquisition():
    """An obliquely acquired series shown in its own (native) plane gets oblique labels."""
    iop = _oblique_iop(0, 35)                  # rows L, columns tilted from P towards H
    sl = SliceGeometry((0.0, 0.0, 0.0), iop, (1.0, 1.0), 4, 4)
    lab = plane_labels(sl.row_dir, sl.col_dir)
    assert (lab.left, lab.right) == ("R", "L")
    assert lab.bottom == "PH" and lab.top == "AF"


# ---------------------------------------------------------------------------- crosshair
def test_rotating_the_crosshair_turns_the_other_planes_only():
    vol = phantom(lambda p: p[..., 0] * 0)
    state = MprState(vol)
    axial_before = [a.copy() for a in state.axes["axial"]]
    state.rotate("axial", 30)
    np.testing.assert_allclose(state.axes["axial"][0], axial_before[0])
    np.testing.assert_allclose(state.normal("axial"), [0, 0, 1])
    # the coronal normal (posterior) turned 30 degrees about the head axis
    assert math.degrees(math.acos(state.normal("coronal") @ np.array([0, 1.0, 0]))) == pytest.approx(30)
    # crosshair lines in the axial pane: the coronal line turned 30 degrees clockwise
    du, dv = state.crosshair_lines("axial")["coronal"]
    assert math.degrees(math.atan2(dv, du)) % 180 == pytest.approx(30, abs=1e-6)
    # the three planes stay orthogonal; a second rotation in another pane: double oblique
    state.rotate("sagittal", 20)
    n = np.array([state.normal(p) for p in mpr.PLANES])
    np.testing.assert_allclose(n @ n.T, np.eye(3), atol=1e-12)
    assert state.is_oblique("axial") and state.is_oblique("coronal")


def test_scroll_moves_one_voxel_along_the_normal():
    vol = phantom(lambda p: p[..., 0] * 0, step=2.5, spacing=(0.7, 0.7))
    state = MprState(vol)
    c0 = state.center.copy()
    state.scroll("axial", 2)
    np.testing.assert_allclose(state.center - c0, [0, 0, 5.0])
    state.scroll("coronal", -1)
    np.testing.assert_allclose(state.center - c0, [0, -0.7, 5.0])
    assert mpr.voxel_step(vol.geometry, (0, 0, 1)) == pytest.approx(2.5)


def test_plane_geometry_round_trip():
    p = PlaneGeometry((1.0, 2.0, 3.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0), 0.5, (10, 20))
    pt = p.pixel_to_patient(3.0, 7.0)
    assert p.patient_to_pixel(pt + 2.0 * p.normal) == pytest.approx((3.0, 7.0, 2.0))
    assert p.to_json()["spacing"] == [0.5, 0.5]
