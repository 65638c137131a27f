"""Camera-and-modality-aware Jaccard (``jaccard_distance(camera=...)``) against a slow dense
reference written from the rule in the docstring of ``bmil.cluster.jaccard.encoding._camera_balanced``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bmil.cluster import jaccard_distance
from helpers import jaccard_from_weights, ordered_by_similarity, reciprocal_weights, unit_similarity


def _rank_lists(sim, modality, camera, k1) -> list[np.ndarray]:
    """Step 1 with the camera rule: per modality k1//2 places; in the query's own modality
    at most ceil(half / cameras) from its own camera, the rest from the other cameras,
    own-camera images filling in when the other cameras run short."""
    half = k1 // 2
    rank = []
    for i in range(len(sim)):
        chosen = []
        for m in (0, 1):
            members = np.flatnonzero(modality == m)
            if modality[i] != m:
                chosen.extend(ordered_by_similarity(sim, i, members)[:half])
                continue
            own = ordered_by_similarity(sim, i, members[camera[members] == camera[i]])
            other = ordered_by_similarity(sim, i, members[camera[members] != camera[i]])
            cap = math.ceil(half / len(np.unique(camera[members])))
            n_own = min(cap, len(own))
            n_other = min(half - n_own, len(other))
            n_own = half - n_other
            chosen.extend(own[:n_own])
            chosen.extend(other[:n_other])
        rank.append(ordered_by_similarity(sim, i, chosen))
    return rank


def reference(feats, k1, k2, modality, camera, lqe="release") -> np.ndarray:
    """Dense N×N distance: camera-balanced rank lists, then docs/method.md's Jaccard steps 2–6 with the
    modality-balanced local query expansion, with plain loops over i."""
    sim = unit_similarity(feats)
    n = len(sim)
    rank = _rank_lists(sim, modality, camera, k1)
    v = reciprocal_weights(sim, rank, k1)
    k_lqe = k2 if lqe == "release" else max(1, k2 // 2)
    v_qe = np.zeros_like(v)
    for i in range(n):
        near = [ordered_by_similarity(sim, i, np.flatnonzero(modality == m))[:k_lqe] for m in (0, 1)]
        if lqe == "release":
            v_qe[i] = 0.5 * (v[near[0]].mean(axis=0) + v[near[1]].mean(axis=0))
        else:
            v_qe[i] = v[np.concatenate(near)].mean(axis=0)
    return jaccard_from_weights(v_qe)


def camera_blobs(n: int, seed: int, d: int = 16, ids: int = 10, cam_shift: float = 0.5):
    """Identities on the sphere, 4 visible cameras (1, 2, 4, 5) and 2 infrared (3, 6); each
    camera adds its own offset (a shared background), so intra-camera pairs look alike."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    pid = rng.integers(0, ids, n)
    modality = (rng.random(n) < 0.4).astype(np.int64)
    camera = np.where(modality == 0, rng.choice([1, 2, 4, 5], n), rng.choice([3, 6], n))
    offsets = rng.normal(size=(7, d))
    offsets *= cam_shift / np.linalg.norm(offsets, axis=1, keepdims=True)
    x = centres[pid] + 0.4 * rng.normal(size=(n, d)) / np.sqrt(d) + offsets[camera]
    return x.astype(np.float32), modality, camera, pid


def dense(dist) -> np.ndarray:
    out = np.ones(dist.shape)
    coo = dist.tocoo()
    out[coo.row, coo.col] = coo.data
    return out


@pytest.mark.parametrize("lqe", ["release", "paper"])
@pytest.mark.parametrize(("seed", "k1", "k2"), [(0, 10, 4), (1, 20, 6), (2, 9, 3), (3, 6, 6)])
def test_camera_aware_matches_reference(seed, k1, k2, lqe):
    x, modality, camera, _ = camera_blobs(90 + 30 * seed, seed)
    dist = jaccard_distance(x, k1, k2, modality=modality, camera=camera, lqe=lqe)
    np.testing.assert_allclose(dense(dist), reference(x, k1, k2, modality, camera, lqe), atol=1e-5)
    assert dist.format == "csr" and dist.has_sorted_indices
    assert (dist != dist.T).nnz == 0


def test_fallback_when_other_cameras_are_short():
    # One visible camera holds all but 3 visible images: its queries must fill their
    # budget of 10 with own-camera images beyond the cap of ceil(10 / 2) = 5.
    x, modality, camera, _ = camera_blobs(80, 5)
    vis = np.flatnonzero(modality == 0)
    camera[vis] = 1
    camera[vis[:3]] = 2
    dist = jaccard_distance(x, 20, 6, modality=modality, camera=camera)
    np.testing.assert_allclose(dense(dist), reference(x, 20, 6, modality, camera), atol=1e-5)


def test_one_camera_per_modality_equals_modality_aware():
    x, modality, _, _ = camera_blobs(100, 6)
    camera = np.where(modality == 0, 7, 8)
    with_camera = jaccard_distance(x, 10, 4, modality=modality, camera=camera)
    without = jaccard_distance(x, 10, 4, modality=modality)
    np.testing.assert_array_equal(with_camera.toarray(), without.toarray())


def test_camera_rule_changes_the_distance_and_reaches_other_cameras():
    # Guards the reference test against a rule that does nothing: with strong camera
    # offsets the plain modality-aware lists are dominated by the own camera.
    x, modality, camera, _ = camera_blobs(150, 7, cam_shift=0.9)
    f = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = f @ f.T
    aware = _rank_lists(sim, modality, camera, 10)
    same_cam = [np.mean(camera[r] == camera[i]) for i, r in enumerate(aware)]
    # own camera: at most ceil(5/4) = 2 of 10 for visible queries, ceil(5/2) = 3 for infrared
    limit = np.where(modality == 0, 2, 3) / 10
    assert np.all(np.array(same_cam) <= limit + 1e-9)
    modality_only = jaccard_distance(x, 10, 4, modality=modality)
    camera_aware = jaccard_distance(x, 10, 4, modality=modality, camera=camera)
    assert np.abs(dense(modality_only) - dense(camera_aware)).max() > 0.05


def test_camera_without_modality_is_not_implemented():
    x, _, camera, _ = camera_blobs(60, 8)
    with pytest.raises(NotImplementedError, match="needs modality"):
        jaccard_distance(x, 6, 2, camera=camera)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"camera": np.zeros(59, np.int64), "modality": "m"}, "length 60"),
        ({"camera": np.zeros(60) + 0.5, "modality": "m"}, "integer camera ids"),
    ],
)
def test_bad_camera_arguments(kwargs, message):
    x, modality, _, _ = camera_blobs(60, 8)
    if kwargs.get("modality") == "m":
        kwargs["modality"] = modality
    with pytest.raises(ValueError, match=message):
        jaccard_distance(x, 6, 2, **kwargs)
