"""``medview-server``: store administration from the command line.

Sub-commands::

    medview-server ingest PATH... --store DIR [--no-verify] [--quiet] [--max-frames N]
            [--max-pixels-per-frame N] [--max-decoded-bytes N] [--accept-nonstandard-uids]
    medview-server quarantine list|show|resolve [ID] --store DIR [--all] [--json]
            [--keep | --replace | --new-uid]
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

Exit codes: 0 success; 1 when ``ingest`` skipped a DICOM image it could not take (any
skip other than "not DICOM" / "not an image"; 3 when it skipped none but quarantined a
file whose SOP Instance UID is stored with other content), when ``quarantine resolve``
could not resolve, when ``fsck`` found rows with missing or
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
    from .ingest import IngestLimits, ingest_paths
    from .store import Store

    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"error: no such file or folder: {', '.join(map(str, missing))}",
              file=sys.stderr)
        return 2
    try:
        limits = IngestLimits.for_store(
            args.store, max_frames=args.max_frames,
            max_pixels_per_frame=args.max_pixels_per_frame,
            max_decoded_bytes=args.max_decoded_bytes,
            accept_nonstandard_uids=True if args.accept_nonstandard_uids else None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    with Store(args.store) as store:
        def log(msg: str) -> None:
            if not args.quiet:
                print(msg, flush=True)

        report = ingest_paths(args.paths, store, log=log, verify=not args.no_verify,
                              limits=limits)
    print(report.summary(), flush=True)
    if not report.ok:
        return 1
    return 3 if report.quarantined else 0


def _cmd_quarantine(args: argparse.Namespace) -> int:
    import json

    from . import quarantine as q
    from .store import Store

    if not Path(args.store).is_dir():
        raise UsageError(f"no store at {args.store}")
    with Store(args.store) as store:
        if args.action == "list":
            rows = q.entries(store, None if args.all else "open")
            if args.json:
                for e in rows:
                    print(json.dumps(e.to_json(), separators=(",", ":")))
                return 0
            for e in rows:
                print(f"{e.id:>5}  {e.state:<8} {e.received_at}  SOP {e.sop_instance_uid}  "
                      f"{'; '.join(e.differences) or e.reason}")
            noun = "entry" if len(rows) == 1 else "entries"
            print(f"{len(rows)} {noun if args.all else 'open ' + noun}")
            return 0
        if args.id is None:
            raise UsageError(f"quarantine {args.action} needs an entry number")
        if args.action == "show":
            e = q.get(store, args.id)
            if e is None:
                print(f"error: no quarantine entry {args.id}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(e.to_json(), indent=1))
                return 0
            for k, v in e.to_json().items():
                if v not in (None, "", []):
                    print(f"{k:<24} {'; '.join(v) if isinstance(v, list) else v}")
            return 0
        action = args.keep and "keep" or args.replace and "replace" or args.new_uid and "new-uid"
        if not action:
            raise UsageError("quarantine resolve needs --keep, --replace or --new-uid")
        try:
            print(q.resolve(store, args.id, action, audit=_cli_auditor(store)))
        except q.QuarantineError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


def _cli_auditor(store):
    from .ingest import store_auditor

    fn, close = store_auditor(store)

    def audit(*a):
        try:
            fn(*a)
        finally:
            close()
    return audit


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
    run(str(args.store), host=args.host, port=args.port, log_level=args.log_level,
        policy_path=str(args.policy) if args.policy else None)
    return 0


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
    p.add_argument("--max-frames", type=int, help="refuse instances with more frames "
                   "(default: STORE/policy.toml [ingest], else 1000000)")
    p.add_argument("--max-pixels-per-frame", type=int, help="refuse larger frames "
                   "(default: [ingest], else 268435456)")
    p.add_argument("--max-decoded-bytes", type=int, help="refuse instances that decode to "
                   "more bytes (default: [ingest], else 64 GiB)")
    p.add_argument("--accept-nonstandard-uids", action="store_true",
                   help="accept UIDs with characters other than digits and dots, or "
                        "longer than 64 (printable, URL-safe ones only)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("quarantine", help="files whose SOP Instance UID is stored with "
                       "other content: list, show, resolve")
    p.add_argument("action", choices=("list", "show", "resolve"))
    p.add_argument("id", nargs="?", type=int, help="entry number (show, resolve)")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--all", action="store_true", help="list: resolved entries too")
    p.add_argument("--json", action="store_true", help="list, show: JSON")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--keep", action="store_true",
                     help="resolve: keep the stored instance (the quarantined file stays)")
    how.add_argument("--replace", action="store_true",
                     help="resolve: replace the stored instance by the quarantined file "
                          "(the stored original is kept in the quarantine)")
    how.add_argument("--new-uid", action="store_true",
                     help="resolve: import the quarantined file as a new instance under a "
                          "fresh SOP Instance UID that records the original one")
    p.set_defaults(func=_cmd_quarantine)

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
