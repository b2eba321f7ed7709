"""``medview-slide`` as a user types it: ingest, list, render, bad input; ``--store``
before or after the command."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from commands.slide_cli import main
from imaging.srdata import ihc_image


@pytest.fixture()
def plain_slide(tmp_path):
    """A plain image of real tissue (scikit-image's IHC, 512×512) as a user drops it."""
    p = tmp_path / "ihc.png"
    Image.fromarray(ihc_image()).save(p)
    return p


def test_ingest_list_render_with_store_anywhere(tmp_path, plain_slide, capsys):
    store = tmp_path / "store"
    rc = main(["--store", str(store), "ingest", str(plain_slide), "--patient", "P-1",
               "--accession", "ACC-1", "--mpp", "0.5", "--tile", "256", "-q"])
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "P-1" in line and "ACC-1" in line and "512x512" in line

    assert main(["list", "--store", str(store)]) == 0
    listed = capsys.readouterr().out
    assert "P-1" in listed and "ACC-1" in listed
    assert main(["list", "--store", str(store), "--patient", "nobody"]) == 0
    assert capsys.readouterr().out.strip() == ""

    out = tmp_path / "level0.png"
    assert main(["--store", str(store), "render", "--slide", "1", "--level", "0",
                 "--region", "100,50,64,48", "--out", str(out)]) == 0
    got = np.asarray(Image.open(out).convert("RGB"))
    # the pyramid is lossless: the rendered region is the source pixels
    assert np.array_equal(got, ihc_image()[50:98, 100:164])

    sr = tmp_path / "sr.png"
    assert main(["render", "--store", str(store), "--slide", "1", "--level", "1",
                 "--region", "0,0,32,32", "--sr", "2", "--out", str(sr)]) == 0
    im = Image.open(sr)
    assert im.size == (64, 64) and "super-resolution x2" in im.text["MedView-Generated"]
    ens = tmp_path / "sr_ensemble.png"
    assert main(["render", "--store", str(store), "--slide", "1", "--level", "1",
                 "--region", "0,0,32,32", "--sr", "2", "--sr-ensemble", "--out", str(ens)]) == 0
    im2 = Image.open(ens)
    assert im2.size == (64, 64) and "self-ensemble" in im2.text["MedView-Generated"]
    assert not np.array_equal(np.asarray(im2), np.asarray(im))       # a different estimate
    assert main(["render", "--store", str(store), "--slide", "1", "--sr-ensemble",
                 "--out", str(ens)]) == 2                            # needs --sr


def test_bad_input_gets_a_clear_error_and_keeps_the_store(tmp_path, plain_slide, capsys):
    store = tmp_path / "store"
    assert main(["ingest", "--store", str(store), str(plain_slide), "--patient", "P-1",
                 "--accession", "ACC-1", "-q"]) == 0
    capsys.readouterr()
    junk = tmp_path / "notaslide.svs"
    junk.write_bytes(b"II*\x00" + b"\x00" * 64)                  # a TIFF header, no image
    assert main(["--store", str(store), "ingest", str(junk), "--patient", "P-2",
                 "--accession", "ACC-2", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ingest:") and "notaslide.svs" in err
    assert main(["--store", str(store), "render", "--slide", "99", "--out",
                 str(tmp_path / "x.png")]) == 1
    assert "99" in capsys.readouterr().err
    assert main(["--store", str(store), "render", "--slide", "1", "--level", "9", "--out",
                 str(tmp_path / "x.png")]) == 1
    assert "out of range" in capsys.readouterr().err
    # a store named explicitly is never created by a render (only the default one is)
    assert main(["--store", str(tmp_path / "nowhere"), "render", "--slide", "1", "--out",
                 str(tmp_path / "x.png")]) == 1
    assert "no slide store" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
    # what was stored before the failures is all still there
    assert main(["list", "--store", str(store)]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 1 and "P-1" in rows[0]
    with pytest.raises(SystemExit) as e:
        main(["ingest", str(plain_slide)])                        # no --patient/--accession
    assert e.value.code == 2
