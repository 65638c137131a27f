"""bmil.cluster.knn against a brute-force numpy search (float64, stable tie order)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from bmil.cluster import knn
from bmil.cluster.knn import IVF_MIN_CANDIDATES, ivf_lists, resolve_knn

knn_module = importlib.import_module("bmil.cluster.knn")  # the module: bmil.cluster.knn is the function


def brute_knn(feats: np.ndarray, k: int, candidates=None, queries=None):
    """Cosine kNN by full sort: similarity descending, then global index ascending."""
    f = feats.astype(np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    cand = np.arange(len(f)) if candidates is None else np.sort(np.asarray(candidates))
    rows = np.arange(len(f)) if queries is None else np.sort(np.asarray(queries))
    sims = f[rows] @ f[cand].T
    order = np.lexsort((np.broadcast_to(cand, sims.shape), -sims), axis=-1)[:, :k]
    return np.take_along_axis(sims, order, 1), cand[order]


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(97, 12)) * rng.uniform(0.5, 3.0, size=(97, 1))).astype(np.float32)


@pytest.mark.parametrize("block_size", [1, 7, 2048])
@pytest.mark.parametrize("k", [1, 5, 30])
def test_matches_brute_force(feats, k, block_size):
    sims, idx = knn(feats, k, block_size=block_size)
    ref_sims, ref_idx = brute_knn(feats, k)
    assert sims.shape == (97, k) and sims.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)
    assert np.all(idx[:, 0] == np.arange(97))  # the query is its own nearest neighbour


def test_candidates_and_queries_use_global_indices(feats):
    rng = np.random.default_rng(1)
    cand = rng.permutation(97)[:40]  # unsorted on purpose
    queries = rng.permutation(97)[:23]
    sims, idx = knn(torch.from_numpy(feats), 6, candidates=cand, queries=queries, block_size=5)
    ref_sims, ref_idx = brute_knn(feats, 6, cand, queries)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)
    assert np.all(np.isin(idx, cand))


def test_exact_ties_keep_lower_index_first():
    # Unit vectors with entries in {0, ±0.5}: every product is an exact multiple of 0.25, so
    # similarities tie exactly, including across the k-th place and across column blocks.
    rng = np.random.default_rng(2)
    n, d = 60, 8
    feats = np.zeros((n, d), np.float32)
    for i in range(n):
        cols = rng.choice(d, 4, replace=False)
        feats[i, cols] = rng.choice([-0.5, 0.5], 4)
    feats[10] = feats[3]  # exact duplicates too
    feats[40] = feats[3]
    for k in (3, 9, 25):
        for block_size in (2, 4, 2048):
            sims, idx = knn(feats, k, block_size=block_size)
            ref_sims, ref_idx = brute_knn(feats, k)
            np.testing.assert_array_equal(idx, ref_idx)
            np.testing.assert_array_equal(sims, ref_sims.astype(np.float32))


def test_faiss_backend_agrees(feats):
    cand = np.arange(0, 97, 2)
    sims, idx = knn(feats, 8, candidates=cand, backend="faiss")
    ref_sims, ref_idx = brute_knn(feats, 8, cand)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


def test_bad_arguments(feats):
    with pytest.raises(ValueError, match="backend must be one of"):
        knn(feats, 3, backend="annoy")
    with pytest.raises(ValueError, match="k must be between 1 and the number of candidates"):
        knn(feats, 11, candidates=np.arange(10))
    with pytest.raises(ValueError, match="k must be between 1"):
        knn(feats, 0)
    with pytest.raises(ValueError, match="must not contain repeated indices"):
        knn(feats, 2, candidates=[1, 2, 2])
    with pytest.raises(ValueError, match="indices in 0..96"):
        knn(feats, 2, candidates=[1, 97])
    with pytest.raises(ValueError, match="2-D array"):
        knn(feats[0], 1)
    with pytest.raises(ValueError, match="knn method must be one of .'exact', 'approximate'., got 'fast'"):
        knn(feats, 3, method="fast")
    with pytest.raises(ValueError, match="nprobe must be a positive integer, got 0"):
        knn(feats, 3, method="approximate", nprobe=0)


# ---------------------------------------------------------------- several groups, other metrics


def tie_features(n: int = 60, d: int = 8, seed: int = 2) -> np.ndarray:
    """Unit rows with entries in {0, ±0.5}: every product is an exact multiple of 0.25, so
    similarities tie exactly; rows 10 and 40 duplicate row 3."""
    rng = np.random.default_rng(seed)
    feats = np.zeros((n, d), np.float32)
    for i in range(n):
        cols = rng.choice(d, 4, replace=False)
        feats[i, cols] = rng.choice([-0.5, 0.5], 4)
    feats[10] = feats[3]
    feats[40] = feats[3]
    return feats


@pytest.mark.parametrize("block_size", [1, 7, 2048])
@pytest.mark.parametrize("layout", ["interleaved", "in_order"])
@pytest.mark.parametrize("data", ["random", "ties"])
def test_groups_in_one_search_equal_separate_searches(block_size, layout, data, monkeypatch):
    """One product per query block against all groups' candidates finds, in each group, the
    neighbours of a separate search per group, ties included, across column blocks (made
    small here) and with the groups' columns in order (no copy) or interleaved. The
    similarities agree to rounding: a product's rounding may depend on its shape (here with
    one-row blocks), not its maths."""
    monkeypatch.setattr(knn_module, "_COLUMN_FACTOR", 3)  # column blocks of 3 × block_size
    rng = np.random.default_rng(7)
    x = tie_features() if data == "ties" else rng.normal(size=(60, 12)).astype(np.float32)
    x = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))
    if layout == "in_order":
        groups = [np.arange(0, 37), np.arange(37, 60)]
    else:
        mod = rng.random(60) < 0.4
        groups = [np.flatnonzero(~mod), np.flatnonzero(mod)]
    ks = [9, min(14, len(groups[1]))]
    fused = knn_module.knn_per_group(x, groups, ks, block_size=block_size)
    for (sims, idx), cands, k in zip(fused, groups, ks, strict=True):
        sep_sims, sep_idx = knn_module.knn_unit_rows(x, k, candidates=cands, block_size=block_size)
        np.testing.assert_array_equal(idx, sep_idx)
        np.testing.assert_allclose(sims, sep_sims, rtol=0, atol=2e-7)
        ref_sims, ref_idx = brute_knn(x.numpy(), k, cands)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_allclose(sims, ref_sims, atol=1e-6)


def test_groups_with_queries_faiss_and_approximate_agree_with_one_group_each(feats):
    x = knn_module.as_unit_tensor(feats)
    groups, queries = [np.arange(0, 97, 3), np.arange(1, 97, 3)], np.arange(5, 60)
    for kw in ({}, {"backend": "faiss"}, {"method": "approximate"}):
        fused = knn_module.knn_per_group(x, groups, [4, 6], queries=queries, **kw)
        for (sims, idx), cands, k in zip(fused, groups, [4, 6], strict=True):
            ref_sims, ref_idx = brute_knn(feats, k, cands, queries)
            np.testing.assert_array_equal(idx, ref_idx)
            np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    with pytest.raises(ValueError, match="must not share rows"):
        knn_module.knn_per_group(x, [np.arange(10), np.arange(5, 20)], [2, 2])


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("method", ["exact", "approximate"])
def test_inner_product_and_euclidean_metrics_on_rows_as_given(backend, method, monkeypatch):
    """metric="ip" ranks by x·y, "l2" by −|x − y|² (returned), on rows not normalised;
    checked against a float64 brute force (the approximate index searches every list here)."""
    monkeypatch.setattr(knn_module, "IVF_MIN_CANDIDATES", 50)
    monkeypatch.setattr(knn_module, "IVF_NPROBE", 10_000)
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(120, 10)) * rng.uniform(0.3, 1.0, size=(120, 1))).astype(np.float32)
    f = x.astype(np.float64)
    cands = np.arange(0, 120, 2)
    for metric, key in (("ip", f @ f[cands].T), ("l2", -((f[:, None] - f[None, cands]) ** 2).sum(-1))):
        order = np.lexsort((np.broadcast_to(cands, key.shape), -key), axis=-1)[:, :7]
        sims, idx = knn(x, 7, candidates=cands, metric=metric, backend=backend, method=method)
        np.testing.assert_array_equal(idx, cands[order])
        np.testing.assert_allclose(sims, np.take_along_axis(key, order, 1), atol=1e-5)
    # The cosine ranking differs on these rows (the metrics matter).
    assert not np.array_equal(knn(x, 7, candidates=cands)[1], knn(x, 7, candidates=cands, metric="ip")[1])
    with pytest.raises(ValueError, match="metric must be one of"):
        knn(x, 3, metric="manhattan")


# ---------------------------------------------------------------- approximate method


def clustered(n: int, d: int = 32, ids: int = 150, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, d))
    return (centres[rng.integers(0, ids, n)] + 0.35 * rng.normal(size=(n, d))).astype(np.float32)


def test_approximate_recall_on_a_small_case():
    x = clustered(5000)
    members = np.arange(0, 5000, 2)  # a candidate subset, as one modality
    assert len(members) >= IVF_MIN_CANDIDATES  # the index is really used
    exact_s, exact_i = brute_knn(x, 15, candidates=members)
    approx_s, approx_i = knn(x, 15, candidates=members, method="approximate")
    recall = np.mean([len(np.intersect1d(a, b)) / 15 for a, b in zip(approx_i, exact_i, strict=True)])
    assert recall >= 0.95
    assert np.all(np.isin(approx_i, members))
    # similarities of what it returns are the true ones, sorted descending
    f = x / np.linalg.norm(x, axis=1, keepdims=True)
    true = np.einsum("qd,qkd->qk", f, f[approx_i])
    np.testing.assert_allclose(approx_s, true, atol=1e-5)
    assert np.all(np.diff(approx_s, axis=1) <= 1e-6)
    # a single probed list misses neighbours: the parameter is used
    _, few = knn(x, 15, candidates=members, method="approximate", nprobe=1)
    assert np.mean([len(np.intersect1d(a, b)) / 15 for a, b in zip(few, exact_i, strict=True)]) < recall


def test_lists_stop_growing_at_about_96_rows():
    # 4·sqrt(M) lists up to (4 · 96)² = 147,456 candidates, then M / 96; at most M // 39 (22,229: 596 → 569)
    cases = {1000: 25, 22_229: 569, 130_000: 1442, 147_456: 1536, 349_861: 3644, 650_139: 6772}
    assert {m: ivf_lists(m) for m in cases} == cases


def test_the_default_probes_are_what_knn_searches(monkeypatch):
    x = clustered(5000)
    members = np.arange(0, 5000, 2)
    assert ivf_lists(len(members)) == 64  # min(4·sqrt(2500), 2500 // 39)
    monkeypatch.setattr(knn_module, "IVF_NPROBE", 16)
    default = knn(x, 15, candidates=members, method="approximate")
    np.testing.assert_array_equal(default[1], knn(x, 15, candidates=members, method="approximate", nprobe=16)[1])
    exact_i = brute_knn(x, 15, candidates=members)[1]
    two = knn(x, 15, candidates=members, method="approximate", nprobe=2)[1]

    def recall(found):
        return np.mean([len(np.intersect1d(a, b)) for a, b in zip(found, exact_i, strict=True)])

    assert recall(default[1]) > recall(two)


def test_approximate_below_the_index_size_is_exact(feats):
    np.testing.assert_array_equal(knn(feats, 5, method="approximate")[1], brute_knn(feats, 5)[1])


def test_resolve_knn():
    assert resolve_knn("auto", 100_001, 100_000) == "approximate"
    assert resolve_knn("auto", 100_000, 100_000) == "exact"
    assert resolve_knn("exact", 10**7, 100) == "exact"
    assert resolve_knn("approximate", 10, 100) == "approximate"
    with pytest.raises(ValueError, match="knn must be one of .'exact', 'approximate', 'auto'., got 'ivf'"):
        resolve_knn("ivf", 10, 100)


def offset_features(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Unit rows: 16 per identity, isotropic noise, and one direction common to all (as a
    modality's offset), which dominates every row's cosine to the others."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 16, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    offset = rng.normal(size=d)
    offset /= np.linalg.norm(offset)
    x = centres[rng.integers(0, n // 16, n)] + 0.9 * rng.normal(size=(n, d)) / np.sqrt(d) + offset
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_approximate_index_lists_are_balanced_under_a_common_offset(monkeypatch):
    # Uncentred k-means on such rows put 4x the mean list size in one list (159 of 6,000
    # rows in 153 lists), so every query probing it scanned that much.
    x = offset_features(6000, 128)
    rows = np.arange(len(x))
    assignment = {}
    original = knn_module._nearest_centroid

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        if kwargs.get("rows") is not None:
            assignment["lists"] = out.numpy()
        return out

    monkeypatch.setattr(knn_module, "_nearest_centroid", spy)
    _, idx = knn(x, 15, candidates=rows, method="approximate")
    sizes = np.bincount(assignment["lists"], minlength=knn_module.ivf_lists(len(rows)))
    assert sizes.max() <= 3 * sizes.mean()
    queries = np.arange(0, len(x), 20)
    _, exact = brute_knn(x, 15, queries=queries)
    recall = np.mean([len(np.intersect1d(a, b)) / 15 for a, b in zip(idx[queries], exact, strict=True)])
    assert recall >= 0.9


def test_list_search_equals_a_scan_of_each_probed_list():
    rng = np.random.default_rng(3)
    queries = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((40, 16), dtype=np.float32)), dim=1)
    cands = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((90, 16), dtype=np.float32)), dim=1)
    list_ptr = np.array([0, 2, 2, 30, 61, 90])  # list 1 empty, list 0 shorter than k
    probe = np.stack([rng.choice(5, 3, replace=False) for _ in range(40)])
    k = 4
    sims, pos = knn_module._search_lists(queries, probe, cands, list_ptr, k)
    for q in range(40):
        for slot, lst in enumerate(probe[q]):
            a, b = list_ptr[lst], list_ptr[lst + 1]
            scores = (cands[a:b].double() @ queries[q].double()).numpy()
            best = np.argsort(-scores, kind="stable")[:k]
            got_p = pos[q, slot * k : (slot + 1) * k]
            got_s = sims[q, slot * k : (slot + 1) * k]
            assert np.array_equal(got_p[: len(best)], best + a)
            np.testing.assert_allclose(got_s[: len(best)], scores[best], atol=1e-6)
            assert np.all(got_p[len(best):] == -1) and np.all(got_s[len(best):] == -np.inf)


def test_approximate_search_in_query_chunks_equals_one_chunk(monkeypatch):
    x = offset_features(6000, 128)
    cands = np.arange(0, 6000, 2)
    whole = knn(x, 15, candidates=cands, method="approximate")
    monkeypatch.setattr(knn_module, "IVF_QUERY_CHUNK", 997)
    chunked = knn(x, 15, candidates=cands, method="approximate")
    assert np.array_equal(whole[1], chunked[1])
    # A product's rounding depends on its row count (the GEMM's blocking), not its maths.
    np.testing.assert_allclose(whole[0], chunked[0], atol=1e-6)


def test_unit_rows_are_used_without_a_copy_and_others_normalised():
    rng = np.random.default_rng(5)
    raw = rng.standard_normal((50, 8)).astype(np.float32)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    same = knn_module.as_unit_tensor(unit)
    assert np.shares_memory(same.numpy(), unit)
    scaled = knn_module.as_unit_tensor(3 * unit)
    assert not np.shares_memory(scaled.numpy(), unit)
    np.testing.assert_allclose(np.linalg.norm(scaled.numpy(), axis=1), 1, atol=1e-6)
    almost = unit.copy()
    almost[7] *= 1 + 1e-3  # one row off: the whole matrix is normalised
    np.testing.assert_allclose(np.linalg.norm(knn_module.as_unit_tensor(almost).numpy(), axis=1), 1, atol=1e-6)
    assert np.array_equal(knn(unit, 5)[1], knn(3 * unit, 5)[1])
    before = unit.copy()
    knn(unit, 5, method="approximate")
    assert np.array_equal(unit, before)


def test_centroid_products_use_bfloat16_only_where_native(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert knn_module.centroid_dtype(cpu) == torch.float32
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert knn_module.centroid_dtype(cpu) == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert knn_module.centroid_dtype(cpu) == torch.float32
    assert knn_module.centroid_dtype(torch.device("cuda")) == torch.bfloat16
