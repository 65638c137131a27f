"""bmil.cluster.jaccard_distance against slow dense references written from docs/method.md and the release's code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bmil.cluster import estimate_jaccard_memory, jaccard_distance
from bmil.cluster.jaccard import kernels
from helpers import jaccard_from_weights, ordered_by_similarity, reciprocal_weights, unit_similarity
from helpers import noisy_blobs as weak_blobs  # many pairs share support, few are close (pruning matters)

# ---------------------------------------------------------------- dense reference


def reference_jaccard(feats, k1, k2, modality=None, lqe="release") -> np.ndarray:
    """Dense N×N Jaccard distance, step by step from docs/method.md, with plain loops over i."""
    sim = unit_similarity(feats)
    n = len(sim)
    # step 1: rank lists; and the lists that local query expansion averages over
    rank, expand_over = [], []
    if modality is None:
        for i in range(n):
            full = ordered_by_similarity(sim, i, np.arange(n))
            rank.append(full[:k1])
            expand_over.append([full[:k2]])
    else:
        half = k1 // 2
        k_lqe = k2 if lqe == "release" else max(1, k2 // 2)
        vis, ir = np.flatnonzero(modality == 0), np.flatnonzero(modality == 1)
        for i in range(n):
            near_vis, near_ir = ordered_by_similarity(sim, i, vis), ordered_by_similarity(sim, i, ir)
            rank.append(ordered_by_similarity(sim, i, np.concatenate([near_vis[:half], near_ir[:half]])))
            expand_over.append([near_vis[:k_lqe], near_ir[:k_lqe]])
    v = reciprocal_weights(sim, rank, k1)  # steps 2 to 4
    v_qe = np.zeros_like(v)
    for i in range(n):  # step 5; k2 = 1 means none, in both modes (docs/method.md, the release)
        lists = expand_over[i]
        if k2 == 1:
            v_qe[i] = v[i]
        elif len(lists) == 1 or lqe == "release":
            v_qe[i] = np.mean([v[lst].mean(axis=0) for lst in lists], axis=0)
        else:
            v_qe[i] = v[np.concatenate(lists)].mean(axis=0)
    return jaccard_from_weights(v_qe)  # step 6


def blobs(n: int, seed: int, d: int = 16, ids: int = 12):
    """Gaussian blobs on the sphere, ~40 % infrared with a shared modality offset."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    pid = rng.integers(0, ids, n)
    modality = (rng.random(n) < 0.4).astype(np.int64)
    shift = rng.normal(size=d)
    shift *= 0.6 / np.linalg.norm(shift)
    x = centres[pid] + 0.4 * rng.normal(size=(n, d)) / np.sqrt(d) + modality[:, None] * shift
    x *= rng.uniform(0.5, 2.0, size=(n, 1))  # not unit length: the function normalises
    return x.astype(np.float32), modality


def dense(dist) -> np.ndarray:
    """The sparse result as a dense matrix, absent pairs = 1."""
    out = np.ones(dist.shape)
    coo = dist.tocoo()
    out[coo.row, coo.col] = coo.data
    return out


# ---------------------------------------------------------------- equality with the reference

CASES = [(6, 2), (10, 4), (20, 6), (6, 6), (9, 3), (10, 1), (7, 1)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("k1", "k2"), CASES)
def test_plain_matches_reference(seed, k1, k2):
    x, _ = blobs(120 + 40 * seed, seed)
    dist = jaccard_distance(x, k1, k2)
    np.testing.assert_allclose(dense(dist), reference_jaccard(x, k1, k2), atol=1e-5)


