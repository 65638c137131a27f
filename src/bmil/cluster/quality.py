"""Pseudo-label quality against true identities (paper, Figure 4: ARI)."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def _singleton_outliers(labels: np.ndarray) -> np.ndarray:
    """Labels with each outlier (-1) given its own new cluster id."""
    out = labels.copy()
    outliers = np.flatnonzero(labels < 0)
    start = labels.max() + 1 if labels.size else 0
    out[outliers] = start + np.arange(outliers.size)
    return out


def _contingency(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sparse.csr_array:
    """Sparse counts [A, B] of the (rows, cols) pairs, duplicates summed."""
    table = sparse.coo_array((np.ones(rows.size, dtype=np.int64), (rows, cols)), shape=shape)
    table = table.tocsr()
    table.sum_duplicates()
    return table


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def label_quality(labels: np.ndarray, true_ids: np.ndarray, modality: np.ndarray | None = None) -> dict:
    """Agreement of pseudo ``labels`` [N] (-1 outliers) with ``true_ids`` [N].

    ari, nmi: sklearn's adjusted Rand index and normalised mutual information, with each
        outlier treated as its own singleton cluster.
    n_clusters: number of clusters (outliers excluded); outlier_ratio: fraction of -1.
    With ``modality`` [N] (0 visible, 1 infrared), also:
    cross_pure_ratio: fraction of the clusters that hold both modalities and one true id.
    cross_precision: among visible–infrared pairs in one cluster, the fraction sharing a
        true id. cross_recall: among visible–infrared pairs sharing a true id, the
        fraction in one cluster (an outlier is in no cluster).
    A ratio with an empty denominator is NaN.
    """
    labels = np.asarray(labels, dtype=np.int64)
    true_ids = np.asarray(true_ids)
    if labels.shape != true_ids.shape or labels.ndim != 1:
        raise ValueError(f"labels and true_ids must be 1-D of one length, got {labels.shape} and {true_ids.shape}.")
    n = labels.size
    clustered = labels >= 0
    _, cluster = np.unique(labels[clustered], return_inverse=True)
    _, tid = np.unique(true_ids, return_inverse=True)
    scored = _singleton_outliers(labels)
    out = {
        "ari": float(adjusted_rand_score(true_ids, scored)),
        "nmi": float(normalized_mutual_info_score(true_ids, scored)),
        "n_clusters": int(cluster.max() + 1 if cluster.size else 0),
        "outlier_ratio": _ratio(np.sum(~clustered), n),
    }
    if modality is None:
        return out
    modality = np.asarray(modality, dtype=np.int64)
    if modality.shape != labels.shape:
        raise ValueError(f"modality must have the shape of labels {labels.shape}, got {modality.shape}.")
    n_ids = int(tid.max()) + 1 if tid.size else 0
    shape = (out["n_clusters"], n_ids)
    c_tid, c_mod = tid[clustered], modality[clustered]
    # [cluster, true id] counts of the clustered samples, per modality and in all
    table_vis = _contingency(cluster[c_mod == 0], c_tid[c_mod == 0], shape)
    table_ir = _contingency(cluster[c_mod == 1], c_tid[c_mod == 1], shape)
    table_all = _contingency(cluster, c_tid, shape)
    vis_size, ir_size = table_vis.sum(axis=1), table_ir.sum(axis=1)
    mixed = (vis_size > 0) & (ir_size > 0)
    pure = np.diff(table_all.indptr) == 1
    same_cluster_pairs = np.sum(vis_size * ir_size)
    same_cluster_same_id = table_vis.multiply(table_ir).sum()
    id_vis = np.bincount(tid[modality == 0], minlength=n_ids)
    id_ir = np.bincount(tid[modality == 1], minlength=n_ids)
    out["cross_pure_ratio"] = _ratio(np.sum(mixed & pure), out["n_clusters"])
    out["cross_precision"] = _ratio(same_cluster_same_id, same_cluster_pairs)
    out["cross_recall"] = _ratio(same_cluster_same_id, np.sum(id_vis * id_ir))
    return out
