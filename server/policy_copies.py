"""Final copies in the store (SPEC H1): each instance's lossless copy in the codec the site
policy's [codec] table gives it, beside the layered JPEG 2000 transport.

``medview-server convert --store DIR --policy`` runs :func:`convert_store`: for every
catalogued instance it reads the original (recalled from the archive if need be), runs the
batch converter's :func:`~server.convert.convert_bytes` (encode, read back, decode,
compare bit for bit), writes the verified copy atomically to
``STORE/final/<series>/<sop>.<codec>.dcm`` and records it in the ``policy_copy`` table of
the catalogue database with its transfer syntax, SHA-256, size, ratio and verification.
An image the policy keeps as it arrived (JPEG baseline) points at its original: no second
copy. Instances whose copy exists, matches its checksum and has the codec the policy gives
now are skipped; a changed policy makes a new copy and removes the old one.

A failed conversion is an alarm: the row records ``verified = 'failed'`` and the reason,
the failure is logged (logger ``medview.convert``) and audited (action ``convert``,
outcome ``failed``), and ``/api/health`` reports ``degraded`` while any remains
(:func:`conversion_health`). ``medview-server convert --summary --store DIR`` prints
:func:`summary_text`.

:func:`after_ingest` makes the copies of newly ingested instances when the policy says
``[codec] on_ingest = true``; :func:`server.ingest.ingest_paths`, the one ingest path,
calls it, so the command line, the viewer's import, DIMSE C-STORE and STOW-RS all do.
Final copies are store objects like the others: tiering moves them
(:meth:`server.tiers.Tiers.read_final`), fsck checks them (``Catalogue.file_refs``)
and deleting a study deletes them.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterable

from .convert import ConvertReport, FileResult, Options, convert_bytes
from .dbutil import Db
from .store import Store, StoreError, safe_component

log = logging.getLogger("medview.convert")

FINAL_DIR = "final"
_DDL = [
    "CREATE TABLE IF NOT EXISTS policy_copy ("
    " instance_pk INTEGER PRIMARY KEY REFERENCES instance(pk) ON DELETE CASCADE,"
    " sop TEXT NOT NULL,"
    " codec TEXT NOT NULL,"                    # jpegls | htj2k | jxl | j2k | keep
    " transfer_syntax TEXT,"
    " relpath TEXT, sha256 TEXT, size INTEGER,"
    " source_size INTEGER, ratio REAL,"
    " verified TEXT NOT NULL CHECK (verified IN ('bit-exact', 'byte copy', 'failed')),"
    " detail TEXT, seconds REAL, policy TEXT, made_at REAL NOT NULL)",
]
OK_STATES = ("bit-exact", "byte copy")


class PolicyCopies:
    """The ``policy_copy`` table of a store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.catalogue                   # its tables first (the foreign keys name them)
        self.db = Db(store.database, component="policy_copies", migrations={1: _DDL})

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def relpath(series_uid: str, sop_uid: str, codec: str) -> str:
        return f"{FINAL_DIR}/{safe_component(series_uid)}/{safe_component(sop_uid)}.{codec}.dcm"

    _COLS = ("instance_pk", "sop", "codec", "transfer_syntax", "relpath", "sha256", "size",
             "source_size", "ratio", "verified", "detail", "seconds", "policy", "made_at")

    def row(self, sop: str) -> dict | None:
        r = self.db.one(f"SELECT {', '.join(self._COLS)} FROM policy_copy WHERE sop = ?", (sop,))
        return dict(zip(self._COLS, r)) if r else None

    def rows(self) -> list[dict]:
        return [dict(zip(self._COLS, r)) for r in
                self.db.all(f"SELECT {', '.join(self._COLS)} FROM policy_copy ORDER BY sop")]

    def record(self, instance_pk: int, res: FileResult, relpath: str | None, policy: str) -> None:
        ok = res.status in ("converted", "kept")
        verified = ("byte copy" if res.status == "kept" else "bit-exact") if ok else "failed"
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO policy_copy (instance_pk, sop, codec, transfer_syntax,"
                " relpath, sha256, size, source_size, ratio, verified, detail, seconds, policy,"
                " made_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (instance_pk) DO "
                "UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in PolicyCopies._COLS[1:]),
                (instance_pk, res.file, res.codec or "?", res.transfer_syntax or None,
                 relpath if ok else None, res.sha256 if ok else None,
                 res.bytes_after if ok else None, res.bytes_before, res.ratio if ok else None,
                 verified, res.error or res.verification, res.seconds, policy, time.time()))


