"""One epoch's pseudo labels: per-modality clustering (stage 1) and global clustering on
the (modality-aware) Jaccard distance (stage 2)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from bmil.cluster import (
    SubClusters,
    clustering_k1,
    dbscan_labels,
    jaccard_distance,
    relabel,
    split_by_modality,
    subset_labels,
    visible_subsets,
)
from bmil.cluster.memory_check import join_memory_check, require_clustering_memory
from bmil.config import ClusterConfig
from bmil.records import INFRARED, VISIBLE

log = logging.getLogger(__name__)


@dataclass
class Association:
    """Pseudo labels of one epoch.

    intra: modality → labels [N_m] over that modality's images (0..C_m-1, -1 outlier or not
           clustered this epoch).
    global_labels: [N] over all images (None in stage 1); -1 for outliers and for the
           images the global clustering did not see.
    sub: the (cluster, modality) split of the global clusters (one prototype per global
         cluster when splitting is off).
    global_index: sorted indices [G] (into all N images) of the images the global
           clustering saw (None in stage 1).
    """

    intra: dict[int, np.ndarray]
    global_labels: np.ndarray | None = None
    sub: SubClusters | None = None
    global_index: np.ndarray | None = None


def cluster_once(features: np.ndarray, cfg: ClusterConfig, modality: np.ndarray | None = None) -> np.ndarray:
    """Jaccard distance + DBSCAN on ``features`` [n, d]; labels [n] relabelled 0..C-1.

    k1 shrinks (with a warning) when there are too few samples for it, rather than
    failing an epoch; fewer than ``min_samples`` samples give no cluster at all.
    """
    distance = cluster_distance(features, cfg, modality)
    if distance is None:
        return np.full(len(features), -1, dtype=np.int64)
    return relabel(dbscan_labels(distance, cfg.eps, cfg.min_samples))


def cluster_distance(
    features: np.ndarray, cfg: ClusterConfig, modality: np.ndarray | None = None
) -> sparse.csr_array | None:
    """The Jaccard distance (sparse [n, n]) :func:`cluster_once` clusters, or ``None`` when
    there are too few samples to cluster; checks the memory it needs first. Only pairs
    within ``cfg.eps`` are stored (all DBSCAN looks at); ``cfg.knn`` picks the neighbours
    (``auto``: approximate above ``cfg.approximate_above`` images)."""
    from bmil.cluster.knn import resolve_knn

    n = len(features)
    if n < max(cfg.min_samples, 2):
        return None
    if modality is not None:
        smallest = int(min(np.sum(modality == VISIBLE), np.sum(modality == INFRARED)))
        if smallest < 2:
            log.warning("a modality has %d image(s) in this clustering step: no cross-modality clustering", smallest)
            return None
    k1 = clustering_k1(cfg.k1, n, modality)
    if k1 < cfg.k1:
        log.warning("only %d samples: clustering with k1=%d instead of %d", n, k1, cfg.k1)
    k2 = max(1, min(cfg.k2, k1))
    device = getattr(features, "device", "cpu")
    require_clustering_memory(n, int(features.shape[1]), k1, cfg, device)
    return jaccard_distance(
        features, k1=k1, k2=k2, modality=modality, lqe=cfg.lqe, backend=cfg.backend, block_size=cfg.block_size,
        max_distance=cfg.eps, knn=resolve_knn(cfg.knn, n, cfg.approximate_above), nprobe=cfg.nprobe,
        memory_check=join_memory_check(n, cfg),  # the join runs on the host
    )


def intra_labels(
    features: np.ndarray, modality: np.ndarray, cfg: ClusterConfig, rng: np.random.Generator,
    subsets: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[int, np.ndarray]:
    """Per-modality pseudo labels; visible images are clustered on subset 0 of
    :func:`~bmil.cluster.visible_subsets` (drawn from ``rng`` unless ``subsets`` is given)
    when ``cfg.subset_ratio`` < 1, the rest stay unlabelled this epoch."""
    out = {}
    for mod in (VISIBLE, INFRARED):
        feats = features[modality == mod]
        if mod == VISIBLE and cfg.subset_ratio < 1.0:
            clustered, _ = subsets if subsets is not None else visible_subsets(len(feats), cfg.subset_ratio, rng)
            out[mod] = subset_labels(cluster_once(feats[clustered], cfg), clustered, len(feats))
        else:
            out[mod] = cluster_once(feats, cfg)
    return out


def global_input(modality: np.ndarray, cfg: ClusterConfig, left_out: np.ndarray | None) -> np.ndarray:
    """Sorted indices (into all images) the global clustering sees: with
    ``cfg.global_visible == "left_out"`` the visible positions ``left_out`` (subset 1 of the
    epoch's split) plus every infrared image, as the release; else every image. An empty or
    absent ``left_out`` (``subset_ratio`` 1) means every visible image."""
    visible = np.flatnonzero(modality == VISIBLE)
    if cfg.global_visible == "left_out" and left_out is not None and len(left_out):
        visible = visible[left_out]
    return np.sort(np.concatenate([visible, np.flatnonzero(modality == INFRARED)]))


def global_labels(
    features: np.ndarray, modality: np.ndarray, cfg: ClusterConfig, split: bool, index: np.ndarray | None = None
) -> tuple[np.ndarray, SubClusters]:
    """Global clusters over the images ``index`` (default: all) and their prototype groups;
    labels [N] with -1 for the images not in ``index``."""
    n = len(modality)
    index = np.arange(n) if index is None else np.asarray(index, dtype=np.int64)
    seen = modality[index]
    labels = np.full(n, -1, dtype=np.int64)
    labels[index] = cluster_once(features[index], cfg, seen if cfg.modality_aware else None)
    if split:
        return labels, split_by_modality(labels, modality)
    num = int(labels.max()) + 1 if np.any(labels >= 0) else 0
    whole = SubClusters(
        sub_labels=labels.copy(),
        sub_to_cluster=np.arange(num, dtype=np.int64),
        sub_modality=np.full(num, -1, dtype=np.int64),
    )
    return labels, whole


def draw_subsets(
    modality: np.ndarray, cfg: ClusterConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray] | None:
    """The epoch's :func:`~bmil.cluster.visible_subsets` of the visible images (positions
    into the visible images), or None when ``cfg.subset_ratio`` is 1."""
    if cfg.subset_ratio >= 1.0:
        return None
    return visible_subsets(int(np.sum(modality == VISIBLE)), cfg.subset_ratio, rng)


def features_read(
    modality: np.ndarray, subsets: tuple[np.ndarray, np.ndarray] | None, *, global_association: bool
) -> np.ndarray | None:
    """Sorted positions (into all N images) whose features :func:`associate` and the epoch's
    memories read: without global association, visible subset 0 and every infrared image
    (the other visible images are unlabelled that epoch); None (all of them) otherwise."""
    if global_association or subsets is None:
        return None
    visible = np.flatnonzero(modality == VISIBLE)[subsets[0]]
    return np.sort(np.concatenate([visible, np.flatnonzero(modality == INFRARED)]))


def associate(
    features: np.ndarray, modality: np.ndarray, cfg: ClusterConfig, rng: np.random.Generator,
    *, global_association: bool, split: bool, subsets: tuple[np.ndarray, np.ndarray] | None = None,
) -> Association:
    """One epoch's pseudo labels from the train features [N, D]: intra clustering per modality,
    and with ``global_association`` (stage 2) the global clustering of :func:`global_input`.
    ``subsets``: the epoch's visible split when already drawn (:func:`draw_subsets`, whose
    draw from ``rng`` this call otherwise makes first); only the rows of
    :func:`features_read` of ``features`` are read."""
    if subsets is None:
        subsets = draw_subsets(modality, cfg, rng)
    intra = intra_labels(features, modality, cfg, rng, subsets)
    if not global_association:
        return Association(intra=intra)
    index = global_input(modality, cfg, subsets[1] if subsets is not None else None)
    labels, sub = global_labels(features, modality, cfg, split, index)
    return Association(intra=intra, global_labels=labels, sub=sub, global_index=index)
