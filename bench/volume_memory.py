"""Peak memory of a whole volume in the viewer's code paths (issue 15), against the raw
volume bytes (slices × size² × 2 bytes), on synthetic CT series of two sizes.

    .venv/bin/python bench/volume_memory.py [--sizes 64,300] [--size 512] [--cases all]

Each case runs in its own process (peak resident memory from ``wait4``), loading the
folder as ``medview render --folder`` does (series selection, one volume array), then:

* ``mpr``: an axial, a coronal and a double-oblique plane (``commands.render.render_plane``);
* ``vr-unshaded``: the MIP preset (VTK's CPU mapper, no gradients);
* ``vr-shaded``: the CT bone preset, ``MEDVIEW_VR_MAPPER=cpu`` (gradients where rays need
  them, :mod:`imaging.raycast`);
* ``vr-shaded-cached``: the same with ``cpu-cached`` (VTK's CPU mapper and its gradient
  cache of 3 bytes per voxel: the path before issue 15);
* ``mpr+vr`` (and ``mpr+vr-cached``): the three planes, then the shaded rendering, from the
  same volume; the child checks that MPR's and VR's VTK images and the ray caster read the
  volume's own array (``shared`` column).

Each child first brings up everything that does not depend on the volume — the modules, the
offscreen OpenGL window (VR cases), the ray caster's compiled kernels, one reslice of a tiny
volume (MPR cases) — and records its resident memory then: the **baseline**. The volume is
read after that, so **volume memory = peak − baseline** is what the volume costs the viewer:
the voxel array and everything the renderers allocate for it (VTK images, gradient caches,
ray-caster buffers, the rendered frames).

Prints, per case and series: raw bytes, baseline, peak resident memory, peak/raw, volume
memory/raw, and per case the marginal cost (extra peak bytes per extra raw byte between the
two series). Targets (issue 15): volume memory ≤ 1.5× raw at 300×512², marginal ≤ 1.5 bytes
per raw byte. Peak/raw of the whole process is printed too: at 300×512² it cannot approach
1.5 while the interpreter, numba and VTK's OpenGL context take 0.26 GB (MPR) to 0.44 GB (VR)
before any voxel (measured: imports 0.18 GB of it, the software OpenGL window 0.19 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = {                      # name: (what the child does, MEDVIEW_VR_MAPPER)
    "mpr": ("mpr", None),
    "vr-unshaded": ("mip", "cpu"),
    "vr-shaded": ("vr", "cpu"),
    "vr-shaded-cached": ("vr", "cpu-cached"),
    "mpr+vr": ("mpr+vr", "cpu"),
    "mpr+vr-cached": ("mpr+vr", "cpu-cached"),
}


def child(folder: str, what: str) -> int:
    """One case in this process; prints a JSON line with what it checked."""
    import numpy as np
    from vtkmodules.util.numpy_support import vtk_to_numpy

    from commands.render import render_plane
    from imaging import mpr as mpr_mod
    from imaging import raycast
    from imaging.series_select import select_series
    from imaging.vr import VrScene, offscreen_window, projection_rotation

    # everything that does not depend on the volume is up before it is read: the modules,
    # the offscreen OpenGL window, the ray caster's compiled kernels, one tiny reslice; the
    # resident memory then is the process's baseline, and what the peak adds to it is what
    # the volume costs (the "volume memory" of the issue)
    window = None
    if "vr" in what or what == "mip":
        window = offscreen_window((512, 512))
        window.Render()                                    # its OpenGL context exists
        raycast.warm_up(np.uint16)
    if "mpr" in what:
        from imaging.volume import SliceGeometry, volume_for_slices
        tiny, slots = volume_for_slices([SliceGeometry((0, 0, -k), (1, 0, 0, 0, 1, 0), (1, 1), 8, 8, 1.0)
                                         for k in range(4)], [(1.0, 0.0)] * 4, (0, 4095), modality="CT")
        for slot in slots:
            tiny.set_slice(slot, np.zeros((8, 8), np.uint16), intercept=0.0)
        render_plane(tiny, "axial")
        del tiny
    baseline = _rss("VmRSS")
    sel = select_series(folder, threshold=10)
    vol = sel.build_volume()
    shared = []
    if "mpr" in what:
        for view, angles in (("axial", None), ("coronal", None), ("oblique", (20.0, 15.0))):
            render_plane(vol, view, angles=angles)
        img = mpr_mod._vtk_reslicer(vol, 1).image           # the plane renderer's input
        shared.append(bool(np.shares_memory(vtk_to_numpy(img.GetPointData().GetScalars()), vol.data)))
    if "vr" in what or what == "mip":
        seen = []
        real_cast = raycast.cast

        def watching(data, *a, **k):                       # which array the caster reads
            if threading.current_thread() is threading.main_thread():   # not the warm-up
                seen.append(data)
            return real_cast(data, *a, **k)

        raycast.cast = watching
        scene = VrScene(vol, window)
        scene.set_preset("MIP" if what == "mip" else "CT bone")
        scene.reset_camera(projection_rotation(0.0, 0.0))
        scene.to_array()
        shared.append(bool(np.shares_memory(vtk_to_numpy(scene.image.GetPointData().GetScalars()), vol.data)))
        shared += [d is vol.data for d in seen]
        scene.close()
        scene.render_window.Finalize()
    print(json.dumps({"shared": all(shared), "checks": len(shared), "baseline": baseline,
                      "peak": _rss("VmHWM")}))
    return 0


def _rss(field: str) -> int:
    """This process's resident memory (VmRSS) or its peak (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(folder: Path, case: str) -> tuple[int, dict]:
    """(peak resident bytes, the child's report) of one case in a new process."""
    what, mapper = CASES[case]
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    env.pop("MEDVIEW_VR_MAPPER", None)
    if mapper:
        env["MEDVIEW_VR_MAPPER"] = mapper
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder), what]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=ROOT)
        _pid, status, usage = os.wait4(proc.pid, 0)      # its peak resident memory, in kB
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{case} failed: {err.read().decode()[-2000:]}")
        return usage.ru_maxrss * 1024, json.loads(out.read().decode().strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,300")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--cases", default="all", help=f"comma-separated, from {', '.join(CASES)}")
    args = ap.parse_args()
    from server.sample import make_sample_ct

    cases = list(CASES) if args.cases == "all" else args.cases.split(",")
    sizes = [int(x) for x in args.sizes.split(",")]
    rows: dict[str, list] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="volmem-") as tmp:
        for n in sizes:
            folder = Path(tmp) / f"ct{n}"
            make_sample_ct(folder, slices=n, size=args.size, seed=1)
            raw = n * args.size * args.size * 2
            for case in cases:
                peak, report = run_case(folder, case)
                rows[case].append((n, raw, peak, report))
    print(f"\nviewer volume memory, {args.size}² slices, resident memory per process: the baseline "
          "before the volume is read (modules, OpenGL window, compiled caster), the peak, and the "
          "volume memory = peak - baseline")
    print(f"{'case':<18} {'slices':>6} {'raw MB':>7} {'base MB':>8} {'peak MB':>8} {'peak/raw':>8}"
          f" {'volume/raw':>10} {'shared':>6} {'B per extra raw B':>18}")
    for case in cases:
        r = rows[case]
        marginal = ""
        if len(r) >= 2:
            (_n0, r0, p0, _), (_n1, r1, p1, _) = r[0], r[-1]
            marginal = f"{(p1 - p0) / (r1 - r0):.2f}"
        for k, (n, raw, peak, report) in enumerate(r):
            base = report["baseline"]
            print(f"{case if k == 0 else '':<18} {n:>6} {raw / 1e6:7.1f} {base / 1e6:8.1f} {peak / 1e6:8.1f} "
                  f"{peak / raw:8.2f} {(peak - base) / raw:10.2f} "
                  f"{'yes' if report['shared'] else 'NO':>6} {marginal if k == len(r) - 1 else '':>18}")
    print("targets: volume memory ≤ 1.5× raw at the larger series, ≤ 1.5 bytes of peak per extra raw byte")
    return 0


if __name__ == "__main__":
    sys.exit(main())
