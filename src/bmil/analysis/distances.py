"""Figure 3: distances between images of one identity under the plain and the
modality-aware Jaccard distance, split into intra- and cross-modality pairs."""

from __future__ import annotations

import numpy as np
from scipy import sparse


def same_label_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i, j), i < j, with labels[i] == labels[j] >= 0, as int64 arrays.

    Built from the one-hot label matrix, so the cost is the number of pairs, not N².
    """
    labels = np.asarray(labels)
    keep = np.flatnonzero(labels >= 0)
    _, lab = np.unique(labels[keep], return_inverse=True)
    onehot = sparse.csr_array(
        (np.ones(keep.size, np.int8), (keep, lab)), shape=(len(labels), int(lab.max(initial=-1)) + 1)
    )
    pairs = sparse.triu(onehot @ onehot.T, k=1).tocoo()
    order = np.lexsort((pairs.col, pairs.row))
    return pairs.row[order].astype(np.int64), pairs.col[order].astype(np.int64)


def pair_distances(distance: sparse.sparray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Values of ``distance`` at (rows, cols), absent pairs = 1 (the jaccard_distance
    convention, where stored zeros are real zeros). float64 [P]."""
    csr = sparse.csr_array(distance)
    csr.sort_indices()
    n = np.int64(csr.shape[1])
    keys = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr)) * n + csr.indices
    query = rows * n + cols
    if keys.size == 0:
        return np.ones(query.shape)
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return np.where(keys[pos] == query, csr.data[pos], 1.0).astype(np.float64)


def identity_pair_distances(
    distance: sparse.sparray, pids: np.ndarray, modality: np.ndarray
) -> dict[str, np.ndarray]:
    """Distances of the same-identity pairs: ``intra`` (same modality) and ``cross``."""
    rows, cols = same_label_pairs(pids)
    values = pair_distances(distance, rows, cols)
    modality = np.asarray(modality)
    same = modality[rows] == modality[cols]
    return {"intra": values[same], "cross": values[~same]}


def distance_summary(values: np.ndarray, eps: float) -> dict:
    """count, mean, median and the fraction below ``eps`` (DBSCAN neighbours)."""
    if values.size == 0:
        return {"pairs": 0, "mean": float("nan"), "median": float("nan"), "below_eps": float("nan")}
    return {
        "pairs": int(values.size),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "below_eps": float(np.mean(values < eps)),
    }
