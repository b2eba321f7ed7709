"""``medview-server``: store administration from the command line.

Sub-commands::

    medview-server ingest PATH... --store DIR [--no-verify] [--quiet] [--max-frames N]
            [--max-pixels-per-frame N] [--max-decoded-bytes N] [--accept-nonstandard-uids]
    medview-server verify --store DIR [--workers N] [--reencode]
    medview-server quarantine list|show|resolve [ID] --store DIR [--all] [--json]
            [--keep | --replace | --new-uid]
    medview-server fsck --store DIR [--repair]
    medview-server sample --store DIR
    medview-server serve --store DIR [--host H] [--port P] [--policy FILE]
            [--dicom-port N [--ae-title MEDVIEW] [--dicom-host 127.0.0.1]]
            [--workers N [--max-streams N]]
    medview-server ae add TITLE --host H --port P --store DIR | ae list | ae remove TITLE
            | ae allow-any on|off
    medview-server pacs add NAME --host H --port P --ae TITLE --store DIR | pacs list
            | pacs remove NAME | pacs echo NAME
    medview-server pacs query NAME [--patient ID] [--date RANGE] [--modality M] --store DIR
    medview-server pacs retrieve NAME --study UID [--via move|get] [--listen-port N] --store DIR
    medview-server export --study UID [--series UID] --out DIR|file.zip [--dicomdir] --store DIR
            [--trusted-proxy CIDR]... [--proxy-header x-forwarded-for|forwarded]
            [--allow-local]
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
    medview-server prefetch --store DIR --worklist FILE [--limit N] [--any-modality] [--json]
    medview-server convert PATH... --out DIR [--to policy|jpegls|htj2k|jxl|j2k]
            [--lossy RATIO] [--min-psnr DB] [--max-error E] [--workers N] [--report FILE]
    medview-server convert --store DIR --policy [--workers N]
    medview-server convert --store DIR --summary
    medview-server list studies|series|instances --store DIR [--patient ID] [--study UID]
            [--series UID] [--json]

Every sub-command with ``--store`` also takes ``--database postgresql://...``: the store's
tables in PostgreSQL instead of the SQLite file ``STORE/catalogue.sqlite``
(:func:`add_database_option`, :mod:`server.database`).

Exit codes: 0 success; 1 when ``ingest`` skipped a DICOM image it could not take (any
skip other than "not DICOM" / "not an image"; 3 when it skipped none but quarantined a
file whose SOP Instance UID is stored with other content), when ``quarantine resolve``
could not resolve, when ``fsck`` found rows with missing or
damaged files (or orphans it did not remove), when ``migrate`` met errors, or when a
``user`` command names an unknown user, or when ``convert`` failed a file (the others
are converted); 2 on usage errors (argparse).

Each sub-command registers itself with ``set_defaults(func=...)``; a new one only needs
its own ``add_parser`` block in :func:`build_parser`.
"""
from __future__ import annotations

import argparse
import json
import os
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
                              limits=limits)      # final copies too, if [codec] on_ingest
    print(report.summary(), flush=True)
    if args.no_verify and report.imported:
        print(f"{len(report.imported)} instances wait for the verification of their lossless "
              "layer (served without it until then): medview-server verify --store "
              f"{args.store}, or the verify job of medview-server serve", flush=True)
    if not report.ok:
        return 1
    return 3 if report.quarantined else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .store import Store
    from .verify import lossless_health, reencode_failed, verify_pending

    with Store(args.store) as store:
        report = verify_pending(store, workers=args.workers)
        if args.reencode:
            for sop, what in reencode_failed(store).items():
                print(f"{sop}: {what}", flush=True)
        for sop, why in report.failed.items():
            print(f"FAILED {sop}: {why}", flush=True)
        for sop, why in report.postponed.items():
            print(f"postponed {sop}: {why}", flush=True)
        health = lossless_health(store.catalogue)
    print(f"lossless verification: {report.summary()}; in the store: {health['pending']} "
          f"pending, {health['failed']} failed", flush=True)
    return 1 if health["failed"] or report.postponed else 0


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
            from .quarantine_admin import resolve

            print(resolve(store, args.id, action, audit=_cli_auditor(store)))
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
    from .fsck import fsck
    from .store import Store

    if not Path(args.store).is_dir():
        print(f"error: no store at {args.store}", file=sys.stderr)
        return 2
    with Store(args.store) as store:
        report = fsck(store, repair=args.repair)
    print(report.format())
    return 0 if report.clean else 1


