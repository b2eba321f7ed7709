"""Resolving a quarantine entry (``medview-server quarantine resolve``): keep the stored
instance, replace it by the newcomer, or import the newcomer under a fresh UID. Above
:mod:`server.ingest` (it runs the ingest pipeline on the quarantined bytes), which
itself only puts files into the quarantine (:mod:`server.quarantine`)."""
from __future__ import annotations

import io
from pathlib import Path

from . import ingest
from imaging.dicom import has_preamble

from .quarantine import (ACTIONS, AuditFn, Entry, QuarantineError, _insert, _keep_file, _parse,
                         _set_state, get)
from .store import Store, StoreError


def _audit(audit: AuditFn | None, store: Store, action: str, resource: str | None,
           outcome: str, detail: dict) -> None:
    if audit is not None:
        audit(action, resource, outcome, detail)
        return
    fn, close = ingest.store_auditor(store)
    try:
        fn(action, resource, outcome, detail)
    finally:
        close()


def _import_bytes(store: Store, data: bytes, label: str, *, verify: bool,
                  check_conflict: bool = True):
    """Run the ingest pipeline on bytes; returns the ImportedFile or raises
    QuarantineError with the refusal."""

    limits = ingest.IngestLimits.for_store(store.root)
    try:
        res = ingest.prepare(data, Path(label), store, verify, limits,
                             check_conflict=check_conflict)
    except ingest.Refusal as s:
        raise QuarantineError(f"the file cannot be imported: {s.reason}") from None
    if isinstance(res, ingest.DuplicateFile):
        raise QuarantineError("an identical file is already stored")
    if not isinstance(res, ingest.Prepared):
        raise QuarantineError("its SOP Instance UID is stored with other content")
    out = ingest.commit_prepared(res, store)
    if not isinstance(out, ingest.ImportedFile):
        raise QuarantineError(f"the file could not be stored: "
                              f"{getattr(out, 'reason', type(out).__name__)}")
    return out


def resolve(store: Store, entry_id: int, action: str, *, audit: AuditFn | None = None,
            verify: bool = True) -> str:
    """Resolve one open entry (``keep``, ``replace`` or ``new-uid``); returns a sentence
    saying what was done. Raises QuarantineError (nothing changed) when it cannot."""
    if action not in ACTIONS:
        raise QuarantineError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    e = get(store, entry_id)
    if e is None:
        raise QuarantineError(f"no quarantine entry {entry_id}")
    if e.state != "open":
        raise QuarantineError(f"entry {entry_id} is already resolved ({e.state}: "
                              f"{e.resolution})")
    try:
        data = store.read_verified(e.relpath, e.sha256, e.size)
    except StoreError as ex:
        raise QuarantineError(f"the quarantined file is damaged or missing: {ex}") from None
    if action == "keep":
        msg = f"kept the stored instance {e.stored_sop_instance_uid}; the quarantined file " \
              f"stays in {e.relpath}"
        _set_state(store, e.id, "kept", msg)
    elif action == "replace":
        msg = _replace(store, e, data, verify)
        _set_state(store, e.id, "replaced", msg)
    else:
        new_uid, msg = _new_uid(store, e, data, verify)
        _set_state(store, e.id, "imported", msg, new_uid)
    _audit(audit, store, "quarantine-resolve", e.sop_instance_uid, action,
           {"quarantine_id": e.id, "resolution": msg, "sha256": e.sha256})
    return msg


def _replace(store: Store, e: Entry, data: bytes, verify: bool) -> str:
    cat = store.catalogue
    stored = cat.find_instance(e.stored_sop_instance_uid)
    # Check first that the newcomer can be imported at all (nothing changes otherwise).

    try:
        probe = ingest.prepare(data, Path(e.relpath), store, verify,
                               ingest.IngestLimits.for_store(store.root),
                               check_conflict=False)
    except ingest.Refusal as s:
        raise QuarantineError(f"the quarantined file cannot be imported: {s.reason}; the "
                              "stored instance is unchanged") from None
    if isinstance(probe, ingest.DuplicateFile):
        raise QuarantineError("an identical file is already stored")
    kept = ""
    if stored is not None:
        try:
            old = store.read_verified(stored["original_relpath"], stored["original_sha256"],
                                      stored.get("original_size"))
        except Exception as ex:  # noqa: BLE001
            raise QuarantineError(f"the stored instance's original cannot be read ({ex}); "
                                  "it must be kept before it is replaced") from None
        rel, sha = _keep_file(store, old)
        old_entry = _insert(
            store, sop=e.stored_sop_instance_uid, stored_sop=e.stored_sop_instance_uid,
            stored_sha=None, rel=rel, sha=sha, size=len(old),
            reason=f"replaced by quarantine entry {e.id}", differences=[],
            source_path=stored["original_relpath"], state="replaced",
            resolution=f"the stored instance, replaced by the file of entry {e.id}")
        for relpath in cat.delete_instance(e.stored_sop_instance_uid):
            store.delete_file(relpath)
        kept = f"; the former original is kept as entry {old_entry.id} ({rel})"
    out = ingest.commit_prepared(probe, store)
    if not isinstance(out, ingest.ImportedFile):
        raise QuarantineError(f"the file could not be stored: "
                              f"{getattr(out, 'reason', type(out).__name__)}; run the "
                              "resolution again")
    return f"replaced the stored instance {e.stored_sop_instance_uid} by the quarantined " \
           f"file{kept}"


def _new_uid(store: Store, e: Entry, data: bytes, verify: bool) -> tuple[str, str]:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    ds = _parse(data)
    new_uid = generate_uid()
    original = e.sop_instance_uid
    ds.SOPInstanceUID = new_uid
    if hasattr(ds, "file_meta") and "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = new_uid
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.get("SOPClassUID", "")
    ref.ReferencedSOPInstanceUID = original
    seq = ds.get("SourceImageSequence")
    items = list(seq) if seq else []
    ds.SourceImageSequence = Sequence(items + [ref])
    buf = io.BytesIO()
    preamble = has_preamble(data)
    ds.save_as(buf, enforce_file_format=preamble)
    imported = _import_bytes(store, buf.getvalue(), e.relpath, verify=verify)
    return new_uid, (f"imported as a new instance {new_uid} (original SOP Instance UID "
                     f"{original} recorded in its SourceImageSequence); the quarantined "
                     f"file stays in {e.relpath}; {imported.frames} frame"
                     f"{'s' if imported.frames != 1 else ''}")
