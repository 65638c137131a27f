"""Clustering on features: exact kNN, the (modality-aware) k-reciprocal Jaccard distance,
DBSCAN pseudo labels, label helpers and pseudo-label quality.

Two sub-modules are imported on their own (``from bmil.cluster.association import ...``):
:mod:`bmil.cluster.association`, one training epoch's pseudo labels (the visible subset
split, intra and global clustering, the k1 rule of :func:`clustering_k1`), and
:mod:`bmil.cluster.memory_check`, which refuses a clustering step that would not fit in memory.

Imports neither torch.nn models nor the engine nor the commands, so it works on any feature
array.
"""

from bmil.cluster.dbscan import dbscan_labels
from bmil.cluster.jaccard import estimate_jaccard_memory, estimate_join_memory, jaccard_distance
from bmil.cluster.knn import knn
from bmil.cluster.labels import (
    SubClusters,
    cluster_counts,
    num_clusters,
    random_subset,
    relabel,
    split_by_modality,
    subset_labels,
    visible_subsets,
)
from bmil.cluster.policy import clustering_k1
from bmil.cluster.quality import label_quality

__all__ = [
    "SubClusters",
    "cluster_counts",
    "clustering_k1",
    "dbscan_labels",
    "estimate_jaccard_memory",
    "estimate_join_memory",
    "jaccard_distance",
    "knn",
    "label_quality",
    "num_clusters",
    "random_subset",
    "visible_subsets",
    "relabel",
    "split_by_modality",
    "subset_labels",
]
