"""DICOM networking (DIMSE) with pynetdicom: the server's SCP and the workstation's SCU.

SCP (:class:`DimseServer`, started by ``medview-server serve --dicom-port N``):

* C-ECHO (Verification);
* C-STORE for every storage SOP class pynetdicom knows, accepting every transfer syntax
  it knows (native, deflate, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K,
  RLE, ...). A received instance is written as a Part 10 file exactly as it came off the
  wire (preamble, file meta, the peer's encoded data set) and handed to the command-line
  ingest (:func:`server.ingest.ingest_paths`): one path, one validation;
* C-FIND at Patient Root and Study Root, levels PATIENT / STUDY / SERIES / IMAGE, with
  PS3.4 C.2.2.2 matching: single value, ``*``/``?`` wildcards, date/time ranges, UID lists,
  empty (universal) keys that are returned filled in;
* C-MOVE to the AE titles of ``medview-server ae add`` (unknown: 0xA801) and C-GET,
  sending the original files' data sets (decompressed to a native syntax only when the
  peer accepted no context for the stored one).

Calling AE titles are checked against the known peers (``ae`` destinations and ``pacs``
entries) unless ``ae allow-any on``; associations are limited and time out; every
association and every operation goes to the audit log (user = the calling AE title).

SCU (:class:`Pacs`): C-ECHO, study C-FIND, retrieval by C-GET or C-MOVE (the latter with
a temporary storage SCP of our own that the PACS must know as our AE title).

The directory of peers lives in the catalogue database's ``settings`` table
(:class:`Peers`), so the command line and a running server share it.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

log = logging.getLogger("medview.dimse")

DEFAULT_AE_TITLE = "MEDVIEW"
DEFAULT_DICOM_PORT = 11112

_DEST_KEY = "dimse.destinations"
_PACS_KEY = "dimse.pacs"
_ANY_KEY = "dimse.allow_any_caller"

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# Unknown move destination (PS3.4 C.4.2.1.4: "Refused: Move Destination unknown").
MOVE_DESTINATION_UNKNOWN = 0xA801

ProgressFn = Callable[[int, int], None]


class DimseError(Exception):
    """A DICOM network operation failed (the message says which and why)."""


# --------------------------------------------------------------------------- peers

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")      # no backslash, no control


def check_ae_title(title: str) -> str:
    t = title.strip()
    if not t or not _AE_RE.match(t):
        raise ValueError(f"not a valid AE title (1-16 printable characters, no backslash): "
                         f"{title!r}")
    return t


@dataclass(frozen=True)
class Peer:
    name: str          # the AE title (destinations) or a local alias (PACS)
    host: str
    port: int
    ae_title: str

    def to_json(self) -> dict:
        return {"host": self.host, "port": self.port, "ae": self.ae_title}


class Peers:
    """The known DICOM peers: C-MOVE destinations (``ae``) and PACS to query (``pacs``)."""

    def __init__(self, catalogue) -> None:
        self.catalogue = catalogue

    def _load(self, key: str) -> dict[str, Peer]:
        raw = self.catalogue.get_setting(key)
        d = json.loads(raw) if raw else {}
        return {n: Peer(n, v["host"], int(v["port"]), v.get("ae") or n) for n, v in d.items()}

    def _save(self, key: str, peers: dict[str, Peer]) -> None:
        self.catalogue.set_setting(key, json.dumps(
            {n: p.to_json() for n, p in sorted(peers.items())}, separators=(",", ":")))

    @staticmethod
    def _check(host: str, port: int) -> None:
        if not host or any(c.isspace() for c in host):
            raise ValueError(f"bad host {host!r}")
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"bad port {port}")

    # C-MOVE destinations, keyed by AE title
    def destinations(self) -> dict[str, Peer]:
        return self._load(_DEST_KEY)

    def add_destination(self, ae_title: str, host: str, port: int) -> Peer:
        title = check_ae_title(ae_title)
        self._check(host, port)
        d = self.destinations()
        d[title] = Peer(title, host, int(port), title)
        self._save(_DEST_KEY, d)
        return d[title]

    def remove_destination(self, ae_title: str) -> bool:
        d = self.destinations()
        gone = d.pop(ae_title.strip(), None) is not None
        self._save(_DEST_KEY, d)
        return gone

    # PACS the workstation queries, keyed by a local name
    def pacs(self) -> dict[str, Peer]:
        return self._load(_PACS_KEY)

    def add_pacs(self, name: str, host: str, port: int, ae_title: str) -> Peer:
        if not name or not re.match(r"^[\w.-]{1,64}$", name):
            raise ValueError(f"a PACS name is letters, digits, '.', '_' or '-': {name!r}")
        self._check(host, port)
        d = self.pacs()
        d[name] = Peer(name, host, int(port), check_ae_title(ae_title))
        self._save(_PACS_KEY, d)
        return d[name]

    def remove_pacs(self, name: str) -> bool:
        d = self.pacs()
        gone = d.pop(name, None) is not None
        self._save(_PACS_KEY, d)
        return gone

    def get_pacs(self, name: str) -> Peer:
        p = self.pacs().get(name)
        if p is None:
            known = ", ".join(self.pacs()) or "none"
            raise KeyError(f"no PACS named {name!r} (known: {known}); add it with "
                           "'medview-server pacs add'")
        return p

    # who may open an association
    @property
    def allow_any(self) -> bool:
        return self.catalogue.get_setting(_ANY_KEY, "0") == "1"

    @allow_any.setter
    def allow_any(self, value: bool) -> None:
        self.catalogue.set_setting(_ANY_KEY, "1" if value else "0")

    def allowed_callers(self) -> list[str] | None:
        """AE titles that may associate, or None when any may."""
        if self.allow_any:
            return None
        return sorted(set(self.destinations()) | {p.ae_title for p in self.pacs().values()})


# --------------------------------------------------------------------------- matching
# PS3.4 C.2.2.2: attribute matching of C-FIND identifiers.

_RANGE_VRS = {"DA", "TM", "DT"}
_CASE_INSENSITIVE_VRS = {"PN"}


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "\\".join(_as_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _wild(pattern: str, value: str, fold: bool) -> bool:
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, re.S | (re.I if fold else 0)) is not None


def match_value(key: str, vr: str, wanted: str, have: Any) -> bool:
    """Does the stored value ``have`` match the identifier's non-empty value ``wanted``?"""
    wanted = wanted.strip()
    if wanted in ("", "*"):
        return True
    values = [v for v in (have if isinstance(have, (list, tuple)) else [have])]
    texts = [_as_text(v).strip() for v in values] or [""]
    if vr == "UI":                          # UID list matching
        uids = {u.strip() for u in wanted.split("\\") if u.strip()}
        return any(t in uids for t in texts)
    if vr in _RANGE_VRS and "-" in wanted:
        lo, _, hi = (x.strip().replace(":", "") for x in wanted.partition("-"))
        for t in texts:
            t = t.replace(":", "")
            if t and (not lo or t[: len(lo)] >= lo) and (not hi or t[: len(hi)] <= hi):
                return True
        return False
    fold = vr in _CASE_INSENSITIVE_VRS
    alternatives = wanted.split("\\") if vr in ("CS", "SH", "LO") and "\\" in wanted \
        else [wanted]
    for alt in alternatives:
        for t in texts:
            if "*" in alt or "?" in alt:
                if _wild(alt, t, fold):
                    return True
            elif (t.upper() == alt.upper()) if fold else (t == alt):
                return True
    return False


