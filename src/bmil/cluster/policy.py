"""The per-epoch clustering policy's neighbourhood size: how far k1 shrinks on small sets."""

from __future__ import annotations

import numpy as np


def clustering_k1(k1: int, n: int, modality: np.ndarray | None = None) -> int:
    """The k1 a clustering step over ``n`` samples uses instead of the configured ``k1``.

    k1 is capped at n - 1 (a sample has n - 1 neighbours); with ``modality`` ([n] of 0/1, the
    modality-aware distance) also at 2·(m - 1), m being the smaller modality's count: the
    rank list takes k1 / 2 neighbours from each modality and, in the sample's own modality,
    the first of them is the sample itself. This is the rule training uses
    (``bmil.cluster.association.cluster_distance``); ``bmil analyze`` uses it too. The result
    is below 2 when a modality has fewer than two samples, too few for the modality-aware
    distance: callers then skip the step.
    """
    if modality is not None:
        modality = np.asarray(modality)
        smallest = int(min(np.sum(modality == 0), np.sum(modality == 1)))
        k1 = min(k1, 2 * (smallest - 1))
    return min(k1, n - 1)
