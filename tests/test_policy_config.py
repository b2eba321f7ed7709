"""The site policy tables (SPEC V1, V2, V6, V8): loading and overriding, versions as
layer truncation points with the ratios they actually reach, selection by version,
quality and purpose, the status matrix and the automatic choice."""
from __future__ import annotations

import os
import time

import pytest

from server.policy import (DEFAULT_POLICY, AutoInputs, ImageFacts, PolicyError,
                                PolicySource, SelectionError, load_policy)
from server.store import Store
from server.versions import VersionTable
from tests.policyutil import copy_store, series_uid


@pytest.fixture(scope="module")
def policy():
    return load_policy()


def test_defaults_are_documented_and_valid(policy):
    assert DEFAULT_POLICY.is_file()
    assert policy.version_names() == ["V1", "V2", "V3"]
    # priors are compared at the 1:20 version (issue 17, SPEC V9); 1:50 is for a look
    assert [v.purpose for v in policy.versions] == ["diagnosis", "comparison", "reference"]
    # the source document's Fig. 3: unread only V1; read..annotations all; report no V1
    assert policy.allowed_versions(1) == ["V1"]
    assert all(policy.allowed_versions(s) == ["V1", "V2", "V3"] for s in (2, 3, 4))
    assert policy.allowed_versions(5) == ["V2", "V3"]
    assert policy.status_name(5) == "report"
    assert policy.quality_for("CT") == {"V1": 100, "V2": 50, "V3": 25}
    assert policy.quality_for("US") == {"V1": 100, "V2": 70, "V3": 30}


def test_ratio_table_most_specific_row_wins(policy):
    assert policy.ratios_for("CT", "CHEST", ["Thorax"]) == {"V2": 20, "V3": 50}
    assert policy.ratios_for("CT", "HEAD", []) == {"V2": 10, "V3": 20}
    assert policy.ratios_for("mr", None, []) == {"V2": 10, "V3": 20}
    assert policy.ratios_for(None, None, []) == {"V2": 20, "V3": 50}


def test_site_file_overrides_parts(tmp_path):
    (tmp_path / "policy.toml").write_text(
        '[[ratios]]\nmodality = "*"\nV2 = 15\nV3 = 40\n\n'
        '[[ratios]]\nmodality = "CT"\nexam = "*angio*"\nV2 = 8\nV3 = 30\n\n'
        '[status.versions]\n1 = ["V1", "V2"]\n\n[storage]\nmigrate_after_days = 7\n')
    p = load_policy(tmp_path)
    assert p.ratios_for("CT", None, ["CT ANGIO neck"]) == {"V2": 8, "V3": 30}
    assert p.ratios_for("CT", None, ["routine"]) == {"V2": 15, "V3": 40}     # list replaced
    assert p.allowed_versions(1) == ["V1", "V2"] and p.allowed_versions(5) == ["V2", "V3"]
    assert p.storage.migrate_after_days == 7 and p.storage.keep_hot == "V2"
    assert p.quality_for("CT")["V2"] == 50                                   # kept


def test_site_purposes_are_kept(tmp_path):
    """A site file that names the purposes as the earlier defaults did (V3 "comparison")
    keeps them: the version the site takes the purpose from gets the site version's
    default purpose, so selection by purpose stays unambiguous."""
    (tmp_path / "policy.toml").write_text('[versions.V3]\npurpose = "comparison"\n')
    p = load_policy(tmp_path)
    assert [v.purpose for v in p.versions] == ["diagnosis", "reference", "comparison"]
    facts = [ImageFacts(1000, (20, 50, 100, 400))]
    sv = p.series_versions("1.2", {"Modality": "OT"}, facts)
    assert sv.select(purpose="comparison").name == "V3"
    assert sv.select(purpose="reference").name == "V2"
    # a site's own purpose that takes nobody's leaves the defaults alone
    (tmp_path / "policy.toml").write_text('[versions.V3]\npurpose = "teaching"\n')
    p = load_policy(tmp_path)
    assert [v.purpose for v in p.versions] == ["diagnosis", "comparison", "teaching"]
    # a site that names every purpose gets exactly what it names
    (tmp_path / "policy.toml").write_text('[versions.V2]\npurpose = "reference"\n'
                                          '[versions.V3]\npurpose = "comparison"\n')
    assert [v.purpose for v in load_policy(tmp_path).versions] == \
        ["diagnosis", "reference", "comparison"]
    # and a policy given with --policy is treated the same way
    other = tmp_path / "other.toml"
    other.write_text('[versions.V1]\npurpose = "comparison"\n')
    (tmp_path / "policy.toml").unlink()
    assert [v.purpose for v in load_policy(tmp_path, other).versions] == \
        ["comparison", "diagnosis", "reference"]