# What each level can answer: keyword -> (VR, row key). Rows come from the catalogue.
_PATIENT_KEYS = {"PatientName": "PN", "PatientID": "LO", "PatientBirthDate": "DA",
                 "PatientSex": "CS", "NumberOfPatientRelatedStudies": "IS",
                 "NumberOfPatientRelatedSeries": "IS", "NumberOfPatientRelatedInstances": "IS"}
_STUDY_KEYS = {"StudyInstanceUID": "UI", "StudyDate": "DA", "StudyTime": "TM",
               "StudyDescription": "LO", "AccessionNumber": "SH", "StudyID": "SH",
               "ReferringPhysicianName": "PN", "ModalitiesInStudy": "CS",
               "NumberOfStudyRelatedSeries": "IS", "NumberOfStudyRelatedInstances": "IS"}
_SERIES_KEYS = {"SeriesInstanceUID": "UI", "SeriesNumber": "IS", "SeriesDescription": "LO",
                "Modality": "CS", "BodyPartExamined": "CS", "SeriesDate": "DA",
                "SeriesTime": "TM", "FrameOfReferenceUID": "UI",
                "NumberOfSeriesRelatedInstances": "IS"}
_IMAGE_KEYS = {"SOPInstanceUID": "UI", "SOPClassUID": "UI", "InstanceNumber": "IS",
               "NumberOfFrames": "IS", "Rows": "US", "Columns": "US"}
_LEVEL_KEYS = {"PATIENT": _PATIENT_KEYS, "STUDY": _STUDY_KEYS, "SERIES": _SERIES_KEYS,
               "IMAGE": _IMAGE_KEYS}
_UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
           "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}


class QueryModelError(ValueError):
    """The identifier is not a valid query for the model (status 0xA900 / 0xC000)."""


def _identifier_keys(identifier: Dataset) -> dict[str, tuple[str, str]]:
    """keyword -> (VR, value as text) of the identifier's keys (sequences skipped)."""
    out = {}
    for elem in identifier:
        kw = elem.keyword
        if not kw or kw in ("QueryRetrieveLevel", "SpecificCharacterSet") or elem.VR == "SQ":
            continue
        v = elem.value
        out[kw] = (elem.VR, "" if v is None else _as_text(list(v) if elem.VM > 1 else v))
    return out


