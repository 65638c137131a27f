"""bmil.evaluation.evaluate: hand-worked cases per protocol and a slow reference loop; the
RegDB trial check of commands/evaluate.py (a model trained on one trial is not scored on another)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bmil.config import load_config
from bmil.evaluation import evaluate
from bmil.evaluation import metrics as metrics_module
from bmil.evaluation.metrics import stable_ranking
from bmil.model import build_model
from helpers import run_cli, save_model_checkpoint

DTYPES = [np.float32, np.float64, np.int64]


def _eval(dist, q_pids, g_pids, q_cams=None, g_cams=None, protocol="regdb", max_rank=5, dtype=np.float64):
    scale = 100 if np.issubdtype(dtype, np.integer) else 1  # integer distances keep order/ties
    return evaluate(
        np.rint(np.asarray(dist, dtype=np.float64) * scale).astype(dtype)
        if scale != 1
        else np.asarray(dist, dtype=dtype),
        np.asarray(q_pids),
        np.asarray(g_pids),
        None if q_cams is None else np.asarray(q_cams),
        None if g_cams is None else np.asarray(g_cams),
        protocol=protocol,
        max_rank=max_rank,
    )


# ---------------------------------------------------------------- regdb (plain)


@pytest.mark.parametrize("dtype", DTYPES)
def test_regdb_plain_single_query(dtype):
    # gallery pids [2, 1, 3, 1], distances increasing -> ranked pids 2, 1, 3, 1
    # matches at positions 2 and 4: first hit 2 -> CMC [0, 1, 1, 1, 1]
    # AP = (1/2 + 2/4) / 2 = 0.5 ; INP = 2 matches / last at 4 = 0.5
    r = _eval([[0.1, 0.2, 0.3, 0.4]], [1], [2, 1, 3, 1], dtype=dtype)
    np.testing.assert_allclose(r["cmc"], [0, 1, 1, 1, 1])
    assert r["mAP"] == pytest.approx(0.5)
    assert r["mINP"] == pytest.approx(0.5)
    assert r["num_valid_queries"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_are_broken_by_gallery_index(dtype):
    # distances [0.5, 0.5, 0.2, 0.5], pids [2, 1, 1, 3]: g2 first, then the 0.5-ties in index
    # order g0, g1, g3 -> ranked pids 1, 2, 1, 3; matches at 1 and 3
    # AP = (1/1 + 2/3) / 2 = 5/6 ; INP = 2/3 ; Rank-1 = 1
    r = _eval([[0.5, 0.5, 0.2, 0.5]], [1], [2, 1, 1, 3], dtype=dtype)
    np.testing.assert_allclose(r["cmc"], [1, 1, 1, 1, 1])
    assert r["mAP"] == pytest.approx(5 / 6)
    assert r["mINP"] == pytest.approx(2 / 3)
    # a tie at the top: the lower gallery index wins Rank-1
    # [0.4, 0.4] with pids [3, 1] -> ranked 3, 1: CMC [0, 1], AP = 1/2, INP = 1/2
    r = _eval([[0.4, 0.4]], [1], [3, 1], dtype=dtype, max_rank=2)
    np.testing.assert_allclose(r["cmc"], [0, 1])
    assert r["mAP"] == pytest.approx(0.5)
    assert r["mINP"] == pytest.approx(0.5)
    r = _eval([[0.4, 0.4]], [1], [1, 3], dtype=dtype, max_rank=2)
    np.testing.assert_allclose(r["cmc"], [1, 1])
    assert r["mAP"] == pytest.approx(1.0)


def test_query_without_match_is_skipped():
    # q0 (pid 1): ranked pids 1, 2 -> hit 1, AP 1, INP 1 ; q1 (pid 9) has no match: skipped
    r = _eval([[0.1, 0.2], [0.1, 0.2]], [1, 9], [1, 2], max_rank=2)
    assert r["num_valid_queries"] == 1
    assert r["num_queries"] == 2
    np.testing.assert_allclose(r["cmc"], [1, 1])
    assert r["mAP"] == pytest.approx(1.0)
    assert r["mINP"] == pytest.approx(1.0)


def test_all_queries_without_match_raise():
    with pytest.raises(ValueError, match="No query has a matching gallery image"):
        _eval([[0.1, 0.2]], [7], [1, 2])


def test_cmc_longer_than_gallery_saturates():
    # 3 gallery images, max_rank 20: ranked pids 2, 1, 1 -> hit at 2
    r = evaluate(np.array([[0.1, 0.2, 0.3]]), np.array([1]), np.array([2, 1, 1]), max_rank=20, protocol="regdb")
    assert r["cmc"].shape == (20,)
    np.testing.assert_allclose(r["cmc"], [0.0] + [1.0] * 19)


# ---------------------------------------------------------------- sysu / standard / llcm
# Shared gallery (index: pid, camera, distance to the query):
#   g0: 1, cam2, 0.05   g1: 5, cam2, 0.10   g2: 5, cam1, 0.15   g3: 1, cam1, 0.20
#   g4: 1, cam4, 0.30   g5: 7, cam4, 0.25   g6: 5, cam4, 0.12
G_PIDS = [1, 5, 5, 1, 1, 7, 5]
G_CAMS = [2, 2, 1, 1, 4, 4, 4]
DIST = [0.05, 0.10, 0.15, 0.20, 0.30, 0.25, 0.12]
# Ranking by distance: g0(1) g1(5) g6(5) g2(5) g3(1) g5(7) g4(1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sysu_camera3_query_ignores_camera2_and_counts_distinct_identities(dtype):
    # camera-3 query, pid 1: g0, g1 (camera 2) removed; remaining ranking
    #   g6(5) g2(5) g3(1) g5(7) g4(1): matches at image positions 3 and 5
    # distinct identities in rank order: 5, 1, 7 -> identity hit at 2 -> CMC [0, 1, 1, 1, 1]
    # AP = (1/3 + 2/5) / 2 = 11/30 ; INP = 2/5 (all matches, not compressed)
    r = _eval([DIST], [1], G_PIDS, [3], G_CAMS, protocol="sysu", dtype=dtype)
    np.testing.assert_allclose(r["cmc"], [0, 1, 1, 1, 1])
    assert r["mAP"] == pytest.approx(11 / 30)
    assert r["mINP"] == pytest.approx(2 / 5)


def test_sysu_camera6_query_keeps_camera2():
    # camera-6 query: nothing removed; ranked pids 1 5 5 5 1 7 1, matches at 1, 5, 7
    # CMC all 1 ; AP = (1/1 + 2/5 + 3/7) / 3 = 64/105 ; INP = 3/7
    r = _eval([DIST], [1], G_PIDS, [6], G_CAMS, protocol="sysu")
    np.testing.assert_allclose(r["cmc"], [1, 1, 1, 1, 1])
    assert r["mAP"] == pytest.approx(64 / 105)
    assert r["mINP"] == pytest.approx(3 / 7)


def test_sysu_distinct_identity_cmc_differs_from_plain_cmc():
    # pid 1 query from camera 6, gallery ranked pids 2, 2, 3, 1 (all camera 1)
    # plain (regdb): hit at image 4 -> CMC [0, 0, 0, 1, 1]
    # sysu: identities 2, 3, 1 -> hit at 3 -> CMC [0, 0, 1, 1, 1]
    # both: AP = 1/4, INP = 1/4 (one match at image position 4)
    dist, g_pids, g_cams = [[0.1, 0.2, 0.3, 0.4]], [2, 2, 3, 1], [1, 1, 1, 1]
    plain = _eval(dist, [1], g_pids, [6], g_cams, protocol="regdb")
    sysu = _eval(dist, [1], g_pids, [6], g_cams, protocol="sysu")
    np.testing.assert_allclose(plain["cmc"], [0, 0, 0, 1, 1])
    np.testing.assert_allclose(sysu["cmc"], [0, 0, 1, 1, 1])
    for r in (plain, sysu):
        assert r["mAP"] == pytest.approx(0.25)
        assert r["mINP"] == pytest.approx(0.25)


def test_sysu_averages_over_queries_with_per_query_cameras():
    # the two queries above (camera 3: CMC [0,1,..], AP 11/30, INP 2/5;
    # camera 6: CMC [1,1,..], AP 64/105, INP 3/7), evaluated together
    r = _eval([DIST, DIST], [1, 1], G_PIDS, [3, 6], G_CAMS, protocol="sysu")
    np.testing.assert_allclose(r["cmc"], [0.5, 1, 1, 1, 1])
    assert r["mAP"] == pytest.approx((11 / 30 + 64 / 105) / 2)
    assert r["mINP"] == pytest.approx((2 / 5 + 3 / 7) / 2)
    assert r["num_valid_queries"] == 2


def test_regdb_ignores_cameras():
    # same as the camera-6 sysu case: nothing is removed
    r = _eval([DIST], [1], G_PIDS, [3], G_CAMS, protocol="regdb")
    np.testing.assert_allclose(r["cmc"], [1, 1, 1, 1, 1])
    assert r["mAP"] == pytest.approx(64 / 105)
    assert r["mINP"] == pytest.approx(3 / 7)


def test_standard_removes_same_identity_same_camera_only():
    # pid 1 query from camera 1: only g3 (pid 1, camera 1) is removed; g2 (pid 5, camera 1)
    # stays. Ranking g0(1) g1(5) g6(5) g2(5) g5(7) g4(1): matches at 1 and 6
    # CMC all 1 ; AP = (1 + 2/6) / 2 = 2/3 ; INP = 2/6
    r = _eval([DIST], [1], G_PIDS, [1], G_CAMS, protocol="standard")
    np.testing.assert_allclose(r["cmc"], [1, 1, 1, 1, 1])
    assert r["mAP"] == pytest.approx(2 / 3)
    assert r["mINP"] == pytest.approx(1 / 3)
    # pid 1 query from camera 2: g0 removed, g1 (pid 5, camera 2) stays.
    # Ranking g1(5) g6(5) g2(5) g3(1) g5(7) g4(1): matches at 4 and 6
    # CMC [0, 0, 0, 1, 1] ; AP = (1/4 + 2/6) / 2 = 7/24 ; INP = 2/6
    r = _eval([DIST], [1], G_PIDS, [2], G_CAMS, protocol="standard")
    np.testing.assert_allclose(r["cmc"], [0, 0, 0, 1, 1])
    assert r["mAP"] == pytest.approx(7 / 24)
    assert r["mINP"] == pytest.approx(1 / 3)


def test_llcm_is_standard_removal_with_distinct_identity_cmc():
    # pid 1 query from camera 2, as above, but identities in rank order are 5, 1 -> hit at 2
    r = _eval([DIST], [1], G_PIDS, [2], G_CAMS, protocol="llcm")
    np.testing.assert_allclose(r["cmc"], [0, 1, 1, 1, 1])
    assert r["mAP"] == pytest.approx(7 / 24)
    assert r["mINP"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("protocol", ["sysu", "standard", "llcm"])
def test_protocols_with_camera_rules_require_camera_ids(protocol):
    with pytest.raises(ValueError, match="q_camids and g_camids"):
        evaluate(np.zeros((1, 2)), np.array([1]), np.array([1, 2]), protocol=protocol)


def test_bad_inputs_raise_one_sentence_errors():
    with pytest.raises(ValueError, match="Unknown evaluation protocol"):
        evaluate(np.zeros((1, 2)), np.array([1]), np.array([1, 2]), protocol="market")
    with pytest.raises(ValueError, match="person ids"):
        evaluate(np.zeros((1, 2)), np.array([1]), np.array([1, 2, 3]), protocol="regdb")
    with pytest.raises(ValueError, match="empty"):
        evaluate(np.zeros((1, 0)), np.array([1]), np.array([], dtype=int), protocol="regdb")
    with pytest.raises(ValueError, match="NaN"):
        evaluate(np.array([[np.nan, 0.0]]), np.array([1]), np.array([1, 2]), protocol="regdb")


# ---------------------------------------------------------------- ranking


def test_stable_ranking_matches_numpy_stable_argsort():
    rng = np.random.default_rng(3)
    # many ties, negative values, signed zeros and infinities
    values = np.array([-2.5, -1.0, -0.0, 0.0, 0.5, 1.0, np.inf, -np.inf, 3e-8, -3e-8])
    for dtype in (np.float32, np.float64, np.float16, np.int32):
        pool = values if np.issubdtype(dtype, np.floating) else np.arange(-3, 4)
        dist = rng.choice(pool, size=(17, 41)).astype(dtype)
        np.testing.assert_array_equal(stable_ranking(dist), np.argsort(dist, axis=1, kind="stable"))


# ---------------------------------------------------------------- slow reference


def _slow_reference(dist, q_pids, g_pids, q_cams, g_cams, protocol, max_rank):
    """Per-query loop written from the definitions (independent of the vectorised code)."""
    cmcs, aps, inps = [], [], []
    for q in range(dist.shape[0]):
        ranked = sorted(range(dist.shape[1]), key=lambda j: (dist[q, j], j))
        kept = []
        for j in ranked:
            if protocol == "sysu" and q_cams[q] == 3 and g_cams[j] == 2:
                continue
            if protocol in ("standard", "llcm") and g_pids[j] == q_pids[q] and g_cams[j] == q_cams[q]:
                continue
            kept.append(j)
        match_positions = [i + 1 for i, j in enumerate(kept) if g_pids[j] == q_pids[q]]
        if not match_positions:
            continue
        if protocol in ("sysu", "llcm"):
            identities = []
            for j in kept:
                if g_pids[j] not in identities:
                    identities.append(g_pids[j])
            hit = identities.index(q_pids[q]) + 1
        else:
            hit = match_positions[0]
        cmcs.append([1.0 if hit <= k else 0.0 for k in range(1, max_rank + 1)])
        aps.append(np.mean([(i + 1) / p for i, p in enumerate(match_positions)]))
        inps.append(len(match_positions) / match_positions[-1])
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(aps)


@pytest.mark.parametrize("protocol", ["sysu", "regdb", "standard", "llcm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("small_blocks", [False, True])
def test_matches_slow_reference_on_random_data(protocol, dtype, small_blocks, monkeypatch):
    if small_blocks:  # several query blocks, the last one partial
        monkeypatch.setattr(metrics_module, "_BLOCK_ENTRIES", 7 * 45)
    rng = np.random.default_rng(11)
    num_q, num_g = 37, 45
    dist = np.round(rng.random((num_q, num_g)), 1).astype(dtype)  # rounding -> many ties
    q_pids = rng.integers(0, 9, num_q)  # some query ids are absent from the gallery
    g_pids = rng.integers(0, 8, num_g)
    q_cams = rng.choice([3, 6, 1], num_q)
    g_cams = rng.choice([1, 2, 4, 5, 3], num_g)
    cmc, m_ap, m_inp, valid = _slow_reference(dist, q_pids, g_pids, q_cams, g_cams, protocol, 20)
    r = evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol=protocol, max_rank=20)
    np.testing.assert_allclose(r["cmc"], cmc, atol=1e-12)
    assert r["mAP"] == pytest.approx(m_ap, abs=1e-12)
    assert r["mINP"] == pytest.approx(m_inp, abs=1e-12)
    assert r["num_valid_queries"] == valid
    assert 0 < valid < num_q


def _regdb_checkpoint(tmp_path: Path, trial: int) -> Path:
    cfg = load_config(None, ["data.dataset=regdb", f"data.trial={trial}", "model.depth=18",
                             "model.non_local=false", "model.pretrained=none"])
    model = build_model(depth=18, non_local=False, pretrained="none")
    return save_model_checkpoint(cfg, model, tmp_path / "regdb.pt")


@pytest.mark.e2e
def test_regdb_model_refuses_another_trial(tmp_path, capsys):
    path = _regdb_checkpoint(tmp_path, trial=1)
    (tmp_path / "RegDB").mkdir()
    code, out, err = run_cli(capsys, "eval", "--config", "regdb", "--checkpoint", str(path),
                             f"data.root={tmp_path / 'RegDB'}", "model.depth=18", "model.non_local=false",
                             "model.pretrained=none", f"output={tmp_path / 'out'}", "data.trial=2")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "trained on RegDB trial 1 but data.trial=2" in err and "eval.allow_trial_mismatch=true" in err

    from bmil.commands.evaluate import check_trained_trial

    state = torch.load(path, weights_only=False)
    allowed = load_config(None, ["data.dataset=regdb", "data.trial=2", "eval.allow_trial_mismatch=true"])
    check_trained_trial(allowed, state, path)  # the explicit override
    check_trained_trial(load_config(None, ["data.dataset=regdb", "data.trial=1"]), state, path)
