"""Protocol runners and reports, with records from fake readers and a fake extractor.

The fake extractor maps every image to the one-hot direction of its person id, except
images whose path contains "looks-like-<pid>", which point to that other person: a perfect
extractor apart from chosen mistakes, so every score below is worked out by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bmil.config import load_config
from bmil.datasets import get_dataset
from bmil.evaluation import (
    ProtocolResult,
    evaluate_cross_modality,
    evaluate_llcm,
    evaluate_regdb,
    evaluate_sysu,
    results_table,
    save_results,
)
from bmil.records import INFRARED, VISIBLE, Record

DIM = 8


class FakeExtract:
    """Counts calls; returns one-hot features of the (apparent) person id."""

    def __init__(self):
        self.calls: list[list[Record]] = []

    def __call__(self, records):
        self.calls.append(list(records))
        feats = np.zeros((len(records), DIM), dtype=np.float32)
        for row, record in enumerate(records):
            pid = record.pid
            if "looks-like-" in record.path:
                pid = int(record.path.split("looks-like-")[1].split("/")[0])
            feats[row, pid] = 1.0
        return feats


# ---------------------------------------------------------------- SYSU-MM01

SYSU_PIDS = (1, 2, 3)
SYSU_GALLERY_CAMS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}


def sysu_query(root):
    return [Record(f"{root}/cam{cam}/{pid:04d}/0001.jpg", pid, cam, INFRARED) for cam in (3, 6) for pid in SYSU_PIDS]


def sysu_gallery(root, mode="all", trial=0, shots=1):
    """Trial t picks file t % 2 of each (camera, person); file 1 of (cam 5, pid 1) is bad."""
    records = []
    for cam in SYSU_GALLERY_CAMS[mode]:
        for pid in SYSU_PIDS:
            for shot in range(shots):
                index = (trial + shot) % 2
                bad = "looks-like-2/" if (cam, pid, index) == (5, 1, 1) else ""
                path = f"{root}/cam{cam}/{pid:04d}/{bad}{index:04d}.jpg"
                records.append(Record(path, pid, cam, VISIBLE))
    return records


def _sysu(extract, mode="all", trials=10, shots=1):
    galleries = [sysu_gallery("sysu", mode=mode, trial=t, shots=shots) for t in range(trials)]
    return evaluate_sysu(extract, query=sysu_query("sysu"), galleries=galleries, mode=mode, shots=shots)


def test_sysu_perfect_extractor_scores_one_and_extracts_once():
    extract = FakeExtract()
    result = _sysu(extract, mode="all", trials=1)
    assert len(extract.calls) == 1
    assert len(extract.calls[0]) == 6 + 12  # queries + one gallery
    assert result.per_trial[0]["rank1"] == 1.0
    assert result.mean == {key: 1.0 for key in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")}
    assert (result.dataset, result.setting, result.protocol, result.mode) == (
        "SYSU-MM01",
        "all-search",
        "sysu",
        "single-shot",
    )
    assert (result.num_trials, result.num_query, result.num_gallery) == (1, 6, 12)


def test_sysu_trials_differ_and_mean_is_mean_of_trials():
    # Gallery order: for cam in 1, 2, 4, 5: pids 1, 2, 3 -> g0..g11; trial 1 uses file 1
    # everywhere, and g9 (cam 5, pid 1) then looks like pid 2.
    # Trial 1, distances are 0 (same apparent pid) or 1; ties ranked by gallery index.
    #  q pid1 cam6: dist0 g0 g3 g6 -> 1,2,3; dist1 in index order g1 g2 g4 g5 g7 g8 g9 ->
    #               g9 at 10: AP = (1+1+1+4/10)/4 = 0.85, INP = 4/10
    #  q pid1 cam3: cam2 (g3 g4 g5) removed; g0 g6 at 1,2; then g1 g2 g7 g8 g9 -> g9 at 7:
    #               AP = (1+1+3/7)/3 = 17/21, INP = 3/7
    #  q pid2 cam6: dist0 g1 g4 g7 g9 g10 -> matches at 1,2,3,5: AP = 3.8/4, INP = 4/5
    #  q pid2 cam3: dist0 g1 g7 g9 g10 -> matches at 1,2,4: AP = 11/12, INP = 3/4
    #  pid 3 queries: AP = INP = 1; every Rank-1 is a hit.
    # Trials 0 and 2 use file 0: perfect.
    extract = FakeExtract()
    result = _sysu(extract, mode="all", trials=3)
    assert len(extract.calls) == 1
    paths = [r.path for r in extract.calls[0]]
    assert len(paths) == len(set(paths)) == 6 + 12 + 12  # trial 2 repeats trial 0's files
    m_ap_1 = (0.85 + 17 / 21 + 3.8 / 4 + 11 / 12 + 2) / 6
    m_inp_1 = (0.4 + 3 / 7 + 0.8 + 0.75 + 2) / 6
    assert [t["trial"] for t in result.per_trial] == [0, 1, 2]
    assert [t["mAP"] for t in result.per_trial] == pytest.approx([1.0, m_ap_1, 1.0])
    assert [t["mINP"] for t in result.per_trial] == pytest.approx([1.0, m_inp_1, 1.0])
    assert [t["rank1"] for t in result.per_trial] == [1.0, 1.0, 1.0]
    assert result.mean["mAP"] == pytest.approx((2 + m_ap_1) / 3)
    assert result.mean["mINP"] == pytest.approx((2 + m_inp_1) / 3)
    assert result.num_trials == 3
    assert all(t["num_valid_queries"] == 6 for t in result.per_trial)


def test_sysu_indoor_and_multishot_bookkeeping():
    extract = FakeExtract()
    result = _sysu(extract, mode="indoor", trials=2, shots=2)
    assert result.setting == "indoor-search"
    assert result.mode.startswith("multi-shot")
    assert result.num_gallery == 2 * 3 * 2  # cameras x persons x shots
    assert result.mean["rank1"] == 1.0


def test_sysu_rejects_unknown_mode():
    galleries = [sysu_gallery("sysu")]
    with pytest.raises(ValueError, match="mode"):
        evaluate_sysu(FakeExtract(), query=sysu_query("sysu"), galleries=galleries, mode="outdoor")
    with pytest.raises(ValueError, match="trials"):
        evaluate_sysu(FakeExtract(), query=sysu_query("sysu"), galleries=[])


# ---------------------------------------------------------------- RegDB


def regdb_test(root, trial):
    """Visible v0..v5 = pids 1,1,2,2,3,3; thermal t0..t5 = pids 2,2,1,1,3,3, t2 looks like 2."""
    visible = [Record(f"{root}/Visible/{trial}/v{i}.bmp", pid, 1, VISIBLE) for i, pid in enumerate((1, 1, 2, 2, 3, 3))]
    thermal = [
        Record(f"{root}/Thermal/{trial}/{'looks-like-2/' if i == 2 else ''}t{i}.bmp", pid, 2, INFRARED)
        for i, pid in enumerate((2, 2, 1, 1, 3, 3))
    ]
    return visible, thermal


def test_regdb_directions_are_scored_separately():
    # visible -> thermal: pid-1 queries: dist0 t3 (pos 1), dist1 t0 t1 t2 -> t2 at 4:
    #   AP = (1 + 2/4)/2 = 0.75, INP = 0.5; pid-2 queries: t0 t1 t2 at dist 0 -> matches at
    #   1, 2: AP = INP = 1; pid 3 perfect. mAP = (2*0.75 + 4)/6 = 11/12, mINP = 5/6, R1 = 1.
    # thermal -> visible: query t2 (pid 1, looks like 2): dist0 v2 v3, then v0 v1 at 3, 4:
    #   R1 miss, hit at 3, AP = (1/3 + 2/4)/2 = 5/12, INP = 1/2; the other 5 queries perfect.
    #   R1 = 5/6, R5 = 1, mAP = (5 + 5/12)/6, mINP = (5 + 1/2)/6.
    extract = FakeExtract()
    visible, thermal = regdb_test("regdb", 4)
    v2t, t2v = evaluate_regdb(extract, visible=visible, thermal=thermal, trial=4)
    assert len(extract.calls) == 1 and len(extract.calls[0]) == 12
    assert (v2t.setting, t2v.setting) == ("visible→thermal", "thermal→visible")
    assert v2t.protocol == t2v.protocol == "regdb"
    assert v2t.num_trials == 1 and v2t.per_trial[0]["trial"] == 4
    assert (v2t.num_query, v2t.num_gallery) == (6, 6)
    assert v2t.mean["rank1"] == 1.0
    assert v2t.mean["mAP"] == pytest.approx(11 / 12)
    assert v2t.mean["mINP"] == pytest.approx(5 / 6)
    assert t2v.mean["rank1"] == pytest.approx(5 / 6)
    assert t2v.mean["rank5"] == 1.0
    assert t2v.mean["mAP"] == pytest.approx((5 + 5 / 12) / 6)
    assert t2v.mean["mINP"] == pytest.approx((5 + 0.5) / 6)


def test_regdb_single_direction():
    visible, thermal = regdb_test("regdb", 1)
    (t2v,) = evaluate_regdb(FakeExtract(), visible=visible, thermal=thermal, trial=1, direction="t2v")
    assert t2v.setting == "thermal→visible"
    with pytest.raises(ValueError, match="direction"):
        evaluate_regdb(FakeExtract(), visible=visible, thermal=thermal, trial=1, direction="sideways")


# ---------------------------------------------------------------- LLCM


def llcm_query(root, modality):
    return [Record(f"{root}/q{modality}/{pid}.jpg", pid, 1, modality) for pid in (1, 2)]


def llcm_gallery(root, modality, trial=0):
    """(pid 1, cam 1), (pid 1, cam 2), (pid 2, cam 1): pid 2 is only seen by camera 1."""
    return [
        Record(f"{root}/g{modality}/t{trial}/{pid}_c{cam}.jpg", pid, cam, modality)
        for pid, cam in ((1, 1), (1, 2), (2, 1))
    ]


def test_llcm_removes_same_identity_same_camera_and_extracts_once():
    # queries are from camera 1: the pid-2 query loses its only match (same camera) and is
    # skipped; the pid-1 query keeps (pid 1, cam 2) at distance 0 -> all scores 1.
    extract = FakeExtract()
    queries = {m: llcm_query("llcm", m) for m in (VISIBLE, INFRARED)}
    galleries = {m: [llcm_gallery("llcm", m, trial=t) for t in range(2)] for m in (VISIBLE, INFRARED)}
    results = evaluate_llcm(extract, queries=queries, galleries=galleries)
    assert len(extract.calls) == 1
    assert len(extract.calls[0]) == 2 * (2 + 2 * 3)  # 2 directions x (queries + 2 galleries)
    assert [r.setting for r in results] == ["visible→infrared", "infrared→visible"]
    for r in results:
        assert r.protocol == "llcm" and r.num_trials == 2
        assert [t["num_valid_queries"] for t in r.per_trial] == [1, 1]
        assert r.mean["rank1"] == r.mean["mAP"] == 1.0


def test_llcm_one_direction_needs_only_its_modalities():
    extract = FakeExtract()
    queries = {INFRARED: llcm_query("llcm", INFRARED)}
    galleries = {VISIBLE: [llcm_gallery("llcm", VISIBLE, trial=0)]}
    (i2v,) = evaluate_llcm(extract, queries=queries, galleries=galleries, direction="i2v")
    assert i2v.setting == "infrared→visible" and len(extract.calls[0]) == 2 + 3
    with pytest.raises(ValueError, match="LLCM direction v2i needs visible queries"):
        evaluate_llcm(extract, queries=queries, galleries=galleries, direction="v2i")


# ---------------------------------------------------------------- quick cross-modality


def test_cross_modality_uses_infrared_queries_against_visible_gallery():
    # gallery (visible) pids [1, 2], infrared queries pids [1, 2, 2]; query 2 points at pid 1
    # query 0: hit 1, AP 1; query 1: hit 2 (AP 1/2, INP 1/2); query 2: hit 1
    # -> R1 = 2/3, mAP = (1 + 1/2 + 1)/3 = 5/6, mINP = 5/6
    feats = np.zeros((5, DIM), dtype=np.float32)
    feats[0, 1] = feats[1, 2] = 1  # visible
    feats[2, 1] = 2.0  # not unit length: re-normalised
    feats[3, 1] = 1
    feats[4, 2] = 1
    pids = np.array([1, 2, 1, 2, 2])
    modality = np.array([VISIBLE, VISIBLE, INFRARED, INFRARED, INFRARED])
    r = evaluate_cross_modality(feats, pids, np.zeros(5), modality)
    assert (r["num_query"], r["num_gallery"], r["num_valid_queries"]) == (3, 2, 3)
    assert r["rank1"] == pytest.approx(2 / 3)
    assert r["rank5"] == 1.0
    assert r["mAP"] == pytest.approx(5 / 6)
    assert r["mINP"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="infrared"):
        evaluate_cross_modality(feats[:2], pids[:2], np.zeros(2), modality[:2])


# ---------------------------------------------------------------- reports


def _regdb_results():
    visible, thermal = regdb_test("regdb", 4)
    return evaluate_regdb(FakeExtract(), visible=visible, thermal=thermal, trial=4)


def test_results_table_has_header_and_percent_rows():
    table = results_table(_regdb_results())
    header, _, rows = table.partition("\n\n")
    assert "protocol `regdb`" in header
    assert "1 trial" in header
    assert "6 queries, 6 gallery images per trial" in header
    assert "feature: BN-neck, flip-averaged, L2-normalised" in header
    assert "visible queries → thermal gallery" in header
    lines = rows.strip().splitlines()
    assert lines[0] == "| Setting | R1 | R5 | R10 | R20 | mAP | mINP |"
    # v2t: 100, 100, 100, 100, 11/12 = 91.7 %, 5/6 = 83.3 %
    assert lines[2] == "| visible→thermal | 100.0 | 100.0 | 100.0 | 100.0 | 91.7 | 83.3 |"
    # t2v: R1 5/6 = 83.3 %, mAP 65/72 = 90.3 %, mINP 11/12 = 91.7 %
    assert lines[3] == "| thermal→visible | 83.3 | 100.0 | 100.0 | 100.0 | 90.3 | 91.7 |"


def test_results_table_names_datasets_when_mixed():
    sysu = _sysu(FakeExtract(), trials=2)
    table = results_table([sysu, *_regdb_results()])
    assert "mean of 2 trials" in table
    assert "| SYSU-MM01 all-search | 100.0 |" in table
    assert "| RegDB visible→thermal |" in table


def test_save_results_round_trips(tmp_path):
    results = _regdb_results()
    path = save_results(results, tmp_path / "out" / "results.json")
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert [r["setting"] for r in loaded["results"]] == ["visible→thermal", "thermal→visible"]
    first = loaded["results"][0]
    for key in (
        "dataset",
        "protocol",
        "mode",
        "num_trials",
        "num_query",
        "num_gallery",
        "feature",
        "per_trial",
        "mean",
        "distance",
        "protocol_rule",
    ):
        assert key in first
    assert first["mean"]["mAP"] == pytest.approx(11 / 12)
    assert ProtocolResult(**{k: v for k, v in first.items() if k != "protocol_rule"}) == results[0]


# ---------------------------------------------------------------- real readers, fake trees


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_sysu_through_the_registry_and_the_real_reader(tmp_path):
    # 3 test ids; 3 files per (id, visible camera), 1 per (id, infrared camera)
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "test_id.txt").write_text("2,1,3\n")
    for pid in (1, 2, 3):
        for cam in (1, 2, 4, 5):
            for n in range(3):
                _touch(tmp_path / f"cam{cam}" / f"{pid:04d}" / f"{n:04d}.jpg")
        for cam in (3, 6):
            _touch(tmp_path / f"cam{cam}" / f"{pid:04d}" / "0001.jpg")
    extract = FakeExtract()
    cfg = load_config(None, ["data.dataset=sysu", f"data.root={tmp_path}", "eval.mode=all"])
    (result,) = get_dataset("sysu").test(extract, tmp_path, cfg, 3)
    assert len(extract.calls) == 1
    from bmil.data import sysu_gallery as real_gallery

    galleries = [{r.path for r in real_gallery(str(tmp_path), "all", t)} for t in range(3)]
    extracted = [r.path for r in extract.calls[0]]
    assert len(extracted) == len(set(extracted)) == 6 + len(set.union(*galleries))
    assert len(set.union(*galleries)) > 12  # the trials drew different images
    assert (result.num_query, result.num_gallery, result.num_trials) == (6, 12, 3)
    assert result.mean["rank1"] == result.mean["mAP"] == result.mean["mINP"] == 1.0


def test_regdb_through_the_registry_and_the_real_reader(tmp_path):
    lines = {"visible": [], "thermal": []}
    for pid in (5, 6):
        for n in range(2):
            for name, folder in (("visible", "Visible"), ("thermal", "Thermal")):
                rel = f"{folder}/{pid}/{n}.bmp"
                _touch(tmp_path / rel)
                lines[name].append(f"{rel} {pid}")
    (tmp_path / "idx").mkdir()
    for name, entries in lines.items():
        (tmp_path / "idx" / f"test_{name}_3.txt").write_text("\n".join(entries) + "\n")
    extract = FakeExtract()
    cfg = load_config(None, ["data.dataset=regdb", f"data.root={tmp_path}", "data.trial=3"])
    results = get_dataset("regdb").test(extract, tmp_path, cfg, 1)
    assert len(extract.calls) == 1 and len(extract.calls[0]) == 8
    assert [(r.setting, r.num_query, r.num_gallery) for r in results] == [
        ("visible→thermal", 4, 4),
        ("thermal→visible", 4, 4),
    ]
    assert all(r.mean["rank1"] == r.mean["mAP"] == 1.0 for r in results)