class QueryEngine:
    """C-FIND / C-MOVE / C-GET matching against the catalogue."""

    def __init__(self, catalogue) -> None:
        self.catalogue = catalogue

    # rows of each level, with every attribute of the levels above
    def _studies(self, keys: dict[str, tuple[str, str]]) -> list[dict]:
        uid = keys.get("StudyInstanceUID", ("", ""))[1]
        kw = {}
        if uid and "*" not in uid and "?" not in uid:
            kw["StudyInstanceUID"] = [u for u in uid.split("\\") if u]
        pid = keys.get("PatientID", ("", ""))[1]
        if pid and "*" not in pid and "?" not in pid and "\\" not in pid:
            kw["PatientID"] = pid
        return self.catalogue.query_studies(**kw)

    def _patients(self, keys) -> list[dict]:
        groups: dict[tuple, dict] = {}
        for st in self._studies({k: v for k, v in keys.items() if k == "PatientID"}):
            key = (st["PatientID"], st["PatientName"])
            g = groups.setdefault(key, {k: st.get(k) for k in
                                        ("PatientID", "PatientName", "PatientBirthDate",
                                         "PatientSex")}
                                  | {"NumberOfPatientRelatedStudies": 0,
                                     "NumberOfPatientRelatedSeries": 0,
                                     "NumberOfPatientRelatedInstances": 0})
            g["NumberOfPatientRelatedStudies"] += 1
            g["NumberOfPatientRelatedSeries"] += st["NumberOfStudyRelatedSeries"] or 0
            g["NumberOfPatientRelatedInstances"] += st["NumberOfStudyRelatedInstances"] or 0
        return list(groups.values())

    def _series(self, keys, studies: list[dict]) -> list[dict]:
        out = []
        by_uid = {s["StudyInstanceUID"]: s for s in studies}
        if not by_uid:
            return out
        suid = keys.get("SeriesInstanceUID", ("", ""))[1]
        kw: dict[str, Any] = {"StudyInstanceUID": list(by_uid)}
        if suid and "*" not in suid and "?" not in suid:
            kw["SeriesInstanceUID"] = [u for u in suid.split("\\") if u]
        for se in self.catalogue.query_series(**kw):
            out.append({**by_uid[se["StudyInstanceUID"]], **se})
        return out

    def _images(self, keys, series: list[dict]) -> list[dict]:
        by_uid = {s["SeriesInstanceUID"]: s for s in series}
        if not by_uid:
            return []
        kw: dict[str, Any] = {"SeriesInstanceUID": list(by_uid)}
        sop = keys.get("SOPInstanceUID", ("", ""))[1]
        if sop and "*" not in sop and "?" not in sop:
            kw["SOPInstanceUID"] = [u for u in sop.split("\\") if u]
        return [{**by_uid[i["SeriesInstanceUID"]], **i}
                for i in self.catalogue.query_instances(**kw)]

    @staticmethod
    def _filter(rows: list[dict], keys, levels: Iterable[str]) -> list[dict]:
        checks = []
        for level in levels:
            for kw, vr in _LEVEL_KEYS[level].items():
                if kw in keys and keys[kw][1].strip() not in ("", "*"):
                    checks.append((kw, keys[kw][0] or vr, keys[kw][1]))
        return [r for r in rows if all(match_value(kw, vr, want, r.get(kw))
                                       for kw, vr, want in checks)]

    def match(self, identifier: Dataset, model: str = "STUDY") -> tuple[str, list[dict]]:
        """Rows matching ``identifier`` at its QueryRetrieveLevel (``model`` is
        ``"PATIENT"`` or ``"STUDY"`` root); returns (level, rows)."""
        level = str(getattr(identifier, "QueryRetrieveLevel", "") or "").strip().upper()
        if level not in LEVELS:
            raise QueryModelError(f"QueryRetrieveLevel must be one of {', '.join(LEVELS)}, "
                                  f"got {level or 'nothing'!r}")
        if model == "STUDY" and level == "PATIENT":
            raise QueryModelError("the Study Root model has no PATIENT level")
        keys = _identifier_keys(identifier)
        if level == "PATIENT":
            return level, self._filter(self._patients(keys), keys, ["PATIENT"])
        studies = self._filter(self._studies(keys), keys, ["PATIENT", "STUDY"])
        if level == "STUDY":
            return level, studies
        series = self._filter(self._series(keys, studies), keys, ["SERIES"])
        if level == "SERIES":
            return level, series
        return level, self._filter(self._images(keys, series), keys, ["IMAGE"])

    def instances(self, identifier: Dataset, model: str = "STUDY") -> list[dict]:
        """Every stored instance under the rows ``identifier`` matches (C-MOVE/C-GET)."""
        level, rows = self.match(identifier, model)
        if level == "IMAGE":
            return rows
        if level == "PATIENT":
            studies = [s for p in rows for s in self.catalogue.query_studies(
                PatientID=p["PatientID"] or None) if s["PatientName"] == p["PatientName"]]
            uids = [s["StudyInstanceUID"] for s in studies]
            return self.catalogue.query_instances(StudyInstanceUID=uids) if uids else []
        if level == "STUDY":
            uids = [s["StudyInstanceUID"] for s in rows]
            return self.catalogue.query_instances(StudyInstanceUID=uids) if uids else []
        uids = [s["SeriesInstanceUID"] for s in rows]
        return self.catalogue.query_instances(SeriesInstanceUID=uids) if uids else []

    @staticmethod
    def response(identifier: Dataset, level: str, row: dict) -> Dataset:
        """The C-FIND response identifier: the requested keys, filled in."""
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        if "SpecificCharacterSet" in identifier:
            ds.SpecificCharacterSet = "ISO_IR 192"
        known = {}
        for lv in LEVELS[: LEVELS.index(level) + 1]:
            known.update(_LEVEL_KEYS[lv])
        for elem in identifier:
            kw = elem.keyword
            if not kw or kw in ("QueryRetrieveLevel", "SpecificCharacterSet"):
                continue
            if elem.VR == "SQ":
                setattr(ds, kw, [])
                continue
            value = row.get(kw) if kw in known else None
            if value is None or value == "" or value == []:
                setattr(ds, kw, None)
                continue
            if elem.VR in ("IS", "US", "UL", "SS", "SL"):
                value = int(value)
            elif isinstance(value, list):
                value = [str(v) for v in value]
            else:
                value = _as_text(value)
            setattr(ds, kw, value)
        # the unique keys of the level and of the study levels above are always returned
        for lv in LEVELS[max(1, LEVELS.index(level)) if level != "PATIENT" else 0:
                         LEVELS.index(level) + 1]:
            kw = _UNIQUE[lv]
            if kw not in ds and row.get(kw):
                setattr(ds, kw, row[kw])
        return ds


