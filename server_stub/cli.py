"""``medview-server``: store administration from the command line.

Sub-commands::

    medview-server ingest PATH... --store DIR [--no-verify] [--quiet]
    medview-server fsck --store DIR [--repair]
    medview-server sample --store DIR

Exit codes: 0 success; 1 when ``ingest`` skipped a DICOM image it could not take (any
skip other than "not DICOM" / "not an image"), or when ``fsck`` found rows with missing or
damaged files (or orphans it did not remove); 2 on usage errors (argparse).

Each sub-command registers itself with ``set_defaults(func=...)``; a new one only needs
its own ``add_parser`` block in :func:`build_parser`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def _cmd_ingest(args: argparse.Namespace) -> int:
    from .ingest import ingest_paths
    from .store import Store

    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"error: no such file or folder: {', '.join(map(str, missing))}",
              file=sys.stderr)
        return 2
    with Store(args.store) as store:
        def log(msg: str) -> None:
            if not args.quiet:
                print(msg, flush=True)

        report = ingest_paths(args.paths, store, log=log, verify=not args.no_verify)
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


def _cmd_fsck(args: argparse.Namespace) -> int:
    from .store import Store

    if not Path(args.store).is_dir():
        print(f"error: no store at {args.store}", file=sys.stderr)
        return 2
    with Store(args.store) as store:
        report = store.fsck(repair=args.repair)
    print(report.format())
    return 0 if report.clean else 1


def _cmd_sample(args: argparse.Namespace) -> int:
    from .sample import SAMPLE_SETTING, ensure_sample_store

    store = ensure_sample_store(args.store, log=lambda m: print(m, flush=True))
    with store:
        print(f"sample data: {store.catalogue.get_setting(SAMPLE_SETTING)}")
        print(", ".join(f"{v} {k}" for k, v in store.catalogue.counts().items()))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .app import run

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving patient data on {args.host}; the local user is refused "
              "from other machines, give real users passwords (issue: rights)", flush=True)
    run(str(args.store), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medview-server",
        description="Image store administration and server for the medview workstation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="import DICOM files and folders into a store")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="files or folders (searched recursively; DICOM recognised by its "
                        "preamble, not its name)")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the bit-exact decode check after encoding")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("fsck", help="check every stored file against the catalogue")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--repair", action="store_true", help="delete orphan files")
    p.set_defaults(func=_cmd_fsck)

    p = sub.add_parser("sample", help="create a store with sample data (first run only)")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("serve", help="run the HTTP image server")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8042)
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
