"""Figures 1b and 5: a 2-D t-SNE of a few identities, both modalities."""

from __future__ import annotations

import numpy as np
from sklearn.manifold import TSNE

EXACT_TSNE_LIMIT = 2000


def pick_identities(pids: np.ndarray, modality: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` random ids (sorted) among those with images in both modalities (all of
    them when fewer); ids < 0 are never picked."""
    pids, modality = np.asarray(pids), np.asarray(modality)
    known = pids >= 0
    both = np.intersect1d(pids[known & (modality == 0)], pids[known & (modality == 1)])
    if both.size <= count:
        return both
    return np.sort(np.random.default_rng(seed).choice(both, count, replace=False))


def tsne_points(
    features: np.ndarray, pids: np.ndarray, modality: np.ndarray, num_ids: int = 10, seed: int = 0
) -> dict[str, np.ndarray]:
    """t-SNE (cosine metric) of the images of ``num_ids`` random identities.

    Returns {"points": float [M, 2], "pids": [M], "modality": [M], "index": rows of
    ``features`` [M], "ids": the chosen ids}. Perplexity min(30, (M − 1) / 3). Exact
    gradients up to EXACT_TSNE_LIMIT images (faster than Barnes–Hut at this size).
    """
    ids = pick_identities(pids, modality, num_ids, seed)
    index = np.flatnonzero(np.isin(pids, ids))
    if index.size < 4:
        raise ValueError(f"t-SNE needs at least 4 images of identities seen in both modalities, got {index.size}.")
    perplexity = float(min(30.0, (index.size - 1) / 3))
    points = TSNE(
        n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed,
        method="exact" if index.size <= EXACT_TSNE_LIMIT else "barnes_hut",
    ).fit_transform(np.asarray(features, np.float32)[index])
    return {
        "points": points.astype(np.float64), "pids": np.asarray(pids)[index],
        "modality": np.asarray(modality)[index], "index": index, "ids": ids,
    }
