"""Helpers for the policy, rights and tiers tests: private store copies, raw packet
requests, and an exact account of which packets a response carried."""
from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import requests

from codestream import framing
from codestream.index import PacketIndex
from codestream.jpp import MAIN_HEADER, PRECINCT, TILE_HEADER, EorMessage, JppParser
from server.database import database_of
from server.dbutil import is_postgres
from server.store import Store
from waits import WAIT_S


def copy_store(src: Path, dst: Path) -> Path:
    """A private copy of a store (files copied, catalogue through SQLite's backup API, so
    that a server using the source at the same time does not matter)."""
    dst.mkdir(parents=True, exist_ok=True)
    for d in ("originals", "j2k"):
        shutil.copytree(src / d, dst / d)
    if is_postgres(database_of(src)):          # MEDVIEW_TEST_DATABASE=postgresql
        from pgcluster import copy_schema

        copy_schema(database_of(src), database_of(dst))
        return dst
    s = sqlite3.connect(src / "catalogue.sqlite")
    d = sqlite3.connect(dst / "catalogue.sqlite")
    with d:
        s.backup(d)
    s.close()
    d.close()
    return dst


def clear_tables(store_dir: Path, tables) -> None:
    """Empty those of ``tables`` that the store's database has (either engine), e.g. the
    reading history a shared store picked up from other tests."""
    from server.dbutil import Db

    db = Db(database_of(store_dir))
    try:
        with db.transaction():
            for table in tables:
                if db.table_exists(table):
                    db.execute(f"DELETE FROM {table}")
    finally:
        db.close()


def copy_store_tree(src: Path, dst: Path) -> Path:
    """A copy of a whole store directory with its database, whatever the engine (the
    SQLite file is in the tree; a PostgreSQL schema is copied beside)."""
    shutil.copytree(src, dst)
    if is_postgres(database_of(src)):
        from pgcluster import copy_schema

        copy_schema(database_of(src), database_of(dst))
    return dst


def read_study_server(ct_store: Path, dst: Path):
    """An embedded server on a private copy of ``ct_store`` whose study is in status 2
    (read), so that ``version=auto`` follows the client's reported context; its ``series``
    is the store's series UID. The caller stops it."""
    from client.policy import PolicyClient
    from client.session import Session
    from server.embedded import EmbeddedServer

    store = copy_store(ct_store, dst)
    clear_tables(store, ("study_status_history", "study_status"))
    srv = EmbeddedServer(str(store)).start()
    srv.series = series_uid(store)
    PolicyClient(Session(srv.url)).set_status(study_uid(store), 2)
    return srv


def series_uid(store_dir: Path) -> str:
    with Store(store_dir) as st:
        (s,) = st.catalogue.query_series()
        return s["SeriesInstanceUID"]


def study_uid(store_dir: Path) -> str:
    with Store(store_dir) as st:
        (s,) = st.catalogue.query_studies()
        return s["StudyInstanceUID"]


def indexes(store_dir: Path, uid: str) -> dict[int, PacketIndex]:
    with Store(store_dir) as st:
        return {r["index"]: PacketIndex.from_json(st.read_verified(r["index_relpath"], r["index_sha256"]))
                for r in st.catalogue.series_images(uid)}


@dataclass
class Response:
    status: int
    json: dict | None
    controls: list[dict]
    messages: list
    body_bytes: int            # every byte of the HTTP body


def fetch(url: str, sid: str, **params) -> Response:
    """One raw packet request (GET /jpip), read to the end."""
    r = requests.get(f"{url}/jpip", params=params, headers={"Authorization": f"Bearer {sid}"},
                     timeout=WAIT_S)
    body = r.content
    if r.status_code != 200:
        return Response(r.status_code, r.json(), [], [], len(body))
    controls, messages = [], []
    parser = JppParser()
    for rtype, payload in framing.RecordReader().feed(body):
        if rtype == framing.CONTROL:
            controls.append(payload)
        else:
            messages.extend(m for m in parser.feed(payload) if not isinstance(m, EorMessage))
    return Response(200, None, controls, messages, len(body))


@dataclass(frozen=True)
class Sent:
    csn: int
    comp: int
    res: int
    prec: int
    layer: int
    nbytes: int


def packets_sent(messages, ixs: dict[int, PacketIndex]) -> tuple[list[Sent], int]:
    """Every packet the precinct messages carried (split by the packet lengths of the
    index), and the header bytes; raises if a message does not cut at packet borders."""
    out: list[Sent] = []
    header_bytes = 0
    for m in messages:
        if m.cls in (MAIN_HEADER, TILE_HEADER):
            header_bytes += len(m.data)
            continue
        assert m.cls == PRECINCT, m
        ix = ixs[m.csn]
        c, r, p = ix.databin_key(m.bin_id)
        lengths = ix.packet_lengths_by_bin()[m.bin_id]
        pos, layer = 0, 0
        while pos < m.offset:
            pos += lengths[layer]
            layer += 1
        assert pos == m.offset, "message does not start at a packet border"
        left = len(m.data)
        while left > 0:
            out.append(Sent(m.csn, c, r, p, layer, lengths[layer]))
            left -= lengths[layer]
            layer += 1
        assert left == 0, "message does not end at a packet border"
    return out, header_bytes
