"""``medview-server``: store administration from the command line.

Sub-commands::

    medview-server ingest PATH... --store DIR [--no-verify] [--quiet]
    medview-server fsck --store DIR [--repair]
    medview-server sample --store DIR
    medview-server serve --store DIR [--host H] [--port P] [--policy FILE]
    medview-server user add NAME --store DIR [--group G]... [--password-stdin]
    medview-server user remove|passwd NAME --store DIR [--password-stdin]
    medview-server user groups NAME [GROUP...] --store DIR
    medview-server user grant USER|@GROUP --store DIR [--study UID | --series UID |
            --patient ID | --slide UID | --exam ACCESSION]
            [--max-layers N] [--max-reduce-min R] [--region x,y,w,h]... [--images 0-9]
            [--versions V2,V3] [--actions browse,metadata,fetch] [--revoke]
    medview-server user list --store DIR
    medview-server migrate --store DIR [--days N] [--archive DIR|s3://...] [--keep-hot V2]
            [--min-status S] [--dry-run]
    medview-server audit --store DIR [--user U] [--action A] [--resource UID]
            [--since YYYY-MM-DD] [--until YYYY-MM-DD] [--limit N] [--json]
    medview-server versions --store DIR [--series UID]
    medview-server list studies|series|instances --store DIR [--patient ID] [--study UID]
            [--series UID] [--json]

Exit codes: 0 success; 1 when ``ingest`` skipped a DICOM image it could not take (any
skip other than "not DICOM" / "not an image"), when ``fsck`` found rows with missing or
damaged files (or orphans it did not remove), when ``migrate`` met errors, or when a
``user`` command names an unknown user; 2 on usage errors (argparse).

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

    problem = _port_problem(args.host, args.port)
    if problem:
        print(f"error: cannot serve on {args.host}:{args.port}: {problem}", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving patient data on {args.host}; the local user is refused "
              "from other machines, give real users passwords (issue: rights)", flush=True)
    run(str(args.store), host=args.host, port=args.port, log_level=args.log_level,
        policy_path=str(args.policy) if args.policy else None)
    return 0


def _port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (in use, no such address...), or None.

    Checked before the server logs "serving" and opens the store; the same socket options
    as the server's (SO_REUSEADDR), so a port in TIME_WAIT is free and a listening one is not."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"unknown host ({e.strerror})"
    family, kind, proto, _name, addr = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(1)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return (f"port {port} is already in use by another program (another "
                    "medview-server?); stop it or choose another --port")
        if e.errno == errno.EACCES:
            return f"no permission to listen on port {port} (ports below 1024 need privileges)"
        return e.strerror or str(e)
    return None


# --------------------------------------------------------------------------- users
def _authority(args: argparse.Namespace):
    from .auth import Authority
    from .store import Store

    if not Path(args.store).is_dir():
        raise UsageError(f"no store at {args.store}")
    Store(args.store).close()          # creates the catalogue if needed
    return Authority(str(Path(args.store) / "catalogue.sqlite"))


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        pw = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        import getpass

        pw = getpass.getpass("password: ")
        if getpass.getpass("again: ") != pw:
            raise UsageError("the passwords differ")
    else:
        raise UsageError("give the password on standard input with --password-stdin")
    if len(pw) < 8:
        raise UsageError("a password needs at least 8 characters")
    return pw


def _cmd_user(args: argparse.Namespace) -> int:
    from .rights import Rule, exam_scope, format_ranges, parse_ranges, patient_scope

    auth = _authority(args)
    try:
        if args.action == "list":
            rules = auth.rules()
            for u in auth.users():
                groups = ", ".join(u["groups"]) or "-"
                login = "password" if u["password"] else "loopback only"
                print(f"{u['name']:<20} groups: {groups:<30} log-in: {login}")
            if rules:
                print("\nrights rules (unset = no limit):")
            for r in rules:
                parts = []
                for k, v in (("max_layers", r.max_layers), ("max_reduce_min", r.max_reduce_min),
                             ("images", format_ranges(r.images) if r.images is not None else None),
                             ("regions", ";".join(",".join(map(str, x)) for x in r.regions)
                              if r.regions is not None else None),
                             ("versions", ",".join(r.versions) if r.versions is not None else None),
                             ("actions", ",".join(sorted(r.actions)) if r.actions is not None else None)):
                    if v is not None:
                        parts.append(f"{k}={v}")
                print(f"  {r.subject:<20} scope {r.scope:<10} {' '.join(parts) or 'no limit'}")
            return 0
        name = args.name
        if args.action == "add":
            auth.add_user(name, _password(args), args.group or ())
            print(f"user {name} added" + (f" (groups: {', '.join(args.group)})" if args.group else ""))
        elif args.action == "remove":
            if not auth.remove_user(name):
                print(f"error: no user {name}", file=sys.stderr)
                return 1
            print(f"user {name} removed (its sessions end on their next request)")
        elif args.action == "passwd":
            auth.set_password(name, _password(args))
            print(f"password of {name} changed")
        elif args.action == "groups":
            auth.set_groups(name, args.groups)
            print(f"{name}: groups {', '.join(args.groups) or 'none'}")
        elif args.action == "grant":
            scope = (args.series or args.study or args.slide
                     or exam_scope(args.exam) or patient_scope(args.patient) or "*")
            if args.revoke:
                gone = auth.remove_rule(name, scope)
                print(f"rule of {name} on {scope} " + ("removed" if gone else "did not exist"))
                return 0 if gone else 1
            regions = None
            if args.region:
                regions = []
                for text in args.region:
                    try:
                        x, y, w, h = (int(v) for v in text.split(","))
                    except ValueError:
                        raise UsageError(f"--region is x,y,w,h, got {text!r}") from None
                    regions.append((x, y, w, h))
            rule = Rule(name, scope, args.max_layers, args.max_reduce_min, regions,
                        parse_ranges(args.images) if args.images is not None else None,
                        [v.strip() for v in args.versions.split(",") if v.strip()]
                        if args.versions is not None else None,
                        {a.strip() for a in args.actions.split(",") if a.strip()}
                        if args.actions is not None else None)
            auth.set_rule(rule)
            print(f"rule stored: {json_line(rule.to_json())}")
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        auth.close()
    return 0


def json_line(obj) -> str:
    import json

    return json.dumps(obj, separators=(", ", ": "))


# --------------------------------------------------------------------------- tiers
def _services(args: argparse.Namespace):
    """Store, policy, versions, diagnosis records and tiers of a store (for the CLI)."""
    from .diagnosis import DiagnosisRecords
    from .policy import PolicySource
    from .store import Store
    from .tiers import Tiers
    from .versions import VersionTable

    if not Path(args.store).is_dir():
        raise UsageError(f"no store at {args.store}")
    store = Store(args.store)
    policy = PolicySource(store.root, getattr(args, "policy", None))
    versions = VersionTable(store, policy.get)
    diag = DiagnosisRecords(store.root / "catalogue.sqlite")
    tiers = Tiers(store, versions=versions.get, status_of=diag.status,
                  settings=lambda: policy.get().storage)
    return store, policy, versions, diag, tiers


def _cmd_migrate(args: argparse.Namespace) -> int:
    store, policy, versions, diag, tiers = _services(args)
    try:
        st = policy.get().storage
        days = st.migrate_after_days if args.days is None else args.days
        if args.dry_run:
            todo = tiers.candidates(days, st.min_status if args.min_status is None else args.min_status)
            for c in todo:
                print(f"{c['sop']}: {len(c['frames'])} codestreams"
                      + (", original" if c["original"] else ""))
            print(f"{len(todo)} instances would be migrated")
            return 0
        problem = _archive_problem(tiers, args.archive)
        if problem:
            print(f"error: {problem}; nothing was migrated", file=sys.stderr)
            return 1
        report = tiers.migrate(days=days, archive=args.archive, keep_hot=args.keep_hot,
                               min_status=args.min_status,
                               log_fn=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
        for e in report.errors:
            print(f"error: {e}", file=sys.stderr)
        print(report.summary())
        return 0 if report.ok else 1
    finally:
        for part in (tiers, diag, versions):
            part.close()
        store.close()


def _archive_problem(tiers, url: str | None) -> str | None:
    """Why the archive cannot be used (not mounted, unreachable, no client), or None:
    said once for the run, not once per instance."""
    from .tiers import ArchiveError

    try:
        arch = tiers.archive(url)
        next(iter(arch.keys()), None)          # lists (the start of) the archive
    except (ArchiveError, OSError) as e:
        return str(e)
    return None


def _cmd_list(args: argparse.Namespace) -> int:
    from .listing import format_rows, list_store
    from .store import Store

    if not (Path(args.store) / "catalogue.sqlite").is_file():
        raise UsageError(f"no store at {args.store}")
    with Store(args.store) as store:
        rows = list_store(store.catalogue, args.level, patient=args.patient,
                          study=args.study, series=args.series)
    for line in format_rows(rows, args.level, as_json=args.json):
        print(line)
    return 0


def _add_list_parser(sub) -> None:
    from .listing import LEVELS

    p = sub.add_parser("list", help="studies, series or instances and their UIDs (what "
                       "medview fetch / snapshot / render need)")
    p.add_argument("level", choices=LEVELS)
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--patient", help="only this Patient ID (* and ? wildcards)")
    p.add_argument("--study", help="only this Study Instance UID")
    p.add_argument("--series", help="only this Series Instance UID")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_cmd_list)


def _cmd_versions(args: argparse.Namespace) -> int:
    store, policy, versions, diag, tiers = _services(args)
    try:
        uids = [args.series] if args.series else [
            s["SeriesInstanceUID"] for s in store.catalogue.query_series()]
        for uid in uids:
            info = store.catalogue.get_series(uid) or {}
            sv = versions.get(uid)
            if sv is None:
                continue
            print(f"{uid} {info.get('Modality', '')} {info.get('BodyPartExamined') or ''} "
                  f"{info.get('SeriesDescription') or ''}".rstrip())
            for v in sv.versions:
                layers = "all" if v.layers is None else str(v.layers)
                target = "lossless" if v.lossless else f"1:{v.target_ratio:g}"
                print(f"  {v.name}  layers {layers:<4} asked {target:<9} reached "
                      f"1:{v.actual_ratio:.1f}  {v.bytes} bytes  quality {v.quality}%  "
                      f"{v.purpose}")
        return 0
    finally:
        for part in (tiers, diag, versions):
            part.close()
        store.close()


def _cmd_audit(args: argparse.Namespace) -> int:
    import json
    from datetime import datetime, timezone

    def day(text):
        if text is None:
            return None
        try:
            return datetime.fromisoformat(text).replace(tzinfo=datetime.fromisoformat(text).tzinfo
                                                        or timezone.utc).timestamp()
        except ValueError:
            raise UsageError(f"dates are YYYY-MM-DD or ISO 8601, got {text!r}") from None

    auth = _authority(args)
    try:
        rows = auth.audit_rows(user=args.user, action=args.action, resource=args.resource,
                               since=day(args.since), until=day(args.until), limit=args.limit)
    finally:
        auth.close()
    for r in reversed(rows):
        if args.json:
            print(json.dumps(r, separators=(",", ":")))
            continue
        when = datetime.fromtimestamp(r["at"], timezone.utc).isoformat(timespec="seconds")
        d = r["detail"] or {}
        what = ""
        if r["action"] == "fetch" and "bytes_sent" in d:
            what = f" {d['bytes_sent']} bytes sent" + (f" ({d['version']})" if d.get("version") else "")
        elif d.get("error"):
            what = f" {d['error']}"
        print(f"{when} {r['user'] or '-':<12} {r['peer'] or '-':<15} {r['action']:<9} "
              f"{r['outcome']:<10} {r['resource'] or '-'}{what}")
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
    p.add_argument("--policy", type=Path, help="site policy file (TOML) over the defaults "
                   "and STORE/policy.toml")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("user", help="users, groups and rights")
    p.add_argument("action", choices=("add", "remove", "passwd", "groups", "grant", "list"))
    p.add_argument("name", nargs="?", help="user name (grant: a user, or @group)")
    p.add_argument("groups", nargs="*", help="groups: the user's groups (replaces them)")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p.add_argument("--group", action="append", help="add: a group of the user (repeat)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--study", help="grant: only for this Study Instance UID")
    scope.add_argument("--series", help="grant: only for this Series Instance UID")
    scope.add_argument("--patient", help="grant: only for this Patient ID (every study and "
                       "slide of the patient)")
    scope.add_argument("--slide", help="grant: only for this slide (its slide UID)")
    scope.add_argument("--exam", help="grant: only for the slides of this pathology exam "
                       "(accession number)")
    p.add_argument("--max-layers", type=int, help="grant: most quality layers")
    p.add_argument("--max-reduce-min", type=int,
                   help="grant: the finest resolution as a reduction (1 = half resolution)")
    p.add_argument("--region", action="append", metavar="X,Y,W,H",
                   help="grant: an allowed region in full-resolution pixels (repeat)")
    p.add_argument("--images", metavar="RANGES", help="grant: allowed images, e.g. 0-9,12")
    p.add_argument("--versions", help="grant: allowed versions, e.g. V2,V3")
    p.add_argument("--actions", help="grant: allowed actions (browse, metadata, fetch, "
                   "retrieve, diagnose)")
    p.add_argument("--revoke", action="store_true", help="grant: remove the rule instead")
    p.set_defaults(func=_cmd_user_checked)

    p = sub.add_parser("migrate", help="move old lossless layers and originals to the archive")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--days", type=float, help="age in days (default: the site policy's)")
    p.add_argument("--archive", help="archive directory or s3://bucket/prefix "
                   "(default: the site policy's, else STORE/archive)")
    p.add_argument("--keep-hot", help="the version whose layers stay hot (default V2)")
    p.add_argument("--min-status", type=int, help="only studies at least at this status")
    p.add_argument("--policy", type=Path, help="site policy file (TOML)")
    p.add_argument("--dry-run", action="store_true", help="list what would move")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("audit", help="who fetched what, and when")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--user")
    p.add_argument("--action", help="login, browse, metadata, fetch, retrieve, diagnose...")
    p.add_argument("--resource", help="a series or study UID")
    p.add_argument("--since", help="YYYY-MM-DD (UTC) or ISO 8601")
    p.add_argument("--until", help="YYYY-MM-DD (UTC) or ISO 8601")
    p.add_argument("--limit", type=int, default=200, help="newest N rows (default 200)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("versions", help="versions per series and the ratios they reach")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--series", help="one Series Instance UID")
    p.add_argument("--policy", type=Path, help="site policy file (TOML)")
    p.set_defaults(func=_cmd_versions)

    _add_list_parser(sub)
    return parser


def _cmd_user_checked(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.name:
        print(f"error: user {args.action} needs a name", file=sys.stderr)
        return 2
    if args.action != "groups" and args.groups:
        print(f"error: unexpected arguments: {' '.join(args.groups)}", file=sys.stderr)
        return 2
    return _cmd_user(args)


class UsageError(Exception):
    """A command-line mistake the user can fix (printed, exit code 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