def final_copy_row(db: Db, sop: str) -> dict | None:
    """The verified final copy of an instance (a ``policy_copy`` row), None if it has
    none (or its conversion failed)."""
    if not db.table_exists("policy_copy"):
        return None
    r = db.one(f"SELECT {', '.join(PolicyCopies._COLS)} FROM policy_copy WHERE sop = ?"
               " AND relpath IS NOT NULL AND verified IN ('bit-exact', 'byte copy')", (sop,))
    return dict(zip(PolicyCopies._COLS, r)) if r else None


def conversion_health(catalogue) -> dict:
    """For /api/health: failed final copies make the server 'degraded'."""
    db = catalogue.db
    if not db.table_exists("policy_copy"):
        return {"copies": 0, "failed": 0}
    n, failed = db.one("SELECT COUNT(*), COALESCE(SUM(CASE WHEN verified = 'failed' "
                       "THEN 1 ELSE 0 END), 0) FROM policy_copy")
    return {"copies": int(n), "failed": int(failed)}


def _instances(store: Store, sops: Iterable[str] | None) -> list[dict]:
    cat = store.catalogue
    if sops is None:
        sops = [r[0] for r in cat.db.all("SELECT SOPInstanceUID FROM instance ORDER BY pk")]
    out = []
    for sop in sops:
        inst = cat.find_instance(sop)
        if inst is not None:
            pk = cat.db.one("SELECT pk FROM instance WHERE SOPInstanceUID = ?", (sop,))[0]
            out.append({**inst, "_pk": pk})
    return out


def convert_store(root: str | Path | Store, *, policy_file: str | Path | None = None,
                  workers: int = 1, sops: Iterable[str] | None = None,
                  progress: Callable[[int, int, FileResult], None] | None = None,
                  audit: bool = True) -> ConvertReport:
    """Make the final copies of a store's instances (all, or ``sops``)."""
    from .policy import load_policy
    from .tiers import Tiers

    t0 = time.perf_counter()
    own = not isinstance(root, Store)
    store = Store(root) if own else root
    copies = PolicyCopies(store)
    tiers = Tiers(store)
    try:
        run = _Conversion(store, copies, tiers, load_policy(store.root, policy_file),
                          progress, audit)
        todo = run.plan(sops)
        if workers <= 1 or len(todo) <= 1:
            run.convert_here(todo)
        else:
            run.convert_in_pool(todo, workers)
        report = run.report
        report.seconds = time.perf_counter() - t0
        if audit and report.results:
            failed = report.count("failed")
            _audit(store, None, "degraded" if failed else "ok",
                   {"summary": report.summary(), "failed": failed})
        return report
    finally:
        tiers.close()
        copies.close()
        if own:
            store.close()


