"""The catalogue: what is in the store, as a small relational database.

Design
------
* Four DICOM levels plus the frame (the *image* that is streamed):
  ``patient -> study -> series -> instance -> frame``, with foreign keys
  (``ON DELETE CASCADE``) so that referential integrity holds by construction.
* SQLite in WAL mode (readers never block the single writer), ``foreign_keys=ON``,
  and a ``schema_version`` table so later releases can migrate.
* Written so that PostgreSQL could replace SQLite:

  - plain SQL only (``INSERT ... RETURNING``, ``LIMIT/OFFSET``, ``LIKE ... ESCAPE``,
    ``EXISTS`` and scalar sub-queries, all of which both dialects have);
  - the dialect-specific bits are few and marked: the connection set-up, pragmas,
    ``BEGIN IMMEDIATE``, the table-exists probe and the ``?`` parameter style live in
    :class:`server_stub.dbutil.Db` (the one SQLite access layer of the server; psycopg
    would need ``%s``), plus the primary-key column type (``_PK``) and ``LIMIT -1`` here;
  - result rows are never read back by column name from the driver (PostgreSQL folds
    unquoted identifiers to lower case): every SELECT lists its columns from a Python
    tuple and rows are zipped with that tuple.

* Thread safety (:class:`server_stub.dbutil.Db`): one connection per thread; all
  writes go through one lock and one explicit transaction each, so the HTTP server's worker
  threads can read while an ingest writes. ``busy_timeout`` covers a second process
  (for example a command-line ingest while the server runs).
* Multi-valued DICOM attributes (ImagePositionPatient, PixelSpacing, ...) are stored as
  JSON text and returned as lists. The full header is stored as DICOM JSON (PS3.18 F.2)
  without the pixel data.

The query methods return plain ``dict`` objects keyed by DICOM keywords, which the HTTP
layer turns into QIDO-RS / JSON responses.
"""
from __future__ import annotations

import json
import math
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from .dbutil import Db

SCHEMA_VERSION = 2

# Dialect-specific primary key column (PostgreSQL: "BIGINT GENERATED ALWAYS AS IDENTITY
# PRIMARY KEY").
_PK = "INTEGER PRIMARY KEY"


class CatalogueError(Exception):
    """Base class for catalogue errors."""


class DuplicateInstanceError(CatalogueError):
    """The SOP Instance UID is already catalogued."""

    def __init__(self, sop_uid: str, original_sha256: str | None):
        super().__init__(f"SOP Instance UID {sop_uid} is already stored")
        self.sop_uid = sop_uid
        self.original_sha256 = original_sha256


class QueryError(CatalogueError, ValueError):
    """A query parameter is malformed (for example a bad date range)."""


# --------------------------------------------------------------------------- columns

PATIENT_COLS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")
STUDY_COLS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription",
              "AccessionNumber", "StudyID", "ReferringPhysicianName")
SERIES_COLS = ("SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality",
               "BodyPartExamined", "SeriesDate", "SeriesTime", "FrameOfReferenceUID")
INSTANCE_COLS = (
    "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "NumberOfFrames", "Rows", "Columns",
    "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept",
    "RescaleType", "WindowCenter", "WindowWidth", "TransferSyntaxUID",
    "original_relpath", "original_sha256", "original_size",
    "signed", "bits_stored", "geometry_flags", "ingested_at",
)
FRAME_COLS = (
    "frame", "codestream_relpath", "codestream_sha256", "codestream_size",
    "index_relpath", "index_sha256", "index_size", "offset", "numres", "nlayers",
    "ImagePositionPatient", "ingested_at",
)
# Stored as JSON text, returned as lists.
_JSON_COLS = {"ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"}
# Stored as a JSON list of strings, returned as a list ([] when none).
_JSON_TEXT_COLS = {"geometry_flags"}

# Column name in SQL when it differs from the key we expose ("offset" and "signed" are
# reserved words in PostgreSQL / awkward in SQL).
_SQL_NAME = {"frame": "frame_number", "offset": "pixel_offset", "signed": "pixel_signed",
             "bits_stored": "encoded_bits_stored"}


def _sqlname(col: str) -> str:
    return _SQL_NAME.get(col, col)


_DDL = [
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT)",
    f"""CREATE TABLE patient (
        pk {_PK},
        PatientID TEXT NOT NULL,
        PatientName TEXT NOT NULL,
        PatientBirthDate TEXT,
        PatientSex TEXT,
        UNIQUE (PatientID, PatientName))""",
    f"""CREATE TABLE study (
        pk {_PK},
        patient_pk INTEGER NOT NULL REFERENCES patient(pk) ON DELETE CASCADE,
        StudyInstanceUID TEXT NOT NULL UNIQUE,
        StudyDate TEXT, StudyTime TEXT, StudyDescription TEXT, AccessionNumber TEXT,
        StudyID TEXT, ReferringPhysicianName TEXT)""",
    f"""CREATE TABLE series (
        pk {_PK},
        study_pk INTEGER NOT NULL REFERENCES study(pk) ON DELETE CASCADE,
        SeriesInstanceUID TEXT NOT NULL UNIQUE,
        SeriesNumber INTEGER, SeriesDescription TEXT, Modality TEXT, BodyPartExamined TEXT,
        SeriesDate TEXT, SeriesTime TEXT, FrameOfReferenceUID TEXT)""",
    f"""CREATE TABLE instance (
        pk {_PK},
        series_pk INTEGER NOT NULL REFERENCES series(pk) ON DELETE CASCADE,
        SOPInstanceUID TEXT NOT NULL UNIQUE,
        SOPClassUID TEXT, InstanceNumber INTEGER, NumberOfFrames INTEGER NOT NULL,
        Rows INTEGER NOT NULL, Columns INTEGER NOT NULL, SamplesPerPixel INTEGER NOT NULL,
        PhotometricInterpretation TEXT NOT NULL, BitsAllocated INTEGER, BitsStored INTEGER,
        PixelRepresentation INTEGER,
        ImagePositionPatient TEXT, ImageOrientationPatient TEXT, PixelSpacing TEXT,
        SliceThickness REAL, SpacingBetweenSlices REAL,
        RescaleSlope REAL, RescaleIntercept REAL, RescaleType TEXT,
        WindowCenter REAL, WindowWidth REAL,
        TransferSyntaxUID TEXT,
        original_relpath TEXT NOT NULL,
        original_sha256 TEXT NOT NULL UNIQUE,
        original_size INTEGER NOT NULL,
        header_json TEXT NOT NULL,
        pixel_signed INTEGER NOT NULL,
        encoded_bits_stored INTEGER NOT NULL,
        ingested_at TEXT NOT NULL,
        geometry_flags TEXT)""",
    f"""CREATE TABLE frame (
        pk {_PK},
        instance_pk INTEGER NOT NULL REFERENCES instance(pk) ON DELETE CASCADE,
        frame_number INTEGER NOT NULL,
        codestream_relpath TEXT NOT NULL, codestream_sha256 TEXT NOT NULL,
        codestream_size INTEGER NOT NULL,
        index_relpath TEXT NOT NULL, index_sha256 TEXT NOT NULL, index_size INTEGER NOT NULL,
        pixel_offset INTEGER NOT NULL, numres INTEGER NOT NULL, nlayers INTEGER NOT NULL,
        ImagePositionPatient TEXT,
        ingested_at TEXT NOT NULL,
        UNIQUE (instance_pk, frame_number))""",
    "CREATE INDEX study_patient ON study (patient_pk)",
    "CREATE INDEX study_date ON study (StudyDate)",
    "CREATE INDEX series_study ON series (study_pk)",
    "CREATE INDEX instance_series ON instance (series_pk)",
    "CREATE INDEX frame_instance ON frame (instance_pk)",
    "CREATE INDEX patient_name ON patient (PatientName)",
]