def _cmd_upgrade(args: argparse.Namespace) -> int:
    """Bring a store made by an earlier version up to date: every component's schema
    migrations (catalogue, users and audit, diagnosis, tiers, versions, slides, policy
    copies, job leases; in SQLite or PostgreSQL, see --database), and the separate slide
    catalogue (``slides/slides.sqlite``) moved into the one catalogue."""
    from .database import store_exists
    from .schema_upgrade import upgrade_all
    from .slide_catalogue import CatalogueError as SlideCatalogueError
    from .slide_catalogue import upgrade_slide_catalogue
    from .store import Store

    root = Path(args.store)
    if not root.is_dir() or not store_exists(root):
        print(f"error: no store at {root} (no catalogue)", file=sys.stderr)
        return 2
    with Store(root) as store:
        versions = upgrade_all(store)
        try:
            moved = upgrade_slide_catalogue(root / "slides", store.database)
        except SlideCatalogueError as e:
            print(f"error: {e}; nothing was changed", file=sys.stderr)
            return 1
    print(f"{root}: schema " + ", ".join(f"{c} {v}" for c, v in versions.items()))
    if moved is None:
        print(f"{root}: up to date")
    else:
        print(f"{root}: slide catalogue moved into the catalogue database: "
              + ", ".join(f"{n} {t}" for t, n in moved.items()))
    return 0


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

    from .peers import parse_networks

    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.max_streams is not None and args.max_streams < 1:
        raise UsageError("--max-streams must be at least 1")
    problem = _port_problem(args.host, args.port)
    if problem:
        print(f"error: cannot serve on {args.host}:{args.port}: {problem}", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        trusted = parse_networks(args.trusted_proxy or ())
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving patient data on {args.host}; give every user a password",
              flush=True)
    if args.allow_local:
        print("warning: --allow-local: the password-less user 'local' can log in from "
              "this machine (loopback, not through a proxy)", flush=True)
    dimse = _start_dimse(args)
    try:
        run(str(args.store), host=args.host, port=args.port, log_level=args.log_level,
            policy_path=str(args.policy) if args.policy else None,
            allow_local=args.allow_local, trusted_proxies=trusted,
            proxy_header=args.proxy_header, workers=args.workers,
            max_streams=args.max_streams)
    finally:
        if dimse is not None:
            dimse.stop()
    return 0


# --------------------------------------------------------------------------- DICOM network
def _start_dimse(args: argparse.Namespace):
    """The DICOM SCP next to the HTTP server when ``--dicom-port`` is given."""
    if args.dicom_port is None:
        return None
    from .dimse import DimseServer
    from .store import Store

    if args.dicom_host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: DICOM listener on {args.dicom_host}; only the AE titles of "
              "'medview-server ae list' may associate unless 'ae allow-any on'", flush=True)
    store = Store(args.store)
    return DimseServer(store, ae_title=args.ae_title, host=args.dicom_host,
                       port=args.dicom_port).start()


def _peers(args: argparse.Namespace):
    from .dimse import Peers
    from .store import Store

    if not Path(args.store).is_dir():
        raise UsageError(f"no store at {args.store}")
    store = Store(args.store)
    return store, Peers(store.catalogue)


def _cmd_ae(args: argparse.Namespace) -> int:
    store, peers = _peers(args)
    try:
        if args.action == "list":
            dests = peers.destinations()
            for p in dests.values():
                print(f"{p.name:<16} {p.host}:{p.port}")
            print(f"calling AE titles: {'any' if peers.allow_any else 'known peers only'}")
            return 0
        if args.action == "allow-any":
            if args.name not in ("on", "off"):
                raise UsageError("ae allow-any takes on or off")
            peers.allow_any = args.name == "on"
            print(f"calling AE titles: {'any' if peers.allow_any else 'known peers only'}")
            return 0
        if not args.name:
            raise UsageError(f"ae {args.action} needs an AE title")
        if args.action == "add":
            if not args.host or not args.port:
                raise UsageError("ae add needs --host and --port")
            try:
                p = peers.add_destination(args.name, args.host, args.port)
            except ValueError as e:
                raise UsageError(str(e)) from None
            print(f"AE {p.name} at {p.host}:{p.port} added (C-MOVE destination, may call us)")
            return 0
        if not peers.remove_destination(args.name):
            print(f"error: no AE {args.name}", file=sys.stderr)
            return 1
        print(f"AE {args.name} removed")
        return 0
    finally:
        store.close()


