"""``medview``: the desktop app and its headless sub-commands.

    medview                         desktop app with the bundled server and sample study
    medview --server URL            desktop app against another server (login dialog)
    medview --station NAME [--station-cache DIR]
                                    a reading station: its worklist, slides from its cache
    medview fetch --server URL --series UID [--layers N] [--level R] [--region x,y,w,h] --out DIR
    medview snapshot [--server URL] --series UID --slice N [--layers Q] [--level R]
                     [--window C,W] [--size W,H] [--no-overlays] --out file.png
    medview render (--folder DIR | --series UID [--server URL]) --view axial|coronal|sagittal|
                   oblique|mip|vr [--angles A,B] [--slab MM] [--position X,Y,Z] [--window C,W]
                   --out file.png [--out-npy plane.npy]          (see viewer/render_cmd.py)
    medview render --slide ID --level L [--region x,y,w,h] [--sr 2|4] --out file.png
                                                                  (see commands/slide_render.py)
    medview list [--server URL] studies|series|instances [--patient ID] [--study UID]
                 [--series UID] [--json]      the UIDs the commands above need

Images are numbered from 1 in series order everywhere, as the viewer shows them.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from client.appdirs import cache_for, default_cache_path, default_data_dir  # noqa: F401 (re-exported)
from commands.slide_render import region_arg


def _window(s: str) -> tuple[float, float]:
    try:
        c, w = (float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("window must be C,W") from None
    return c, w


def _credentials(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", default=os.environ.get("MEDVIEW_USER", "local"),
                   help="user name (default: the local user)")
    p.add_argument("--password", default=os.environ.get("MEDVIEW_PASSWORD"))
    p.add_argument("--cache", default=None,
                   help=f"packet cache file (default {default_cache_path()})")
    p.add_argument("--no-cache", action="store_true", help="do not use the packet cache")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medview", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", help="image server URL (default: start the bundled server)")
    p.add_argument("--store", help="store directory of the bundled server "
                   f"(default {default_data_dir() / 'store'})")
    p.add_argument("--station", metavar="NAME",
                   help="run as reading station NAME: its worklist opens, slides come from "
                        "its pre-distributed cache first")
    p.add_argument("--station-cache", metavar="DIR",
                   help="the station's cache folder (default: as configured on the server)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command")

    f = sub.add_parser("fetch", help="fetch a series progressively and write .npy files")
    f.add_argument("--server", required=True, dest="fetch_server")
    f.add_argument("--series", required=True)
    f.add_argument("--layers", type=int)
    f.add_argument("--level", type=int, help="resolution reduction, 0 = full resolution")
    f.add_argument("--region", type=region_arg, help="x,y,w,h in full-resolution pixels")
    f.add_argument("--order", default="quality", choices=("quality", "resolution", "image"))
    f.add_argument("--out", required=True)
    _credentials(f)

    s = sub.add_parser("snapshot", help="render the stack view offscreen to a PNG")
    s.add_argument("--server", dest="snap_server")
    s.add_argument("--series", required=True)
    s.add_argument("--slice", type=int, default=1,
                   help="image number, 1-based as the viewer shows it (default 1)")
    s.add_argument("--layers", type=int)
    s.add_argument("--level", type=int)
    s.add_argument("--window", type=_window,
                   help="centre,width in modality units (a negative centre: --window=-600,1500)")
    s.add_argument("--size", default="512,512", help="output W,H in pixels")
    s.add_argument("--no-overlays", action="store_true",
                   help="image only, without the overlay text and scale bar")
    s.add_argument("--out", required=True)
    _credentials(s)

    from commands.render import add_parser as add_render_parser
    add_render_parser(sub, _credentials)
    _add_list_parser(sub)
    return p


def _add_list_parser(sub) -> None:
    from client.listing import LEVELS

    ls = sub.add_parser("list", help="list studies, series or instances and their UIDs")
    ls.add_argument("level", choices=LEVELS)
    ls.add_argument("--server", dest="list_server",
                    help="image server URL (default: the bundled server on --store)")
    ls.add_argument("--patient", help="only this Patient ID (* and ? wildcards)")
    ls.add_argument("--study", help="only this Study Instance UID")
    ls.add_argument("--series", help="only this Series Instance UID")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.add_argument("--user", default=os.environ.get("MEDVIEW_USER", "local"),
                    help="user name (default: the local user)")
    ls.add_argument("--password", default=os.environ.get("MEDVIEW_PASSWORD"))


def cmd_list(args) -> int:
    """Print the rows through the client session (the user's rights apply)."""
    from client.listing import format_rows, list_server
    from client.session import ServerError, Session

    server = session = None
    try:
        url = args.list_server or args.server
        if not url:
            from .snapshot_cmd import SnapshotError, _start_bundled
            try:
                server = _start_bundled(args.store)
            except SnapshotError as e:
                print(f"medview list: {e}", file=sys.stderr)
                return 1
            url = server.url
        session = Session(url, args.user, args.password)
        refused: list[str] = []
        rows = list_server(session, args.level, patient=args.patient, study=args.study,
                           series=args.series, refused=refused)
        for r in refused:
            print(f"medview list: left out: {r}", file=sys.stderr)
    except ServerError as e:
        print(f"medview list: {e}", file=sys.stderr)
        return 1
    finally:
        if session is not None:
            session.logout()
        if server is not None:
            server.stop()
    for line in format_rows(rows, args.level, as_json=args.json):
        print(line)
    return 0


def cmd_fetch(args) -> int:
    from client.fetch import fetch_series
    from client.session import ServerError, Session

    try:
        session = Session(args.fetch_server, args.user, args.password)
        summary = fetch_series(session, args.series, args.out, layers=args.layers,
                               level=args.level, region=args.region, cache=cache_for(args),
                               order=args.order, log=lambda m: print(m, file=sys.stderr))
    except ServerError as e:
        print(f"medview fetch: {e}", file=sys.stderr)
        return 1
    print(f"{len(summary['images'])} images written to {args.out} "
          f"({summary['bytes_received']} bytes received of {summary['bytes_total']} total)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from commands.slide_render import dispatch_slide_render

    code = dispatch_slide_render(sys.argv[1:] if argv is None else argv)   # render --slide
    if code is not None:
        return code
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "fetch":
        return cmd_fetch(args)
    if args.command == "list":
        return cmd_list(args)
    if args.command == "snapshot":
        from .snapshot_cmd import cmd_snapshot
        return cmd_snapshot(args)
    if args.command == "render":
        from commands.render import cmd_render
        return cmd_render(args)
    from .app import run_gui
    return run_gui(args)


if __name__ == "__main__":
    sys.exit(main())
