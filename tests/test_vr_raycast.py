"""Shaded volume rendering on the CPU without a gradient cache (issue 15): the ray caster
reads the one volume array MPR reslices, keeps little besides it, and shows the same
thing, in the same place and orientation, as VTK's own CPU ray caster."""
from __future__ import annotations

import os
import threading
import tracemalloc

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from imaging import raycast  # noqa: E402
from imaging.vr import VrScene, VrUnavailable, offscreen_window  # noqa: E402
from imaging.volume import SliceGeometry, volume_for_slices  # noqa: E402

SIZE = 96


def ct_with_markers(n=48, size=SIZE, spacing=1.0, thickness=1.5):
    """A soft-tissue cylinder in air with a bone ball in the middle and a smaller bone
    ball towards the patient's left (+x), head (+z) and front (-y) (patient LPS)."""
    half = (size - 1) / 2 * spacing
    sl = [SliceGeometry((-half, -half, (k - (n - 1) / 2) * thickness), (1, 0, 0, 0, 1, 0),
                        (spacing, spacing), size, size, thickness) for k in range(n)]
    vol, _ = volume_for_slices(sl, [(1.0, -1024.0)] * n, (0, 4095), modality="CT")
    pts = vol.geometry.index_to_patient(np.stack(np.meshgrid(np.arange(size), np.arange(size), np.arange(n),
                                                             indexing="xy"), -1).transpose(2, 0, 1, 3))
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    hu = np.where(np.hypot(x, y) < size * 0.45 * spacing, 40.0, -1000.0)
    hu[np.sqrt(x ** 2 + y ** 2 + z ** 2) < 14] = 1200.0
    hu[np.sqrt((x - 24) ** 2 + (y + 10) ** 2 + (z - 18) ** 2) < 8] = 1200.0
    vol.data[...] = vol._to_storage(hu.astype(np.float32))
    vol.own[:] = 1
    return vol


def scene(vol, mapper, size=(128, 128)):
    try:
        s = VrScene(vol, offscreen_window(size), mapper=mapper)
    except VrUnavailable as e:
        pytest.skip(f"no offscreen OpenGL: {e}")
    s.set_preset("CT bone")
    return s


def close(s):
    s.close()
    s.render_window.Finalize()


@pytest.fixture(scope="module")
def vol():
    return ct_with_markers()


def test_vr_and_mpr_read_the_one_volume_array(vol):
    """MPR's reslice input, VR's VTK image and the shaded ray caster all read the
    volume's own voxel array, never a copy."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    from imaging.mpr import MprState, _vtk_reslicer

    state = MprState(vol)
    state.render("axial", state.plane("axial", (64, 64), 1.0), backend="vtk")
    mpr_in = vtk_to_numpy(_vtk_reslicer(vol, 1).image.GetPointData().GetScalars())
    assert np.shares_memory(mpr_in, vol.data)
    assert mpr_in.ctypes.data == vol.data.ctypes.data

    s = scene(vol, "cpu")
    seen = []
    real = raycast.cast

    def watching(data, *a, **k):
        if threading.current_thread() is threading.main_thread():   # not the warm-up
            seen.append(data)
        return real(data, *a, **k)

    raycast.cast = watching
    try:
        s.to_array()
    finally:
        raycast.cast = real
        close(s)
    vr_in = vtk_to_numpy(s.image.GetPointData().GetScalars())
    assert vr_in.ctypes.data == vol.data.ctypes.data
    assert seen and all(d is vol.data for d in seen)


def test_shaded_frame_keeps_no_volume_sized_scratch():
    """What the caster allocates for a frame (tables, block summary, picture) is far
    below the volume's own bytes: no gradient volume, no cast or flipped copy."""
    vol = ct_with_markers(n=64, size=160)
    s = scene(vol, "cpu", (64, 64))
    try:
        s.to_array()                       # compiled, tables made
        s.caster.volume_changed()          # block summary and tables made again below
        tracemalloc.start()
        s.to_array()
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        close(s)
    assert peak < 0.25 * vol.data.nbytes, (peak, vol.data.nbytes)


def test_vtk_mapper_never_shades_in_cpu_mode(vol):
    """The VTK CPU mapper would build its 3 B/voxel gradient cache when shading: in the
    ``cpu`` mode its property never shades; the shaded picture comes from the caster."""
    s = scene(vol, "cpu")
    try:
        assert s.preset.shade and not s.prop.GetShade()
        assert s.caster.active and not s.actor.GetVisibility()
        s.set_preset("MIP")                 # unshaded: VTK's mapper again
        assert not s.caster.active and s.actor.GetVisibility()
        s.set_preset("CT bone")
        assert s.caster.active
    finally:
        close(s)


def _bone(img):
    return img.max(axis=2) > 60