def _cmd_pacs(args: argparse.Namespace) -> int:
    from .dimse import DimseError, Pacs

    store, peers = _peers(args)
    try:
        if args.action == "list":
            for p in peers.pacs().values():
                print(f"{p.name:<16} {p.ae_title:<16} {p.host}:{p.port}")
            return 0
        if not args.name:
            raise UsageError(f"pacs {args.action} needs a name")
        if args.action == "add":
            if not (args.host and args.port and args.ae):
                raise UsageError("pacs add needs --host, --port and --ae")
            try:
                p = peers.add_pacs(args.name, args.host, args.port, args.ae)
            except ValueError as e:
                raise UsageError(str(e)) from None
            print(f"PACS {p.name}: {p.ae_title} at {p.host}:{p.port}")
            return 0
        if args.action == "remove":
            if not peers.remove_pacs(args.name):
                print(f"error: no PACS {args.name}", file=sys.stderr)
                return 1
            print(f"PACS {args.name} removed")
            return 0
        try:
            pacs = Pacs(peers.get_pacs(args.name), ae_title=args.ae_title)
        except KeyError as e:
            print(f"error: {e.args[0]}", file=sys.stderr)
            return 1
        try:
            if args.action == "echo":
                pacs.echo()
                print(f"{args.name}: C-ECHO ok")
            elif args.action == "query":
                rows = pacs.find_studies(args.patient, args.date, args.modality)
                for r in rows:
                    mods = r.get("ModalitiesInStudy") or ""
                    mods = "\\".join(mods) if isinstance(mods, list) else str(mods)
                    print(f"{r.get('StudyInstanceUID', '')}  {r.get('StudyDate') or '-':<8}  "
                          f"{str(r.get('PatientID') or ''):<12} "
                          f"{str(r.get('PatientName') or ''):<24} {mods:<8} "
                          f"{r.get('NumberOfStudyRelatedInstances') or ''} "
                          f"{r.get('StudyDescription') or ''}".rstrip())
                print(f"{len(rows)} studies")
            elif args.action == "retrieve":
                if not args.study:
                    raise UsageError("pacs retrieve needs --study UID")

                def progress(done: int, total: int) -> None:
                    if not args.quiet:
                        print(f"\r{done}/{total} instances", end="", flush=True)

                counts = pacs.retrieve(args.study, store, via=args.via,
                                       listen_port=args.listen_port, progress=progress)
                if not args.quiet:
                    print()
                for e in counts["errors"]:
                    print(f"error: {e}", file=sys.stderr)
                print(f"{counts['completed']} received, {counts['failed']} failed; "
                      f"{counts['imported']} imported, {counts['duplicates']} duplicates, "
                      f"{counts['skipped']} skipped")
                return 0 if not counts["failed"] and not counts["skipped"] else 1
        except DimseError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    finally:
        store.close()


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import ExportError, export_study
    from .store import Store

    if not Path(args.store).is_dir():
        raise UsageError(f"no store at {args.store}")
    with Store(args.store) as store:
        try:
            report = export_study(store, args.study, args.out, series=args.series,
                                  dicomdir=args.dicomdir)
        except ExportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(report.summary())
    return 0