class _Conversion:
    """One :func:`convert_store` run: which instances need a final copy, the conversion
    of their originals (here or in a process pool), and each result recorded."""

    def __init__(self, store: Store, copies: "PolicyCopies", tiers, pol,
                 progress: Callable[[int, int, FileResult], None] | None, audit: bool) -> None:
        self.store = store
        self.copies = copies
        self.tiers = tiers
        self.pol = pol
        self.opts = Options(to="policy", codec_policy=pol.codec)
        self.progress = progress
        self.audit = audit
        self.report = ConvertReport()
        self.total = self.done = 0

    def plan(self, sops: Iterable[str] | None) -> list[tuple[dict, str]]:
        """The instances to convert, with the codec the policy chooses; one whose
        verified copy with that codec exists is reported as skipped."""
        store, report = self.store, self.report
        todo: list[tuple[dict, str]] = []
        for inst in _instances(store, sops):
            series = store.catalogue.get_series(inst["SeriesInstanceUID"]) or {}
            choice = self.pol.codec.choose(
                rows=int(inst["Rows"]), cols=int(inst["Columns"]),
                samples=int(inst["SamplesPerPixel"]), modality=series.get("Modality"),
                body_part=series.get("BodyPartExamined"),
                transfer_syntax=inst.get("TransferSyntaxUID"))
            have = self.copies.row(inst["SOPInstanceUID"])
            if (have and have["verified"] in OK_STATES and have["codec"] == choice.codec
                    and (have["codec"] == "keep" or self.tiers.final_present(have))):
                report.results.append(FileResult(
                    inst["SOPInstanceUID"], have["relpath"], "skipped", have["codec"],
                    have["transfer_syntax"], have["source_size"] or 0, have["size"] or 0,
                    have["ratio"] or 0.0, verification=f"{have['verified']} (made before)"))
                continue
            todo.append((inst, choice.codec))
        self.total = len(todo) + len(report.results)
        self.done = len(report.results)
        return todo

    def original(self, inst: dict) -> bytes | None:
        """The instance's original (recalled when archived); None (and recorded as
        failed) when it is missing or damaged."""
        try:
            return self.tiers.read_original(inst)
        except Exception as e:  # noqa: BLE001 - a missing/damaged original
            self.finish(inst, FileResult(inst["SOPInstanceUID"], error=f"original: {e}"), None)
            return None

    def convert_here(self, todo: list[tuple[dict, str]]) -> None:
        for inst, _codec in todo:
            data = self.original(inst)
            if data is not None:
                self.finish(inst, *convert_bytes(data, self.opts, inst["SOPInstanceUID"]))

    def convert_in_pool(self, todo: list[tuple[dict, str]], workers: int) -> None:
        """Convert in ``workers`` processes, at most ``2 * workers`` originals in flight;
        results are recorded here, in order."""
        from concurrent.futures import ProcessPoolExecutor

        from .convert import pool_context

        with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context()) as pool:
            window: list = []
            for inst, _codec in todo:
                data = self.original(inst)
                if data is None:
                    continue
                window.append((inst, pool.submit(convert_bytes, data, self.opts,
                                                 inst["SOPInstanceUID"])))
                while len(window) >= 2 * workers:
                    i, fut = window.pop(0)
                    self.finish(i, *fut.result())
            for i, fut in window:
                self.finish(i, *fut.result())

    def finish(self, inst: dict, res: FileResult, out: bytes | None) -> None:
        """Write a converted copy (the original itself when kept), record it, delete the
        copy it replaces, report it."""
        store = self.store
        sop = inst["SOPInstanceUID"]
        res.file = sop
        old = self.copies.row(sop)
        rel = None
        if out is not None:
            if res.status == "kept":
                rel = inst["original_relpath"]       # the original is the final copy
            else:
                rel = PolicyCopies.relpath(inst["SeriesInstanceUID"], sop, res.codec)
                try:
                    store.atomic_write(rel, out)
                except OSError as e:
                    res.status, res.error, rel = "failed", f"cannot write: {e}", None
        res.output = rel or ""
        self.copies.record(inst["_pk"], res, rel, self.pol.fingerprint)
        if (old and old["relpath"] and old["relpath"] != rel
                and old["relpath"].startswith(FINAL_DIR + "/")):
            try:
                store.delete_file(old["relpath"])
            except (OSError, StoreError):
                pass
        if res.status == "failed":
            log.error("final copy of %s failed: %s", sop, res.error)
            if self.audit:
                _audit(store, sop, "failed", {"error": res.error, "codec": res.codec})
        self.done += 1
        self.report.results.append(res)
        if self.progress:
            self.progress(self.done, self.total, res)