@pytest.mark.parametrize("lqe", ["release", "paper"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("k1", "k2"), CASES)
def test_modality_aware_matches_reference(seed, k1, k2, lqe):
    x, modality = blobs(120 + 40 * seed, seed)
    dist = jaccard_distance(x, k1, k2, modality=modality, lqe=lqe)
    np.testing.assert_allclose(dense(dist), reference_jaccard(x, k1, k2, modality, lqe), atol=1e-5)


def test_k2_one_is_no_expansion_in_both_modes():
    # Hand-checkable consequence: without expansion V[i] is the softmax over E(i) alone, so
    # the modality-aware result with k2 = 1 must differ from averaging self with the nearest
    # other-modality image (what bmil did before), and equal the reference without step 5.
    x, modality = blobs(150, 11)
    for mod in (None, modality):
        ours = dense(jaccard_distance(x, 10, 1, modality=mod))
        np.testing.assert_allclose(ours, reference_jaccard(x, 10, 1, mod), atol=1e-5)
    averaged = reference_jaccard(x, 10, 2, modality, "paper")  # paper k2 = 2: self + nearest of the other
    assert np.abs(dense(jaccard_distance(x, 10, 1, modality=modality)) - averaged).max() > 0.05


def test_modes_differ():
    # Guards the tests above against a reference that ignores its arguments.
    x, modality = blobs(150, 3)
    plain = reference_jaccard(x, 10, 4)
    release = reference_jaccard(x, 10, 4, modality, "release")
    paper = reference_jaccard(x, 10, 4, modality, "paper")
    assert np.abs(plain - release).max() > 0.05
    assert np.abs(release - paper).max() > 0.05


# ---------------------------------------------------------------- rows below unit length (the release's)


def release_reference(feats, k1, k2, modality=None) -> np.ndarray:
    """Dense N×N distance as the release computes it on rows of any length, plain loops over
    i in float64: faiss_rerank.py ranks the k1 nearest by squared Euclidean distance
    (IndexFlatL2); faiss_rerank_xmodal.py (search_option 5) takes the k1//2 largest inner
    products of each modality and merges them by inner product, and averages V over the k2
    first of each modality's list; both weight by exp(−(2 − 2·x·y)) of the rows as given.
    Equal keys are ordered by lower index (the release leaves ties to faiss / torch)."""
    x = feats.astype(np.float64)
    ip = x @ x.T
    n = len(x)

    def by(key, cands):  # cands by key ascending, ties by lower index
        cands = np.asarray(cands)
        return cands[np.lexsort((cands, key[cands]))]

    rank, expand_over = [], []
    if modality is None:
        sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        for i in range(n):
            full = by(sq[i], np.arange(n))
            rank.append(full[:k1])
            expand_over.append([full[:k2]])
    else:
        half = k1 // 2
        vis, ir = np.flatnonzero(modality == 0), np.flatnonzero(modality == 1)
        for i in range(n):
            near_vis, near_ir = by(-ip[i], vis), by(-ip[i], ir)
            rank.append(by(-ip[i], np.concatenate([near_vis[:half], near_ir[:half]])))
            expand_over.append([near_vis[:k2], near_ir[:k2]])
    v = reciprocal_weights(ip, rank, k1)
    if k2 == 1:
        return jaccard_from_weights(v)
    return jaccard_from_weights(np.array([np.mean([v[lst].mean(axis=0) for lst in lists], axis=0)
                                          for lists in expand_over]))


def flip_averaged_blobs(n: int, seed: int, d: int = 16, ids: int = 10, view: float = 1.5):
    """Like the release's clustering features: (n(a) + n(b)) / 2 of two noisy views a, b of
    blobs (norms about 0.6 to 1), ~40 % infrared with a modality offset."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    pid = rng.integers(0, ids, n)
    modality = (rng.random(n) < 0.4).astype(np.int64)
    a = centres[pid] + 0.5 * rng.normal(size=(n, d)) / np.sqrt(d) + 0.5 * modality[:, None] * centres[0]
    b = a + view * rng.normal(size=(n, d)) / np.sqrt(d)
    unit = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in (a, b)]
    return ((unit[0] + unit[1]) / 2).astype(np.float32), modality


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("k1", "k2"), [(6, 1), (6, 3), (10, 4), (9, 1), (12, 6)])
@pytest.mark.parametrize("aware", [False, True])
def test_rows_below_unit_length_are_ranked_and_weighted_as_the_release_does(seed, k1, k2, aware):
    x, modality = flip_averaged_blobs(110 + 30 * seed, seed)
    norms = np.linalg.norm(x, axis=1)
    assert norms.max() < 1 and norms.min() < 0.85
    mod = modality if aware else None
    ours = dense(jaccard_distance(x, k1, k2, modality=mod))
    np.testing.assert_allclose(ours, release_reference(x, k1, k2, mod), atol=1e-5)
    # Not what normalising the rows first gives (the reference is sensitive to the lengths).
    assert np.abs(ours - reference_jaccard(x, k1, k2, mod)).max() > 0.02


def test_unit_rows_rank_alike_by_distance_inner_product_and_cosine():
    x, modality = flip_averaged_blobs(120, 3)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for mod in (None, modality):
        ours = dense(jaccard_distance(unit, 10, 4, modality=mod))
        np.testing.assert_allclose(ours, reference_jaccard(unit, 10, 4, mod), atol=1e-5)
        np.testing.assert_allclose(ours, release_reference(unit, 10, 4, mod), atol=1e-5)


def release_input() -> tuple[np.ndarray, np.ndarray]:
    """40 rows (24 visible first, then 16 infrared) of d = 8, (n(a) + n(b)) / 2 with views
    far apart (norms 0.70 to 0.98; two rows' largest same-modality inner product is not
    with themselves)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 8))
    pid = rng.integers(0, 5, 40)
    a = centres[pid] + 0.3 * rng.normal(size=(40, 8))
    b = a + 1.0 * rng.normal(size=(40, 8))
    x = (a / np.linalg.norm(a, axis=1, keepdims=True) + b / np.linalg.norm(b, axis=1, keepdims=True)) / 2
    return x.astype(np.float32), np.r_[np.zeros(24, np.int64), np.ones(16, np.int64)]