def _add_dimse_parsers(sub) -> None:
    p = sub.add_parser("ae", help="DICOM peers that may call us and receive C-MOVE")
    p.add_argument("action", choices=("add", "remove", "list", "allow-any"))
    p.add_argument("name", nargs="?", help="the peer's AE title (allow-any: on or off)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.set_defaults(func=_cmd_ae)

    p = sub.add_parser("pacs", help="query and retrieve from a remote PACS (DICOM SCU)")
    p.add_argument("action", choices=("add", "remove", "list", "echo", "query", "retrieve"))
    p.add_argument("name", nargs="?", help="local name of the PACS")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--ae", help="add: the PACS's AE title")
    p.add_argument("--ae-title", default="MEDVIEW", help="our AE title (default MEDVIEW)")
    p.add_argument("--patient", help="query: Patient ID (wildcards * and ?)")
    p.add_argument("--date", help="query: study date YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    p.add_argument("--modality", help="query: modality in study, e.g. CT")
    p.add_argument("--study", help="retrieve: Study Instance UID")
    p.add_argument("--via", choices=("get", "move"), default="get",
                   help="retrieve: C-GET (one association, default) or C-MOVE to our title")
    p.add_argument("--listen-port", type=int,
                   help="retrieve --via move: port of our temporary storage SCP")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=_cmd_pacs)

    p = sub.add_parser("export", help="write a study's original files (optionally a DICOMDIR)")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--study", required=True, help="Study Instance UID")
    p.add_argument("--series", help="only this Series Instance UID")
    p.add_argument("--out", required=True, type=Path, help="an empty folder, or FILE.zip")
    p.add_argument("--dicomdir", action="store_true", help="write a DICOM File-set with a "
                   "DICOMDIR")
    p.set_defaults(func=_cmd_export)
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
    with Store(args.store) as store:   # creates the catalogue if needed
        return Authority(store.database)


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
    diag = DiagnosisRecords(store.database)
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


def _cmd_prefetch(args: argparse.Namespace) -> int:
    from .priors import WorklistError, prefetch, read_worklist

    try:
        exams = read_worklist(args.worklist)
    except WorklistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    store, policy, versions, diag, tiers = _services(args)
    try:
        rep = prefetch(store.catalogue, tiers, versions.get, exams, limit=args.limit,
                       other_modalities=args.any_modality,
                       log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
        for e in rep.errors:
            print(f"error: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"exams": rep.exams, "priors": rep.priors,
                              "frames_recalled": rep.frames_recalled,
                              "frames_hot": rep.frames_hot,
                              "bytes_recalled": rep.bytes_recalled, "errors": rep.errors}))
        else:
            print(rep.summary())
        return 0 if rep.ok else 1
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

    from .database import store_exists

    if not store_exists(args.store):
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


# --------------------------------------------------------------------------- convert (H4)
def _cmd_convert(args: argparse.Namespace) -> int:
    """``convert PATH... --out DIR``: the batch converter; ``convert --store DIR --policy``:
    the store's final copies; ``convert --summary --store DIR``: their state."""
    from . import convert

    if args.store is not None:
        if args.paths or args.out:
            raise UsageError("--store works on the store's own instances: no PATH or --out")
        if not Path(args.store).is_dir():
            raise UsageError(f"no store at {args.store}")
        from . import policy_copies

        if args.summary:
            print(policy_copies.summary_text(args.store, policy_file=args.policy_file))
            return 0
        if not args.policy:
            raise UsageError("with --store, say --policy (make the policy copies) or --summary")
        rep = policy_copies.convert_store(
            args.store, policy_file=args.policy_file, workers=args.workers,
            progress=None if args.quiet else convert.progress_printer())
        if args.report:
            for p in convert.write_report(rep, args.report):
                print(f"report: {p}")
        print(rep.summary(), flush=True)
        return 0 if rep.ok else 1
    if args.summary or args.policy:
        raise UsageError("--summary and --policy go with --store DIR")
    if not args.paths or args.out is None:
        raise UsageError("convert PATH... --out DIR (or --store DIR --policy)")
    if args.lossy is not None and args.lossy <= 1:
        raise UsageError(f"--lossy is a compression ratio above 1, got {args.lossy}")
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    codec_policy = None
    if args.to == "policy":
        from .policy import PolicyError, load_policy

        try:
            codec_policy = load_policy(None, args.policy_file).codec
        except PolicyError as e:
            raise UsageError(str(e)) from None
    opts = convert.Options(to=args.to, lossy_ratio=args.lossy, min_psnr=args.min_psnr,
                           max_error=args.max_error, codec_policy=codec_policy)
    rep = convert.convert_paths(args.paths, args.out, opts, workers=args.workers,
                                progress=None if args.quiet else convert.progress_printer())
    report = args.report if args.report else Path(args.out) / "convert-report.json"
    for p in convert.write_report(rep, report):
        print(f"report: {p}")
    print(rep.summary(), flush=True)
    return 0 if rep.ok else 1