# Version 2: impossible values flagged per instance, and the quarantine of files whose
# SOP Instance UID is already stored with other content (server_stub.quarantine).
_QUARANTINE_DDL = [
    f"""CREATE TABLE IF NOT EXISTS quarantine (
        pk {_PK},
        SOPInstanceUID TEXT NOT NULL,
        stored_sop_instance_uid TEXT NOT NULL,
        stored_sha256 TEXT,
        relpath TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        reason TEXT NOT NULL,
        differences TEXT,
        source_path TEXT,
        received_at TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'open',
        resolved_at TEXT,
        resolution TEXT,
        new_sop_instance_uid TEXT)""",
    "CREATE INDEX IF NOT EXISTS quarantine_stored ON quarantine (stored_sop_instance_uid)",
    "CREATE INDEX IF NOT EXISTS quarantine_sha ON quarantine (sha256)",
]

# Per-series generation counter: every change to what a series serves (an image added or
# deleted, an instance updated, a quarantine entry about one of its instances, a frame
# migrated or recalled: server_stub.tiers adds its triggers) adds one, inside the writing
# transaction, whichever process writes. Readers that keep series facts
# (server_stub.series_facts) compare one primary-key row instead of re-reading the series.
# Triggers, so that no writer (nor an older release of this program) can forget it.
# Rows are never deleted (a series deleted and ingested again gets a higher generation).
# (PostgreSQL: the same UPSERT, in trigger functions.)
GENERATION_TABLE = ("CREATE TABLE IF NOT EXISTS series_generation ("
                    "series_uid TEXT PRIMARY KEY, generation INTEGER NOT NULL)")


def generation_trigger(name: str, event: str, table: str, series_uid_select: str) -> str:
    """A trigger adding one to the generation of the series ``series_uid_select`` (a
    SELECT of one column, with a WHERE clause, that may use NEW / OLD) names."""
    return (f"CREATE TRIGGER IF NOT EXISTS {name} {event} ON {table} BEGIN "
            f"INSERT INTO series_generation (series_uid, generation) "
            f"SELECT uid, 1 FROM ({series_uid_select}) WHERE uid IS NOT NULL "
            f"ON CONFLICT (series_uid) DO UPDATE SET generation = generation + 1; END")


_SERIES_OF_INSTANCE = ("SELECT se.SeriesInstanceUID AS uid FROM instance i JOIN series se "
                       "ON i.series_pk = se.pk WHERE i.pk = {}")
_SERIES_OF_SOP = ("SELECT se.SeriesInstanceUID AS uid FROM instance i JOIN series se "
                  "ON i.series_pk = se.pk WHERE i.SOPInstanceUID = {}")
_GENERATION_DDL = [
    GENERATION_TABLE,
    generation_trigger("gen_frame_insert", "AFTER INSERT", "frame",
                       _SERIES_OF_INSTANCE.format("NEW.instance_pk")),
    generation_trigger("gen_frame_update", "AFTER UPDATE", "frame",
                       _SERIES_OF_INSTANCE.format("NEW.instance_pk")),
    generation_trigger("gen_instance_update", "AFTER UPDATE", "instance",
                       _SERIES_OF_INSTANCE.format("NEW.pk")),
    # before: the series row still exists (an instance deleted with its series, by a
    # study's cascade, is covered by the series trigger)
    generation_trigger("gen_instance_delete", "BEFORE DELETE", "instance",
                       _SERIES_OF_INSTANCE.format("OLD.pk")),
    generation_trigger("gen_series_delete", "BEFORE DELETE", "series",
                       "SELECT OLD.SeriesInstanceUID AS uid WHERE 1"),
    generation_trigger("gen_series_update", "AFTER UPDATE", "series",
                       "SELECT NEW.SeriesInstanceUID AS uid WHERE 1"),
    generation_trigger("gen_quarantine_insert", "AFTER INSERT", "quarantine",
                       _SERIES_OF_SOP.format("NEW.stored_sop_instance_uid")),
    generation_trigger("gen_quarantine_update", "AFTER UPDATE", "quarantine",
                       _SERIES_OF_SOP.format("NEW.stored_sop_instance_uid")),
]

_DATE_RE = re.compile(r"^\d{8}$")


