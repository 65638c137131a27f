"""Pseudo-label helpers: random subsets, relabelling, the (cluster, modality) split, counts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def random_subset(n: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted int64 indices of a random subset of 0..n-1 of size round(ratio·n), at least 1.

    ratio: fraction in (0, 1]; n must be positive.
    """
    if n < 1:
        raise ValueError(f"random_subset needs n >= 1, got {n}.")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}.")
    size = max(1, int(round(ratio * n)))
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def visible_subsets(n: int, ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The release's random split of ``n`` visible images for one epoch (``subset_clustering``).

    A random permutation is cut into consecutive slices of ``max(1, int(ratio·n))``: the first
    (subset 0) is clustered and trained with the intra loss, the second (subset 1) is the
    part intra clustering leaves out, which stage 2's global clustering takes. Returns
    (subset 0, subset 1) as sorted int64 positions; subset 1 is empty when ``ratio`` is 1
    and holds the remainder when ``ratio`` > 0.5. With ``ratio`` 0.5 and odd ``n`` one image
    is in neither, as in the release.
    """
    if n < 1:
        raise ValueError(f"visible_subsets needs n >= 1, got {n}.")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}.")
    size = max(1, int(ratio * n))
    order = rng.permutation(n).astype(np.int64)
    return np.sort(order[:size]), np.sort(order[size: 2 * size])


def subset_labels(labels_of_subset: np.ndarray, subset_idx: np.ndarray, n: int) -> np.ndarray:
    """Full-length int64 labels [n]: ``labels_of_subset`` at ``subset_idx``, -1 elsewhere."""
    labels_of_subset = np.asarray(labels_of_subset)
    subset_idx = np.asarray(subset_idx)
    if labels_of_subset.shape != subset_idx.shape:
        raise ValueError(
            f"labels_of_subset and subset_idx must have the same length, got "
            f"{labels_of_subset.shape} and {subset_idx.shape}."
        )
    out = np.full(n, -1, dtype=np.int64)
    out[subset_idx] = labels_of_subset
    return out


def relabel(labels: np.ndarray) -> np.ndarray:
    """Map the non-negative labels to 0..C-1 in ascending order of their values; -1 stays."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full(labels.shape, -1, dtype=np.int64)
    clustered = labels >= 0
    _, out[clustered] = np.unique(labels[clustered], return_inverse=True)
    return out


@dataclass
class SubClusters:
    """The split of global clusters by modality.

    sub_labels: int64 [N], sub-cluster id of each sample, -1 for outliers.
    sub_to_cluster: int64 [S], global cluster of each sub-cluster.
    sub_modality: int64 [S], modality of each sub-cluster (0 visible, 1 infrared; -1 when
        a sub-cluster stands for a whole unsplit cluster).
    Sub-cluster ids are ordered by (cluster, modality).
    """

    sub_labels: np.ndarray
    sub_to_cluster: np.ndarray
    sub_modality: np.ndarray


def split_by_modality(labels: np.ndarray, modality: np.ndarray) -> SubClusters:
    """Split each cluster of ``labels`` [N] (-1 outliers) into one sub-cluster per modality
    present in it (``modality`` [N] of 0/1): two for a mixed cluster, one otherwise."""
    labels = np.asarray(labels, dtype=np.int64)
    modality = np.asarray(modality, dtype=np.int64)
    if labels.shape != modality.shape:
        raise ValueError(f"labels and modality must have the same shape, got {labels.shape} and {modality.shape}.")
    clustered = labels >= 0
    pair_key = labels[clustered] * 2 + modality[clustered]
    keys, inverse = np.unique(pair_key, return_inverse=True)
    sub_labels = np.full(labels.shape, -1, dtype=np.int64)
    sub_labels[clustered] = inverse
    return SubClusters(sub_labels=sub_labels, sub_to_cluster=keys // 2, sub_modality=keys % 2)


def num_clusters(labels: np.ndarray) -> int:
    """Distinct clusters in pseudo labels ``labels`` [N] (-1 outliers are not a cluster)."""
    labels = np.asarray(labels)
    return int(np.unique(labels[labels >= 0]).size)


def cluster_counts(labels: np.ndarray, modality: np.ndarray) -> dict:
    """Summary of pseudo labels ``labels`` [N] (-1 outliers) over ``modality`` [N] (0/1).

    Returns {"clusters", "outliers", "clusters_visible", "outliers_visible",
    "clusters_infrared", "outliers_infrared", "cross_clusters"}: clusters per modality
    count the clusters holding at least one sample of that modality; cross_clusters the
    clusters holding both.
    """
    labels = np.asarray(labels, dtype=np.int64)
    modality = np.asarray(modality, dtype=np.int64)
    clustered = labels >= 0
    per_modality = []
    for m in (0, 1):
        per_modality.append(np.unique(labels[clustered & (modality == m)]))
    vis, ir = per_modality
    return {
        "clusters": num_clusters(labels),
        "outliers": int(np.sum(~clustered)),
        "clusters_visible": int(vis.size),
        "outliers_visible": int(np.sum(~clustered & (modality == 0))),
        "clusters_infrared": int(ir.size),
        "outliers_infrared": int(np.sum(~clustered & (modality == 1))),
        "cross_clusters": int(np.intersect1d(vis, ir).size),
    }