def _add_convert_parser(sub) -> None:
    from .convert import DEFAULT_MIN_PSNR, TARGETS

    p = sub.add_parser("convert", help="re-encode DICOM files (JPEG-LS, HTJ2K, JPEG XL, "
                       "J2K), keeping every attribute and verifying each output")
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                   help="DICOM files or folders (searched recursively)")
    p.add_argument("--out", type=Path, help="output folder (inputs are never overwritten)")
    p.add_argument("--to", choices=TARGETS, default="policy",
                   help="codec; 'policy' (default) follows the site policy's [codec] table")
    p.add_argument("--lossy", type=float, metavar="RATIO",
                   help="lossy at about this compression ratio (new SOP Instance UID, "
                        "LossyImageCompression recorded); default lossless")
    p.add_argument("--min-psnr", type=float, default=DEFAULT_MIN_PSNR,
                   help=f"lossy: refuse outputs below this PSNR in dB (default {DEFAULT_MIN_PSNR:g})")
    p.add_argument("--max-error", type=float, help="lossy: refuse outputs with a larger "
                   "maximum pixel error")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--report", type=Path, help="report file; written as FILE.json and "
                   "FILE.csv (default OUT/convert-report.json/.csv)")
    p.add_argument("--store", type=Path, help="work on a store instead of files")
    p.add_argument("--policy", action="store_true",
                   help="with --store: make each instance's policy copy (final copy)")
    p.add_argument("--summary", action="store_true",
                   help="with --store: show the store's conversion state")
    p.add_argument("--policy-file", type=Path, help="site policy file (TOML) over the defaults")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medview-server",
        description="Image store administration and server for the medview workstation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_store_parsers(sub)
    _add_serve_parser(sub)
    _add_user_parser(sub)
    _add_tier_parsers(sub)
    _add_record_parsers(sub)
    _add_dimse_parsers(sub)
    _add_convert_parser(sub)
    _add_list_parser(sub)
    for name in ("ingest", "fsck", "serve", "sample", "migrate"):
        _object_store_args(sub.choices[name])
    return parser


def _add_store_parsers(sub) -> None:
    """The sub-commands ingest, quarantine, fsck, upgrade, sample: a store's contents and health."""
    p = sub.add_parser("ingest", help="import DICOM files and folders into a store")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="files or folders (searched recursively; DICOM recognised by its "
                        "preamble, not its name)")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--no-verify", action="store_true",
                   help="store at once, without the bit-exact decode check before the "
                        "commit: the lossless layer is served only once `medview-server "
                        "verify` (or the server's verify job) has checked it")
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

    p = sub.add_parser("verify", help="check the lossless layers stored unverified "
                                      "(ingest --no-verify) and serve them once equal")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: one per core)")
    p.add_argument("--reencode", action="store_true",
                   help="encode the instances whose verification failed again from their "
                        "originals (each decoded and compared before it replaces anything)")
    p.set_defaults(func=_cmd_verify)

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

    p = sub.add_parser("upgrade", help="bring a store made by an earlier version up to date")
    p.add_argument("--store", required=True)
    p.set_defaults(func=_cmd_upgrade)

    p = sub.add_parser("sample", help="create a store with sample data (first run only)")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.set_defaults(func=_cmd_sample)


def _add_serve_parser(sub) -> None:
    """The sub-commands serve: the HTTP image server."""
    p = sub.add_parser("serve", help="run the HTTP image server")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8042)
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--policy", type=Path, help="site policy file (TOML) over the defaults "
                   "and STORE/policy.toml")
    p.add_argument("--dicom-port", type=int, help="also run the DICOM SCP (C-ECHO, C-STORE, "
                   "C-FIND, C-MOVE, C-GET) on this port")
    p.add_argument("--ae-title", default="MEDVIEW", help="our AE title (default MEDVIEW)")
    p.add_argument("--dicom-host", default="127.0.0.1",
                   help="address of the DICOM listener (default 127.0.0.1)")
    p.add_argument("--trusted-proxy", action="append", metavar="CIDR",
                   help="a reverse proxy whose forwarding header names the client (repeat; "
                        "default none: the client is the TCP peer, headers are ignored)")
    p.add_argument("--proxy-header", default="x-forwarded-for",
                   choices=("x-forwarded-for", "forwarded"),
                   help="the header the trusted proxies set (default X-Forwarded-For)")
    p.add_argument("--allow-local", action="store_true",
                   help="let the password-less user 'local' log in from loopback (off: "
                        "only the desktop app's bundled server has it)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes on the one port (sessions and caches are shared "
                        "through the database; default 1)")
    p.add_argument("--max-streams", type=int, default=None, metavar="N",
                   help="packet streams the machine runs at once, shared by the worker "
                        "processes (each takes its share, rounded up); beyond them 503 "
                        "with Retry-After (default 2 per core)")
    p.set_defaults(func=_cmd_serve)


