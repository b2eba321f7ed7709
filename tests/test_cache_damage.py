"""The client's packet cache recovers from any damage (issue 10, section 6).

A real cache file is filled by a real transfer, then damaged (random bit flips anywhere
in the file, truncation, rows swapped between images, a page overwritten); a real
``medview fetch`` from an in-process server on that cache must finish, bit-exact.
"""
from __future__ import annotations

import json
import random
import shutil
import sqlite3

import numpy as np
import pytest

from client import PacketCache, SeriesData, Session
from client.cache import entry_checksum
from codestream.encode import decode_full
from server.store import Store
from viewer.cli import main as medview

TRIALS = 20


@pytest.fixture()
def reference(ct_store, ct_series_uid):
    with Store(ct_store) as st:
        rows = st.catalogue.series_images(ct_series_uid)
        return [decode_full(st.read_verified(r["codestream_relpath"], r["codestream_sha256"]),
                            r["offset"], r["signed"], bits_stored=r["bits_stored"])
                for r in rows]


@pytest.fixture()
def filled(server, ct_series_uid, tmp_path):
    """Two cache files filled by real transfers: the whole series, and 2 layers of it."""
    out = {}
    for name, layers in (("full", None), ("partial", 2)):
        path = tmp_path / f"{name}.sqlite"
        cache = PacketCache(path)
        SeriesData(Session(server.url), cache, ct_series_uid).transfer(layers=layers).run()
        cache.close()
        assert not list(tmp_path.glob(f"{name}.sqlite-wal")) or \
            (tmp_path / f"{name}.sqlite-wal").stat().st_size == 0
        out[name] = path
    return out


def _flip_bits(path, rng, n=200):
    data = bytearray(path.read_bytes())
    for _ in range(n):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _truncate(path, rng):
    data = path.read_bytes()
    path.write_bytes(data[:rng.randrange(1, len(data))])


def _swap_rows(path, rng, n=6):
    """Valid data and its checksum moved under another key (another image or bin)."""
    con = sqlite3.connect(path)
    rows = con.execute("SELECT rowid, data, crc FROM bins WHERE cls = 0").fetchall()
    for _ in range(n):
        (ra, da, ca), (rb, db, cb) = rng.sample(rows, 2)
        con.execute("UPDATE bins SET data = ?, crc = ?, size = ? WHERE rowid = ?",
                    (db, cb, len(db), ra))
        con.execute("UPDATE bins SET data = ?, crc = ?, size = ? WHERE rowid = ?",
                    (da, ca, len(da), rb))
    # and whole headers swapped between two images
    imgs = [r[0] for r in con.execute("SELECT DISTINCT image FROM bins")]
    a, b = rng.sample(imgs, 2)
    con.execute("UPDATE bins SET image = '~' WHERE image = ? AND cls != 0", (a,))
    con.execute("UPDATE bins SET image = ? WHERE image = ? AND cls != 0", (a, b))
    con.execute("UPDATE bins SET image = ? WHERE image = '~'", (b,))
    con.commit()
    con.close()


def _overwrite_page(path, rng):
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    npages = len(data) // page
    p = rng.randrange(npages)
    data[p * page:(p + 1) * page] = rng.randbytes(page)
    path.write_bytes(bytes(data))


DAMAGE = [
    ("200 bit flips", lambda p, r: _flip_bits(p, r)),
    ("truncation", _truncate),
    ("rows swapped", _swap_rows),
    ("page overwritten", _overwrite_page),
    ("rows swapped + 200 bit flips", lambda p, r: (_swap_rows(p, r), _flip_bits(p, r))),
]


def test_fetch_recovers_from_any_cache_damage(server, ct_series_uid, filled, reference,
                                              tmp_path, capsys):
    rng = random.Random(20261204)
    recovered, kinds = 0, {}
    for trial in range(TRIALS):
        kind, damage = DAMAGE[trial % len(DAMAGE)]
        source = filled["full" if trial % 2 == 0 else "partial"]
        path = tmp_path / f"trial{trial}" / "packets.sqlite"
        path.parent.mkdir()
        shutil.copyfile(source, path)
        damage(path, rng)
        out = tmp_path / f"trial{trial}" / "out"
        code = medview(["fetch", "--server", server.url, "--series", ct_series_uid,
                        "--cache", str(path), "--out", str(out)])
        assert code == 0, (trial, kind)
        summary = json.loads((out / "images.json").read_text())
        assert len(summary["images"]) == len(reference)
        for im, ref in zip(summary["images"], reference):
            px = np.load(out / im["file"])
            assert px.dtype == ref.dtype and np.array_equal(px, ref), (trial, kind, im["image"])
        # the cache left behind is sound: opens clean, and a transfer on it is exact
        cache = PacketCache(path)
        sd = SeriesData(Session(server.url), cache, ct_series_uid)
        assert cache.recovered == 0 and cache.dropped == 0, (trial, kind)
        sd.transfer().run()
        for csn in (0, len(reference) - 1):
            assert np.array_equal(sd.decode(csn).pixels, reference[csn]), (trial, kind, csn)
        cache.close()
        recovered += 1
        kinds[kind] = kinds.get(kind, 0) + 1
    with capsys.disabled():
        print(f"\ncache damage: {recovered} of {TRIALS} trials recovered bit-exact {kinds}")
    assert recovered == TRIALS


