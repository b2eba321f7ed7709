"""The server as a separate process: `medview-server serve`, `medview fetch`, kill -9."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from client import Callbacks, ConnectionFailed, PacketCache, SeriesData, Session, TransferError
from codestream.encode import decode_full
from server.store import Store
from waits import WAIT_S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(store, port):
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--store", str(store), "--port",
         str(port), "--log-level", "warning", "--allow-local"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            Session(url)
            return proc, url
        except ConnectionFailed:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read().decode())
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def test_fetch_cli_writes_npy_and_json(ct_store, ct_series_uid, tmp_path):
    port = _free_port()
    proc, url = _serve(ct_store, port)
    try:
        out = tmp_path / "out"
        from viewer.cli import main
        rc = main(["fetch", "--server", url, "--series", ct_series_uid, "--layers", "2",
                   "--level", "1", "--out", str(out), "--cache", str(tmp_path / "c.sqlite")])
        assert rc == 0
        summary = json.loads((out / "images.json").read_text())
        assert len(summary["images"]) == 12
        first = summary["images"][0]
        # numbered from 1, as the viewer and `snapshot --slice` count
        assert first["file"] == "0001.npy" and first["image"] == 1 and first["codestream"] == 0
        assert summary["images"][-1]["file"] == "0012.npy"
        assert first["layers"] == 2 and first["reduce"] == 1 and first["shape"] == [128, 128]
        arr = np.load(out / first["file"])
        with Store(ct_store) as st:
            row = st.catalogue.series_images(ct_series_uid)[0]
            cs = st.read_verified(row["codestream_relpath"], row["codestream_sha256"])
        np.testing.assert_array_equal(arr, decode_full(cs, row["offset"], True, layers=2, reduce=1))
        assert first["SOPInstanceUID"] == row["SOPInstanceUID"]
        # region at full resolution and quality
        out2 = tmp_path / "region"
        rc = main(["fetch", "--server", url, "--series", ct_series_uid, "--region", "10,20,40,30",
                   "--out", str(out2), "--no-cache"])
        assert rc == 0
        reg = json.loads((out2 / "images.json").read_text())["images"][3]
        assert reg["shape"] == [30, 40] and reg["layers"] == 4
        # a bad series gives a clear error and a non-zero exit
        assert main(["fetch", "--server", url, "--series", "1.2.3", "--out",
                     str(tmp_path / "x"), "--no-cache"]) == 1
    finally:
        proc.terminate()
        proc.wait(WAIT_S)


def test_killed_server(ct_store, ct_series_uid, tmp_path):
    """kill -9 during a transfer: a clear error, the cache keeps what arrived, and a
    restarted server completes the series bit-exactly."""
    port = _free_port()
    proc, url = _serve(ct_store, port)
    cache = PacketCache(tmp_path / "c.sqlite")
    sd = SeriesData(Session(url), cache, ct_series_uid)

    def kill(_p):
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    t = sd.transfer(order="image", callbacks=Callbacks(on_image=kill))
    try:
        t.run()
        completed = True
    except TransferError as e:
        completed = False
        assert "broke off" in str(e) or "closed the stream" in str(e)
    assert proc.poll() is not None
    with pytest.raises(ConnectionFailed):
        sd.transfer().run()
    # what arrived is intact on disk
    cache2 = PacketCache(tmp_path / "c.sqlite")
    sd2_levels_before = None
    proc, url = _serve(ct_store, port)
    try:
        sd2 = SeriesData(Session(url), cache2, ct_series_uid)
        assert cache2.dropped == 0
        sd2_levels_before = [sd2.levels(c) for c in range(12)]
        assert sd2_levels_before[0] == (4, 2)
        t2 = sd2.transfer()
        t2.run()
        if not completed:
            assert t2.received < t2.total
        with Store(ct_store) as st:
            for csn in (0, 6, 11):
                row = st.catalogue.series_images(ct_series_uid)[csn]
                cs = st.read_verified(row["codestream_relpath"], row["codestream_sha256"])
                np.testing.assert_array_equal(sd2.decode(csn).pixels,
                                              decode_full(cs, row["offset"], True))
    finally:
        proc.terminate()
        proc.wait(WAIT_S)