def _add_user_parser(sub) -> None:
    """The sub-commands user: users, groups and rights."""
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
                   "retrieve, diagnose, store)")
    p.add_argument("--revoke", action="store_true", help="grant: remove the rule instead")
    p.set_defaults(func=_cmd_user_checked)


def _add_tier_parsers(sub) -> None:
    """The sub-commands migrate, prefetch: the archive tier and prior studies."""
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

    p = sub.add_parser("prefetch", help="recall and prepare the relevant prior studies "
                       "of a worklist's patients (CSV or JSON: patient_id, date, modality)")
    p.add_argument("--store", required=True, type=Path, help="store directory")
    p.add_argument("--worklist", required=True, type=Path, help="scheduled exams (CSV/JSON)")
    p.add_argument("--limit", type=int, default=2, help="priors per exam (default 2)")
    p.add_argument("--any-modality", action="store_true",
                   help="also priors of another modality (after the same modality's)")
    p.add_argument("--policy", type=Path, help="site policy file (TOML)")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=_cmd_prefetch)


def _add_record_parsers(sub) -> None:
    """The sub-commands audit, versions: what was fetched, and the versions of the series."""
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


def _object_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objects", metavar="URL",
                   help="keep the store's originals, codestreams and indexes in this object "
                        "store (s3://bucket/prefix); recorded in STORE/objects.json on first "
                        "use, so later commands need not repeat it. Credentials from "
                        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or boto3's usual chain)")
    p.add_argument("--s3-endpoint", metavar="URL",
                   help="endpoint of an S3-compatible server (default: MEDVIEW_S3_ENDPOINT, "
                        "else the one recorded with the store, else AWS)")


def _open_object_store(args: argparse.Namespace) -> None:
    """``--objects`` / ``--s3-endpoint``: record the store's object store (every command
    then opens ``Store(args.store)`` as usual and finds it)."""
    endpoint = getattr(args, "s3_endpoint", None)
    if endpoint:
        os.environ["MEDVIEW_S3_ENDPOINT"] = endpoint
    url = getattr(args, "objects", None)
    if url:
        from .store import Store, StoreError
        try:
            Store(args.store, url, endpoint=endpoint).close()
        except StoreError as e:
            raise UsageError(str(e)) from None


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


def add_database_option(parser: argparse.ArgumentParser) -> None:
    """``--database URL`` on every sub-command that takes ``--store``: where the store's
    tables live (default: ``STORE/catalogue.sqlite``, or the environment variable
    MEDVIEW_DATABASE); see :mod:`server.database`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in set(action.choices.values()):
                add_database_option(p)
    if any("--store" in a.option_strings for a in parser._actions) and \
            not any("--database" in a.option_strings for a in parser._actions):
        parser.add_argument(
            "--database", metavar="URL",
            help="the store's database: postgresql://USER@HOST/DB (default: the SQLite "
                 "file STORE/catalogue.sqlite, or $MEDVIEW_DATABASE)")


def _use_database(args: argparse.Namespace) -> None:
    """The --database of the command line, for every Store of this process at --store."""
    from .database import DatabaseConfigError, use_database

    url = getattr(args, "database", None)
    store = getattr(args, "store", None)
    if url and store:
        try:
            use_database(store, url)
        except DatabaseConfigError as e:
            raise UsageError(str(e)) from None
    elif url:
        raise UsageError("--database needs --store")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    add_database_option(parser)
    args = parser.parse_args(argv)
    try:
        _use_database(args)
        _open_object_store(args)
        return int(args.func(args))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