# --------------------------------------------------------------------------- SCP

def _storage_sop_classes() -> list[str]:
    from pynetdicom import StoragePresentationContexts
    return [str(cx.abstract_syntax) for cx in StoragePresentationContexts]


def _native(ts: str) -> bool:
    return ts in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, "1.2.840.10008.1.2.2")


def _make_ae_class():
    from pynetdicom import AE

    class _AE(AE):
        """An AE whose list of allowed calling AE titles is read at each association."""

        allowed_fn: Callable[[], list[str] | None] = staticmethod(lambda: None)

        @property
        def require_calling_aet(self) -> list[str]:          # type: ignore[override]
            allowed = self.allowed_fn()
            if allowed is None:
                return []
            return allowed or ["\x01"]                   # nobody (no AE title is this)

        @require_calling_aet.setter
        def require_calling_aet(self, value) -> None:
            pass

    return _AE


class DimseServer:
    """The SCP. ``start()`` listens on a background thread; ``stop()`` ends it."""

    def __init__(self, store, authority=None, *, ae_title: str = DEFAULT_AE_TITLE,
                 host: str = "127.0.0.1", port: int = DEFAULT_DICOM_PORT,
                 max_associations: int = 8, acse_timeout: float = 30,
                 dimse_timeout: float = 60, network_timeout: float = 60,
                 verify: bool = True) -> None:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                          PatientRootQueryRetrieveInformationModelGet,
                                          PatientRootQueryRetrieveInformationModelMove,
                                          StudyRootQueryRetrieveInformationModelFind,
                                          StudyRootQueryRetrieveInformationModelGet,
                                          StudyRootQueryRetrieveInformationModelMove,
                                          Verification)
        from .auth import Authority

        self.store = store
        self.peers = Peers(store.catalogue)
        self.query = QueryEngine(store.catalogue)
        from .tiers import Tiers
        self.tiers = Tiers(store)             # originals, recalled from the archive if needed
        self._own_auth = authority is None
        self.auth = authority or Authority(store.database)
        self.verify = verify
        self.host, self.port, self.ae_title = host, int(port), check_ae_title(ae_title)
        self._models = {
            str(PatientRootQueryRetrieveInformationModelFind): "PATIENT",
            str(PatientRootQueryRetrieveInformationModelMove): "PATIENT",
            str(PatientRootQueryRetrieveInformationModelGet): "PATIENT",
            str(StudyRootQueryRetrieveInformationModelFind): "STUDY",
            str(StudyRootQueryRetrieveInformationModelMove): "STUDY",
            str(StudyRootQueryRetrieveInformationModelGet): "STUDY",
        }
        pnd_log = logging.getLogger("pynetdicom")
        if pnd_log.level == logging.NOTSET:      # its INFO lines are per PDU: keep them out
            pnd_log.setLevel(logging.WARNING)
        ae = _make_ae_class()(ae_title=self.ae_title)
        ae.allowed_fn = self.peers.allowed_callers
        ae.maximum_associations = max_associations
        ae.acse_timeout = acse_timeout
        ae.dimse_timeout = dimse_timeout
        ae.network_timeout = network_timeout
        ae.connection_timeout = 10
        ae.add_supported_context(Verification)
        for uid in self._models:
            ae.add_supported_context(uid)
        for sop in _storage_sop_classes():
            # as SCP for C-STORE; and as SCU role for C-GET (the peer proposes SCP role)
            ae.add_supported_context(sop, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        self.ae = ae
        self._handlers = [
            (evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find), (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get), (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        self._server = None
        self._ingest_lock = threading.Lock()
        self.tmpdir = Path(store.root) / "incoming"

    # ------------------------------------------------------------------ life
    def start(self) -> "DimseServer":
        self.tmpdir.mkdir(exist_ok=True)
        self._server = self.ae.start_server((self.host, self.port), block=False,
                                            evt_handlers=self._handlers)
        self.port = self._server.server_address[1]
        log.warning("DICOM SCP %s listening on %s:%d", self.ae_title, self.host, self.port)
        if self.peers.allowed_callers() == []:
            log.warning("no calling AE title may associate yet: add peers with "
                        "'medview-server ae add TITLE --host H --port P', or allow any "
                        "with 'medview-server ae allow-any on'")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.tiers.close()
        if self._own_auth:
            self.auth.close()

    def __enter__(self) -> "DimseServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ audit
    def _audit(self, event, action: str, outcome: str, resource: str | None = None,
               status: int | None = None, **detail) -> None:
        a = event.assoc
        try:
            self.auth.audit(user=a.requestor.ae_title, action=action, resource=resource,
                            outcome=outcome, status=status, peer=a.requestor.address,
                            session=f"dimse-{id(a):x}",
                            detail={"called": a.acceptor.ae_title, **detail})
        except Exception:  # noqa: BLE001 - auditing never takes the network down
            log.exception("DIMSE audit failed")

    def _on_accepted(self, event) -> None:
        self._audit(event, "dimse-associate", "ok",
                    contexts=len(event.assoc.accepted_contexts))

    def _on_rejected(self, event) -> None:
        self._audit(event, "dimse-associate", "denied",
                    error="calling AE title not known" if self.peers.allowed_callers()
                    is not None else "rejected")

    def _on_released(self, event) -> None:
        self._audit(event, "dimse-release", "ok")

    def _on_aborted(self, event) -> None:
        self._audit(event, "dimse-abort", "error")

    # ------------------------------------------------------------------ C-ECHO
    def _on_echo(self, event) -> int:
        self._audit(event, "dimse-echo", "ok", status=0)
        return 0x0000

    # ------------------------------------------------------------------ C-STORE
    def ingest_file(self, path: Path):
        """The same ingest as the command line; returns its report."""
        from .ingest import ingest_paths
        with self._ingest_lock:       # one writer; the ingest itself uses its own threads
            return ingest_paths([path], self.store, verify=self.verify)

    def _on_store(self, event) -> int | Dataset:
        sop = str(event.request.AffectedSOPInstanceUID)
        fd, name = tempfile.mkstemp(prefix="rx-", suffix=".dcm", dir=self.tmpdir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(event.encoded_dataset(include_meta=True))
            report = self.ingest_file(path)
        except Exception as e:  # noqa: BLE001
            log.exception("C-STORE of %s failed", sop)
            self._audit(event, "dimse-store", "error", sop, 0xA700, error=str(e))
            return _status(0xA700, f"cannot store: {e}"[:64])
        finally:
            path.unlink(missing_ok=True)
        if report.imported or report.duplicates:
            study = report.imported[0].study_instance_uid if report.imported else None
            self._audit(event, "dimse-store", "ok", study, 0,
                        sop=sop, duplicate=not report.imported)
            return 0x0000
        reason = report.skipped[0].reason if report.skipped else "not stored"
        kind = report.skipped[0].kind if report.skipped else ""
        self._audit(event, "dimse-store", "error", None, 0xC000, sop=sop, error=reason)
        log.warning("C-STORE of %s refused: %s", sop, reason)
        # 0xA900: data set does not match SOP class; 0xC000: cannot understand
        return _status(0xA900 if kind == "not-image" else 0xC000, reason[:64])

    # ------------------------------------------------------------------ C-FIND
    def _on_find(self, event) -> Iterator[tuple[int, Dataset | None]]:
        model = self._models.get(str(event.request.AffectedSOPClassUID), "STUDY")
        try:
            identifier = event.identifier
            level, rows = self.query.match(identifier, model)
        except QueryModelError as e:
            self._audit(event, "dimse-find", "error", status=0xA900, error=str(e))
            yield _status(0xA900, str(e)[:64]), None
            return
        except Exception as e:  # noqa: BLE001 - a malformed identifier
            self._audit(event, "dimse-find", "error", status=0xC000, error=str(e))
            yield _status(0xC000, str(e)[:64]), None
            return
        self._audit(event, "dimse-find", "ok", status=0, level=level, matches=len(rows),
                    keys={k: v[1] for k, v in _identifier_keys(identifier).items() if v[1]})
        for row in rows:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, self.query.response(identifier, level, row)

    # ------------------------------------------------------------------ C-MOVE / C-GET
    def _matched_files(self, event, model: str) -> list[dict]:
        return self.query.instances(event.identifier, model)

    def _dataset(self, inst: dict, accepted: dict[str, set[str]] | None) -> Dataset:
        """The original file's data set; decompressed when the peer took only native."""
        import pydicom
        ds = pydicom.dcmread(io.BytesIO(self.tiers.read_original(inst)))   # verified
        for elem in list(ds.group_dataset(0x0000)):     # command group never travels
            del ds[elem.tag]
        if accepted is not None:
            ts = str(ds.file_meta.TransferSyntaxUID)
            ok = accepted.get(str(ds.SOPClassUID), set())
            if ts not in ok and not _native(ts):
                if ExplicitVRLittleEndian in ok or ImplicitVRLittleEndian in ok:
                    ds.decompress(generate_instance_uid=False)   # same instance
                    target = (ExplicitVRLittleEndian if ExplicitVRLittleEndian in ok
                              else ImplicitVRLittleEndian)
                    # serialise once in the target syntax and read back, so that every
                    # nested item is encoded the way the context says
                    buf = io.BytesIO()
                    ds.file_meta.TransferSyntaxUID = target
                    ds.save_as(buf, implicit_vr=target == ImplicitVRLittleEndian,
                               little_endian=True, enforce_file_format=True)
                    ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
        return ds

    @staticmethod
    def _accepted(assoc) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for cx in assoc.accepted_contexts:
            out.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
        return out

    def _on_move(self, event):
        model = self._models.get(str(event.request.AffectedSOPClassUID), "STUDY")
        dest_title = str(event.move_destination).strip()
        dest = self.peers.destinations().get(dest_title)
        if dest is None:
            self._audit(event, "dimse-move", "denied", status=MOVE_DESTINATION_UNKNOWN,
                        destination=dest_title, error="unknown move destination")
            yield None, None
            return
        try:
            files = self._matched_files(event, model)
        except Exception as e:
            # raised on: pynetdicom answers 0xC511 (failure, unable to process)
            self._audit(event, "dimse-move", "error", status=0xC511, error=str(e))
            raise
        contexts = _store_contexts(files, self.store)
        yield dest.host, dest.port, {"contexts": contexts}
        yield len(files)
        studies = sorted({f["StudyInstanceUID"] for f in files})
        store_assoc = None
        sent = 0
        for f in files:
            if event.is_cancelled:
                yield 0xFE00, None
                break
            if store_assoc is None:
                store_assoc = _find_requestor(self.ae, dest.host, dest.port)
            try:
                ds = self._dataset(f, self._accepted(store_assoc) if store_assoc else None)
            except Exception as e:  # noqa: BLE001
                log.error("cannot read %s: %s", f["SOPInstanceUID"], e)
                ds = None
            sent += ds is not None
            yield 0xFF00, ds
        self._audit(event, "dimse-move", "ok", ",".join(studies) or None, 0,
                    destination=dest_title, instances=len(files), sent=sent)

    def _on_get(self, event):
        model = self._models.get(str(event.request.AffectedSOPClassUID), "STUDY")
        try:
            files = self._matched_files(event, model)
        except Exception as e:
            self._audit(event, "dimse-get", "error", status=0xC411, error=str(e))
            raise                          # pynetdicom answers 0xC411 (unable to process)
        yield len(files)
        accepted = self._accepted(event.assoc)
        for f in files:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, self._dataset(f, accepted)
        self._audit(event, "dimse-get", "ok",
                    ",".join(sorted({f["StudyInstanceUID"] for f in files})) or None, 0,
                    instances=len(files))


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment.replace("\\", "/")
    return ds


def _store_contexts(files: list[dict], store) -> list:
    """Presentation contexts for sending ``files``: per SOP class one context with the
    stored transfer syntax(es) and one with the native ones (at most 128)."""
    from pynetdicom import build_context
    by_class: dict[str, set[str]] = {}
    for f in files:
        ts = f.get("TransferSyntaxUID") or ExplicitVRLittleEndian
        by_class.setdefault(f["SOPClassUID"], set()).add(ts)
    out = []
    for sop, tss in sorted(by_class.items()):
        for ts in sorted(t for t in tss if not _native(t)):
            out.append(build_context(sop, [ts]))
        out.append(build_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    return out[:128]


def _find_requestor(ae, host: str, port: int):
    """The association pynetdicom opened to a C-MOVE destination (to learn which
    transfer syntaxes it accepted)."""
    for a in ae.active_associations:
        if a.is_requestor and a.acceptor.port == port and a.is_established:
            return a
    return None


# --------------------------------------------------------------------------- SCU

def _study_find_identifier(patient: str | None, date: str | None, modality: str | None,
                           study_uid: str | None = None, name: str | None = None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = name or ""
    ds.PatientID = patient or ""
    ds.PatientBirthDate = ""
    ds.StudyInstanceUID = study_uid or ""
    ds.StudyDate = date or ""
    ds.StudyTime = ""
    ds.StudyDescription = ""
    ds.AccessionNumber = ""
    ds.ModalitiesInStudy = modality or ""
    ds.NumberOfStudyRelatedSeries = None
    ds.NumberOfStudyRelatedInstances = None
    return ds


class Pacs:
    """The workstation as SCU of a remote PACS."""

    def __init__(self, peer: Peer, *, ae_title: str = DEFAULT_AE_TITLE,
                 timeout: float = 60) -> None:
        self.peer = peer
        self.ae_title = check_ae_title(ae_title)
        self.timeout = timeout

    def _ae(self):
        from pynetdicom import AE
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = 10
        return ae

    def _associate(self, ae, **kw):
        a = ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.ae_title, **kw)
        if not a.is_established:
            raise DimseError(f"{self.peer.name}: no association with {self.peer.ae_title} at "
                             f"{self.peer.host}:{self.peer.port} (refused, rejected or "
                             "not listening)")
        return a

    def echo(self) -> None:
        from pynetdicom.sop_class import Verification
        ae = self._ae()
        ae.add_requested_context(Verification)
        a = self._associate(ae)
        try:
            st = a.send_c_echo()
            if not st or st.Status != 0:
                raise DimseError(f"C-ECHO failed: {_status_text(st)}")
        finally:
            a.release()

    def find_studies(self, patient: str | None = None, date: str | None = None,
                     modality: str | None = None, study_uid: str | None = None,
                     name: str | None = None) -> list[dict]:
        """Study-level C-FIND (Study Root); one dict per study, keyed by keyword.
        ``patient`` is the Patient ID, ``name`` the Patient's Name (both may hold ``*``
        and ``?``), ``date`` a date or range ``YYYYMMDD-YYYYMMDD``."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as Find
        ae = self._ae()
        ae.add_requested_context(Find)
        a = self._associate(ae)
        out = []
        try:
            for st, ident in a.send_c_find(
                    _study_find_identifier(patient, date, modality, study_uid, name), Find):
                if not st:
                    raise DimseError("C-FIND: the peer did not answer")
                if st.Status in (0xFF00, 0xFF01) and ident is not None:
                    out.append({e.keyword: _plain(e) for e in ident if e.keyword})
                elif st.Status != 0:
                    raise DimseError(f"C-FIND failed: {_status_text(st)}")
        finally:
            a.release()
        return out

    def retrieve(self, study_uid: str, store, *, via: str = "get", listen_port: int | None = None,
                 listen_host: str = "127.0.0.1",
                 progress: ProgressFn | None = None, cancel: threading.Event | None = None,
                 verify: bool = True) -> dict:
        """Retrieve a study into ``store`` through the common ingest path.

        ``via="get"``: C-GET on one association. ``via="move"``: C-MOVE to our own AE
        title; a temporary storage SCP listens on ``listen_port`` meanwhile (the PACS must
        know our title with this host and port). Returns counts
        (completed, failed, warning, imported, duplicates, skipped).
        """
        from pynetdicom import evt

        counts = {"completed": 0, "failed": 0, "warning": 0, "imported": 0,
                  "duplicates": 0, "skipped": 0, "errors": []}
        handlers = [(evt.EVT_C_STORE, _ingesting_handler(store, counts, verify))]
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = study_uid
        server = None
        if via == "get":
            a, responses = self._start_get(ident, handlers)
        elif via == "move":
            a, responses, server = self._start_move(ident, handlers, listen_host, listen_port)
        else:
            raise ValueError(f"--via is move or get, not {via!r}")
        try:
            final = _follow_retrieve(a, responses, progress, cancel)
            if final is not None:
                counts["completed"] = int(getattr(final, "NumberOfCompletedSuboperations", 0) or 0)
                counts["failed"] = int(getattr(final, "NumberOfFailedSuboperations", 0) or 0)
                counts["warning"] = int(getattr(final, "NumberOfWarningSuboperations", 0) or 0)
                counts["status"] = int(final.Status)
                if final.Status not in (0x0000, 0xB000, 0xFE00):
                    raise DimseError(f"C-{via.upper()} failed: {_status_text(final)}")
        finally:
            a.release()
            if server is not None:
                server.shutdown()
        return counts

    def _start_get(self, ident: Dataset, handlers: list):
        """C-GET of ``ident`` on one association that also takes the C-STOREs (the
        common image storage classes, every syntax): (association, responses)."""
        from pynetdicom import ALL_TRANSFER_SYNTAXES, build_role
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as Get

        ae = self._ae()
        ae.add_requested_context(Get)
        # 127 contexts at most: the common image storage classes, every syntax
        sops = _common_storage_classes()[:120]
        roles = []
        for sop in sops:
            ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                           *[t for t in ALL_TRANSFER_SYNTAXES
                                             if not _native(t)]][:64])
            roles.append(build_role(sop, scp_role=True))
        a = self._associate(ae, ext_neg=roles, evt_handlers=handlers)
        return a, a.send_c_get(ident, Get)

    def _start_move(self, ident: Dataset, handlers: list, listen_host: str,
                    listen_port: int | None):
        """C-MOVE of ``ident`` to our own AE title, a temporary storage SCP (calling AE:
        the PACS only) listening meanwhile: (association, responses, SCP server)."""
        from pynetdicom import ALL_TRANSFER_SYNTAXES
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as Move

        ae = self._ae()
        if not listen_port:
            raise DimseError("C-MOVE needs the port of our storage SCP (--listen-port), "
                             "as the PACS knows it for our AE title")
        scp_ae = self._ae()
        for sop in _storage_sop_classes():
            scp_ae.add_supported_context(sop, ALL_TRANSFER_SYNTAXES)
        scp_ae.require_calling_aet = [self.peer.ae_title]
        server = scp_ae.start_server((listen_host, listen_port), block=False,
                                     evt_handlers=handlers)
        ae.add_requested_context(Move)
        try:
            a = self._associate(ae)
        except DimseError:
            server.shutdown()
            raise
        return a, a.send_c_move(ident, self.ae_title, Move), server


def _ingesting_handler(store, counts: dict, verify: bool):
    """A C-STORE handler that ingests each received data set through the common ingest
    path (one at a time) and adds the outcome to ``counts``."""
    from .ingest import ingest_paths

    lock = threading.Lock()
    tmp = Path(store.root) / "incoming"
    tmp.mkdir(exist_ok=True)

    def on_store(event) -> int:
        fd, name = tempfile.mkstemp(prefix="rx-", suffix=".dcm", dir=tmp)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(event.encoded_dataset(include_meta=True))
            with lock:
                rep = ingest_paths([path], store, verify=verify)
                counts["imported"] += len(rep.imported)
                counts["duplicates"] += len(rep.duplicates)
                counts["skipped"] += len(rep.skipped)
                counts["errors"] += [s.reason for s in rep.skipped]
            return 0x0000 if (rep.imported or rep.duplicates) else 0xC000
        finally:
            path.unlink(missing_ok=True)
    return on_store


def _follow_retrieve(a, responses, progress: ProgressFn | None,
                     cancel: threading.Event | None):
    """Read a C-GET / C-MOVE's pending responses (progress from their sub-operation
    counts; C-CANCEL once ``cancel`` is set); the final status."""
    final = None
    for st, _ in responses:
        if not st:
            raise DimseError("the peer did not answer the retrieve request")
        done = int(getattr(st, "NumberOfCompletedSuboperations", 0) or 0)
        failed = int(getattr(st, "NumberOfFailedSuboperations", 0) or 0)
        warn = int(getattr(st, "NumberOfWarningSuboperations", 0) or 0)
        left = int(getattr(st, "NumberOfRemainingSuboperations", 0) or 0)
        if progress is not None:
            progress(done + failed + warn, done + failed + warn + left)
        final = st
        if cancel is not None and cancel.is_set() and st.Status in (0xFF00, 0xFF01):
            ctx_id = next(iter(a.accepted_contexts)).context_id
            a.send_c_cancel(1, ctx_id)
            cancel = None
    return final


def _plain(elem) -> Any:
    """A C-FIND answer's value as plain Python: str (PN, UI, text), int, list of them."""
    v = elem.value
    if v is None or v == "":
        return None
    if elem.VM > 1:
        return [str(x) if not isinstance(x, (int, float)) else x for x in v]
    if elem.VR in ("IS", "US", "UL", "SS", "SL"):
        return int(v)
    if elem.VR == "CS" and elem.keyword == "ModalitiesInStudy":
        return [str(v)]
    return str(v)


def _common_storage_classes() -> list[str]:
    """Storage SOP classes in a useful order for C-GET (images first)."""
    from pynetdicom import sop_class as sc
    first = [sc.CTImageStorage, sc.MRImageStorage, sc.EnhancedCTImageStorage,
             sc.EnhancedMRImageStorage, sc.ComputedRadiographyImageStorage,
             sc.DigitalXRayImageStorageForPresentation, sc.DigitalMammographyXRayImageStorageForPresentation,
             sc.UltrasoundImageStorage, sc.UltrasoundMultiFrameImageStorage,
             sc.SecondaryCaptureImageStorage, sc.NuclearMedicineImageStorage,
             sc.PositronEmissionTomographyImageStorage, sc.XRayAngiographicImageStorage,
             sc.RTImageStorage, sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
             sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
             sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
             sc.VLWholeSlideMicroscopyImageStorage]
    rest = [s for s in _storage_sop_classes() if s not in {str(x) for x in first}]
    return [str(s) for s in first] + rest


def _status_text(st) -> str:
    if not st or "Status" not in st:
        return "no valid answer (timeout or abort)"
    from pynetdicom.status import code_to_category
    text = f"status 0x{int(st.Status):04X} ({code_to_category(int(st.Status))})"
    if "ErrorComment" in st:
        text += f": {st.ErrorComment}"
    return text


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    """Block until something accepts TCP connections on host:port."""
    import socket
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")
            time.sleep(0.05)
