"""Figure 1a: how many of each image's nearest neighbours share its modality."""

from __future__ import annotations

import numpy as np

from bmil.cluster import knn


def neighbour_modality_share(features: np.ndarray, modality: np.ndarray, k: int = 30) -> np.ndarray:
    """Fraction of each image's k nearest neighbours (itself excluded) of its own modality.

    features: [N, d] (rows L2-normalised here); modality: int [N], 0 visible, 1 infrared;
    k < N. Neighbours by cosine similarity, ties by lower index. Returns float64 [N] in
    [0, 1]: the intra-modality share; 1 − share is the inter-modality share.
    """
    modality = np.asarray(modality)
    n = len(features)
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and N - 1 = {n - 1}, got {k}.")
    _, idx = knn(features, k + 1)
    rows = np.arange(n)[:, None]
    # Drop the row itself; a row pushed out by exact duplicates drops its last neighbour.
    drop = idx == rows
    drop[:, -1] |= ~drop.any(axis=1)
    kept = np.take_along_axis(idx, np.argsort(drop, axis=1, kind="stable")[:, :k], 1)
    return (modality[kept] == modality[:, None]).mean(axis=1)


def share_summary(share: np.ndarray, modality: np.ndarray) -> dict:
    """Mean intra/inter-modality neighbour share per query modality and overall."""
    modality = np.asarray(modality)
    out = {}
    for name, mask in (("visible", modality == 0), ("infrared", modality == 1), ("all", np.ones_like(share, bool))):
        intra = float(share[mask].mean()) if mask.any() else float("nan")
        out[name] = {"intra": intra, "inter": 1.0 - intra, "images": int(mask.sum())}
    return out