def test_valid_data_under_another_key_is_not_served(server, ct_series_uid, tmp_path):
    path = tmp_path / "p.sqlite"
    cache = PacketCache(path)
    sd = SeriesData(Session(server.url), cache, ct_series_uid)
    sd.transfer(layers=1).run()
    a, b = sd.images[0]["key"], sd.images[1]["key"]
    cache.close()
    # image b's rows, data and checksum intact, copied under image a's key
    con = sqlite3.connect(path)
    con.execute("DELETE FROM bins WHERE image = ?", (a,))
    con.execute("INSERT INTO bins SELECT ns, ?, cls, bin, data, crc, size, used FROM bins "
                "WHERE image = ?", (a, b))
    n = con.execute("SELECT count(*) FROM bins WHERE image = ?", (a,)).fetchone()[0]
    con.commit()
    con.close()
    cache = PacketCache(path)
    assert cache.load(sd.ns, a).main_header is None     # nothing of b served as a
    assert cache.dropped == n
    assert cache.load(sd.ns, b).main_header is not None
    # the checksum is the key's too
    assert entry_checksum(sd.ns, a, 0, 0, b"x") != entry_checksum(sd.ns, b, 0, 0, b"x")
    assert entry_checksum(sd.ns, a, 0, 0, b"x") != entry_checksum(sd.ns, a, 0, 1, b"x")
    cache.close()


def test_damage_found_while_open_replaces_the_file(tmp_path):
    """Every operation, not only opening, handles an SQLite error as a damaged file."""
    path = tmp_path / "p.sqlite"
    cache = PacketCache(path)
    cache.put("ns", "img", {(2, 0): b"main", (1, 0): b"tile", (0, 3): b"x" * 5000})
    for i in range(50):
        cache.put("ns", f"other{i}", {(0, j): bytes([j]) * 3000 for j in range(4)})
    cache._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cache._con.execute("PRAGMA cache_size = 1")   # no page held in memory
    # another writer damages the file under the open cache: every page after the first
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    with open(path, "r+b") as f:
        f.seek(page)
        f.write(bytes([0x5A]) * (len(data) - page))
    assert cache.load("ns", "img").precincts == {}
    cache.put("ns", "img", {(2, 0): b"main"})
    cache.usage()
    cache.images("ns")
    cache.evict()
    cache.forget("ns", "img")
    assert cache.recovered >= 1
    assert list(tmp_path.glob("p.sqlite.damaged-*"))
    cache.put("ns", "new", {(0, 1): b"abc"})
    assert cache.usage() == (3, 1)
    cache.close()


def test_old_format_entries_are_not_trusted(tmp_path):
    """Entries written with a data-only CRC (version 1) are dropped, not served."""
    import zlib
    path = tmp_path / "p.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE bins (ns TEXT NOT NULL, image TEXT NOT NULL, cls INTEGER NOT "
                "NULL, bin INTEGER NOT NULL, data BLOB NOT NULL, crc INTEGER NOT NULL, size "
                "INTEGER NOT NULL, used REAL NOT NULL, PRIMARY KEY (ns, image, cls, bin))")
    con.execute("INSERT INTO bins VALUES ('ns', 'img', 0, 1, x'00', ?, 1, 0)",
                (zlib.crc32(b"\x00"),))
    con.commit()
    con.close()
    cache = PacketCache(path)
    assert cache.usage() == (0, 0)
    cache.close()


def test_a_write_after_close_keeps_the_file(tmp_path):
    """A transfer that ends after the cache was closed must not cost the user the cache."""
    path = tmp_path / "p.sqlite"
    cache = PacketCache(path)
    cache.put("ns", "img", {(0, 1): b"abc"})
    cache.close()
    cache.put("ns", "img", {(0, 2): b"def"})
    assert cache.load("ns", "img").precincts == {} and cache.usage() == (0, 0)
    assert cache.recovered == 0 and not list(tmp_path.glob("p.sqlite.damaged-*"))
    again = PacketCache(path)
    assert again.usage() == (3, 1)
    again.close()
