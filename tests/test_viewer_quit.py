"""File → Quit ends the whole application: every window, transfers, workers and the
bundled server, exit code 0 (the app runs as a subprocess, offscreen)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from vr_data import ingest_folder, make_ball_ct

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 300          # generous: reached only when the process does not end


def test_quit_closes_every_window_and_the_process_exits_0(tmp_path):
    files = make_ball_ct(tmp_path / "dicom", slices=24, size=96)
    uid = ingest_folder(files, tmp_path / "store")
    from imaging.slide_sample import make_ihc_slide
    from server.slide_store import SlideStore
    from imaging.tilesource import ArraySource

    img, assoc = make_ihc_slide(640, 480, seed=3)
    slides = SlideStore.for_image_store(tmp_path / "store")
    slide_uid = slides.ingest(ArraySource(img, mpp=0.5, associated=assoc), patient_id="P9",
                              accession="A9", tile_size=256, label="ihc test")["slide_uid"]
    slides.close()
    env = {k: v for k, v in os.environ.items() if k not in ("MEDVIEW_HOME", "MEDVIEW_CACHE")}
    env.update(QT_QPA_PLATFORM="offscreen", XDG_CONFIG_HOME=str(tmp_path / "config"),
               XDG_DATA_HOME=str(tmp_path / "data"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "quit_app_run.py"),
                             str(tmp_path / "store"), uid, slide_uid], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the app did not end after Quit:\n{out}\n{err[-3000:]}")
    ended = time.monotonic()
    assert proc.returncode == 0, f"{out}\n{err[-3000:]}"
    assert "MprWindow" in out and "MainWindow" in out and "SlidePane" in out, out   # all open at Quit
    m = re.search(r"quit at ([\d.]+)", out)
    assert m, out
    print(f"process ended {ended - float(m.group(1)):.2f} s after Quit")   # the figure, not a test
    assert "event loop left" in out and "stage quit" in out
    # the logout, the bundled server's stop and the cache's close (a shutdown thread)
    # finished before the process ended, and nothing was left to the exit watchdog
    assert "closing did not finish" not in err and "exiting although threads" not in err, err[-3000:]
