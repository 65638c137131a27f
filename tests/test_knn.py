"""bmil.cluster.knn against a brute-force numpy search (float64, stable tie order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bmil.cluster import knn


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
