"""``medview-server serve --workers N``: several server processes on one port share
sessions (and the rest of their state) through the database, so a session made by one
process is honoured by every other."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import requests

from policyutil import copy_store_tree
from waits import WAIT_S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_worker_processes_share_sessions(ct_store, tmp_path):
    store = copy_store_tree(ct_store, tmp_path / "store")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--store", str(store),
                             "--port", str(port), "--workers", "2", "--allow-local",
                             "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:                                      # up: answers its health route
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                requests.get(f"{url}/api/health", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        sid = requests.post(f"{url}/api/login", json={"username": "local"},
                            timeout=30).json()["session"]
        auth = {"Authorization": f"Bearer {sid}", "Connection": "close"}
        replicas: dict[str, int] = {}
        deadline = time.monotonic() + WAIT_S
        while len(replicas) < 2:
            # a new connection each time: the kernel hands it to either process
            h = requests.get(f"{url}/api/health", headers={"Connection": "close"},
                             timeout=30).json()
            replicas[h["replica"]] = replicas.get(h["replica"], 0) + 1
            r = requests.get(f"{url}/dicomweb/studies", headers=auth, timeout=30)
            assert r.status_code == 200, r.text          # the session, whoever answers
            assert time.monotonic() < deadline, f"one process answered everything: {replicas}"
        # every process honours the session and the logout made through one of them
        requests.post(f"{url}/api/logout", headers=auth, timeout=30)
        for _ in range(6):
            r = requests.get(f"{url}/dicomweb/studies", headers=auth, timeout=30)
            assert r.status_code == 401
    finally:
        proc.terminate()
        try:
            proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp_path / "store", ignore_errors=True)