# Obtained by running the release's own clustercontrast/utils/faiss_rerank.py
# (compute_jaccard_distance, search_option=3: faiss IndexFlatL2 on the CPU) and
# faiss_rerank_xmodal.py (compute_jaccard_distance_xmodal, search_option=5, rgbNum=24) on
# release_input() as a torch tensor (faiss-cpu 1.x, torch CPU): for each (variant, k1, k2),
# the sum of the dense N×N result, its entries below 1, and Σ W·d with
# W = np.random.default_rng(1).random((40, 40)).
RELEASE_OUTPUT = {
    ("plain", 6, 3): (1378.6627, 522, 693.8446),
    ("plain", 6, 1): (1444.0106, 394, 728.6388),
    ("plain", 8, 4): (1302.7667, 688, 655.1120),
    ("modality", 6, 3): (1290.6568, 874, 649.2128),
    ("modality", 6, 1): (1471.8374, 302, 739.4007),
    ("modality", 8, 4): (1219.9279, 1058, 614.4052),
}


@pytest.mark.parametrize(("variant", "k1", "k2"), sorted(RELEASE_OUTPUT))
def test_matches_the_release_s_own_output_on_rows_below_unit_length(variant, k1, k2):
    x, modality = release_input()
    ours = dense(jaccard_distance(x, k1, k2, modality=modality if variant == "modality" else None))
    total, below, weighted = RELEASE_OUTPUT[(variant, k1, k2)]
    assert int((ours < 1).sum()) == below
    assert ours.sum() == pytest.approx(total, abs=2e-3)
    assert (np.random.default_rng(1).random((40, 40)) * ours).sum() == pytest.approx(weighted, abs=2e-3)


# ---------------------------------------------------------------- structure of the result


def test_sparse_structure():
    x, modality = blobs(200, 4)
    for mod in (None, modality):
        dist = jaccard_distance(x, 10, 4, modality=mod)
        assert dist.shape == (200, 200) and dist.format == "csr" and dist.dtype == np.float32
        assert dist.has_sorted_indices
        assert np.all(dist.data < 1) and np.all(dist.data >= 0)
        # the diagonal is stored, as an explicit 0
        diag_stored = dist[np.arange(200), np.arange(200)]
        assert np.all(diag_stored == 0)
        assert all(i in dist.indices[dist.indptr[i] : dist.indptr[i + 1]] for i in range(200))
        assert (dist != dist.T).nnz == 0
        assert dist.nnz < 200 * 200 / 2  # genuinely sparse on clustered data


def test_permuting_samples_permutes_the_matrix():
    x, modality = blobs(180, 5)
    perm = np.random.default_rng(9).permutation(180)
    for mod, lqe in ((None, "release"), (modality, "release"), (modality, "paper")):
        base = dense(jaccard_distance(x, 12, 4, modality=mod, lqe=lqe))
        mod_p = None if mod is None else mod[perm]
        permuted = dense(jaccard_distance(x[perm], 12, 4, modality=mod_p, lqe=lqe))
        np.testing.assert_allclose(permuted, base[np.ix_(perm, perm)], atol=1e-6)


def test_inputs_tensor_scale_and_backend_agree():
    x, modality = blobs(150, 6)
    base = dense(jaccard_distance(x, 10, 4, modality=modality))
    scaled = x * np.random.default_rng(0).uniform(0.1, 10, size=(150, 1)).astype(np.float32)
    np.testing.assert_allclose(dense(jaccard_distance(scaled, 10, 4, modality=modality)), base, atol=1e-6)
    tensor = torch.from_numpy(x.astype(np.float64))
    np.testing.assert_allclose(dense(jaccard_distance(tensor, 10, 4, modality=modality)), base, atol=1e-6)
    faiss_result = jaccard_distance(x, 10, 4, modality=modality, backend="faiss", block_size=16)
    np.testing.assert_allclose(dense(faiss_result), base, atol=1e-6)


