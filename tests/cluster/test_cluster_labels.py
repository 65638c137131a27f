"""Label helpers, DBSCAN on the sparse distance, and pseudo-label quality."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import sparse
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from bmil.cluster import (
    cluster_counts,
    dbscan_labels,
    jaccard_distance,
    label_quality,
    random_subset,
    relabel,
    split_by_modality,
    subset_labels,
)

# ---------------------------------------------------------------- label helpers


def test_random_subset():
    rng = np.random.default_rng(0)
    sub = random_subset(101, 0.5, rng)
    assert len(sub) == 50 and np.all(np.diff(sub) > 0) and sub.min() >= 0 and sub.max() < 101
    assert len(random_subset(10, 0.01, rng)) == 1
    assert np.array_equal(random_subset(7, 1.0, rng), np.arange(7))
    a = random_subset(1000, 0.3, np.random.default_rng(5))
    b = random_subset(1000, 0.3, np.random.default_rng(5))
    c = random_subset(1000, 0.3, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="ratio must be in"):
        random_subset(10, 0.0, rng)


def test_subset_labels_and_relabel():
    full = subset_labels(np.array([4, -1, 4, 9]), np.array([1, 3, 5, 6]), 8)
    assert full.tolist() == [-1, 4, -1, -1, -1, 4, 9, -1]
    assert relabel(np.array([7, -1, 3, 7, 10, 3, -1])).tolist() == [1, -1, 0, 1, 2, 0, -1]
    assert relabel(np.array([-1, -1])).tolist() == [-1, -1]
    with pytest.raises(ValueError, match="same length"):
        subset_labels(np.array([1, 2]), np.array([0]), 4)


def test_split_by_modality():
    labels = np.array([0, 0, 1, 1, -1, 2, 2, 0, 3])
    modality = np.array([0, 1, 1, 1, 0, 0, 1, 0, 0])
    sub = split_by_modality(labels, modality)
    # (cluster, modality) in order: (0,0) (0,1) (1,1) (2,0) (2,1) (3,0)
    assert sub.sub_to_cluster.tolist() == [0, 0, 1, 2, 2, 3]
    assert sub.sub_modality.tolist() == [0, 1, 1, 0, 1, 0]
    assert sub.sub_labels.tolist() == [0, 1, 2, 2, -1, 3, 4, 0, 5]


def test_cluster_counts():
    labels = np.array([0, 0, 1, 1, -1, 2, 2, -1, 3])
    modality = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0])
    assert cluster_counts(labels, modality) == {
        "clusters": 4,
        "outliers": 2,
        "clusters_visible": 3,
        "outliers_visible": 1,
        "clusters_infrared": 3,
        "outliers_infrared": 1,
        "cross_clusters": 2,
    }


# ---------------------------------------------------------------- DBSCAN


def _dense_with_absent_one(dist) -> np.ndarray:
    out = np.ones(dist.shape)
    coo = sparse.coo_array(dist)
    out[coo.row, coo.col] = coo.data
    return out


def test_dbscan_sparse_equals_dense():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8))
    x = (centres[rng.integers(0, 6, 150)] + 0.3 * rng.normal(size=(150, 8))).astype(np.float32)
    dist = jaccard_distance(x, 10, 4)
    full = np.maximum(_dense_with_absent_one(dist), 0)
    for eps in (0.3, 0.5, 0.7):
        for min_samples in (2, 4, 8):
            labels = dbscan_labels(dist, eps, min_samples)
            expected = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(full)
            assert labels.dtype == np.int64
            np.testing.assert_array_equal(labels, expected)
    assert len(set(dbscan_labels(dist, 0.5).tolist()) - {-1}) >= 3  # a non-trivial case


def test_dbscan_explicit_zeros_are_neighbours():
    # 0-1-2 chained by explicit zeros (one stored as a tiny negative rounding error),
    # 3-4 close, 5 alone; absent pairs are distance 1.
    rows = [0, 1, 1, 2, 0, 2, 3, 4, 0, 1, 2, 3, 4, 5]
    cols = [1, 0, 2, 1, 2, 0, 4, 3, 0, 1, 2, 3, 4, 5]
    vals = [0.0, 0.0, -1e-9, -1e-9, 0.4, 0.4, 0.2, 0.2, 0, 0, 0, 0, 0, 0]
    dist = sparse.csr_array((vals, (rows, cols)), shape=(6, 6))
    assert dist.nnz == 14  # the zeros are stored
    labels = dbscan_labels(dist, eps=0.1, min_samples=3)
    full = np.maximum(_dense_with_absent_one(dist), 0)
    expected = DBSCAN(eps=0.1, min_samples=3, metric="precomputed").fit_predict(full)
    np.testing.assert_array_equal(labels, expected)
    assert labels.tolist() == [0, 0, 0, -1, -1, -1]
    assert dbscan_labels(dist, eps=0.3, min_samples=2).tolist() == [0, 0, 0, 1, 1, -1]


def test_dbscan_bad_input():
    dist = sparse.csr_array(np.eye(3))
    with pytest.raises(ValueError, match="eps must be below 1 for a sparse distance"):
        dbscan_labels(dist, 1.0)
    with pytest.raises(ValueError, match="eps must be positive"):
        dbscan_labels(dist, 0.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        dbscan_labels(sparse.csr_array(np.array([[0.0, np.nan], [np.nan, 0.0]])), 0.5)
    # dense input has no "absent" pairs, so eps >= 1 is fine there
    assert dbscan_labels(np.zeros((3, 3)), 1.5, 2).tolist() == [0, 0, 0]


# ---------------------------------------------------------------- label quality


def _brute_cross(labels, true_ids, modality):
    """Cross-modality precision and recall by enumerating visible–infrared pairs."""
    same_cluster = same_cluster_same_id = same_id = 0
    for i, j in itertools.product(range(len(labels)), repeat=2):
        if modality[i] != 0 or modality[j] != 1:
            continue
        in_one = labels[i] >= 0 and labels[i] == labels[j]
        same_cluster += in_one
        same_id += true_ids[i] == true_ids[j]
        same_cluster_same_id += in_one and true_ids[i] == true_ids[j]
    return same_cluster_same_id / same_cluster, same_cluster_same_id / same_id


def test_label_quality_hand_case():
    labels = np.array([0, 0, 0, 1, 1, -1, 2, 2, -1, 3])
    true_ids = np.array([5, 5, 5, 6, 6, 6, 7, 5, 8, 8])
    modality = np.array([0, 1, 0, 0, 1, 1, 0, 1, 0, 1])
    q = label_quality(labels, true_ids, modality)
    # clusters: 0 = {vis 5, ir 5, vis 5} mixed and pure; 1 = {vis 6, ir 6} mixed, pure;
    # 2 = {vis 7, ir 5} mixed, impure; 3 = {ir 8} single modality
    assert q["n_clusters"] == 4
    assert q["outlier_ratio"] == pytest.approx(0.2)
    assert q["cross_pure_ratio"] == pytest.approx(2 / 4)
    # vis–ir pairs in one cluster: (0,1) (2,1) (3,4) (6,7) -> 3 of 4 share the id
    assert q["cross_precision"] == pytest.approx(3 / 4)
    # vis–ir pairs with one id: id 5: vis {0,2} × ir {1,7} = 4; id 6: vis {3} × ir {4,5} = 2;
    # id 8: vis {8} × ir {9} = 1 -> 7, of which in one cluster: (0,1) (2,1) (3,4) = 3
    assert q["cross_recall"] == pytest.approx(3 / 7)
    prec, rec = _brute_cross(labels, true_ids, modality)
    assert q["cross_precision"] == pytest.approx(prec) and q["cross_recall"] == pytest.approx(rec)
    singletons = np.array([0, 0, 0, 1, 1, 100, 2, 2, 101, 3])
    assert q["ari"] == pytest.approx(adjusted_rand_score(true_ids, singletons))
    assert q["nmi"] == pytest.approx(normalized_mutual_info_score(true_ids, singletons))


def test_label_quality_random_against_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(5):
        n = 40
        true_ids = rng.integers(0, 6, n)
        labels = np.where(rng.random(n) < 0.2, -1, (true_ids + (rng.random(n) < 0.3)) * 3)
        modality = rng.integers(0, 2, n)
        q = label_quality(labels, true_ids, modality)
        prec, rec = _brute_cross(labels, true_ids, modality)
        assert q["cross_precision"] == pytest.approx(prec)
        assert q["cross_recall"] == pytest.approx(rec)
        clusters = [c for c in np.unique(labels) if c >= 0]
        mixed_pure = sum(
            len(set(modality[labels == c])) == 2 and len(set(true_ids[labels == c])) == 1 for c in clusters
        )
        assert q["cross_pure_ratio"] == pytest.approx(mixed_pure / len(clusters))
        assert q["n_clusters"] == len(clusters)


def test_label_quality_perfect_and_without_modality():
    ids = np.array([3, 3, 4, 4, 9])
    q = label_quality(np.array([1, 1, 0, 0, 2]), ids)
    assert q["ari"] == pytest.approx(1.0) and q["nmi"] == pytest.approx(1.0)
    assert set(q) == {"ari", "nmi", "n_clusters", "outlier_ratio"}
    # every sample an outlier: singletons, ARI 0; no cluster pairs -> NaN precision
    q = label_quality(np.full(5, -1), ids, np.array([0, 1, 0, 1, 0]))
    assert q["n_clusters"] == 0 and q["outlier_ratio"] == 1.0
    assert np.isnan(q["cross_precision"]) and q["cross_recall"] == 0.0