@pytest.mark.parametrize("text, message", [
    ("[versions.V2]\nlossless = true\n", "only it, must be lossless"),
    ('[[ratios]]\nmodality = "CT"\nV2 = 10\n', "default row"),
    ('[status.versions]\n7 = ["V1"]\n', "not 1-5"),
    ('[status.versions]\n2 = ["V9"]\n', "unknown version"),
    ('[[auto.rules]]\nwhen = { weather = ["rain"] }\nchoose = "V1"\n', "unknown condition"),
    ("[storage]\nkeep_hot = \"V7\"\n", "keep_hot"),
    ("this is not toml = = =\n", "not valid TOML"),
])
def test_bad_site_files_are_refused_clearly(tmp_path, text, message):
    (tmp_path / "policy.toml").write_text(text)
    with pytest.raises(PolicyError, match=message):
        load_policy(tmp_path)


def test_policy_is_reloaded_when_edited(tmp_path):
    src = PolicySource(tmp_path, interval=0)
    assert src.get().allowed_versions(5) == ["V2", "V3"]
    f = tmp_path / "policy.toml"
    f.write_text('[status.versions]\n5 = ["V1", "V2", "V3"]\n')
    assert src.get().allowed_versions(5) == ["V1", "V2", "V3"]
    f.write_text("broken = = \n")                       # a broken edit keeps the last good one
    os.utime(f, (time.time() + 5, time.time() + 5))
    assert src.get().allowed_versions(5) == ["V1", "V2", "V3"] and src.last_error


def _facts(ratios, raw=1_000_000):
    return [ImageFacts(raw, tuple(int(raw / r) for r in ratios))]


def test_versions_are_truncation_points(policy):
    info = {"Modality": "CT", "BodyPartExamined": "CHEST"}
    sv = policy.series_versions("1.2", info, _facts((48, 21, 8.5, 2.7)))
    assert [(v.name, v.layers) for v in sv.versions] == [("V1", None), ("V2", 2), ("V3", 1)]
    assert sv.get("V2").actual_ratio == pytest.approx(21, rel=0.01)
    # a site ratio between two layers takes the nearest (on a log scale)
    sv = policy.series_versions("1.2", {"Modality": "MR"}, _facts((48, 21, 8.5, 2.7)))
    assert sv.get("V2").layers == 3 and sv.get("V3").layers == 2       # 1:10 -> 8.5, 1:20 -> 21
    assert sv.select(version="V2").name == "V2"
    assert sv.select(quality=60).name == "V1" and sv.select(quality=50).name == "V2"
    assert sv.select(quality=1).name == "V3"
    assert sv.select(purpose="Comparison").name == "V2"
    with pytest.raises(SelectionError, match="V1, V2, V3"):
        sv.select(version="V9")
    with pytest.raises(SelectionError, match="purpose"):
        sv.select(purpose="fun")


def test_automatic_choice(policy):
    def choose(allowed=("V1", "V2", "V3"), **kw):
        return policy.choose_auto(AutoInputs(**kw), list(allowed))

    assert choose(status=1, link_bps=1e6).version == "V1"                # unread: diagnosis
    assert choose(status=2, link_bps=2e6).version == "V3"                # slow link
    assert choose(status=2, link_bps=20e6).version == "V2"               # medium link
    assert choose(status=2, link_bps=1e9).version == "V1"
    assert choose(status=2, memory_mb=1024).version == "V3"              # small client
    assert choose(status=2, cpus=1).version == "V2"                      # slow client
    assert choose(status=2, groups=("referrer",)).version == "V2"        # user's group
    assert choose(status=2, place="home").version == "V2"                # place of use
    c = choose(status=2, place="reading-room", link_bps=100e6, groups=("referrer",))
    assert c.version == "V1" and "reading room" in c.reasons[0]
    assert choose(status=2).version == "V1"                              # nothing known
    c = choose(allowed=("V2", "V3"), status=5)                          # report: no V1
    assert c.version == "V2" and "nearest" in c.reasons[-1]
    c = choose(allowed=("V1",), status=1, link_bps=1e3)
    assert c.version == "V1"


def test_place_from_the_site_network_table(tmp_path):
    (tmp_path / "policy.toml").write_text('[auto.networks]\n"10.20.0.0/16" = "reading-room"\n')
    p = load_policy(tmp_path)
    assert p.place_for("10.20.3.4", "home") == "reading-room"
    assert p.place_for("192.168.1.2", "home") == "home"


def test_ratios_reached_on_the_sample_ct(ct_store, tmp_path):
    """The versions of the sample CT, as recorded in the catalogue."""
    store_dir = copy_store(ct_store, tmp_path / "store")
    uid = series_uid(store_dir)
    with Store(store_dir) as st:
        vt = VersionTable(st, load_policy)
        sv = vt.get(uid)
        rec = {r["version"]: r for r in vt.recorded(uid)}
        vt.close()
    assert sv.get("V1").lossless and sv.get("V1").actual_ratio > 1.5
    assert sv.get("V2").actual_ratio == pytest.approx(20, rel=0.15)
    assert sv.get("V3").actual_ratio == pytest.approx(50, rel=0.15)
    assert rec["V2"]["layers"] == 2 and rec["V3"]["layers"] == 1
    assert rec["V2"]["actual_ratio"] == pytest.approx(sv.get("V2").actual_ratio)