def test_small_modality_uses_all_its_samples():
    # 5 infrared samples, k1 = 10 needs 5 per modality; release LQE asks for k2 = 6
    # infrared neighbours and gets all 5 (documented); the reference does the same.
    x, _ = blobs(80, 7)
    modality = np.zeros(80, np.int64)
    modality[[3, 17, 40, 41, 70]] = 1
    dist = jaccard_distance(x, 10, 6, modality=modality)
    np.testing.assert_allclose(dense(dist), reference_jaccard(x, 10, 6, modality), atol=1e-5)


# ---------------------------------------------------------------- bad input


def test_bad_input_sentences():
    x, modality = blobs(60, 8)
    cases = [
        (dict(features=np.where(np.arange(16) == 3, np.nan, x)), "features contain NaN or infinite values."),
        (dict(features=np.where(np.arange(16) == 5, -np.inf, x)), "features contain NaN or infinite values."),
        (dict(features=np.where(np.arange(60)[:, None] == 7, np.inf, x)), "features contain NaN or infinite values."),
        (dict(features=x[:30], k1=30), "needs more than k1 = 30 samples, got 30"),
        (dict(features=x, modality=modality[:-1]), "modality must be a 1-D array of length 60"),
        (dict(features=x, modality=modality + 1), "modality must contain only 0 .visible. and 1 .infrared."),
        (
            dict(features=x, modality=np.zeros(60, int)),
            "needs at least 15 samples of each modality, got 60 visible and 0 infrared",
        ),
        (dict(features=x, k1=1, modality=modality), "needs k1 >= 2"),
        (dict(features=x, lqe="balanced"), "lqe must be one of"),
        (dict(features=x, k1=0), "k1 must be a positive integer"),
        (dict(features=x, k2=2.5), "k2 must be a positive integer"),
        (dict(features=x, backend="annoy"), "backend must be one of"),
        (dict(features=x, max_distance=0), "max_distance must be a number in .0, 1., got 0."),
        (dict(features=x, max_distance=1.5), "max_distance must be a number in .0, 1., got 1.5."),
        (dict(features=x, max_distance=-0.2), "max_distance must be a number in .0, 1."),
        (dict(features=x, max_distance="0.5"), "max_distance must be a number in .0, 1."),
        (dict(features=x, knn="fast"), "knn must be one of .'exact', 'approximate'., got 'fast'."),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            jaccard_distance(**kwargs)
    with pytest.raises(NotImplementedError, match="camera-aware Jaccard is not implemented yet"):
        jaccard_distance(x, camera=np.zeros(60, int))


def test_memory_estimate_is_monotone():
    sizes = [1000, 5000, 20000, 34167, 100000]
    estimates = [estimate_jaccard_memory(n, 30, 2048) for n in sizes]
    assert all(a < b for a, b in zip(estimates, estimates[1:], strict=False))
    assert estimate_jaccard_memory(20000, 30, 2048) < estimate_jaccard_memory(20000, 40, 2048)
    assert estimate_jaccard_memory(20000, 30, 512) < estimate_jaccard_memory(20000, 30, 2048)
    # at least the normalised copy of the features
    assert estimate_jaccard_memory(20000, 30, 2048) > 4 * 20000 * 2048


# ---------------------------------------------------------------- thresholded distance


def _within(full: np.ndarray, t: float) -> np.ndarray:
    """The dense full result with entries above t set to 1 (absent)."""
    return np.where(full <= t, full, 1.0)


THRESHOLD_CASES = [  # (k1, k2, lqe, t)
    (10, 4, "release", 0.6),
    (12, 6, "release", 0.5),
    (10, 1, "release", 0.6),
    (10, 4, "paper", 0.6),
    (9, 1, "paper", 0.75),
    (20, 6, "release", 0.3),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("k1", "k2", "lqe", "t"), THRESHOLD_CASES)
@pytest.mark.parametrize("make", [blobs, weak_blobs])
def test_thresholded_equals_full_with_far_pairs_dropped(seed, k1, k2, lqe, t, make):
    x, modality = make(150 + 30 * seed, seed)
    for mod in (None, modality):
        full = jaccard_distance(x, k1, k2, modality=mod, lqe=lqe)
        thr = jaccard_distance(x, k1, k2, modality=mod, lqe=lqe, max_distance=t)
        assert thr.format == "csr" and thr.has_sorted_indices and (thr != thr.T).nnz == 0
        assert thr.data.max() <= t and np.all(thr.diagonal() == 0)
        full_d, thr_d = dense(full), dense(thr)
        # same stored pairs as the full result's within t (pairs at t itself may round either way)
        near_t = np.abs(full_d - t) < 1e-6
        assert np.array_equal((thr_d <= t) | near_t, (full_d <= t) | near_t)
        np.testing.assert_allclose(thr_d[~near_t], _within(full_d, t)[~near_t], atol=1e-6)
        if seed:
            continue
        # and against the dense reference, independently of the full sparse path
        reference = reference_jaccard(x, k1, k2, mod, lqe)
        ok = np.abs(reference - t) > 1e-5
        np.testing.assert_allclose(thr_d[ok], _within(reference, t)[ok], atol=1e-5)


def test_thresholding_prunes_on_weak_features():
    # Guards the test above against a threshold that drops nothing: on weakly separated
    # features most pairs share support but few are within t.
    x, modality = weak_blobs(300, 5)
    full = jaccard_distance(x, 10, 4, modality=modality)
    thr = jaccard_distance(x, 10, 4, modality=modality, max_distance=0.5)
    assert full.nnz > 5 * thr.nnz
    assert thr.nnz > 300  # something beyond the diagonal is kept


def test_thresholded_join_in_many_blocks_across_threads_equals_one_block(monkeypatch):
    import bmil.cluster.jaccard.join as join_module

    x, modality = weak_blobs(300, 3)
    whole = jaccard_distance(x, 10, 4, modality=modality, max_distance=0.6)
    blocks = []
    original = join_module._join_blocks
    monkeypatch.setattr(join_module, "_join_blocks", lambda *a: blocks.extend(original(*a)) or iter(blocks))
    monkeypatch.setattr(join_module, "_TRIPLES_PER_BLOCK", 500)
    monkeypatch.setattr(join_module, "_BINS_PER_BLOCK", 2000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # four blocks in flight
    split = jaccard_distance(x, 10, 4, modality=modality, max_distance=0.6)
    assert len(blocks) > 20
    assert np.array_equal(split.indptr, whole.indptr) and np.array_equal(split.indices, whole.indices)
    np.testing.assert_array_equal(split.data, whole.data)


@pytest.mark.parametrize("max_distance", [0.6, 1.0])
def test_join_summing_by_sorted_keys_equals_dense_bins(monkeypatch, max_distance):
    # With a one-bin budget every block of more than one row sums its pairs by sorting
    # (the numpy join's choice; the compiled kernels have one accumulator per row).
    import bmil.cluster.jaccard.join as join_module

    monkeypatch.setattr(kernels, "AVAILABLE", False)
    x, modality = weak_blobs(300, 7)
    monkeypatch.setattr(join_module, "_DENSE_SHARE", 0)  # the banded join at t = 1 too
    dense = jaccard_distance(x, 10, 4, modality=modality, max_distance=max_distance)
    blocks = []
    original = join_module._join_blocks
    monkeypatch.setattr(join_module, "_join_blocks", lambda *a: blocks.extend(original(*a)) or iter(blocks))
    monkeypatch.setattr(join_module, "_BINS_PER_BLOCK", 1)
    monkeypatch.setattr(join_module, "_TRIPLES_PER_BLOCK", 3000)
    by_sort = jaccard_distance(x, 10, 4, modality=modality, max_distance=max_distance)
    assert sum(r1 - r0 > 1 for r0, r1, _ in blocks) > 5
    assert np.array_equal(by_sort.indptr, dense.indptr) and np.array_equal(by_sort.indices, dense.indices)
    np.testing.assert_array_equal(by_sort.data, dense.data)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(("max_distance", "dense_share"), [(0.6, 50), (1.0, 0), (1.0, 1 << 40)])
def test_join_with_64_bit_entry_indices_equals_32_bit(monkeypatch, max_distance, dense_share, compiled):
    # Past 2^30 entries of V the join's per-entry rows, positions and counts are int64;
    # small data use int32. Both must give the same result, bit for bit (the banded join
    # with and without the threshold, and the dense join; compiled kernels and numpy).
    import bmil.cluster.jaccard.join as join_module

    monkeypatch.setattr(kernels, "AVAILABLE", compiled and kernels.AVAILABLE)
    monkeypatch.setattr(join_module, "_DENSE_SHARE", dense_share)
    x, modality = weak_blobs(300, 11)
    chosen = []
    original = join_module._entry_index_dtype
    monkeypatch.setattr(join_module, "_entry_index_dtype", lambda v: chosen.append(original(v)) or chosen[-1])
    narrow = jaccard_distance(x, 10, 4, modality=modality, max_distance=max_distance)
    monkeypatch.setattr(join_module, "_entry_index_dtype", lambda v: np.int64)
    wide = jaccard_distance(x, 10, 4, modality=modality, max_distance=max_distance)
    assert chosen == [np.int32]
    assert np.array_equal(wide.indptr, narrow.indptr) and np.array_equal(wide.indices, narrow.indices)
    np.testing.assert_array_equal(wide.data, narrow.data)


def _full_join(monkeypatch, which: str) -> None:
    """Make jaccard_distance's full result take the dense or the banded join."""
    import bmil.cluster.jaccard.join as join_module

    monkeypatch.setattr(join_module, "_DENSE_SHARE", {"dense": 1 << 40, "banded": 0}[which])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("make", [blobs, weak_blobs])
def test_dense_and_banded_full_joins_agree_bit_for_bit(monkeypatch, make, seed):
    x, modality = make(140 + 40 * seed, seed)
    for mod in (None, modality):
        results = {}
        for which in ("banded", "dense"):
            _full_join(monkeypatch, which)
            results[which] = jaccard_distance(x, 10, 4, modality=mod)
        banded, dense_join = results["banded"], results["dense"]
        assert dense_join.format == "csr" and dense_join.has_sorted_indices and (dense_join != dense_join.T).nnz == 0
        assert np.array_equal(dense_join.indptr, banded.indptr) and np.array_equal(dense_join.indices, banded.indices)
        np.testing.assert_array_equal(dense_join.data, banded.data)
        assert np.all(dense_join.diagonal() == 0) and dense_join.data.max() < 1
        np.testing.assert_allclose(dense(dense_join), reference_jaccard(x, 10, 4, mod), atol=1e-5)


def test_dense_join_in_many_blocks_across_threads_equals_one_block(monkeypatch):
    import bmil.cluster.jaccard.join as join_module

    x, modality = weak_blobs(300, 4)
    _full_join(monkeypatch, "dense")
    monkeypatch.setattr(join_module, "_DENSE_BINS_PER_BLOCK", 1 << 30)
    monkeypatch.setattr(join_module, "_TRIPLES_PER_BLOCK", 1 << 30)
    whole = jaccard_distance(x, 10, 4, modality=modality)
    blocks = []
    original = join_module._dense_blocks
    monkeypatch.setattr(join_module, "_dense_blocks", lambda *a: blocks.extend(original(*a)) or blocks)
    monkeypatch.setattr(join_module, "_DENSE_BINS_PER_BLOCK", 300 * 7)  # 7 rows a block at most
    monkeypatch.setattr(join_module, "_TRIPLES_PER_BLOCK", 3000)  # and fewer where rows have many triples
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # four blocks in flight
    split = jaccard_distance(x, 10, 4, modality=modality)
    assert len(blocks) > 300 // 7 and min(r1 - r0 for r0, r1 in blocks) < 7
    assert [r0 for r0, _ in blocks] == [0] + [r1 for _, r1 in blocks[:-1]] and blocks[-1][1] == 300
    assert np.array_equal(split.indptr, whole.indptr) and np.array_equal(split.indices, whole.indices)
    np.testing.assert_array_equal(split.data, whole.data)


def test_dense_join_is_chosen_when_triples_reach_a_share_of_all_pairs(monkeypatch):
    from scipy import sparse

    import bmil.cluster.jaccard.join as join_module

    def identity(n: int):
        return sparse.csr_array(sparse.eye(n, dtype=np.float32))

    # the default share, 50: the identity has n triples (each row meets itself)
    assert join_module._DENSE_SHARE == 50
    assert join_module._nearly_dense(identity(50))  # 50 · 50 >= 50²
    assert not join_module._nearly_dense(identity(51))  # 51 · 50 < 51²
    monkeypatch.setattr(join_module, "_DENSE_SHARE", 4)
    # identity: 8 triples < 64 / 4; one shared column: 64 >= 64 / 4
    assert not join_module._nearly_dense(identity(8))
    one_column = sparse.csr_array((np.ones(8, np.float32), np.zeros(8, np.int32), np.arange(9)), shape=(8, 8))
    assert join_module._nearly_dense(one_column)

    def spread(n: int, columns: int):  # row i's one entry in column i mod columns
        return sparse.csr_array((np.ones(n, np.float32), np.arange(n) % columns, np.arange(n + 1)), shape=(n, n))

    # 16 rows on 4 columns: 4 · 4² = 64 triples, exactly 256 / 4; on 8 columns 8 · 2² = 32
    assert join_module._nearly_dense(spread(16, 4))
    assert not join_module._nearly_dense(spread(16, 8))


@pytest.mark.parametrize("bound", [1000, 1 << 60])  # packed sort; stable argsort (would overflow)
def test_sum_by_key_equals_bincount(bound):
    import bmil.cluster.jaccard.join as join_module

    rng = np.random.default_rng(8)
    keys = rng.integers(0, 1000, 5000) * (bound // 1000)
    weights = rng.random(5000)
    weights[rng.random(5000) < 0.1] = 0.0
    got_keys, got = join_module._sum_by_key(keys, weights, bound)
    expected = {}
    for key, w in zip(keys.tolist(), weights.tolist(), strict=True):
        expected[key] = expected.get(key, 0.0) + w  # the input's order, as bincount sums
    want = sorted((key, total) for key, total in expected.items() if total != 0)
    assert got_keys.tolist() == [key for key, _ in want]
    assert got.tolist() == [total for _, total in want]


def _partners_by_search(col_rows: np.ndarray, colptr: np.ndarray, ks: np.ndarray, entry_rows: np.ndarray):
    """Reference: for each entry (entry_rows[e], ks[e]), binary search of column ks[e]'s
    sorted rows for the first row after entry_rows[e]; (position, count of later rows)."""
    first = np.array([
        colptr[k] + np.searchsorted(col_rows[colptr[k] : colptr[k + 1]], i, side="right")
        for i, k in zip(entry_rows, ks, strict=True)
    ])
    return first, colptr[ks + 1] - first


@pytest.mark.parametrize("share", [None, 0.6])
def test_later_rows_in_a_column_store_equal_a_binary_search(share):
    import scipy.sparse as sp

    import bmil.cluster.jaccard.join as join_module

    rng = np.random.default_rng(4)
    v = sp.random_array((200, 200), density=0.05, format="csr", random_state=rng)
    v.sort_indices()
    entry_rows = np.repeat(np.arange(200), np.diff(v.indptr))
    ks = v.indices.astype(np.int64)
    member = None if share is None else rng.random(v.nnz) < share
    kept = v
    if member is not None:
        kept_ptr = np.concatenate([[0], np.cumsum(np.bincount(entry_rows[member], minlength=200))])
        kept = sp.csr_array((v.data[member], v.indices[member], kept_ptr), shape=v.shape)
    store = kept.tocsc()
    store.sort_indices()
    expected = _partners_by_search(store.indices, store.indptr.astype(np.int64), ks, entry_rows)
    found = join_module._later_in_column(join_module._csc_positions(v), ks, member, store.indptr)
    np.testing.assert_array_equal(found[0], expected[0])
    np.testing.assert_array_equal(found[1], expected[1])
    assert (found[1] > 0).sum() > 100  # most entries have later rows in their column


def test_one_search_for_both_modalities_equals_one_search_per_modality(monkeypatch):
    """The modality-aware rank lists come from one product per query block against all rows
    (knn_per_group); searching each modality on its own gives the same distance, bit for bit
    on these features (rounding could differ only where a product's shape changes it)."""
    import bmil.cluster.jaccard.encoding as encoding_module
    from bmil.cluster.knn import knn_unit_rows

    x, modality = blobs(300, 8, d=32)
    for feats in (x, flip_averaged_blobs(300, 8, d=32)[0]):
        fused = jaccard_distance(feats, 20, 6, modality=modality, block_size=64)

        def per_modality(self, x, groups, ks, queries=None):
            return [knn_unit_rows(x, k, candidates=g, queries=queries, block_size=self.block_size,
                                  metric=self.metric) for g, k in zip(groups, ks, strict=True)]

        with monkeypatch.context() as m:
            m.setattr(encoding_module._Search, "per_group", per_modality)
            separate = jaccard_distance(feats, 20, 6, modality=modality, block_size=64)
        assert np.array_equal(fused.indptr, separate.indptr) and np.array_equal(fused.indices, separate.indices)
        np.testing.assert_array_equal(fused.data, separate.data)


@pytest.mark.parametrize(("per_row", "cut"), [(100, True), (50, False)])
def test_wide_join_blocks_use_dense_bins_when_bins_per_triple_are_few(monkeypatch, per_row, cut):
    # Every row's partners reach the last row (width about N), so a block of bins is a few
    # rows only: it is cut to them when its bins are at most _BINS_PER_TRIPLE per triple
    # (10 rows · 1000 bins = 10,000 against 16 · 10 · per_row triples), else it keeps all
    # its rows (and sums by sorting).
    import bmil.cluster.jaccard.join as join_module

    n = 1000
    monkeypatch.setattr(join_module, "_TRIPLES_PER_BLOCK", 1 << 30)
    monkeypatch.setattr(join_module, "_BINS_PER_BLOCK", 10_000)
    monkeypatch.setattr(join_module, "_BINS_PER_TRIPLE", 16)
    triples = np.arange(n + 1, dtype=np.int64) * per_row
    blocks = list(join_module._join_blocks(triples, np.full(n, n - 1, np.int64)))
    assert [r0 for r0, _, _ in blocks] == [0] + [r1 for _, r1, _ in blocks[:-1]] and blocks[-1][1] == n
    if cut:
        assert blocks[0] == (0, 10, 1000) and all((r1 - r0) * w <= 10_000 for r0, r1, w in blocks)
    else:
        assert blocks == [(0, n, n)]


def test_suffix_lookup_by_table_equals_lookup_by_search(monkeypatch):
    # The thresholded join's exact suffix overlaps look entries up in a dense table of the
    # block's rows, or by binary search past _LOOKUP_PER_BLOCK: the same values either way
    # (the numpy join's choice; the compiled kernel spreads one row over a table).
    import bmil.cluster.jaccard.join as join_module

    monkeypatch.setattr(kernels, "AVAILABLE", False)
    x, modality = weak_blobs(300, 5)
    monkeypatch.setattr(join_module, "_TRIPLES_PER_BLOCK", 3000)  # many blocks
    looked_up = []
    overlap = join_module._SuffixRows.overlap
    monkeypatch.setattr(join_module._SuffixRows, "overlap", lambda self, r0, r1, rows, cols: looked_up.append(
        len(rows)) or overlap(self, r0, r1, rows, cols))
    by_table = jaccard_distance(x, 10, 4, modality=modality, max_distance=0.6)
    monkeypatch.setattr(join_module, "_LOOKUP_PER_BLOCK", 0)
    by_search = jaccard_distance(x, 10, 4, modality=modality, max_distance=0.6)
    assert by_table.nnz > 600 and sum(looked_up) > 300  # both runs looked pairs' suffixes up
    assert np.array_equal(by_table.indptr, by_search.indptr) and np.array_equal(by_table.indices, by_search.indices)
    np.testing.assert_array_equal(by_table.data, by_search.data)


def test_expansion_membership_by_table_equals_membership_by_search(monkeypatch):
    # The expansion reads R(i, k1) membership from a table of the block's rows, or past
    # _MEMBERSHIP_TABLE bools searches sorted keys: the same E(i), so the same distance.
    import bmil.cluster.jaccard.encoding as encoding_module

    x, modality = weak_blobs(300, 6)
    for mod in (None, modality):
        by_table = jaccard_distance(x, 10, 4, modality=mod)
        with monkeypatch.context() as m:
            m.setattr(encoding_module, "_MEMBERSHIP_TABLE", 0)
            by_search = jaccard_distance(x, 10, 4, modality=mod)
        assert np.array_equal(by_table.indptr, by_search.indptr) and np.array_equal(by_table.indices, by_search.indices)
        np.testing.assert_array_equal(by_table.data, by_search.data)


def test_sorted_distinct_keys_equal_numpy_unique():
    # The expansion's distinct pair keys: a sort and a mask of first occurrences, checked
    # against np.unique on keys with many repeats, one key and none.
    from bmil.cluster.jaccard.encoding import _sorted_distinct

    rng = np.random.default_rng(0)
    for keys in (rng.integers(0, 50, 1000), np.array([7], np.int64), np.array([], np.int64)):
        np.testing.assert_array_equal(_sorted_distinct(keys.astype(np.int64)), np.unique(keys))


def test_query_expansion_in_row_blocks_equals_one_product(monkeypatch):
    # Step 5 multiplies Q's row blocks on several threads: the same float32 sums as one
    # product, bit for bit, with sorted indices.
    from scipy import sparse

    from bmil.cluster.jaccard.encoding import _expanded

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    q = sparse.csr_array(sparse.random(5000, 5000, density=0.002, random_state=1, dtype=np.float32))
    v = sparse.csr_array(sparse.random(5000, 5000, density=0.01, random_state=2, dtype=np.float32))
    one = q @ v
    one.sort_indices()
    blocks = _expanded(q, v)
    assert blocks.has_sorted_indices and blocks.dtype == np.float32
    assert np.array_equal(blocks.indptr, one.indptr) and np.array_equal(blocks.indices, one.indices)
    np.testing.assert_array_equal(blocks.data, one.data)