def test_anterior_view_left_on_the_right_head_up_like_vtk(vol):
    """The anterior view: the patient's left is on the screen's right, the head up; the
    picture covers what VTK's cached-gradient CPU mapper shows."""
    a = scene(vol, "cpu")
    b = scene(vol, "cpu-cached")
    try:
        mine, ref = a.to_array(), b.to_array()
    finally:
        close(a)
        close(b)
    h, w, _ = mine.shape
    m = _bone(mine)
    assert m[h // 2, w // 2]                                    # the central ball
    ys, xs = np.nonzero(m[: h // 2 - 4, w // 2 + 4:])           # upper right quadrant only
    assert len(ys) > 20
    assert not m[: h // 2 - 20, : w // 2 - 20].any()            # nothing upper left
    r = _bone(ref)
    assert (r & m).sum() > 0.95 * r.sum()                       # all VTK shows ...
    assert (m & ~(ref.max(axis=2) > 15)).sum() < 0.05 * m.sum()  # ... and nothing it leaves black
    # the same lighting (VTK's normals are quantised: a few per cent either way)
    ratio = mine[m & r].astype(float).mean() / ref[m & r].astype(float).mean()
    assert 0.9 < ratio < 1.1, ratio
    assert (m & r).sum() > 0.95 * (m | r).sum()


def test_unshaded_cast_equals_vtk_unshaded(vol):
    """Tables, opacity correction, compositing, camera and geometry are VTK's: without
    shading the caster's picture is VTK's CPU mapper's, pixel for pixel but for edges."""
    a = scene(vol, "cpu")
    b = scene(vol, "cpu-cached")
    try:
        b.prop.ShadeOff()
        ref = b.to_array()
        mine = a.cast_picture((128, 128), shade=False)
    finally:
        close(a)
        close(b)
    diff = np.abs(mine.astype(int) - ref.astype(int)).max(axis=2)
    assert ref.max() > 200
    assert (diff <= 8).mean() > 0.97, np.percentile(diff, [50, 99, 100])   # rims: sampling phase
    assert abs(mine.mean() - ref.mean()) < 0.05 * ref.mean()


def test_shading_follows_the_surface(vol):
    """The central ball is lit from the camera: its middle brighter than its rim."""
    s = scene(vol, "cpu", (160, 160))
    try:
        img = s.to_array().astype(float).sum(axis=2)
    finally:
        close(s)
    h, w = img.shape
    row = img[h // 2]
    inside = np.nonzero(row > 60)[0]
    centre = row[w // 2]
    rim = max(row[inside.min() + 1], row[inside.max() - 1])
    assert centre > 1.3 * rim, (centre, rim)


def test_crop_and_clip_cut_the_shaded_rendering(vol):
    s = scene(vol, "cpu")
    try:
        whole = _bone(s.to_array())
        s.set_crop(((0.0, 0.5), (0.0, 1.0), (0.0, 1.0)))      # keep the patient's right half
        half = _bone(s.to_array())
        h, w = half.shape
        assert half[:, : w // 2 - 3].sum() > 0.8 * whole[:, : w // 2 - 3].sum()
        assert not half[:, w // 2 + 3:].any()                   # the left-hand marker is gone
        s.set_crop(None)
        s.set_clip_plane(vol.geometry.center, (0, 0, 1))       # cut away the upper half
        low = _bone(s.to_array())
        assert not low[: h // 2 - 3].any() and low[h // 2 + 3:].sum() > 0.8 * whole[h // 2 + 3:].sum()
    finally:
        close(s)


def test_progressive_voxels_reach_the_shaded_picture():
    vol = ct_with_markers(n=24, size=48)
    keep = vol.data.copy()
    vol.data[...] = vol.data.min()
    s = scene(vol, "cpu", (64, 64))
    try:
        assert s.to_array().max() < 8
        vol.data[...] = keep
        s.refresh()
        assert _bone(s.to_array()).sum() > 50
    finally:
        close(s)


def test_block_summary_is_conservative():
    rng = np.random.default_rng(3)
    data = rng.integers(-500, 500, (19, 21, 23)).astype(np.int16)
    lo, hi = raycast.block_ranges(data)
    b = raycast.BLOCK
    for k, j, i in [(0, 0, 0), (2, 1, 2), (1, 2, 1)]:
        part = data[k * b:(k + 1) * b + 1, j * b:(j + 1) * b + 1, i * b:(i + 1) * b + 1]
        assert lo[k, j, i] == part.min() and hi[k, j, i] == part.max()
    opacity = np.zeros(1000, np.float32)
    opacity[900] = 0.5                           # only value 400 is visible
    ne = raycast.nonempty_blocks(lo, hi, opacity, -500.0, 1.0)
    assert np.array_equal(ne, (lo <= 400) & (hi >= 400))


def test_warm_up_compiles_for_other_voxel_types():
    raycast.warm_up(np.uint16)
    data = np.zeros((6, 6, 6), np.uint16)
    data[2:4, 2:4, 2:4] = 1000
    lo, hi = raycast.block_ranges(data)
    alpha = np.array([0.0, 1.0], np.float32)
    nonempty = raycast.nonempty_blocks(lo, hi, alpha, 0.0, 1 / 1000)
    # a parallel view straight down the z axis: NDC (x, y, z) → index (x, y, z) of the cube
    ndc_to_index = np.diag([2.5, 2.5, -2.5, 1.0])
    ndc_to_index[:3, 3] = 2.5
    pic = raycast.cast(data, np.ones((2, 3), np.float32), alpha, 0.0, 1 / 1000, ndc_to_index, np.eye(3),
                       size=(6, 6), box=(np.zeros(3), np.full(3, 5.0)), plane=None, step_mm=0.5,
                       nonempty=nonempty, shade=raycast.ShadeParams(False, 0, 1, 0, 10),
                       light=np.array([0.0, 0.0, 1.0]))
    assert pic[2:4, 2:4].min() > 200 and pic[0].max() == 0 and pic[:, 0].max() == 0
