"""DBSCAN pseudo labels on a precomputed (sparse) distance matrix."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from sklearn.cluster import DBSCAN


def dbscan_labels(
    distance: sparse.sparray | sparse.spmatrix | np.ndarray, eps: float, min_samples: int = 4
) -> np.ndarray:
    """Cluster labels int64 [N] from DBSCAN(metric="precomputed"); -1 marks outliers.

    distance: [N, N] distances, either dense or sparse in the :func:`jaccard_distance`
        convention (stored entries are the candidate pairs, explicit zeros mean distance
        0, an absent pair means distance 1). Small negative values from rounding are
        clipped to 0.
    eps: neighbourhood radius, 0 < eps < 1 for sparse input: sklearn never treats absent
        pairs as neighbours, which equals "absent = 1" only while eps < 1.
    min_samples: neighbours (the point itself included) that make a core point.
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}.")
    if isinstance(min_samples, bool) or not isinstance(min_samples, (int, np.integer)) or min_samples < 1:
        raise ValueError(f"min_samples must be a positive integer, got {min_samples!r}.")
    if sparse.issparse(distance):
        if eps >= 1:
            raise ValueError(
                f"eps must be below 1 for a sparse distance, where an absent pair means distance 1, got {eps}."
            )
        graph = sparse.csr_array(distance, dtype=np.float64, copy=True)
        values = graph.data
    else:
        graph = np.array(distance, dtype=np.float64)
        values = graph
    if graph.ndim != 2 or graph.shape[0] != graph.shape[1]:
        raise ValueError(f"distance must be a square [N, N] matrix, got shape {graph.shape}.")
    if not np.all(np.isfinite(values)):
        raise ValueError("distance contains NaN or infinite values.")
    np.maximum(values, 0.0, out=values)
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(graph)
    return labels.astype(np.int64)
