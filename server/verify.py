"""The lossless layer's verification after the commit (issue 15).

Ingest with ``verify=False`` (``"deferred"``) stores an instance at once with
``instance.lossless_state = 'pending'`` and, per frame, ``frame.pixel_sha256``: the
SHA-256 of the samples the encoder was given (:func:`codestream.encode.pixel_digest`). Until the verifier
has been through, the packet planner serves that instance's lossy layers only (never its
last, lossless one), WADO-RS never hands out its stored codestream as lossless JPEG 2000
(it encodes from the original instead), and the image list says ``lossless_state``.

:func:`verify_pending` reads each pending frame's codestream back from the store (its
checksum checked), decodes it with OpenJPEG, undoes the offset and compares the digest:

* every frame equal: ``verified`` — the lossless layer is served from now on;
* any difference (or a codestream that does not decode, or is damaged in the store):
  ``failed`` with the reason in ``lossless_detail`` — nothing of that codestream is
  served any more (not even its lossy layers), the failure is logged (logger
  ``medview.verify``) and audited (action ``verify``, outcome ``failed``), and
  ``/api/health`` reports ``degraded`` (:func:`lossless_health`). The original file is
  kept bit for bit and WADO-RS still serves it; ``medview-server verify --store DIR
  --reencode`` encodes such instances again from their originals, decoded and compared
  before anything is replaced (:func:`reencode_failed`).

Decoding runs on one worker per core (threads or processes, as the ingest's encoding:
:func:`server.ingest._executor`). The state only ever moves ``pending`` -> ``verified`` / ``failed``
by a conditional UPDATE, so two verifiers (server processes sharing the catalogue) never
undo each other's result.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterable

from codestream.encode import pixel_digest

log = logging.getLogger("medview.verify")

PENDING, VERIFIED, FAILED = "pending", "verified", "failed"


def layers_served(state: str | None, nlayers: int) -> int:
    """How many quality layers of an image may be served in ``state``: all when
    verified, all but the lossless one while pending, none after a failed verification."""
    if state in (None, VERIFIED):
        return nlayers
    if state == PENDING:
        return max(0, nlayers - 1)
    return 0


def check_frame(codestream: bytes, offset: int, signed: bool, bits_stored: int,
                pixel_sha256: str | None) -> str | None:
    """None when the codestream decodes to the samples of ``pixel_sha256``, else why not."""
    from codestream.encode import decode_full

    if not pixel_sha256:
        return "no digest of the source samples was recorded"
    try:
        back = decode_full(codestream, int(offset), bool(signed),
                           bits_stored=16 if int(bits_stored or 16) > 8 else 8, threads=0)
        return None if pixel_digest(back) == pixel_sha256 else _DIFFERS
    except Exception as e:  # noqa: BLE001 - a codestream that does not decode failed
        return f"the stored codestream does not decode: {type(e).__name__}: {e}"


_DIFFERS = "the decoded codestream differs from the source samples (digest mismatch)"


def _check_job(args: tuple) -> str | None:
    return check_frame(*args)


@dataclass
class VerifyReport:
    verified: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)        # SOP -> reason
    postponed: dict[str, str] = field(default_factory=dict)     # SOP -> why (tried later)

    def summary(self) -> str:
        return (f"{len(self.verified)} verified, {len(self.failed)} FAILED"
                + (f", {len(self.postponed)} postponed" if self.postponed else ""))


def pending_frames(catalogue, sops: Iterable[str] | None = None) -> dict[str, list[dict]]:
    """SOP Instance UID -> its frames (relpath, checksums, offset, sign, digest) for the
    instances whose lossless layer is pending (all, or those of ``sops``)."""
    sql = ("SELECT i.SOPInstanceUID, f.frame_number, f.codestream_relpath, "
           "f.codestream_sha256, f.codestream_size, f.pixel_offset, i.pixel_signed, "
           "i.encoded_bits_stored, f.pixel_sha256 FROM frame f JOIN instance i "
           "ON f.instance_pk = i.pk WHERE i.lossless_state = ? ORDER BY i.pk, f.frame_number")
    want = None if sops is None else set(sops)
    out: dict[str, list[dict]] = {}
    for r in catalogue.db.all(sql, [PENDING]):
        if want is not None and r[0] not in want:
            continue
        out.setdefault(r[0], []).append({
            "frame": r[1], "relpath": r[2], "sha256": r[3], "size": r[4], "offset": r[5],
            "signed": bool(r[6]), "bits_stored": r[7], "pixel_sha256": r[8]})
    return out


def set_state(catalogue, sop: str, state: str, detail: str | None,
              expect: str = PENDING) -> bool:
    """Move an instance's lossless state from ``expect`` to ``state`` (False if another
    verifier, or a re-encode, changed it meanwhile)."""
    db = catalogue.db
    with db.transaction():
        cur = db.execute("UPDATE instance SET lossless_state = ?, lossless_detail = ? "
                         "WHERE SOPInstanceUID = ? AND lossless_state = ?",
                         [state, detail, sop, expect])
        return cur.rowcount == 1


def lossless_health(catalogue) -> dict:
    """For /api/health: instances whose lossless layer waits for the verifier, and those
    whose verification failed (an alarm: the server is 'degraded')."""
    db = catalogue.db
    rows = dict(db.all("SELECT lossless_state, COUNT(*) FROM instance "
                       "WHERE lossless_state <> ? GROUP BY lossless_state", [VERIFIED]))
    failed = [r[0] for r in db.all("SELECT SOPInstanceUID FROM instance WHERE "
                                   "lossless_state = ? ORDER BY pk LIMIT 20", [FAILED])]
    return {"pending": int(rows.get(PENDING, 0)), "failed": int(rows.get(FAILED, 0)),
            "failed_instances": failed}


def verify_pending(store, *, sops: Iterable[str] | None = None, workers: int | None = None,
                   audit: Callable[[str, str | None, str, dict], None] | None = None,
                   should_stop: Callable[[], bool] = lambda: False,
                   processes: bool | None = None) -> VerifyReport:
    """Verify the pending lossless layers of ``store`` (all, or the instances ``sops``):
    see the module doc. ``audit(action, resource, outcome, detail)`` records failures
    (default: the store's audit log)."""
    from .ingest import _executor, _submit, store_auditor
    from .store import StoreError, StoreIntegrityError

    cat = store.catalogue
    todo = pending_frames(cat, sops)
    report = VerifyReport()
    if not todo:
        return report
    close = lambda: None  # noqa: E731
    if audit is None:
        audit, close = store_auditor(store, "medview:verify")
    nframes = sum(len(v) for v in todo.values())
    tiers: list = []
    workers = max(1, int(workers)) if workers is not None else max(1, min(8, os.cpu_count() or 1))
    try:
        with _executor(workers, nframes, processes) as pool:
            window: list[tuple[str, list[Future | str]]] = []

            def settle(sop: str, checks: list) -> None:
                reasons = []
                for n, c in enumerate(checks, start=1):
                    why = c if isinstance(c, str) or c is None else _result(c)
                    if why:
                        reasons.append(f"frame {n}: {why}")
                if not reasons:
                    if set_state(cat, sop, VERIFIED, None):
                        report.verified.append(sop)
                    return
                why = "; ".join(reasons)
                if all(_TRANSIENT in r or _NOT_RUN in r for r in reasons):   # tried later
                    report.postponed[sop] = why
                    return
                if set_state(cat, sop, FAILED, f"lossless verification failed: {why}"):
                    report.failed[sop] = why
                    log.error("lossless verification of %s FAILED: %s", sop, why)
                    audit("verify", sop, "failed", {"reason": why})

            def read(sop: str, f: dict) -> bytes:
                try:
                    return store.read_verified(f["relpath"], f["sha256"], f["size"])
                except StoreIntegrityError as e:
                    if e.problem != "file is missing":
                        raise
                if not tiers:                    # its lossless layers went to the archive
                    from .tiers import Tiers
                    tiers.append(Tiers(store))
                return tiers[0].read_codestream({
                    "SOPInstanceUID": sop, "frame": f["frame"], "codestream_relpath":
                    f["relpath"], "codestream_sha256": f["sha256"]})

            for sop, frames in todo.items():
                if should_stop():
                    break
                checks: list[Future | str] = []
                for f in frames:
                    try:
                        cs = read(sop, f)
                    except StoreError as e:              # damaged or missing in the store
                        checks.append(f"the stored codestream is damaged: {e}")
                        continue
                    except OSError as e:
                        checks.append(f"the stored codestream {_TRANSIENT}: {e}")
                        continue
                    checks.append(_submit(pool, _check_job, (cs, f["offset"], f["signed"],
                                                             f["bits_stored"], f["pixel_sha256"])))
                window.append((sop, checks))
                while sum(len(c) for _s, c in window) > 2 * workers and len(window) > 1:
                    settle(*window.pop(0))
            for item in window:
                settle(*item)
    finally:
        for t in tiers:
            t.close()
        close()
    return report


def _result(fut: Future) -> str | None:
    try:
        return fut.result()
    except Exception as e:  # noqa: BLE001 - a worker died: not verified, tried again later
        return f"{_NOT_RUN}: {type(e).__name__}: {e}"


_TRANSIENT = "cannot be read"
_NOT_RUN = "the verifier could not run"


def reencode_failed(store, *, sops: Iterable[str] | None = None,
                    audit: Callable[[str, str | None, str, dict], None] | None = None
                    ) -> dict[str, str]:
    """Encode the instances whose verification failed (all, or ``sops``) again from their
    originals: each new codestream decoded and compared bit for bit before anything
    changes, and its samples' digest compared with the one recorded at ingest; the new
    files written under new names, then the frame rows and the state ``verified`` in one
    transaction, then the old files removed. Returns SOP -> what happened."""
    import time
    from pathlib import Path

    from .ingest import IngestLimits, _prepare_bytes, _Prepared, _Skip, store_auditor

    cat = store.catalogue
    db = cat.db
    want = None if sops is None else set(sops)
    rows = db.all("SELECT i.pk, i.SOPInstanceUID, se.SeriesInstanceUID, i.original_relpath, "
                  "i.original_sha256, i.original_size, i.lossless_detail FROM instance i "
                  "JOIN series se ON i.series_pk = se.pk WHERE i.lossless_state = ? "
                  "ORDER BY i.pk", [FAILED])
    close = lambda: None  # noqa: E731
    if audit is None:
        audit, close = store_auditor(store, "medview:verify")
    out: dict[str, str] = {}
    limits = IngestLimits.for_store(store.root)
    try:
        for pk, sop, series, orel, osha, osize, detail in rows:
            if want is not None and sop not in want:
                continue
            old = db.all("SELECT frame_number, codestream_relpath, index_relpath, pixel_sha256 "
                         "FROM frame WHERE instance_pk = ? ORDER BY frame_number", [pk])
            try:
                data = store.read_verified(orel, osha, osize)
                res = _prepare_bytes(data, Path(orel), osha, True, limits)
                if not isinstance(res, _Prepared):
                    raise _Skip(f"the original cannot be prepared again ({type(res).__name__})")
                if len(res.frames) != len(old):
                    raise _Skip(f"the original gives {len(res.frames)} frames, the catalogue "
                                f"has {len(old)}")
                for (n, _c, _i, digest), ef in zip(old, res.frames):
                    if digest and digest != ef.pixel_sha256:
                        raise _Skip(f"frame {n}: the original's samples are not the ones "
                                    "encoded at ingest")
                tag = f"re{int(time.time() * 1000)}"
                new = []
                for (n, _c, _i, _d), ef in zip(old, res.frames):
                    cs_rel, idx_rel = store.codestream_paths(series, sop, n)
                    cs_rel = cs_rel[:-len(".j2k")] + f".{tag}.j2k"
                    idx_rel = idx_rel[:-len(".idx.json")] + f".{tag}.idx.json"
                    new.append((n, cs_rel, store.atomic_write(cs_rel, ef.codestream),
                                len(ef.codestream), idx_rel,
                                store.atomic_write(idx_rel, ef.index_json),
                                len(ef.index_json), ef))
            except Exception as e:  # noqa: BLE001 - it stays failed, and says why
                why = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
                out[sop] = f"not re-encoded: {why}"
                log.error("re-encoding %s failed: %s", sop, why)
                continue
            with db.transaction():
                for n, cs_rel, cs_sha, cs_size, idx_rel, idx_sha, idx_size, ef in new:
                    db.execute("UPDATE frame SET codestream_relpath = ?, codestream_sha256 = ?, "
                               "codestream_size = ?, index_relpath = ?, index_sha256 = ?, "
                               "index_size = ?, pixel_offset = ?, numres = ?, nlayers = ?, "
                               "pixel_sha256 = ? WHERE instance_pk = ? AND frame_number = ?",
                               [cs_rel, cs_sha, cs_size, idx_rel, idx_sha, idx_size, ef.offset,
                                ef.numres, ef.nlayers, ef.pixel_sha256, pk, n])
                done = db.execute("UPDATE instance SET lossless_state = ?, lossless_detail = ? "
                                  "WHERE pk = ? AND lossless_state = ?",
                                  [VERIFIED, f"re-encoded from the original after: {detail}",
                                   pk, FAILED]).rowcount == 1
            if not done:                         # changed meanwhile: the new files unused
                for _n, cs_rel, _s, _z, idx_rel, *_ in new:
                    store.delete_file(cs_rel)
                    store.delete_file(idx_rel)
                out[sop] = "changed meanwhile: left alone"
                continue
            for _n, c_rel, i_rel, _d in old:      # nothing names them any more
                for rel in (c_rel, i_rel):
                    try:
                        store.delete_file(rel)
                    except Exception:  # noqa: BLE001 - an orphan fsck reports
                        log.warning("could not remove %s", rel)
            out[sop] = "re-encoded and verified"
            audit("verify", sop, "re-encoded", {"after": detail})
    finally:
        close()
    return out