def utc_now() -> str:
    """ISO-8601 UTC timestamp used for ``ingested_at``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _multi(value: str | Sequence[str] | None) -> list[str]:
    """Split a QIDO multi-value parameter ("CT,MR", "CT\\MR" or a list)."""
    if value is None:
        return []
    if isinstance(value, str):
        parts = re.split(r"[,\\]", value)
    else:
        parts = [str(v) for v in value]
    return [p.strip() for p in parts if p.strip()]


def _like_pattern(value: str) -> str:
    """DICOM wildcards (``*``, ``?``) to a SQL LIKE pattern with ``\\`` as escape."""
    out = []
    for ch in value:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


class _Where:
    """Accumulates WHERE clauses and their parameters (``?`` placeholders)."""

    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.params: list[Any] = []

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def text(self, column: str, value: str | None) -> None:
        """Case-insensitive match; ``*`` and ``?`` are wildcards."""
        if value is None or value == "" or value == "*":
            return
        if "*" in value or "?" in value:
            self.add(f"UPPER({column}) LIKE UPPER(?) ESCAPE '\\'", _like_pattern(value))
        else:
            self.add(f"UPPER({column}) = UPPER(?)", value)

    def exact(self, column: str, value: Any) -> None:
        if value is None or value == "":
            return
        self.add(f"{column} = ?", value)

    def uid_list(self, column: str, value: str | Sequence[str] | None) -> None:
        """UID list matching: one UID or several (comma / backslash separated, or a list)."""
        uids = _multi(value)
        if not uids:
            return
        self.add(f"{column} IN ({', '.join('?' * len(uids))})", *uids)

    def date_range(self, column: str, value: str | None) -> None:
        """``YYYYMMDD``, ``YYYYMMDD-``, ``-YYYYMMDD`` or ``YYYYMMDD-YYYYMMDD``."""
        if value is None or value.strip() == "":
            return
        value = value.strip()
        if "-" not in value:
            if not _DATE_RE.match(value):
                raise QueryError(f"bad date {value!r}: expected YYYYMMDD or a range")
            self.add(f"{column} = ?", value)
            return
        lo, _, hi = value.partition("-")
        lo, hi = lo.strip(), hi.strip()
        if (lo and not _DATE_RE.match(lo)) or (hi and not _DATE_RE.match(hi)) or not (lo or hi):
            raise QueryError(f"bad date range {value!r}: expected YYYYMMDD-YYYYMMDD, "
                             "YYYYMMDD- or -YYYYMMDD")
        if lo:
            self.add(f"{column} >= ?", lo)
        if hi:
            self.add(f"{column} <= ?", hi)

    def sql(self) -> str:
        return (" WHERE " + " AND ".join(self.clauses)) if self.clauses else ""


def _page(limit: int | None, offset: int) -> tuple[str, list[Any]]:
    if limit is None and not offset:
        return "", []
    if limit is not None and limit < 0:
        raise QueryError("limit must be >= 0")
    if offset < 0:
        raise QueryError("offset must be >= 0")
    # -1 is SQLite's "no limit"; PostgreSQL would use LIMIT ALL.
    return " LIMIT ? OFFSET ?", [limit if limit is not None else -1, offset]


def _decode(col: str, value: Any) -> Any:
    if col in _JSON_TEXT_COLS:
        return json.loads(value) if value else []
    if value is not None and col in _JSON_COLS:
        return json.loads(value)
    return value


def _encode(col: str, value: Any) -> Any:
    if col in _JSON_TEXT_COLS:
        return json.dumps([str(v) for v in value]) if value else None
    if col in _JSON_COLS and value is not None:
        return json.dumps([float(v) for v in value])
    if col == "signed" and value is not None:
        return 1 if value else 0
    return value


def _row(cols: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    d = {c: _decode(c, v) for c, v in zip(cols, row)}
    if "signed" in d and d["signed"] is not None:
        d["signed"] = bool(d["signed"])
    return d


class Catalogue:
    """SQLite catalogue of patients, studies, series, instances and frames.

    Safe to share between threads. Use :meth:`close` (or a ``with`` block) when done.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = Db(self.path, closed_error=CatalogueError)
        self._init_schema()

    # ------------------------------------------------------------------ connection
    # The connections, pragmas, transactions and parameter style are server_stub.dbutil's
    # (one SQLite access layer for every table of the catalogue database).

    def _execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self.db.execute(sql, params)

    def _all(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        return self.db.all(sql, params)

    def _one(self, sql: str, params: Iterable[Any] = ()) -> tuple | None:
        return self.db.one(sql, params)

    def _transaction(self):
        """One write transaction; writes are serialised by one lock."""
        return self.db.transaction()

    def close(self) -> None:
        """Close every connection opened by any thread."""
        self.db.close()

    def __enter__(self) -> "Catalogue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ schema

    def _init_schema(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction():
            if not self._table_exists("schema_version"):
                for stmt in _DDL + _QUARANTINE_DDL + _GENERATION_DDL:
                    self._execute(stmt)
                self._execute("INSERT INTO schema_version (version) VALUES (?)",
                              [SCHEMA_VERSION])
                return
            (version,) = self._one("SELECT version FROM schema_version")
            if version > SCHEMA_VERSION:
                raise CatalogueError(f"catalogue {self.path} has schema version {version}; "
                                     f"this program knows up to {SCHEMA_VERSION}")
            if version < 2:         # a store made before the quarantine: add, keep all
                self._execute("ALTER TABLE instance ADD COLUMN geometry_flags TEXT")
                for stmt in _QUARANTINE_DDL:
                    self._execute(stmt)
                self._execute("UPDATE schema_version SET version = ?", [2])
            # Future migrations go here: if version < 3: ...
            if not self.db.read_only:          # an addition (no version change)
                for stmt in _GENERATION_DDL:
                    self._execute(stmt)

    def _table_exists(self, name: str) -> bool:
        return self.db.table_exists(name)

    def series_generation(self, series_uid: str) -> int | None:
        """The series' generation (0 before its first change since the counter exists);
        None when this database has no counter (a read-only store of an older release):
        then nothing about the series may be kept."""
        try:
            row = self._one("SELECT generation FROM series_generation WHERE series_uid = ?",
                            [series_uid])
        except sqlite3.OperationalError:
            return None
        return 0 if row is None else row[0]

    @property
    def schema_version(self) -> int:
        return self._one("SELECT version FROM schema_version")[0]

    # ------------------------------------------------------------------ settings

    def get_setting(self, key: str, default: str | None = None) -> str | None:
        row = self._one("SELECT value FROM settings WHERE key = ?", [key])
        return default if row is None else row[0]

    def set_setting(self, key: str, value: str) -> None:
        with self._transaction():
            self._execute("DELETE FROM settings WHERE key = ?", [key])
            self._execute("INSERT INTO settings (key, value) VALUES (?, ?)", [key, value])

    # ------------------------------------------------------------------ writes

    def add_instance(self, instance: dict[str, Any], frames: Sequence[dict[str, Any]]) -> int:
        """Insert one instance with all its frames in ONE transaction.

        ``instance`` holds the patient, study, series and instance attributes keyed by
        the names in ``PATIENT_COLS``, ``STUDY_COLS``, ``SERIES_COLS`` and
        ``INSTANCE_COLS`` plus ``header_json`` (DICOM JSON text). ``frames`` holds one dict
        per frame keyed by ``FRAME_COLS``. Patient, study and series rows are reused if
        they exist (the first values seen win). Raises :class:`DuplicateInstanceError`
        if the SOP Instance UID is already stored. Returns the instance key.
        """
        sop = instance["SOPInstanceUID"]
        if not frames:
            raise CatalogueError(f"instance {sop} has no frames")
        now = utc_now()
        with self._transaction():
            row = self._one("SELECT original_sha256 FROM instance WHERE SOPInstanceUID = ?",
                            [sop])
            if row is not None:
                raise DuplicateInstanceError(sop, row[0])
            patient_pk = self._get_or_create(
                "patient", ("PatientID", "PatientName"), PATIENT_COLS, instance, {},
                defaults={"PatientID": "", "PatientName": ""})
            study_pk = self._get_or_create(
                "study", ("StudyInstanceUID",), STUDY_COLS, instance,
                {"patient_pk": patient_pk})
            series_pk = self._get_or_create(
                "series", ("SeriesInstanceUID",), SERIES_COLS, instance,
                {"study_pk": study_pk})
            cols = [c for c in INSTANCE_COLS if c != "ingested_at"]
            values = [_encode(c, instance.get(c)) for c in cols]
            names = ["series_pk"] + [_sqlname(c) for c in cols] + ["header_json", "ingested_at"]
            params = [series_pk] + values + [instance.get("header_json") or "{}", now]
            (instance_pk,) = self._one(
                f"INSERT INTO instance ({', '.join(names)}) "
                f"VALUES ({', '.join('?' * len(names))}) RETURNING pk", params)
            fcols = [c for c in FRAME_COLS if c != "ingested_at"]
            fnames = ["instance_pk"] + [_sqlname(c) for c in fcols] + ["ingested_at"]
            fsql = (f"INSERT INTO frame ({', '.join(fnames)}) "
                    f"VALUES ({', '.join('?' * len(fnames))})")
            for fr in frames:
                self._execute(fsql, [instance_pk] + [_encode(c, fr.get(c)) for c in fcols]
                              + [now])
        return instance_pk

    def _get_or_create(self, table: str, key_cols: Sequence[str], cols: Sequence[str],
                       values: dict[str, Any], parent: dict[str, int],
                       defaults: dict[str, Any] | None = None) -> int:
        defaults = defaults or {}
        vals = {c: values.get(c) if values.get(c) is not None else defaults.get(c)
                for c in cols}
        where = " AND ".join(f"{c} = ?" for c in key_cols)
        row = self._one(f"SELECT pk FROM {table} WHERE {where}", [vals[c] for c in key_cols])
        if row is not None:
            return row[0]
        names = list(parent) + list(cols)
        params = list(parent.values()) + [vals[c] for c in cols]
        (pk,) = self._one(f"INSERT INTO {table} ({', '.join(names)}) "
                          f"VALUES ({', '.join('?' * len(names))}) RETURNING pk", params)
        return pk

    def delete_study(self, study_uid: str) -> list[str]:
        """Delete a study and everything under it; returns the file relpaths that it
        referenced (the caller deletes them *after* this commits, so a crash leaves at
        worst orphans)."""
        with self._transaction():
            files = self._study_files(study_uid)
            row = self._one("SELECT pk, patient_pk FROM study WHERE StudyInstanceUID = ?",
                            [study_uid])
            if row is None:
                return []
            self._execute("DELETE FROM study WHERE pk = ?", [row[0]])
            # a patient goes with their last study, unless pathology exams (the slide
            # tables of this database, server_stub.slide_catalogue) still refer to them
            keep_for_exams = (" AND NOT EXISTS (SELECT 1 FROM exam WHERE patient_pk = ?)"
                              if self.db.table_exists("exam") else "")
            self._execute("DELETE FROM patient WHERE pk = ? AND NOT EXISTS "
                          "(SELECT 1 FROM study WHERE patient_pk = ?)" + keep_for_exams,
                          [row[1]] * (3 if keep_for_exams else 2))
        return files

    def _study_files(self, study_uid: str) -> list[str]:
        rows = self._all(
            "SELECT i.original_relpath, f.codestream_relpath, f.index_relpath "
            "FROM study st JOIN series se ON se.study_pk = st.pk "
            "JOIN instance i ON i.series_pk = se.pk JOIN frame f ON f.instance_pk = i.pk "
            "WHERE st.StudyInstanceUID = ?", [study_uid])
        out: dict[str, None] = {}
        for r in rows:
            for p in r:
                out[p] = None
        for r in self._final_copies(
                " AND i.series_pk IN (SELECT se.pk FROM series se JOIN study st"
                " ON se.study_pk = st.pk WHERE st.StudyInstanceUID = ?)", [study_uid]):
            out[r[0]] = None
        return list(out)

    # ------------------------------------------------------------------ lookups

    def has_original(self, sha256: str) -> bool:
        """True if an instance whose original file has this SHA-256 is catalogued."""
        return self._one("SELECT 1 FROM instance WHERE original_sha256 = ?", [sha256]) is not None

    def find_instance(self, sop_uid: str) -> dict[str, Any] | None:
        """Instance attributes (``INSTANCE_COLS``) plus series/study UIDs, or None."""
        rows = self._instances(_where_one("i.SOPInstanceUID", sop_uid), "", [])
        return rows[0] if rows else None

    def instance_header(self, sop_uid: str) -> dict[str, Any] | None:
        """The instance's header as DICOM JSON (pixel data excluded), or None."""
        row = self._one("SELECT header_json FROM instance WHERE SOPInstanceUID = ?", [sop_uid])
        return None if row is None else json.loads(row[0])

    def get_study(self, study_uid: str) -> dict[str, Any] | None:
        rows = self.query_studies(StudyInstanceUID=study_uid)
        return rows[0] if rows else None

    def get_series(self, series_uid: str) -> dict[str, Any] | None:
        rows = self.query_series(SeriesInstanceUID=series_uid)
        return rows[0] if rows else None

    def counts(self) -> dict[str, int]:
        """Row counts per level (patients, studies, series, instances, frames)."""
        out = {}
        for key, table in (("patients", "patient"), ("studies", "study"),
                           ("series", "series"), ("instances", "instance"),
                           ("frames", "frame")):
            out[key] = self._one(f"SELECT COUNT(*) FROM {table}")[0]
        return out

    def file_refs(self) -> list[tuple[str, str, int, str]]:
        """Every file the catalogue references: (relpath, sha256, size, owner SOP UID)."""
        out: list[tuple[str, str, int, str]] = []
        for r in self._all("SELECT original_relpath, original_sha256, original_size, "
                           "SOPInstanceUID FROM instance"):
            out.append((r[0], r[1], r[2], r[3]))
        for r in self._all(
                "SELECT f.codestream_relpath, f.codestream_sha256, f.codestream_size, "
                "f.index_relpath, f.index_sha256, f.index_size, i.SOPInstanceUID "
                "FROM frame f JOIN instance i ON f.instance_pk = i.pk"):
            out.append((r[0], r[1], r[2], r[6]))
            out.append((r[3], r[4], r[5], r[6]))
        for r in self._all("SELECT relpath, sha256, size, pk FROM quarantine"):
            out.append((r[0], r[1], r[2], f"quarantine #{r[3]}"))
        out += self._final_copies("")
        return out

    def _final_copies(self, where: str, params=()) -> list[tuple[str, str, int, str]]:
        """Final copies (server_stub.policy_copies: table policy_copy, made on demand)
        that are files of their own (not the original kept as it arrived)."""
        if not self.db.table_exists("policy_copy"):
            return []
        return [tuple(r) for r in self._all(
            "SELECT c.relpath, c.sha256, c.size, c.sop FROM policy_copy c"
            " JOIN instance i ON c.instance_pk = i.pk"
            " WHERE c.relpath IS NOT NULL AND c.relpath <> i.original_relpath" + where,
            list(params))]

    def conflicted_instances(self, series_uid: str) -> set[str]:
        """SOP Instance UIDs of the series with an open quarantine entry (another file
        arrived with the same UID and other content)."""
        rows = self._all(
            "SELECT DISTINCT q.stored_sop_instance_uid FROM quarantine q "
            "JOIN instance i ON i.SOPInstanceUID = q.stored_sop_instance_uid "
            "JOIN series se ON i.series_pk = se.pk "
            "WHERE se.SeriesInstanceUID = ? AND q.state = 'open'", [series_uid])
        return {r[0] for r in rows}

    def delete_instance(self, sop_uid: str) -> list[str]:
        """Delete one instance (and its frames; the series, study and patient too when
        nothing else is left in them); returns the relpaths of the files it referenced,
        for the caller to delete *after* this commits."""
        with self._transaction():
            row = self._one("SELECT i.pk, i.original_relpath, se.pk, st.pk, st.patient_pk "
                            "FROM instance i JOIN series se ON i.series_pk = se.pk "
                            "JOIN study st ON se.study_pk = st.pk WHERE i.SOPInstanceUID = ?",
                            [sop_uid])
            if row is None:
                return []
            ipk, orig, se_pk, st_pk, p_pk = row
            files = [orig]
            for r in self._all("SELECT codestream_relpath, index_relpath FROM frame "
                               "WHERE instance_pk = ?", [ipk]):
                files += [r[0], r[1]]
            files += [r[0] for r in self._final_copies(" AND i.pk = ?", [ipk])]
            self._execute("DELETE FROM instance WHERE pk = ?", [ipk])
            self._execute("DELETE FROM series WHERE pk = ? AND NOT EXISTS "
                          "(SELECT 1 FROM instance WHERE series_pk = ?)", [se_pk, se_pk])
            self._execute("DELETE FROM study WHERE pk = ? AND NOT EXISTS "
                          "(SELECT 1 FROM series WHERE study_pk = ?)", [st_pk, st_pk])
            self._execute("DELETE FROM patient WHERE pk = ? AND NOT EXISTS "
                          "(SELECT 1 FROM study WHERE patient_pk = ?)", [p_pk, p_pk])
        return files

    # ------------------------------------------------------------------ QIDO-style queries

    def query_studies(self, PatientName: str | None = None, PatientID: str | None = None,
                      StudyDate: str | None = None,
                      ModalitiesInStudy: str | Sequence[str] | None = None,
                      StudyInstanceUID: str | Sequence[str] | None = None,
                      AccessionNumber: str | None = None, StudyDescription: str | None = None,
                      limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """Studies matching QIDO-RS style filters, newest first.

        ``PatientName``, ``PatientID``, ``AccessionNumber`` and ``StudyDescription`` match
        case-insensitively with ``*``/``?`` wildcards; ``StudyDate`` takes a date or a
        range; ``ModalitiesInStudy`` matches studies containing any of the given
        modalities; ``StudyInstanceUID`` takes one UID or a list. Each row has the patient
        and study attributes plus ``ModalitiesInStudy`` (list),
        ``NumberOfStudyRelatedSeries`` and ``NumberOfStudyRelatedInstances``.
        """
        w = _Where()
        w.text("p.PatientName", PatientName)
        w.text("p.PatientID", PatientID)
        w.text("st.AccessionNumber", AccessionNumber)
        w.text("st.StudyDescription", StudyDescription)
        w.date_range("st.StudyDate", StudyDate)
        w.uid_list("st.StudyInstanceUID", StudyInstanceUID)
        mods = _multi(ModalitiesInStudy)
        if mods:
            w.add("EXISTS (SELECT 1 FROM series ms WHERE ms.study_pk = st.pk AND ms.Modality "
                  f"IN ({', '.join('?' * len(mods))}))", *mods)
        cols = PATIENT_COLS + STUDY_COLS + ("NumberOfStudyRelatedSeries",
                                             "NumberOfStudyRelatedInstances")
        select = ", ".join([f"p.{c}" for c in PATIENT_COLS] + [f"st.{c}" for c in STUDY_COLS] + [
            "(SELECT COUNT(*) FROM series s1 WHERE s1.study_pk = st.pk)",
            "(SELECT COUNT(*) FROM series s2 JOIN instance i2 ON i2.series_pk = s2.pk "
            "WHERE s2.study_pk = st.pk)",
        ])
        page, pparams = _page(limit, offset)
        sql = (f"SELECT st.pk, {select} FROM study st JOIN patient p ON st.patient_pk = p.pk"
               f"{w.sql()} ORDER BY CASE WHEN st.StudyDate IS NULL THEN 1 ELSE 0 END, "
               f"st.StudyDate DESC, st.StudyTime DESC, st.StudyInstanceUID{page}")
        rows = self._all(sql, w.params + pparams)
        out = []
        for r in rows:
            d = _row(cols, r[1:])
            d["ModalitiesInStudy"] = self._modalities(r[0])
            out.append(d)
        return out

    def _modalities(self, study_pk: int) -> list[str]:
        rows = self._all("SELECT DISTINCT Modality FROM series WHERE study_pk = ? "
                         "AND Modality IS NOT NULL", [study_pk])
        return sorted(r[0] for r in rows)

    def query_series(self, StudyInstanceUID: str | Sequence[str] | None = None,
                     Modality: str | Sequence[str] | None = None,
                     SeriesInstanceUID: str | Sequence[str] | None = None,
                     SeriesNumber: int | None = None, SeriesDescription: str | None = None,
                     BodyPartExamined: str | None = None, PatientID: str | None = None,
                     limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """Series matching the filters, in SeriesNumber order.

        Rows carry the series attributes, the parent study's StudyInstanceUID, StudyDate,
        StudyDescription, PatientName and PatientID, plus
        ``NumberOfSeriesRelatedInstances`` and ``NumberOfImages`` (frames).
        """
        w = _Where()
        w.uid_list("st.StudyInstanceUID", StudyInstanceUID)
        w.uid_list("se.SeriesInstanceUID", SeriesInstanceUID)
        mods = _multi(Modality)
        if mods:
            w.add(f"se.Modality IN ({', '.join('?' * len(mods))})", *mods)
        if SeriesNumber is not None and SeriesNumber != "":
            w.exact("se.SeriesNumber", int(SeriesNumber))
        w.text("se.SeriesDescription", SeriesDescription)
        w.text("se.BodyPartExamined", BodyPartExamined)
        w.text("p.PatientID", PatientID)
        extra = ("StudyInstanceUID", "StudyDate", "StudyDescription", "PatientName",
                 "PatientID")
        cols = SERIES_COLS + extra + ("NumberOfSeriesRelatedInstances", "NumberOfImages")
        select = ", ".join(
            [f"se.{c}" for c in SERIES_COLS]
            + ["st.StudyInstanceUID", "st.StudyDate", "st.StudyDescription", "p.PatientName",
               "p.PatientID",
               "(SELECT COUNT(*) FROM instance i1 WHERE i1.series_pk = se.pk)",
               "(SELECT COUNT(*) FROM instance i2 JOIN frame f2 ON f2.instance_pk = i2.pk "
               "WHERE i2.series_pk = se.pk)"])
        page, pparams = _page(limit, offset)
        sql = (f"SELECT {select} FROM series se JOIN study st ON se.study_pk = st.pk "
               f"JOIN patient p ON st.patient_pk = p.pk{w.sql()} "
               f"ORDER BY st.StudyInstanceUID, "
               f"CASE WHEN se.SeriesNumber IS NULL THEN 1 ELSE 0 END, se.SeriesNumber, "
               f"se.SeriesInstanceUID{page}")
        return [_row(cols, r) for r in self._all(sql, w.params + pparams)]

    def query_instances(self, StudyInstanceUID: str | Sequence[str] | None = None,
                        SeriesInstanceUID: str | Sequence[str] | None = None,
                        SOPInstanceUID: str | Sequence[str] | None = None,
                        SOPClassUID: str | None = None, InstanceNumber: int | None = None,
                        limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """Instances (``INSTANCE_COLS`` plus StudyInstanceUID, SeriesInstanceUID,
        Modality), in InstanceNumber order."""
        w = _Where()
        w.uid_list("st.StudyInstanceUID", StudyInstanceUID)
        w.uid_list("se.SeriesInstanceUID", SeriesInstanceUID)
        w.uid_list("i.SOPInstanceUID", SOPInstanceUID)
        w.exact("i.SOPClassUID", SOPClassUID)
        if InstanceNumber is not None and InstanceNumber != "":
            w.exact("i.InstanceNumber", int(InstanceNumber))
        page, pparams = _page(limit, offset)
        return self._instances(w, page, pparams)

    def _instances(self, w: _Where, page: str, pparams: list[Any]) -> list[dict[str, Any]]:
        extra = ("StudyInstanceUID", "SeriesInstanceUID", "Modality")
        cols = INSTANCE_COLS + extra
        select = ", ".join([f"i.{_sqlname(c)}" for c in INSTANCE_COLS]
                           + ["st.StudyInstanceUID", "se.SeriesInstanceUID", "se.Modality"])
        sql = (f"SELECT {select} FROM instance i JOIN series se ON i.series_pk = se.pk "
               f"JOIN study st ON se.study_pk = st.pk{w.sql()} "
               f"ORDER BY st.StudyInstanceUID, se.SeriesInstanceUID, "
               f"CASE WHEN i.InstanceNumber IS NULL THEN 1 ELSE 0 END, i.InstanceNumber, "
               f"i.SOPInstanceUID{page}")
        return [_row(cols, r) for r in self._all(sql, w.params + pparams)]

    def qido(self, level: str, matches: Sequence[tuple[str, str]] = (), *,
             limit: int | None = None, offset: int = 0,
             header: bool = False) -> list[dict[str, Any]]:
        """QIDO-RS search at ``level`` (``study``, ``series``, ``instance``): ``matches``
        is a list of (keyword or tag, DICOM matching value), all of which must match
        (PS3.4 C.2.2.2: single value, wildcards, UID lists, date / time ranges, lists,
        universal matching; see :func:`qido_condition`). Rows carry the catalogued
        attributes of the level and its parents (plus counts at study and series level,
        ModalitiesInStudy at study level) and, with ``header``, ``header_json``: the
        stored DICOM JSON header of the instance (of the first instance of the series /
        study at those levels). Raises QueryError naming a key it cannot match."""
        return _qido_search(self, level, matches, limit=limit, offset=offset, header=header)

    # ------------------------------------------------------------------ images of a series

    def series_images(self, series_uid: str) -> list[dict[str, Any]]:
        """Every image (instance, frame) of a series, in series order.

        Order: InstanceNumber (missing last), then SOP Instance UID, then frame number.
        Each dict has ``index`` (0..n-1, the image's component number in the series
        target), the instance's geometry / rescale / window attributes (with the frame's
        own ImagePositionPatient when the instance is an enhanced multi-frame), and the
        frame's files: see :data:`SERIES_IMAGE_KEYS`.
        """
        icols = tuple(c for c in _IMAGE_INSTANCE_COLS)
        fcols = tuple(c for c in _IMAGE_FRAME_COLS)
        select = ", ".join([f"i.{_sqlname(c)}" for c in icols]
                           + [f"f.{_sqlname(c)}" for c in fcols])
        rows = self._all(
            f"SELECT {select} FROM frame f JOIN instance i ON f.instance_pk = i.pk "
            f"JOIN series se ON i.series_pk = se.pk WHERE se.SeriesInstanceUID = ?",
            [series_uid])
        images = []
        for r in rows:
            inst = _row(icols, r[: len(icols)])
            fr = _row(fcols, r[len(icols):])
            frame_ipp = fr.pop("frame_ImagePositionPatient")
            inst.update(fr)
            if frame_ipp is not None:
                inst["ImagePositionPatient"] = frame_ipp
            images.append(inst)
        images.sort(key=lambda d: (d["InstanceNumber"] is None, d["InstanceNumber"] or 0,
                                   d["SOPInstanceUID"], d["frame"]))
        conflicted = self.conflicted_instances(series_uid) if images else set()
        for n, d in enumerate(images):
            d["index"] = n
            d["conflict"] = d["SOPInstanceUID"] in conflicted
        return [{k: d[k] for k in SERIES_IMAGE_KEYS} for d in images]


def _where_one(column: str, value: str) -> _Where:
    w = _Where()
    w.add(f"{column} = ?", value)
    return w


_IMAGE_INSTANCE_COLS = (
    "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "NumberOfFrames", "Rows", "Columns",
    "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept",
    "RescaleType", "WindowCenter", "WindowWidth", "signed", "bits_stored", "geometry_flags",
)
_IMAGE_FRAME_COLS = (
    "frame", "codestream_relpath", "codestream_sha256", "codestream_size", "index_relpath",
    "index_sha256", "index_size", "offset", "numres", "nlayers", "frame_ImagePositionPatient",
)
_SQL_NAME["frame_ImagePositionPatient"] = "ImagePositionPatient"
_JSON_COLS.add("frame_ImagePositionPatient")

#: Keys of each dict returned by :meth:`Catalogue.series_images`, in this order.
SERIES_IMAGE_KEYS = (
    "index", "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "frame", "NumberOfFrames",
    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
    "BitsStored", "PixelRepresentation", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "RescaleSlope",
    "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
    "signed", "bits_stored", "offset", "numres", "nlayers",
    "codestream_relpath", "codestream_sha256", "codestream_size",
    "index_relpath", "index_sha256", "index_size",
    "geometry_flags", "conflict",
)


# --------------------------------------------------------------------------- QIDO-RS matching
# PS3.18 §8.3.4 / PS3.4 C.2.2.2: every matching key is resolved here to one condition in
# SQL with parameters, or refused with QueryError naming it (never silently ignored).
#
# A key is either a catalogued column (below) or any other top-level, non-binary,
# non-sequence attribute of the stored header (``instance.header_json``, DICOM JSON),
# matched over the header's values with SQLite's JSON1 ``json_each`` (dialect-specific:
# PostgreSQL would use ``jsonb_array_elements``). A key below the query level (an
# instance attribute in a study query) or from the header matches when *some* instance
# of the study / series matches every such key (one EXISTS for all of them).

QIDO_LEVELS = ("study", "series", "instance")

# keyword -> (level, table alias, column, VR). Level "study" includes the patient.
_QIDO_COLUMNS: dict[str, tuple[str, str, str, str]] = {
    "PatientID": ("study", "p", "PatientID", "LO"),
    "PatientName": ("study", "p", "PatientName", "PN"),
    "PatientBirthDate": ("study", "p", "PatientBirthDate", "DA"),
    "PatientSex": ("study", "p", "PatientSex", "CS"),
    "StudyInstanceUID": ("study", "st", "StudyInstanceUID", "UI"),
    "StudyDate": ("study", "st", "StudyDate", "DA"),
    "StudyTime": ("study", "st", "StudyTime", "TM"),
    "StudyDescription": ("study", "st", "StudyDescription", "LO"),
    "AccessionNumber": ("study", "st", "AccessionNumber", "SH"),
    "StudyID": ("study", "st", "StudyID", "SH"),
    "ReferringPhysicianName": ("study", "st", "ReferringPhysicianName", "PN"),
    "SeriesInstanceUID": ("series", "se", "SeriesInstanceUID", "UI"),
    "SeriesNumber": ("series", "se", "SeriesNumber", "IS"),
    "SeriesDescription": ("series", "se", "SeriesDescription", "LO"),
    "Modality": ("series", "se", "Modality", "CS"),
    "BodyPartExamined": ("series", "se", "BodyPartExamined", "CS"),
    "SeriesDate": ("series", "se", "SeriesDate", "DA"),
    "SeriesTime": ("series", "se", "SeriesTime", "TM"),
    "FrameOfReferenceUID": ("series", "se", "FrameOfReferenceUID", "UI"),
    "SOPInstanceUID": ("instance", "i", "SOPInstanceUID", "UI"),
    "SOPClassUID": ("instance", "i", "SOPClassUID", "UI"),
    "InstanceNumber": ("instance", "i", "InstanceNumber", "IS"),
}
#: Attributes computed by the server: returned, never matched (PS3.18 Table 6.7.1-2).
QIDO_RETURN_ONLY = frozenset({
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances", "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances", "RetrieveURL",
    "InstanceAvailability", "TimezoneOffsetFromUTC",
})
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ", "AT", "UV", "SV"})
_NUMBER_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD"})
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TIME_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DT_RE = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_INT64 = 1 << 63


@dataclass(frozen=True)
class QidoKey:
    """A matching key resolved: its keyword, tag, VR and where it lives."""

    keyword: str
    tag: int
    vr: str
    level: str | None          # level of a catalogued column, None = from the header
    alias: str | None = None
    column: str | None = None


def qido_key(name: str) -> QidoKey:
    """Resolve a QIDO attribute name — a keyword (``PatientID``) or a tag as eight hex
    digits (``00100020``) — or raise QueryError naming it."""
    from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

    raw = name.strip()
    tag = None
    if re.fullmatch(r"[0-9A-Fa-f]{8}", raw):
        tag = int(raw, 16)
        keyword = keyword_for_tag(tag) or ""
    elif re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", raw):
        keyword = raw
        tag = tag_for_keyword(raw)
    else:
        raise QueryError(f"{name}: not an attribute keyword or tag (sequence paths such as "
                         "00400275.00401001 are not supported)")
    if keyword == "ModalitiesInStudy":
        return QidoKey("ModalitiesInStudy", 0x00080061, "CS", "study")
    if keyword in _QIDO_COLUMNS:
        level, alias, column, vr = _QIDO_COLUMNS[keyword]
        return QidoKey(keyword, tag, vr, level, alias, column)
    if tag is None or not keyword:
        raise QueryError(f"{name}: unknown attribute (not in the DICOM dictionary)")
    vr = dictionary_VR(tag)
    if (tag >> 16) in (0x0000, 0x0002, 0x7FE0) or (tag >> 16) & 1:
        raise QueryError(f"{name} ({keyword}): not a matching key (group {tag >> 16:04X})")
    return QidoKey(keyword, tag, vr, None)


def _split_list(value: str, commas: bool) -> list[str]:
    parts = re.split(r"[\\,]" if commas else r"\\", value)
    return [p.strip() for p in parts]


def _glob_pattern(value: str) -> str:
    """DICOM wildcards to an SQLite GLOB pattern (case-sensitive; dialect-specific:
    PostgreSQL's LIKE is case-sensitive and would take :func:`_like_pattern`)."""
    return "".join({"*": "*", "?": "?", "[": "[[]"}.get(ch, ch) for ch in value)


def _plausible(v: str, vr: str) -> bool:
    """Calendar and clock limits of a (partial) DA / TM / DT value."""
    v = v.replace(":", "")
    if vr == "DT":
        v = re.sub(r"[+-]\d{4}$", "", v)
        date, clock = v[:8], v[8:]
    elif vr == "DA":
        date, clock = v, ""
    else:
        date, clock = "", v
    try:
        if len(date) == 8:
            datetime.strptime(date, "%Y%m%d")
        elif len(date) >= 6 and not 1 <= int(date[4:6]) <= 12:
            return False
    except ValueError:
        return False
    whole = clock.split(".")[0]
    limits = (23, 59, 60)
    return all(int(whole[i:i + 2]) <= limits[i // 2] for i in range(0, len(whole) - 1, 2))


def _time_bounds(value: str, regex: re.Pattern, what: str, key: str) -> tuple[str, str]:
    """A partial DICOM time / datetime → (lowest, highest) string it stands for, compared
    lexicographically with the stored value (colons of old ACR-NEMA times removed)."""
    v = value.replace(":", "")
    if not regex.match(v):
        raise QueryError(f"{key}={value}: bad {what}")
    if what == "datetime":
        v = re.sub(r"[+-]\d{4}$", "", v)
    whole, _, frac = v.partition(".")
    top, bottom = ("235959", "000000") if what == "time" else ("99991231235959",
                                                                "00000101000000")
    lo = whole + bottom[len(whole):] + ("." + frac if frac else "")
    hi = whole + top[len(whole):] + "." + (frac + "999999")[:6]
    return lo, hi


def qido_condition(key: QidoKey, value: str, ref: str) -> tuple[str, list[Any]] | None:
    """The SQL condition (on the SQL expression ``ref``) for one key and its value, or
    None for universal matching (empty value, or ``*``). Raises QueryError with the key."""
    name = key.keyword
    value = value.strip()
    if value == "" or (value == "*" and key.vr not in ("UI",)):
        return None
    vr = key.vr
    if vr in _BINARY_VRS:
        raise QueryError(f"{name}: attributes of VR {vr} cannot be matched")
    if vr == "UI":
        uids = _split_list(value, commas=True)
        for u in uids:
            if not u:
                raise QueryError(f"{name}={value}: a UID list with an empty item matches no "
                                 "valid UID (PS3.4 C.2.2.2.2)")
            if not _UID_RE.match(u) or len(u) > 64:
                raise QueryError(f"{name}={value}: {u!r} is not a UID (digits and dots, at "
                                 "most 64; wildcards are not allowed for UIDs)")
        return f"{ref} IN ({', '.join('?' * len(uids))})", uids
    if vr in ("DA", "TM", "DT"):
        if "*" in value or "?" in value:
            raise QueryError(f"{name}={value}: wildcards are not allowed for dates and times")
        regex, what = {"DA": (_DATE_RE, "date"), "TM": (_TIME_RE, "time"),
                       "DT": (_DT_RE, "datetime")}[vr]
        if vr == "DA":
            value = value.replace(".", "")      # old ACR-NEMA yyyy.mm.dd
        if (vr == "DT" and _DT_RE.match(value)           # one datetime (maybe "-hhmm" zone)
                and not re.fullmatch(r"\d{4,8}-\d{4}", value)):   # not a range of years
            lo, sep, hi = value, "", ""
        else:
            if value.count("-") > 1:
                raise QueryError(f"{name}={value}: a range has one '-' (time zone offsets "
                                 "in datetime ranges are not supported)")
            lo, sep, hi = value.partition("-") if "-" in value else (value, "", "")
        lo, hi = lo.strip(), hi.strip()
        if sep and not lo and not hi:
            raise QueryError(f"{name}={value}: a range needs at least one end")
        for v in (lo, hi):
            if v and not (regex.match(v.replace(":", "")) and _plausible(v, vr)):
                raise QueryError(f"{name}={value}: bad {what} {v!r} (DICOM {vr} format)")
        if vr == "DA":
            if not sep:
                return f"{ref} = ?", [lo]
            parts, params = [], []
            if lo:
                parts.append(f"{ref} >= ?")
                params.append(lo)
            if hi:
                parts.append(f"{ref} <= ?")
                params.append(hi)
            return " AND ".join(parts), params
        parts, params = [], []
        if lo:
            parts.append(f"REPLACE({ref}, ':', '') >= ?")
            params.append(_time_bounds(lo, regex, what, name)[0])
        if hi or not sep:
            parts.append(f"REPLACE({ref}, ':', '') <= ?")
            params.append(_time_bounds(hi if sep else lo, regex, what, name)[1])
        return " AND ".join(parts), params
    if vr in _NUMBER_VRS:
        nums = []
        for item in _split_list(value, commas=False):
            try:
                n = int(item) if vr in ("IS", "US", "SS", "UL", "SL") else float(item)
            except ValueError:
                raise QueryError(f"{name}={value}: {item!r} is not a number") from None
            if isinstance(n, int) and not -_INT64 <= n < _INT64:
                raise QueryError(f"{name}={value}: {item} is out of range")
            if isinstance(n, float) and not math.isfinite(n):
                raise QueryError(f"{name}={value}: {item} is not a finite number")
            nums.append(n)
        return f"{ref} IN ({', '.join('?' * len(nums))})", nums
    # text: PN case-insensitive (PS3.4 C.2.2.2.1 allows it; fuzzymatching is accepted and
    # changes nothing more), every other VR case-sensitive; * and ? wildcards; a
    # backslash separates a list of values (any may match); CS lists may use commas.
    items = _split_list(value, commas=(vr == "CS"))
    if any(i == "" for i in items) and len(items) > 1:
        raise QueryError(f"{name}={value}: a list of values with an empty item")
    parts, params = [], []
    for item in items:
        wild = "*" in item or "?" in item
        if vr == "PN":
            if wild:
                parts.append(f"UPPER({ref}) LIKE UPPER(?) ESCAPE '\\'")
                params.append(_like_pattern(item))
            else:
                parts.append(f"UPPER({ref}) = UPPER(?)")
                params.append(item)
        elif wild:
            parts.append(f"{ref} GLOB ?")
            params.append(_glob_pattern(item))
        else:
            parts.append(f"{ref} = ?")
            params.append(item)
    return "(" + " OR ".join(parts) + ")", params


_QIDO_ROW_COLS = {
    "study": PATIENT_COLS + STUDY_COLS,
    "series": SERIES_COLS + PATIENT_COLS + STUDY_COLS,
    "instance": INSTANCE_COLS + SERIES_COLS + PATIENT_COLS + STUDY_COLS,
}


def _qido_select(level: str) -> tuple[list[str], list[str]]:
    """(keys, SQL expressions) of one result row of ``level``."""
    keys, exprs = [], []
    for c in _QIDO_ROW_COLS[level]:
        alias = ("p" if c in PATIENT_COLS else "st" if c in STUDY_COLS
                 else "se" if c in SERIES_COLS else "i")
        if c in keys:
            continue
        keys.append(c)
        exprs.append(f"{alias}.{_sqlname(c)}")
    if level == "study":
        keys += ["NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
        exprs += ["(SELECT COUNT(*) FROM series s1 WHERE s1.study_pk = st.pk)",
                  "(SELECT COUNT(*) FROM series s2 JOIN instance i2 ON i2.series_pk = s2.pk "
                  "WHERE s2.study_pk = st.pk)"]
    elif level == "series":
        keys += ["NumberOfSeriesRelatedInstances", "NumberOfImages"]
        exprs += ["(SELECT COUNT(*) FROM instance i1 WHERE i1.series_pk = se.pk)",
                  "(SELECT COUNT(*) FROM instance i2 JOIN frame f2 ON f2.instance_pk = i2.pk "
                  "WHERE i2.series_pk = se.pk)"]
    return keys, exprs


def _qido_search(cat: "Catalogue", level: str, matches: Sequence[tuple[str, str]], *,
                 limit: int | None, offset: int, header: bool) -> list[dict[str, Any]]:
    if level not in QIDO_LEVELS:
        raise QueryError(f"unknown query level {level!r}")
    depth = QIDO_LEVELS.index(level)
    direct = _Where()
    deep: list[tuple[str, list[Any]]] = []      # conditions on some instance below
    sub_series = "xs" if level == "study" else "se"
    sub_inst = "i" if level == "instance" else "xi"
    for name, value in matches:
        key = qido_key(name)
        if key.keyword in QIDO_RETURN_ONLY:
            raise QueryError(f"{name}: computed by the server, it can be returned "
                             "(includefield) but not matched")
        if key.keyword == "ModalitiesInStudy":
            if depth > 0:
                raise QueryError(f"{name}: a study query key (use Modality at this level)")
            cond = qido_condition(QidoKey("Modality", 0x00080060, "CS", "series"), value,
                                  "ms.Modality")
            if cond is not None:
                direct.add("EXISTS (SELECT 1 FROM series ms WHERE ms.study_pk = st.pk AND "
                           f"{cond[0]})", *cond[1])
            continue
        if key.level is not None and QIDO_LEVELS.index(key.level) <= depth:
            cond = qido_condition(key, value, f"{key.alias}.{key.column}")
            if cond is not None:
                direct.add(cond[0], *cond[1])
            continue
        if key.level is not None:          # a catalogued key below the query level
            alias = sub_series if key.alias == "se" else sub_inst
            cond = qido_condition(key, value, f"{alias}.{key.column}")
        else:                              # from the stored header
            cond = qido_condition(key, value, "CASE WHEN hv.type = 'object' "
                                  "THEN json_extract(hv.value, '$.Alphabetic') "
                                  "ELSE hv.value END")
            if cond is not None:
                cond = (f"EXISTS (SELECT 1 FROM json_each({sub_inst}.header_json, ?) hv "
                        f"WHERE {cond[0]})", [f'$."{key.tag:08X}".Value', *cond[1]])
        if cond is None:
            continue
        if level == "instance":
            direct.add(cond[0], *cond[1])
        else:
            deep.append(cond)
    if deep:
        conds = " AND ".join(c for c, _ in deep)
        params = [p for _, ps in deep for p in ps]
        if level == "study":
            direct.add("EXISTS (SELECT 1 FROM series xs JOIN instance xi ON xi.series_pk = "
                       f"xs.pk WHERE xs.study_pk = st.pk AND {conds})", *params)
        else:
            direct.add(f"EXISTS (SELECT 1 FROM instance xi WHERE xi.series_pk = se.pk AND "
                       f"{conds})", *params)
    keys, exprs = _qido_select(level)
    if header:
        keys.append("header_json")
        exprs.append("i.header_json" if level == "instance" else
                     "(SELECT hi.header_json FROM instance hi WHERE hi.series_pk = se.pk "
                     "ORDER BY hi.pk LIMIT 1)" if level == "series" else
                     "(SELECT hi.header_json FROM series hs JOIN instance hi ON hi.series_pk"
                     " = hs.pk WHERE hs.study_pk = st.pk ORDER BY hi.pk LIMIT 1)")
    order = [("CASE WHEN st.StudyDate IS NULL THEN 1 ELSE 0 END, st.StudyDate DESC, "
              "st.StudyTime DESC, st.StudyInstanceUID"),
             ("st.StudyInstanceUID, CASE WHEN se.SeriesNumber IS NULL THEN 1 ELSE 0 END, "
              "se.SeriesNumber, se.SeriesInstanceUID"),
             ("st.StudyInstanceUID, se.SeriesInstanceUID, CASE WHEN i.InstanceNumber IS "
              "NULL THEN 1 ELSE 0 END, i.InstanceNumber, i.SOPInstanceUID")][depth]
    frm = {0: "study st JOIN patient p ON st.patient_pk = p.pk",
           1: "series se JOIN study st ON se.study_pk = st.pk "
              "JOIN patient p ON st.patient_pk = p.pk",
           2: "instance i JOIN series se ON i.series_pk = se.pk "
              "JOIN study st ON se.study_pk = st.pk JOIN patient p ON st.patient_pk = p.pk"}[depth]
    page, pparams = _page(limit, offset)
    sql = f"SELECT st.pk, {', '.join(exprs)} FROM {frm}{direct.sql()} ORDER BY {order}{page}"
    out = []
    for r in cat._all(sql, direct.params + pparams):
        d = _row(keys, r[1:])
        if level == "study":
            d["ModalitiesInStudy"] = cat._modalities(r[0])
        if header:
            d["header_json"] = json.loads(d["header_json"]) if d["header_json"] else {}
        out.append(d)
    return out

