#!/usr/bin/env python
"""DICOM networking: the project's SCP against Orthanc, timed by the same client (dcmtk).

    .venv/bin/python bench/dimse.py [--files N] [--reps R] [--size S]

Starts ``medview-server serve --dicom-port`` (HTTP and DICOM on loopback) and a throwaway
Orthanc (Debian's binary, own config, storage in a temporary directory; its DICOM port
binds every interface, only the configured AE titles from 127.0.0.1 are accepted), then
times with dcmtk's tools against each:

* C-ECHO (``echoscu``), C-FIND at study level (``findscu -S``),
* C-STORE of a study of N files (``storescu +sd``, a new study each repetition),
* C-MOVE of that study to a ``storescp`` (``movescu``), C-GET of it (``getscu``).

Each figure is the median wall time of R runs of the tool (process start included, the
same for both peers). The project's C-STORE includes its ingest: every instance is
decoded, encoded into a layered JPEG 2000 codestream and verified bit for bit before the
C-STORE response; Orthanc stores the file as it is. Prints a table; writes
``bench/out/dimse.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process ended with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not open")


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=20, help="instances per study (default 20)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per figure (default 3)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/out/dimse.json")
    args = ap.parse_args()

    subprocess.run(["bash", str(REPO / "scripts/apt-ensure.sh"), "dcmtk", "orthanc"], check=True)
    from server.sample import make_sample_ct

    tmp = Path(tempfile.mkdtemp(prefix="bench-dimse-"))
    procs: list[subprocess.Popen] = []
    try:
        studies = []
        for rep in range(args.reps):
            d = tmp / f"study{rep}"
            make_sample_ct(d, slices=args.files, size=args.size, seed=100 + rep)
            studies.append(d)
        import pydicom
        uids = [str(pydicom.dcmread(next(d.iterdir())).StudyInstanceUID) for d in studies]
        pid = str(pydicom.dcmread(next(studies[0].iterdir())).PatientID)

        dest_port = free_port()
        rx = tmp / "rx"
        rx.mkdir()
        procs.append(subprocess.Popen(["storescp", "-aet", "DEST", "+xa", "-od", str(rx),
                                       str(dest_port)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        wait_port(dest_port, procs[-1])

        # the project
        store = tmp / "store"
        mv = [sys.executable, "-m", "server.cli"]
        store.mkdir()
        for name, port in (("TESTER", 104), ("DEST", dest_port)):
            subprocess.run([*mv, "ae", "add", name, "--host", "127.0.0.1", "--port",
                            str(port), "--store", str(store)], check=True, cwd=REPO,
                           capture_output=True)
        mv_port = free_port()
        procs.append(subprocess.Popen([*mv, "serve", "--store", str(store), "--port",
                                       str(free_port()), "--dicom-port", str(mv_port),
                                       "--log-level", "warning"], cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(mv_port, procs[-1])

        # Orthanc
        o_http, o_dicom = free_port(), free_port()
        cfg = {"Name": "bench", "StorageDirectory": str(tmp / "orthanc"),
               "IndexDirectory": str(tmp / "orthanc"), "HttpPort": o_http,
               "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
               "DicomServerEnabled": True, "DicomAet": "ORTHANC", "DicomPort": o_dicom,
               "DicomCheckModalityHost": True, "DicomAlwaysAllowEcho": False,
               "DicomAlwaysAllowStore": False, "DicomAlwaysAllowFind": False,
               "DicomAlwaysAllowGet": False, "DicomAlwaysAllowMove": False, "Plugins": [],
               "DicomModalities": {"tester": ["TESTER", "127.0.0.1", 104],
                                   "dest": ["DEST", "127.0.0.1", dest_port]}}
        (tmp / "orthanc.json").write_text(json.dumps(cfg))
        procs.append(subprocess.Popen(["Orthanc", str(tmp / "orthanc.json")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(o_dicom, procs[-1])

        peers = {"project": ("MEDVIEW", mv_port), "Orthanc": ("ORTHANC", o_dicom)}
        results: dict[str, dict[str, float]] = {}
        for peer, (aec, port) in peers.items():
            base = ["-aet", "TESTER", "-aec", aec]
            addr = ["127.0.0.1", str(port)]
            r = results[peer] = {}
            store_t = [timed(["storescu", *base, *addr, "+sd", str(d)]) for d in studies]
            r["C-STORE"] = statistics.median(store_t)
            r["C-ECHO"] = statistics.median(timed(["echoscu", *base, *addr])
                                            for _ in range(args.reps))
            r["C-FIND"] = statistics.median(timed(
                ["findscu", "-S", *base, "-k", "QueryRetrieveLevel=STUDY", "-k",
                 f"PatientID={pid}", "-k", "StudyInstanceUID", *addr])
                for _ in range(args.reps))
            r["C-MOVE"] = statistics.median(timed(
                ["movescu", "-S", *base, "-aem", "DEST", "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={u}", *addr]) for u in uids)
            got = tmp / f"get-{peer}"
            got.mkdir()
            r["C-GET"] = statistics.median(timed(
                ["getscu", "-S", *base, "-od", str(got), "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={u}", *addr]) for u in uids)
        n = args.files
        print(f"\nDICOM operations, median of {args.reps} runs, dcmtk client, loopback; "
              f"a study = {n} CT images {args.size}x{args.size} (16 bit)")
        print(f"{'operation':<28}{'project':>12}{'Orthanc':>12}")
        labels = {"C-ECHO": "C-ECHO (echoscu)", "C-FIND": "C-FIND study (findscu)",
                  "C-STORE": f"C-STORE {n} files (storescu)",
                  "C-MOVE": f"C-MOVE {n} to storescp", "C-GET": f"C-GET {n} (getscu)"}
        for op, label in labels.items():
            print(f"{label:<28}{results['project'][op] * 1000:>10.0f}ms"
                  f"{results['Orthanc'][op] * 1000:>10.0f}ms")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"files": n, "size": args.size, "reps": args.reps,
                                        "seconds": results,
                                        "load": os.getloadavg()}, indent=1))
        print(f"load average {os.getloadavg()[0]:.2f}; written {args.out}")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