def _audit(store: Store, sop: str | None, outcome: str, detail: dict) -> None:
    from .auth import Authority

    auth = Authority(store.database)
    try:
        auth.audit(user="local", action="convert", resource=sop, outcome=outcome, detail=detail)
    finally:
        auth.close()


def after_ingest(store: Store, sops: Iterable[str], *, log_fn: Callable[[str], None] | None = None
                 ) -> ConvertReport | None:
    """Final copies of newly ingested instances, when ``[codec] on_ingest`` is true (None
    when it is not). Failures are recorded, logged and audited like any conversion."""
    from .policy import load_policy

    from .policy import PolicyError

    sops = list(sops)
    if not sops:
        return None
    try:
        if not load_policy(store.root).codec.on_ingest:
            return None
    except PolicyError as e:                 # a broken site policy never breaks ingest
        log.error("no final copies after ingest: %s", e)
        return None
    try:
        rep = convert_store(store, sops=sops)
    except Exception as e:  # noqa: BLE001 - the instances are stored; copies can be redone
        log.exception("final copies after ingest failed")
        if log_fn:
            log_fn(f"final copies FAILED ({type(e).__name__}: {e}); "
                   "run medview-server convert --store DIR --policy")
        return None
    if log_fn:
        for r in rep.results:
            if r.status == "failed":
                log_fn(f"final copy of {r.file} FAILED: {r.error}")
        log_fn(f"final copies: {rep.summary()}")
    return rep


def summary(root: str | Path) -> dict:
    """The store's conversion state: per codec and state, and what is missing."""
    from .tiers import Tiers

    store = Store(root)
    copies = PolicyCopies(store)
    tiers = Tiers(store)
    try:
        n_inst = store.catalogue.counts()["instances"]
        rows = copies.rows()
        by: dict[tuple[str, str, str], dict] = {}
        for r in rows:
            k = (r["codec"], r["transfer_syntax"] or "", r["verified"])
            d = by.setdefault(k, {"count": 0, "source_bytes": 0, "copy_bytes": 0})
            d["count"] += 1
            d["source_bytes"] += r["source_size"] or 0
            d["copy_bytes"] += r["size"] or 0
        damaged = [r["sop"] for r in rows if r["verified"] in OK_STATES and r["relpath"]
                   and r["codec"] != "keep" and not tiers.final_present(r)]
        return {
            "instances": n_inst,
            "with_copy": sum(r["verified"] in OK_STATES for r in rows),
            "failed": [{"sop": r["sop"], "codec": r["codec"], "reason": r["detail"]}
                       for r in rows if r["verified"] == "failed"],
            "without_copy": n_inst - len(rows),
            "damaged_copies": damaged,
            "by_codec": [{"codec": k[0], "transfer_syntax": k[1], "verified": k[2], **v}
                         for k, v in sorted(by.items())],
        }
    finally:
        tiers.close()
        copies.close()
        store.close()


def summary_text(root: str | Path, policy_file: str | Path | None = None) -> str:
    s = summary(root)
    lines = [f"{s['instances']} instances: {s['with_copy']} with a verified final copy, "
             f"{len(s['failed'])} failed, {s['without_copy']} not converted yet"
             + (f", {len(s['damaged_copies'])} copies damaged or missing"
                if s["damaged_copies"] else "")]
    for g in s["by_codec"]:
        ratio = (f"{g['source_bytes'] / g['copy_bytes']:.2f}:1" if g["copy_bytes"] else "-")
        lines.append(f"  {g['codec']:<7} {g['transfer_syntax']:<24} {g['verified']:<10} "
                     f"{g['count']:>6} instances  {g['source_bytes']:>12} -> "
                     f"{g['copy_bytes']:>12} bytes  {ratio}")
    for f in s["failed"][:20]:
        lines.append(f"  FAILED {f['sop']} ({f['codec']}): {f['reason']}")
    for sop in s["damaged_copies"][:20]:
        lines.append(f"  DAMAGED {sop}: the copy does not match its checksum")
    return "\n".join(lines)
