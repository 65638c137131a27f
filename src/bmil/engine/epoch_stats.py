"""What one epoch's association is worth logging: cluster counts and, when the true ids are
known, pseudo-label quality (``metrics.jsonl`` keys ``clusters/...``, ``ari/...``, ``global/...``)."""

from __future__ import annotations

import numpy as np

from bmil.cluster import cluster_counts, label_quality, num_clusters
from bmil.cluster.association import Association
from bmil.records import MODALITIES, MODALITY_NAMES, VISIBLE


def association_stats(assoc: Association, modality: np.ndarray, pids: np.ndarray | None) -> dict[str, float]:
    """Cluster counts of ``assoc`` over images of ``modality`` [N] (0/1); with true person
    ids ``pids`` [N] (None when unknown) also ARI per modality and the global clustering's
    ARI, NMI and cross-modality association precision / recall / pure ratio. ``global/images``
    counts the images the global clustering saw."""
    stats: dict[str, float] = {}
    for m in MODALITIES:
        name = MODALITY_NAMES[m]
        labels = assoc.intra[m]
        stats[f"clusters/{name}"] = num_clusters(labels)
        stats[f"outliers/{name}"] = int(np.sum(labels < 0))
        if pids is not None:
            stats[f"ari/{name}"] = label_quality(labels, pids[modality == m])["ari"]
    if assoc.global_labels is not None:
        seen = np.arange(len(modality)) if assoc.global_index is None else assoc.global_index
        stats["global/images"] = int(len(seen))
        stats["global/visible_images"] = int(np.sum(modality[seen] == VISIBLE))
        for key, value in cluster_counts(assoc.global_labels[seen], modality[seen]).items():
            stats[f"global/{key}"] = value
        if pids is not None:
            quality = label_quality(assoc.global_labels[seen], pids[seen], modality[seen])
            for key in ("ari", "nmi", "cross_precision", "cross_recall", "cross_pure_ratio"):
                stats[f"global/{key}"] = quality[key]
    return stats
