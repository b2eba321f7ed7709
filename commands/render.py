"""``medview render``: an MPR plane, a MIP or a volume rendering of a series, headless.

    medview render (--folder DIR | --series UID [--server URL])
                   --view axial|coronal|sagittal|oblique|mip|vr [--angles A,B] [--slab MM]
                   [--mode avg|mip|minip] [--position X,Y,Z] [--window C,W] [--spacing MM]
                   [--size W,H] [--thick-to-thin] --out file.png [--out-npy plane.npy]

* ``--folder`` runs the series selection (M1–M3) on a folder (or an image file: its
  folder) and prints what it kept, skipped and found missing; below the threshold it
  refuses with exit code 1.
* ``--series`` loads the series from the image server (``--server``, or the bundled one on
  ``--store`` / the default store), at full resolution and quality; ``--thick-to-thin``
  loads it through the slab pyramid (P10), which ends bit-exact as well.
* Planes (axial, coronal, sagittal, oblique) pass through ``--position`` (patient mm,
  default the volume centre) and cover the whole volume, with square pixels of
  ``--spacing`` mm (default the smallest voxel spacing). ``--angles A,B`` turns them: ``A``
  degrees about the patient's left-right axis, then ``B`` about the anterior-posterior
  axis; ``oblique`` is the axial plane so turned (it needs ``--angles``). ``--slab MM``
  makes a thick slab (``--mode``, default average).
* ``mip`` projects the maximum through the whole volume seen from the front (or a slab of
  ``--slab`` mm); ``vr`` renders the volume (``--size``, default 512,512). For both,
  ``--angles A,B`` turn the patient ``A`` degrees about the head-foot axis, then tilt ``B``
  degrees about the left-right axis.
* The PNG is the windowed picture (``--window C,W``; default: CT soft tissue, otherwise
  the 1–99 % range). ``--out-npy`` saves the plane itself (modality values such as HU,
  float32, NaN outside the volume) and a sidecar ``.json`` with its spacing, origin,
  axes, orientation labels and the settings used (for ``vr``: the RGB picture).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["add_parser", "cmd_render", "RenderError", "render_plane"]

VIEWS = ("axial", "coronal", "sagittal", "oblique", "mip", "vr")


class RenderError(Exception):
    """A user-facing problem (bad option, refused series...)."""


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers") from None
    if len(vals) != n:
        raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers")
    return vals


def add_parser(sub, credentials) -> argparse.ArgumentParser:
    """Add ``render`` to the ``medview`` sub-parsers (``credentials`` adds --user etc.)."""
    r = sub.add_parser("render", help="render an MPR plane, MIP or volume rendering to a PNG",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="a folder (or an image file) with the series")
    src.add_argument("--series", help="Series Instance UID on the image server")
    r.add_argument("--server", dest="render_server", help="image server URL (default: bundled)")
    r.add_argument("--view", required=True, choices=VIEWS)
    r.add_argument("--angles", type=lambda s: _floats(s, 2, "--angles"), help="A,B in degrees")
    r.add_argument("--slab", type=float, default=0.0, help="slab thickness in mm")
    r.add_argument("--mode", choices=("avg", "mip", "minip"), help="slab mode (default avg; mip for --view mip)")
    r.add_argument("--position", type=lambda s: _floats(s, 3, "--position"), help="X,Y,Z patient mm")
    r.add_argument("--window", type=lambda s: _floats(s, 2, "--window"), help="C,W")
    r.add_argument("--spacing", type=float, help="output pixel size in mm (planes)")
    r.add_argument("--size", type=lambda s: tuple(int(v) for v in _floats(s, 2, "--size")),
                   default=(512, 512), help="W,H of the vr picture")
    r.add_argument("--threshold", type=int, default=10, help="fewest images for MPR (default 10)")
    r.add_argument("--thick-to-thin", action="store_true", help="load through the slab pyramid")
    r.add_argument("--out", required=True, help="PNG file")
    r.add_argument("--out-npy", help="save the plane (float32) and a sidecar .json")
    credentials(r)
    return r


# --------------------------------------------------------------------------- volumes
def _volume_from_folder(args):
    from imaging.series_select import select_series

    sel = select_series(args.folder, threshold=args.threshold)
    print(sel.report(refusal=False))       # the refusal is the error message below
    if sel.refusal:
        raise RenderError(sel.refusal)
    return sel.build_volume(), sel.kept[0].window


def _volume_from_series(args):
    from client.series import SeriesData
    from client.session import Session

    from client.appdirs import cache_for
    from client.volume_loader import SlabVolumeLoader, VolumeLoader, full_plan, load_all, usable_images

    server = None
    url = args.render_server
    cache = session = None
    try:
        if not url:
            server = _start_bundled(getattr(args, "store", None))
            url = server.url
        session = Session(url, args.user, args.password)
        cache = cache_for(args)
        series = SeriesData(session, cache, args.series)
        keep, notes = usable_images(series.images)
        for n in notes:
            print(f"skipped {n}")
        if len(keep) < args.threshold:
            raise RenderError(f"MPR needs at least {args.threshold} images of one series; "
                              f"series {args.series} has {len(keep)} usable image(s)")
        if args.thick_to_thin:
            from client.slabs import SlabSeries
            loader = SlabVolumeLoader(SlabSeries(session, cache, args.series), series.images)
        else:
            loader = VolumeLoader(series, plan=full_plan())
        vol = load_all(loader, lambda ev: print(f"loaded: {ev.stage.name}, {ev.layers} layer(s)",
                                                file=sys.stderr))
        im = series.images[keep[0]]
        window = None
        if im.get("WindowCenter") is not None and im.get("WindowWidth"):
            window = (float(im["WindowCenter"]), float(im["WindowWidth"]))
        print(f"kept {len(keep)} image(s) of series {args.series}; {loader.received} bytes received")
        return vol, window
    finally:
        if session is not None:
            session.logout()
        if cache is not None:
            cache.close()
        if server is not None:
            server.stop()


def _start_bundled(store: str | None):
    from server.embedded import EmbeddedServer

    from client.appdirs import default_data_dir

    if store:
        path = Path(store)
        from server.database import store_exists

        if not store_exists(path):
            raise RenderError(f"no image store at {path}")
    else:
        from server.sample import ensure_sample_store

        path = default_data_dir() / "store"
        ensure_sample_store(path, log=lambda m: print(m, file=sys.stderr)).close()
    return EmbeddedServer(str(path)).start()


# --------------------------------------------------------------------------- rendering
def render_plane(volume, view: str, *, angles=None, slab: float = 0.0, mode: str | None = None,
                 position=None, spacing: float | None = None):
    """(values, plane, mode) for a plane view, mip included (see the module docstring)."""
    from imaging.mpr import BASE_AXES, angles_rotation, fit_plane, reslice
    from imaging.vr import projection_rotation

    a, b = angles or (0.0, 0.0)
    geom = volume.geometry
    through = np.asarray(position, float) if position is not None else geom.center
    if view == "mip":
        r = projection_rotation(a, b)
        u0, v0 = BASE_AXES["coronal"]
        u, v = r @ np.asarray(u0), r @ np.asarray(v0)
        n = np.cross(u, v)
        mode = mode or "mip"
        if not slab:
            proj = (geom.corners() - through) @ n
            slab = 2.0 * float(np.abs(proj).max()) + 2.0 * max(geom.spacing)
        plane = fit_plane(geom, u, v, through=through, spacing=spacing)
        return reslice(volume, plane, slab=slab, mode=mode, max_samples=2048), plane, mode, slab
    name = "axial" if view == "oblique" else view
    r = angles_rotation(a, b)
    u0, v0 = BASE_AXES[name]
    plane = fit_plane(geom, r @ np.asarray(u0), r @ np.asarray(v0), through=through, spacing=spacing)
    mode = mode or "avg"
    return reslice(volume, plane, slab=slab, mode=mode, max_samples=2048), plane, mode, slab


def _default_window(volume, values, explicit, header, projection: bool = False):
    """``--window`` as given; else :func:`imaging.windowing.initial_window`: the header's
    window when usable, or the percentile window of the rendered values (a MIP always
    gets its own window from the projection)."""
    from imaging.windowing import initial_window

    if explicit is not None:
        return tuple(float(x) for x in explicit)
    header = header or (None, None)
    return initial_window(header[0], header[1], values, projection=projection) or (
        (40.0, 400.0) if volume.modality.upper() == "CT" else (0.0, 1.0))


def _save_png(path: Path, array: np.ndarray) -> None:
    import io

    from PIL import Image

    from imaging.files import write_atomic

    a = np.ascontiguousarray(array)
    buf = io.BytesIO()
    Image.fromarray(a, "L" if a.ndim == 2 else "RGB").save(buf, "PNG")
    try:
        write_atomic(path, buf.getvalue())
    except OSError as e:
        raise RenderError(f"cannot write {path}: {e.strerror or e}") from None


def cmd_render(args) -> int:
    """Run the sub-command; returns the exit code."""
    from client.session import ServerError

    from imaging.mpr import display_uint8

    try:
        if args.view == "oblique" and not args.angles:
            raise RenderError("--view oblique needs --angles A,B")
        if args.folder:
            volume, dicom_window = _volume_from_folder(args)
        else:
            volume, dicom_window = _volume_from_series(args)
        for w in volume.warnings:
            print(f"warning: {w}")
        out = Path(args.out)
        sidecar: dict = {"view": args.view, "series_uid": volume.series_uid, "modality": volume.modality,
                         "angles": list(args.angles or (0.0, 0.0)),
                         "volume": volume.geometry.to_json()}
        if args.view == "vr":
            from imaging.vr import projection_rotation, render_volume

            window = args.window            # MIP presets choose their own from the projection
            rgb = render_volume(volume, size=args.size, rotation=projection_rotation(*(args.angles or (0, 0))),
                                window=window)
            _save_png(out, rgb)
            summary = f"{out}: volume rendering {rgb.shape[1]}×{rgb.shape[0]}"
            array, sidecar["kind"] = rgb, "rgb"
        else:
            values, plane, mode, slab = render_plane(volume, args.view, angles=args.angles, slab=args.slab,
                                                     mode=args.mode, position=args.position,
                                                     spacing=args.spacing)
            window = _default_window(volume, values, args.window, dicom_window,
                                     projection=mode == "mip" and slab > 0)
            _save_png(out, display_uint8(values, *window))
            labels = plane.labels()
            sidecar.update(plane.to_json())
            sidecar.update(kind="plane", units="HU" if volume.modality.upper() == "CT" else "",
                           slab=slab, mode=mode if slab else None, window=list(window),
                           labels={"left": labels.left, "right": labels.right, "top": labels.top,
                                   "bottom": labels.bottom},
                           position=list(map(float, args.position or volume.geometry.center)))
            summary = (f"{out}: {args.view} {plane.shape[1]}×{plane.shape[0]} px at {plane.spacing:.3g} mm"
                       f"{f', {mode} slab {slab:.1f} mm' if slab else ''}, window {window[0]:g}/{window[1]:g}, "
                       f"labels {labels.left}/{labels.right}/{labels.top}/{labels.bottom}")
            array = values.astype(np.float32)
        if args.out_npy:
            npy = Path(args.out_npy)
            npy.parent.mkdir(parents=True, exist_ok=True)
            np.save(npy, array)
            npy.with_suffix(".json").write_text(json.dumps(sidecar, indent=1))
            summary += f"; {npy} (+ {npy.with_suffix('.json').name})"
        print(summary)
        return 0
    except (RenderError, ServerError) as e:
        print(f"medview render: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - e.g. a volume that cannot be built
        from imaging.volume import VolumeError
        from imaging.vr import VrUnavailable

        if isinstance(e, (VolumeError, VrUnavailable)):
            print(f"medview render: {e}", file=sys.stderr)
            return 1
        raise
