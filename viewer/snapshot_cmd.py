"""``medview snapshot``: render one slice, as the stack view shows it, into a PNG.

    medview snapshot [--server URL] --series UID --slice N [--layers Q] [--level R]
                     [--window C,W] [--size W,H] [--no-overlays] --out file.png

``--slice N`` counts from 1, as the viewer shows it ("Im: N / total"): the first image
of the series is ``--slice 1``. Only that slice is fetched, at ``--layers`` quality layers (default all) and resolution
reduction ``--level`` (0 = full resolution; default: what a ``--size`` view needs, V4).
Without ``--server`` the bundled server is started on ``--store`` (or on the default
store, where the sample study is created on first run). The picture is drawn by the
desktop app's own :class:`~viewer.stackview.StackView`, offscreen.
"""
from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["cmd_snapshot", "parse_size"]


class SnapshotError(Exception):
    """A user-facing problem (bad slice, layers or level; unknown series...)."""


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in str(text).split(","))
    except ValueError:
        raise SnapshotError(f"--size must be W,H (pixels), got {text!r}") from None
    if w <= 0 or h <= 0 or w > 16384 or h > 16384:
        raise SnapshotError(f"--size must be between 1 and 16384 pixels per side, got {text!r}")
    return w, h


def _err(message: str) -> None:
    print(f"medview snapshot: {message}", file=sys.stderr)


def cmd_snapshot(args) -> int:
    """Run the sub-command; returns the exit code (0 done, 1 failed)."""
    from client.session import ServerError

    server = session = cache = None
    try:
        size = parse_size(getattr(args, "size", None) or "512,512")
        url = getattr(args, "snap_server", None)
        if not url:
            server = _start_bundled(getattr(args, "store", None))
            url = server.url
        from client.session import Session

        from client.appdirs import cache_for

        session = Session(url, args.user, args.password)
        cache = cache_for(args)
        summary = snapshot(session, cache, args.series, args.slice, out=Path(args.out),
                           layers=args.layers, level=args.level, window=args.window,
                           size=size, overlays=not getattr(args, "no_overlays", False))
    except (SnapshotError, ServerError) as e:
        _err(str(e))
        return 1
    finally:
        if session is not None:
            session.logout()
        if server is not None:
            server.stop()
        if cache is not None:
            cache.close()
    print(summary)
    return 0


def _start_bundled(store: str | None):
    from server.embedded import EmbeddedServer

    from client.appdirs import default_data_dir

    if store:
        path = Path(store)
        from server.database import store_exists

        if not store_exists(path):
            raise SnapshotError(f"no image store at {path}")
    else:
        from server.sample import ensure_sample_store

        path = default_data_dir() / "store"
        ensure_sample_store(path, log=lambda m: print(m, file=sys.stderr)).close()
    return EmbeddedServer(str(path)).start()


def snapshot(session, cache, series_uid: str, number: int, *, out: Path,
             layers: int | None = None, level: int | None = None,
             window: tuple[float, float] | None = None, size: tuple[int, int] = (512, 512),
             overlays: bool = True) -> str:
    """Fetch slice ``number`` (1-based, as the viewer shows it) and write the rendered
    view to ``out``; returns a summary line."""
    from client.series import SeriesData

    from client.series_loader import reduce_for_fit
    from imaging.model import DecodedImage, ImageMeta, SeriesInfo
    from .snapshot import render_view_to_image

    sd = SeriesData(session, cache, series_uid)
    if not 1 <= number <= len(sd):
        raise SnapshotError(f"--slice {number} is out of range: the series has {len(sd)} "
                            f"images (1-{len(sd)})")
    index = number - 1
    im = sd.images[index]
    numres, nlayers = im["numres"], im["nlayers"]
    if layers is not None and not 1 <= layers <= nlayers:
        raise SnapshotError(f"--layers {layers} is out of range: the image has {nlayers} "
                            f"quality layers (1-{nlayers})")
    if level is not None and not 0 <= level < numres:
        raise SnapshotError(f"--level {level} is out of range: the image has {numres} "
                            f"resolution levels (0 = full resolution to {numres - 1})")
    reduce = level if level is not None else reduce_for_fit(im["Columns"], im["Rows"], *size, numres)
    transfer = sd.transfer(comps=[index], layers=layers, reduce=reduce)
    transfer.run()
    d = sd.decode(index, reduce=reduce, layers=layers or 0)
    decoded = DecodedImage(index, d.pixels, min(d.layers, layers or nlayers), nlayers, d.reduce)
    meta = ImageMeta.from_dict(im)
    series = SeriesInfo.from_dict(sd.info, sd.images)
    image = render_view_to_image(series, meta, decoded, window=window, size=size,
                                 overlays=overlays)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not image.save(str(out), "PNG"):
        raise SnapshotError(f"cannot write {out}")
    return (f"{out}: slice {number} of {len(sd)}, {decoded.width}×{decoded.height} "
            f"(reduce {decoded.reduce}), {decoded.layers}/{nlayers} layers, "
            f"{transfer.received} bytes received, rendered at {size[0]}×{size[1]}")
