"""k-reciprocal Jaccard distance (Zhong et al., CVPR 2017) and BMIL's modality-aware variant,
computed sparsely: no N×N matrix anywhere; memory linear in N plus the result itself.

Steps (docs/method.md, "The Jaccard distance, step by step"), each vectorised over row blocks:

1. ``rank[i]``: the k1 nearest neighbours of i, i itself first (exact kNN). Modality-aware:
   the k1//2 nearest visible and the k1//2 nearest infrared (both from one product per block
   of rows against all rows), merged, sorted by similarity. "Nearest" is by cosine for unit
   rows; rows below unit length are ranked as the release ranks them (see
   :func:`jaccard_distance`).
   Camera-and-modality-aware (beyond the paper): within the query's own modality its own
   camera gets at most an even share of the k1//2 places (``_camera_balanced``).
2. Reciprocity R(i, k) by gathering ``rank[rank[i, :k+1], :k+1]`` and looking for i.
3. Expansion E(i): R(i, k1) plus R(c, round(k1/2)) of each candidate c whose half set
   overlaps R(i, k1) by more than 2/3; membership via ``searchsorted`` on row-offset keys.
4. V (CSR): softmax over E(i) of −(2 − 2·x_i·x_j) (the cosine for unit rows); the inner
   products from the kNN where i's rank list has them, otherwise gathered dot products.
5. Local query expansion as a sparse row-averaging matrix: V ← Q @ V.
6. s(i, j) = Σ_k min(V[i,k], V[j,k]) for pairs sharing support, joining the rows of V with
   its columns block by block (rows in a banded order, each unordered pair once,
   summed with ``np.bincount``); d = 1 − s/(2 − s), clipped at 0. When nearly every pair
   shares support (the full result of weakly separated features) each block of rows
   instead sums all its partners in a dense accumulator and is written straight into the
   result (``_dense_min_overlap_distance``).

The result stores every pair with d < 1 (the pairs that share support), explicit zeros
included (the diagonal is exactly 0); an absent pair has distance 1. On clustered
features that is a few k1 pairs per row (81 at k1 = 30 in benchmarks/jaccard.py); on
unstructured features (random vectors, hub-ridden spaces) nearly every pair can share
support, and the result, 8 bytes per stored pair, approaches a dense N×N matrix.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.csgraph import reverse_cuthill_mckee

from bmil.cluster.knn import (
    IVF_QUERY_CHUNK,
    METHODS,
    UNIT_TOLERANCE,
    as_float_tensor,
    ivf_lists,
    ivf_probes,
    knn_per_group,
    row_norms,
)

log = logging.getLogger(__name__)

LQE_MODES = ("release", "paper")
# Work per row block of step 6: (row, shared column, partner) triples and dense
# accumulator bins [rows in block, N]; both bound the block's temporary memory.
_TRIPLES_PER_BLOCK = 1 << 21
_BINS_PER_BLOCK = 1 << 17
# The full result is summed densely (_dense_min_overlap_distance) when V's triples, both
# directions, are at least N²/_DENSE_SHARE. Measured (2 cores, the join alone, same V): the
# dense join was faster at every N²/triples up to 45 (N = 200,000 well separated: 48.4 s
# against 56.6 s; 100,000 weakly separated, 11: 27.6 against 55.3 s) and leaner at all (8
# bytes a stored pair against the banded assembly's 26); its N² bins cost about 1 ns each,
# so far beyond that the banded join is faster. Its blocks hold up to
# _DENSE_BINS_PER_BLOCK bins (8 MB of float64: fastest at N = 20,000 among 2^18 to 2^22).
_DENSE_SHARE = 50
_DENSE_BINS_PER_BLOCK = 1 << 20
# Entries of the [B, m, m] reciprocity and [B, m, m/2] expansion gathers per row block.
_GATHER_PER_BLOCK = 1 << 22
# Membership queries of the expansion per row block: small, so the search stays in cache.
_MEMBERSHIP_PER_BLOCK = 1 << 17
_BYTES_PER_DOT_CHUNK = 1 << 24
# Thresholded join: suffix mass limit as a share of s_min (0.85: measured on weakly and well
# separated features, about 3× fewer triples than the full join, about 1.3 candidate pairs
# per passing pair), and a slack for float rounding in the pruning bound.
_JOIN_WORKERS = 4  # at most this many row blocks of the thresholded join in flight at once
_SUFFIX_SHARE = 0.85
_BOUND_SLACK = 1e-6
# Memory estimate (estimate_jaccard_memory, estimate_join_memory): bytes per entry of V
# while it is built (V with the local query expansion's product) and during the join.
_V_BYTES_PER_ENTRY = 24
_JOIN_BYTES_PER_V_ENTRY = 72
_PHASES = ("all", "before_join")


def jaccard_distance(
    features: np.ndarray | torch.Tensor,
    k1: int = 30,
    k2: int = 6,
    modality: np.ndarray | None = None,
    camera: np.ndarray | None = None,
    lqe: str = "release",
    *,
    backend: str = "torch",
    block_size: int = 2048,
    max_distance: float = 1.0,
    knn: str = "exact",
    nprobe: int | None = None,
    memory_check: Callable[[int], None] | None = None,
) -> sparse.csr_array:
    """Sparse k-reciprocal Jaccard distance between all rows of ``features``.

    features: float array or tensor [N, d]. CUDA tensors run the kNN on the GPU, the rest
        on the CPU. Three cases, by the rows' L2 norms:
        - all unit length (within ``bmil.cluster.knn.UNIT_TOLERANCE``; the library default,
          e.g. bmil's test features): cosine similarity, used without a copy;
        - all at most unit length, not all unit (the release's clustering features, the
          mean of an image's and its mirror's unit features, which bmil's training
          clusters): used as they are, as the release uses them: the plain distance ranks
          neighbours by Euclidean distance (faiss ``IndexFlatL2`` in ``faiss_rerank.py``),
          the modality-aware one by inner product (``faiss_rerank_xmodal.py``), where a row
          need not be its own nearest (a longer row of its modality may come first); the
          weights of step 4 use the inner products x_i·x_j of these rows. For unit rows both
          rankings are the cosine one;
        - any row longer than unit (e.g. raw network outputs): L2-normalised here, then as
          unit rows.
    k1: neighbourhood size (rank list length); N must exceed k1.
    k2: local query expansion size.
    modality: None for the plain distance, or ints [N] (0 visible, 1 infrared, any order)
        for the modality-aware distance. Modality-aware mode needs k1 >= 2 and at least
        k1//2 samples of each modality (an odd k1 uses k1//2 neighbours per modality).
    camera: None, or ints [N] (any camera numbering) for the camera-and-modality-aware
        distance; needs ``modality`` (NotImplementedError without it). Rule (step 1 only; see :func:`_camera_balanced`):
        within the query's own modality, at most ceil((k1//2) / C) of its k1//2 neighbours
        come from its own camera (itself included), C being the number of cameras of that
        modality; the rest are the most similar images of the modality's other cameras
        (own-camera images fill in when the other cameras have too few). The other
        modality's list is unchanged (its images are all from other cameras). With one
        camera per modality this is exactly the modality-aware distance.
    lqe: modality-aware expansion, "release" (½·(mean of V over the k2 nearest visible +
        mean over the k2 nearest infrared), the default) or "paper" (eq. 6: mean of V over
        the max(1, k2//2) nearest of each modality). Ignored in plain mode. When a
        modality (or, in plain mode, the data set) has fewer samples than asked, all of
        them are used.
        k2 = 1 means no local query expansion in either mode (step 5 is skipped, as in
        the release).
    backend, block_size: passed to :func:`bmil.cluster.knn`.
    max_distance: t in (0, 1]; only pairs with distance <= t are stored (1: every pair
        sharing support, the full result). Clustering needs no more than DBSCAN's eps.
        Pairs that cannot reach it are not computed (see :func:`_thresholded_distance`);
        the stored values equal those of the full result.
    knn: "exact" or "approximate" neighbours in step 1 (:func:`bmil.cluster.knn`,
        ``method``: the inverted file, per modality).
    nprobe: lists each query of the approximate kNN searches (None: the default,
        ``bmil.cluster.knn.IVF_NPROBE``).
    memory_check: called once V is built, before the join, with the bytes the rest of the
        call needs (:func:`estimate_join_memory` of V's size); it may raise to stop there.

    Returns a float32 ``scipy.sparse.csr_array`` [N, N] with sorted indices holding every
    pair whose distance is at most ``max_distance`` and below 1 (explicit zeros kept,
    diagonal stored as 0); an absent pair has distance 1 (or, with max_distance < 1, a
    distance above max_distance). The matrix is exactly symmetric.
    """
    x, as_given = _feature_rows(features)
    mod = _validate(x, k1, k2, modality, lqe)
    _validate_scale(max_distance, knn)
    cam = _validate_camera(camera, mod, x.shape[0])
    n = x.shape[0]
    # Rows below unit length are ranked as the release ranks them: by Euclidean distance in
    # the plain distance (faiss IndexFlatL2), by inner product in the modality-aware one.
    metric = "l2" if as_given and mod is None else "ip"
    search = _Search(backend, block_size, knn, nprobe, metric)
    with torch.no_grad():
        if mod is None:
            nb = _plain_neighbours(x, k1, k2, search)
        else:
            nb = _modality_neighbours(x, mod, k1, k2, lqe, search, cam, self_first=not as_given)
    kh = int(np.around(k1 / 2))
    full_len, half_len = min(k1 + 1, nb.rank.shape[1]), min(kh + 1, nb.rank.shape[1])
    recip_full = _reciprocal(nb.rank, full_len)
    recip_half = _reciprocal(nb.rank, half_len)
    rows, cols = _expansion(nb.rank, recip_full, recip_half, full_len, half_len)
    del recip_full, recip_half
    cos = _pair_cosines(x, rows, cols, nb)
    v = _softmax_weights(cos, rows, cols, n)
    del rows, cols, cos
    if nb.lqe_matrix is not None:
        v = nb.lqe_matrix @ v
    del nb
    if memory_check is not None:
        memory_check(estimate_join_memory(n, v.nnz, k1, max_distance))
    if max_distance >= 1.0 and _nearly_dense(v):
        dist = _dense_min_overlap_distance(v)
    else:
        order = _band_order(v)
        v = _rows_in_order(v, order)  # the original V is freed here, before the join
        if max_distance >= 1.0:
            dist = _min_overlap_distance(v, order)
        else:
            dist = _thresholded_distance(v, order, float(max_distance))
    log.debug("Jaccard distance: N = %d, %.1f stored pairs per row", n, dist.nnz / n)
    return dist


def _feature_rows(features: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(x [N, d] float32, as_given): ``features`` as they are when every row has unit length
    (within UNIT_TOLERANCE) or every row is at most that long (as_given: the release's
    flip-averaged clustering features, used unnormalised); otherwise (a row longer than
    unit) L2-normalised, as_given False. Unit rows are used as they are, without a copy."""
    x = as_float_tensor(features)
    if x.shape[0] == 0:
        return x, False
    norms = row_norms(x)
    if bool(((norms - 1).abs() <= UNIT_TOLERANCE).all()):
        return x, False
    if bool((norms <= 1 + UNIT_TOLERANCE).all()):
        return x, True
    return torch.nn.functional.normalize(x, dim=1), False


def _validate(x: torch.Tensor, k1: int, k2: int, modality, lqe: str) -> np.ndarray | None:
    """Check the arguments; the modality as an int64 array (None in plain mode)."""
    n = x.shape[0]
    for name, k in (("k1", k1), ("k2", k2)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{name} must be a positive integer, got {k!r}.")
    if lqe not in LQE_MODES:
        raise ValueError(f"lqe must be one of {LQE_MODES}, got {lqe!r}.")
    # A NaN or infinite entry makes its row's norm NaN or infinite (x's rows are at most unit
    # length, so no finite row overflows); 70× faster than isfinite over every entry at 200k × 2048.
    if not bool(torch.isfinite(torch.linalg.vector_norm(x, dim=1)).all()):
        raise ValueError("features contain NaN or infinite values.")
    if n <= k1:
        raise ValueError(f"the Jaccard distance needs more than k1 = {k1} samples, got {n}.")
    if modality is None:
        return None
    mod = modality.cpu().numpy() if isinstance(modality, torch.Tensor) else np.asarray(modality)
    if mod.shape != (n,):
        raise ValueError(f"modality must be a 1-D array of length {n} (one per feature row), got shape {mod.shape}.")
    if not np.all((mod == 0) | (mod == 1)):
        raise ValueError("modality must contain only 0 (visible) and 1 (infrared).")
    mod = mod.astype(np.int64)
    if k1 < 2:
        raise ValueError(f"the modality-aware Jaccard distance needs k1 >= 2, got {k1}.")
    need = k1 // 2
    counts = np.bincount(mod, minlength=2)
    if counts.min() < need:
        raise ValueError(
            f"the modality-aware Jaccard distance with k1 = {k1} needs at least {need} samples "
            f"of each modality, got {counts[0]} visible and {counts[1]} infrared."
        )
    return mod


def _validate_scale(max_distance, knn: str) -> None:
    """Check the threshold and the kNN method."""
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, float, np.floating, np.integer)) or not (
        0.0 < float(max_distance) <= 1.0
    ):
        raise ValueError(f"max_distance must be a number in (0, 1], got {max_distance!r}.")
    if knn not in METHODS:
        raise ValueError(f"knn must be one of {METHODS}, got {knn!r}.")


@dataclass(frozen=True)
class _Search:
    """How step 1 finds neighbours: :func:`~bmil.cluster.knn.knn_per_group`'s backend,
    block_size, method, nprobe and metric ("ip", or "l2": similarities are then minus
    squared distances)."""

    backend: str
    block_size: int
    method: str
    nprobe: int | None = None
    metric: str = "ip"

    def __call__(self, x: torch.Tensor, k: int, candidates=None, queries=None) -> tuple[np.ndarray, np.ndarray]:
        return self.per_group(x, [candidates], [k], queries)[0]

    def per_group(self, x: torch.Tensor, groups: list, ks: list[int], queries=None) -> list:
        """[(sims, idx)] of each candidate group, found in one search (knn_per_group)."""
        return knn_per_group(
            x, groups, ks, queries=queries, backend=self.backend, block_size=self.block_size, method=self.method,
            nprobe=self.nprobe, metric=self.metric,
        )


def _validate_camera(camera, mod: np.ndarray | None, n: int) -> np.ndarray | None:
    """The camera ids as an int64 array [N] (None when not given)."""
    if camera is None:
        return None
    if mod is None:
        raise NotImplementedError(
            "camera-aware Jaccard is not implemented yet for the plain distance: camera= needs modality="
        )
    cam = camera.cpu().numpy() if isinstance(camera, torch.Tensor) else np.asarray(camera)
    if cam.shape != (n,):
        raise ValueError(f"camera must be a 1-D array of length {n} (one per feature row), got shape {cam.shape}.")
    if cam.size and not np.issubdtype(cam.dtype, np.integer):
        raise ValueError(f"camera must hold integer camera ids, got dtype {cam.dtype}.")
    return cam.astype(np.int64)


def _self_first(idx: np.ndarray, sims: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Put each query row itself first in its neighbour list, keeping the others' order.

    idx, sims: [Q, k] kNN of the query ``rows`` [Q] among candidates that include them.
    A row pushed out of its own list by exact duplicates is inserted and the last dropped.
    The self entry gets similarity +inf, so that any later sort keeps it first.
    """
    k = idx.shape[1]
    ext_idx = np.concatenate([rows[:, None], idx], axis=1)
    ext_sims = np.concatenate([np.full((len(rows), 1), np.inf, np.float32), sims], axis=1)
    drop = ext_idx == rows[:, None]
    drop[:, 0] = False
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ext_idx, order, 1), np.take_along_axis(ext_sims, order, 1)


@dataclass
class _Neighbours:
    """Step 1 and the step-5 weights.

    rank: int64 [N, K], the rank lists, each row itself first.
    rank_sims: float32 [N, K], their inner products with the row (cosines for unit rows;
        +inf in place of the row itself where it was put first).
    lqe_matrix: float32 CSR [N, N], V ← lqe_matrix @ V is the local query expansion;
        None when there is none (k2 = 1).
    """

    rank: np.ndarray
    rank_sims: np.ndarray
    lqe_matrix: sparse.csr_array | None


def _row_average_matrix(cols: np.ndarray, weights: np.ndarray, n: int) -> sparse.csr_array:
    """CSR [n, n] with ``weights`` [n, m] at columns ``cols`` [n, m] of each row."""
    indptr = np.arange(0, cols.size + 1, cols.shape[1])
    return sparse.csr_array((weights.ravel(), cols.ravel(), indptr), shape=(n, n))


def _plain_neighbours(x: torch.Tensor, k1: int, k2: int, search: _Search) -> _Neighbours:
    """rank [N, k1] (self first), by ``search.metric``; LQE: mean over rank[i, :k2] (none
    for k2 = 1)."""
    n = x.shape[0]
    sims, idx = search(x, min(max(k1, k2), n))
    if search.metric == "l2":  # minus squared distances back to inner products: x·y = (|x|² + |y|² − d²) / 2
        sq = (row_norms(x).double() ** 2).cpu().numpy()
        sims = ((sims + sq[:, None] + sq[idx]) / 2).astype(np.float32)
    idx, sims = _self_first(idx, sims, np.arange(n))
    if k2 == 1:
        return _Neighbours(idx[:, :k1], sims[:, :k1], None)
    k2_eff = min(k2, n)
    weights = np.full((n, k2_eff), 1.0 / k2_eff, np.float32)
    return _Neighbours(idx[:, :k1], sims[:, :k1], _row_average_matrix(idx[:, :k2_eff], weights, n))


def _modality_neighbours(
    x: torch.Tensor, mod: np.ndarray, k1: int, k2: int, lqe: str, search: _Search,
    cam: np.ndarray | None = None, *, self_first: bool = True,
) -> _Neighbours:
    """Merged per-modality rank [N, 2·(k1//2)]; LQE balanced over the two modalities (none
    for k2 = 1, as in the release: not even the nearest image of the other modality).

    Both modalities' neighbours come from one search (:meth:`_Search.per_group`).
    self_first: each row is put first in its own modality's list (unit rows); otherwise it
    keeps the place its inner product with itself gives it (the release, on rows below
    unit length: a longer neighbour may come before it).
    With ``cam`` each modality's half of the rank list follows :func:`_camera_balanced`;
    the LQE lists stay the plain per-modality nearest neighbours.
    """
    n = x.shape[0]
    half = k1 // 2
    k_lqe = k2 if lqe == "release" else max(1, k2 // 2)
    groups = [np.flatnonzero(mod == m) for m in (0, 1)]
    found = search.per_group(x, groups, [min(max(half, k_lqe), len(members)) for members in groups])
    lists, halves = [], []
    for members, (sims, idx) in zip(groups, found, strict=True):
        if self_first:
            idx[members], sims[members] = _self_first(idx[members], sims[members], members)
        lists.append((sims, idx))
        if cam is None:
            halves.append((sims[:, :half], idx[:, :half]))
        else:
            halves.append(_camera_balanced(x, members, cam, half, sims[:, :half], idx[:, :half], search))
    (s_vis, i_vis), (s_ir, i_ir) = lists
    merged_s = np.concatenate([halves[0][0], halves[1][0]], axis=1)
    merged_i = np.concatenate([halves[0][1], halves[1][1]], axis=1)
    order = np.lexsort((merged_i, -merged_s), axis=-1)
    rank = np.take_along_axis(merged_i, order, 1)
    rank_sims = np.take_along_axis(merged_s, order, 1)
    if k2 == 1:
        return _Neighbours(rank, rank_sims, None)

    c_vis, c_ir = i_vis[:, :k_lqe], i_ir[:, :k_lqe]
    if lqe == "release":
        w_vis, w_ir = 0.5 / c_vis.shape[1], 0.5 / c_ir.shape[1]
    else:
        w_vis = w_ir = 1.0 / (c_vis.shape[1] + c_ir.shape[1])
    weights = np.concatenate(
        [np.full(c_vis.shape, w_vis, np.float32), np.full(c_ir.shape, w_ir, np.float32)], axis=1
    )
    lqe_matrix = _row_average_matrix(np.concatenate([c_vis, c_ir], axis=1), weights, n)
    return _Neighbours(rank, rank_sims, lqe_matrix)


def _camera_balanced(
    x: torch.Tensor,
    members: np.ndarray,
    cam: np.ndarray,
    budget: int,
    sims: np.ndarray,
    idx: np.ndarray,
    search: _Search,
) -> tuple[np.ndarray, np.ndarray]:
    """One modality's ``budget`` neighbours of every row, intra-camera ones capped.

    members: int64 [M], the rows of this modality; cam: int64 [N] camera ids.
    sims, idx: [N, budget], the plain nearest ``members`` of every row (self first for
        members); rows of the other modality keep them, since all their candidates here
        are from other cameras.
    For a member i of camera c, with C cameras in the modality: own = min(ceil(budget/C),
    |camera c|) nearest images of camera c (i itself first), then the budget − own nearest
    of the other cameras; when those have fewer images, camera c fills the rest.

    Why this rule: images from one camera share background, viewpoint and lighting, so
    they outrank a person's images from other cameras; k-reciprocal lists filled by them
    link few cameras, and one identity then splits into per-camera clusters. Capping the
    own camera at its even share of the budget (ceil: i itself always fits) leaves room
    for inter-camera neighbours while keeping the list length, the sparsity and the
    nearest-first selection of the modality-aware distance. Unlike CA-Jaccard's union of
    separate intra- and inter-camera k-reciprocal sets, it needs no second reciprocity
    pass and reduces to the modality-aware distance when a modality has one camera.

    Returns (sims [N, budget] float32, idx [N, budget] int64), unsorted within a row.
    """
    sims, idx = sims.copy(), idx.copy()
    cams = np.unique(cam[members])
    cap = -(-budget // len(cams))
    for c in cams:
        queries = members[cam[members] == c]
        others = members[cam[members] != c]
        take_other = min(budget - min(cap, len(queries)), len(others))
        take_own = budget - take_other
        s_own, i_own = search(x, take_own, candidates=queries, queries=queries)
        i_own, s_own = _self_first(i_own, s_own, queries)
        parts_s, parts_i = [s_own], [i_own]
        if take_other:
            s_oth, i_oth = search(x, take_other, candidates=others, queries=queries)
            parts_s.append(s_oth)
            parts_i.append(i_oth)
        sims[queries] = np.concatenate(parts_s, axis=1)
        idx[queries] = np.concatenate(parts_i, axis=1)
    return sims, idx


def _row_blocks(n: int, per_row: int, budget: int):
    """Consecutive [start, stop) row ranges of about ``budget / per_row`` rows."""
    step = max(1, budget // max(per_row, 1))
    for r0 in range(0, n, step):
        yield r0, min(r0 + step, n)


def _reciprocal(rank: np.ndarray, m: int) -> np.ndarray:
    """bool [N, m]: rank[i, p] is a k-reciprocal neighbour of i (i in rank[rank[i, p], :m])."""
    n = rank.shape[0]
    out = np.empty((n, m), dtype=bool)
    head = rank[:, :m]
    for r0, r1 in _row_blocks(n, m * m, _GATHER_PER_BLOCK):
        back = head[head[r0:r1]]  # [B, m, m]
        out[r0:r1] = (back == np.arange(r0, r1)[:, None, None]).any(axis=2)
    return out


def _expansion(
    rank: np.ndarray, recip_full: np.ndarray, recip_half: np.ndarray, full_len: int, half_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """E(i) as (rows, cols) int64 pairs, sorted by row then column, without duplicates.

    rank: int64 [N, K]; recip_full: bool [N, full_len], R(i, k1) membership of
    rank[i, :full_len]; recip_half: bool [N, half_len], the same for R(i, round(k1/2)).
    Pairs are handled as keys i·(N+1) + j, which sort by row, then column. Row blocks run
    on the torch threads' cores (numpy releases the GIL in most of a block's work).
    """
    n = rank.shape[0]
    stride = np.int64(n + 1)
    block = functools.partial(_expansion_keys, rank, recip_full, recip_half, full_len, half_len)
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        keys = np.concatenate(list(pool.map(block, _row_blocks(n, full_len * half_len, _MEMBERSHIP_PER_BLOCK))))
    rows = keys // stride
    return rows, keys - rows * stride


def _expansion_keys(
    rank: np.ndarray, recip_full: np.ndarray, recip_half: np.ndarray, full_len: int, half_len: int,
    rows: tuple[int, int],
) -> np.ndarray:
    """The sorted distinct keys i·(N+1) + j of E(i) for the rows i in [r0, r1) (``rows``)."""
    r0, r1 = rows
    n = rank.shape[0]
    stride = np.int64(n + 1)
    sentinel = n  # sorts after every real index of a row, before the next row's keys
    offsets = (np.arange(r0, r1, dtype=np.int64) * stride)[:, None]
    own = np.where(recip_full[r0:r1], rank[r0:r1, :full_len], sentinel)  # R(i, k1)
    own_keys = (np.sort(own, axis=1) + offsets).ravel()
    cand = rank[r0:r1, :full_len]  # [B, mf]; only the reciprocal ones can be accepted
    half_keys = rank[cand, :half_len] + offsets[:, :, None]  # [B, mf, mh]: rank[c, :kh+1]
    half_ok = recip_half[cand]  # [B, mf, mh]: which of them are in R(c, kh)
    pos = np.minimum(np.searchsorted(own_keys, half_keys.ravel()), own_keys.size - 1)
    inside = (own_keys[pos] == half_keys.ravel()).reshape(half_keys.shape) & half_ok
    # |R(c, kh) ∩ R(i, k1)| > 2/3·|R(c, kh)|, in integers
    accept = recip_full[r0:r1] & (3 * inside.sum(axis=2) > 2 * half_ok.sum(axis=2))
    return np.unique(np.concatenate([
        own_keys[own_keys % stride != sentinel],
        half_keys[accept[:, :, None] & half_ok],
    ]))


def _workers() -> int:
    """Row blocks in flight at once in the thread pools: the torch threads, at most _JOIN_WORKERS."""
    return max(1, min(torch.get_num_threads(), _JOIN_WORKERS))


def _pair_cosines(x: torch.Tensor, rows: np.ndarray, cols: np.ndarray, nb: _Neighbours) -> np.ndarray:
    """float64 [P]: inner products of the pairs (rows[p], cols[p]) of ``x``'s rows (cosines
    for unit rows), rows sorted.

    Pairs in the rank lists reuse the kNN's similarities; the rest (expansion members
    beyond i's own list, and i itself) are gathered dot products, in chunks of a few MiB
    (small chunks stay in cache, which is what makes the gather fast); on CUDA the
    products run there.
    """
    n = x.shape[0]
    stride = np.int64(n + 1)
    order = np.argsort(nb.rank, axis=1)
    keys = (np.take_along_axis(nb.rank, order, 1) + (np.arange(n, dtype=np.int64) * stride)[:, None]).ravel()
    known = np.take_along_axis(nb.rank_sims, order, 1).ravel()
    query = rows * stride + cols
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    found = (keys[pos] == query) & np.isfinite(known[pos])
    cos = np.where(found, known[pos], 0.0)
    missing = np.flatnonzero(~found)
    r_miss, c_miss = rows[missing], cols[missing]
    chunk = max(1, _BYTES_PER_DOT_CHUNK // (8 * x.shape[1]))
    xn = x.numpy() if x.device.type == "cpu" else None
    for p0 in range(0, len(missing), chunk):
        sl = slice(p0, p0 + chunk)
        if xn is not None:
            cos[missing[sl]] = np.einsum("pd,pd->p", xn[r_miss[sl]], xn[c_miss[sl]])
        else:
            r = torch.from_numpy(r_miss[sl]).to(x.device)
            c = torch.from_numpy(c_miss[sl]).to(x.device)
            cos[missing[sl]] = (x[r] * x[c]).sum(dim=1).double().cpu().numpy()
    return cos


def _softmax_weights(cos: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int) -> sparse.csr_array:
    """V [N, N] float32 CSR: softmax over each row's pairs of −(2 − 2·cos).

    cos: float64 [P] cosines of the pairs (rows[p], cols[p]), sorted by row.
    """
    weights = np.exp(2.0 * cos - 2.0)
    weights /= np.bincount(rows, weights=weights, minlength=n)[rows]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    return sparse.csr_array((weights.astype(np.float32), cols, indptr), shape=(n, n))


def _band_order(v: sparse.csr_array) -> np.ndarray:
    """A row order (reverse Cuthill–McKee of V's symmetrised pattern) that puts rows that
    share support next to each other, so a block of rows meets a narrow band of partners."""
    n = v.shape[0]
    pattern = sparse.csr_matrix((np.ones(v.nnz, np.int8), v.indices, v.indptr), shape=(n, n))
    return reverse_cuthill_mckee((pattern + pattern.T).tocsr(), symmetric_mode=True).astype(np.int64)


def _rows_in_order(v: sparse.csr_array, order: np.ndarray) -> sparse.csr_array:
    """V's rows in ``order`` (row i is sample order[i]; columns keep their numbering), with
    sorted indices: the layout both joins take."""
    v = v[order]
    v.sort_indices()
    return v


def _entry_index_dtype(v: sparse.csr_array) -> type:
    """int32 for the per-entry rows, positions and counts of the join when every value fits
    (positions go up to twice V's entries), int64 otherwise: 4 bytes less per entry each."""
    return np.int32 if max(2 * v.nnz, v.shape[0]) < np.iinfo(np.int32).max else np.int64


def _entry_rows(v: sparse.csr_array, dtype: type) -> np.ndarray:
    """The row of each entry of V (CSR order), as ``dtype``."""
    return np.repeat(np.arange(v.shape[0], dtype=dtype), np.diff(v.indptr))


def _min_overlap_distance(v: sparse.csr_array, order: np.ndarray) -> sparse.csr_array:
    """d(i, j) = 1 − s/(2 − s), s = Σ_k min(V[i,k], V[j,k]), for every pair sharing support.

    v: V with its rows in a banded order (:func:`_band_order`, :func:`_rows_in_order`),
    row i being sample ``order[i]``; each row meets only the partners after it in that
    order (s is symmetric), so every unordered pair is computed once and the result is
    exactly symmetric. Peak memory of the assembly: about 16 bytes per stored entry.
    """
    n = v.shape[0]
    dtype = _entry_index_dtype(v)
    vc = v.tocsc()
    vc.sort_indices()
    entry_rows = _entry_rows(v, dtype)
    first, fan = _later_in_column(_csc_positions(v, dtype), v.indices, None, vc.indptr)
    join = _ColumnJoin(
        n=n, indptr=v.indptr.astype(np.int64), data=v.data, first=first, fan=fan,
        col_rows=vc.indices.astype(np.int32, copy=False), col_data=vc.data,
    )
    del vc
    blocks = _join_blocks(join.triples_by_row(entry_rows), join.reach(entry_rows))
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        pieces = list(pool.map(functools.partial(_sharing_pairs, join), blocks))
    del join, first, fan, entry_rows
    return _assemble(pieces, order, n)


def _nearly_dense(v: sparse.csr_array) -> bool:
    """True when the (row, column, partner) triples of V's join, counted from both ends of
    every pair, reach N²/_DENSE_SHARE: the full result is then close to dense."""
    column_rows = np.bincount(v.indices, minlength=v.shape[0]).astype(np.int64)
    return int(column_rows @ column_rows) * _DENSE_SHARE >= v.shape[0] ** 2


def _dense_min_overlap_distance(v: sparse.csr_array) -> sparse.csr_array:
    """:func:`_min_overlap_distance` for a result close to dense (:func:`_nearly_dense`).

    v: V [N, N] CSR in the samples' order. Each block of rows sums its overlaps with every
    partner in dense bins [rows, N], in V's column order as there, so both (i, j) and (j, i)
    are computed, from the same terms in the same order: the result is exactly symmetric
    and equal to the banded join's, bit for bit. Computing each pair twice costs less than
    the banded join's mirror and sort once half of all pairs are stored; the blocks' pairs
    come out sorted by row and column and go straight into the result's arrays, allocated at
    a bound (a row's pairs are at most its triples and N) whose untouched pages take no
    memory, then shrunk in place. Peak: the result, 8 bytes per stored pair, plus V twice
    and the blocks in flight.
    """
    n = v.shape[0]
    v.sort_indices()
    dtype = _entry_index_dtype(v)
    vc = v.tocsc()
    vc.sort_indices()
    colptr = vc.indptr.astype(dtype, copy=False)
    join = _ColumnJoin(  # every entry (i, k) meets all the rows of column k, i itself included
        n=n, indptr=v.indptr.astype(np.int64), data=v.data, first=colptr[v.indices],
        fan=np.diff(colptr)[v.indices], col_rows=vc.indices.astype(np.int32, copy=False), col_data=vc.data,
    )
    del vc
    triples = join.triples_by_row(_entry_rows(v, dtype))
    bound = int(np.minimum(np.diff(triples), n).sum())
    out_dtype = np.int32 if max(bound, n) < np.iinfo(np.int32).max else np.int64
    indices, data = np.empty(bound, out_dtype), np.empty(bound, np.float32)
    indptr = np.zeros(n + 1, out_dtype)
    stored = 0
    block_pairs = functools.partial(_dense_block, join, out_dtype)
    for (r0, r1), (counts, cols, dist) in _in_order(block_pairs, _dense_blocks(triples)):
        indptr[r0 + 1 : r1 + 1] = counts
        indices[stored : stored + len(cols)] = cols
        data[stored : stored + len(cols)] = dist
        stored += len(cols)
    np.cumsum(indptr, out=indptr)
    # Shrunk in place (realloc, no copy; scipy would copy views of much larger arrays). No
    # view of either array exists here (the writes' slices are gone), which is what
    # refcheck guards against; its count also sees the interpreter's own references.
    indices.resize(stored, refcheck=False)
    data.resize(stored, refcheck=False)
    return sparse.csr_array((data, indices, indptr), shape=(n, n))


def _in_order(fn: Callable, items: list):
    """(item, fn(item)) for each item, in order, computed on the thread pool with at most
    two blocks per worker done or running ahead of the one being consumed."""
    workers = _workers()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) > 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _dense_blocks(triples: np.ndarray) -> list[tuple[int, int]]:
    """Row blocks (r0, r1): at most _DENSE_BINS_PER_BLOCK bins [rows, N] and at most
    _TRIPLES_PER_BLOCK triples, one row at least. triples: int64 [N+1], cumulative by row."""
    n = len(triples) - 1
    rows = max(1, _DENSE_BINS_PER_BLOCK // n)
    blocks, r0 = [], 0
    while r0 < n:
        by_triples = int(np.searchsorted(triples, triples[r0] + _TRIPLES_PER_BLOCK, side="right")) - 1
        r1 = min(n, r0 + rows, max(by_triples, r0 + 1))
        blocks.append((r0, r1))
        r0 = r1
    return blocks


def _dense_block(
    join: _ColumnJoin, out_dtype: type, block: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pairs per row, columns, distances) of rows [r0, r1) against every row (d < 1, the
    diagonal 0), ascending by row and column: int64 [r1 − r0], ``out_dtype`` and float32.
    join: every entry meeting all the rows of its column (:func:`_dense_min_overlap_distance`)."""
    r0, r1 = block
    n = join.n
    local = np.arange(r1 - r0, dtype=np.int64)
    # bins [rows, N] fit the entry index dtype (at most max(_DENSE_BINS_PER_BLOCK, N) of them)
    bins, overlap = join.keyed_overlaps(r0, r1, (local * n).astype(join.first.dtype))
    s = np.bincount(bins, weights=overlap, minlength=(r1 - r0) * n)
    del bins, overlap
    keys = np.flatnonzero(s > 0)  # a bool scan: several times faster than on the floats
    dist = _overlap_distance(s[keys])
    del s
    diagonal = local * (n + 1) + r0  # key of (i, i): present whenever row i has an entry
    at = np.minimum(np.searchsorted(keys, diagonal), len(keys) - 1)
    dist[at[keys[at] == diagonal]] = 0.0
    if not (dist < 1.0).all():  # pairs whose tiny overlap rounds d to 1 are not stored
        keep = dist < 1.0
        keys, dist = keys[keep], dist[keep]
    counts = np.diff(np.searchsorted(keys, np.arange(r1 - r0 + 1, dtype=np.int64) * n))
    return counts, (keys - np.repeat(local * n, counts)).astype(out_dtype), dist


def _overlap_distance(s: np.ndarray) -> np.ndarray:
    """float32 d = max(1 − s/(2 − s), 0) of float64 min-overlap sums s (rows of V sum to 1),
    in place on one temporary; every join computes it here, so their results agree bit for bit."""
    d = 2.0 - s
    np.divide(s, d, out=d)
    np.subtract(1.0, d, out=d)
    np.maximum(d, 0.0, out=d)
    return d.astype(np.float32)


def _sharing_pairs(join: _ColumnJoin, block: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, distance) of the pairs of one row block (r0, r1, width) of the join
    with distance below 1."""
    rows, cols, s = join.block(*block)
    dist = _overlap_distance(s)
    keep = dist < 1.0
    return rows[keep], cols[keep], dist[keep]


def _thresholded_distance(v: sparse.csr_array, order: np.ndarray, max_distance: float) -> sparse.csr_array:
    """The pairs of :func:`_min_overlap_distance` with d <= ``max_distance`` (t < 1) only,
    without computing the overlap of pairs that cannot reach it (v, order: as there).

    d <= t ⇔ s >= s_min = 2(1 − t)/(2 − t). Every row of V sums to 1. Columns get one global
    order, rarest first (fewest rows), ties by index; each row's entries in that order are
    split into a prefix and a suffix, the suffix being the longest tail of mass below
    ε = _SUFFIX_SHARE · s_min (prefix filtering). The join then skips the (i, k, j) triples
    whose entries are both in suffixes — the common columns, which make most triples —
    and sums the rest exactly: X(i, j) = s(i, j) − SS(i, j), SS being the suffix–suffix
    overlap, 0 <= SS <= min(m_i, m_j) with m the suffix masses (< ε). So a pair with
    X + min(m_i, m_j) < s_min cannot pass (and a pair with no triple left has s < ε <
    s_min); for the few others SS is added exactly (:func:`_suffix_overlap`) and the
    threshold applied to s = X + SS. Stored values equal the full result's up to the
    order of the float64 summation.
    """
    n = v.shape[0]
    s_min = 2.0 * (1.0 - max_distance) / (2.0 - max_distance)
    dtype = _entry_index_dtype(v)
    entry_rows = _entry_rows(v, dtype)
    suffix = _suffix_entries(v, entry_rows, _SUFFIX_SHARE * s_min)
    suffix_mass = np.bincount(entry_rows, weights=np.where(suffix, v.data, 0.0), minlength=n)
    vc = v.tocsc()
    vc.sort_indices()
    keep = ~suffix  # (copies: eliminate_zeros would compact v's own index arrays in place)
    pre_ptr = np.concatenate([[0], np.cumsum(np.bincount(entry_rows[keep], minlength=n))])
    pre = sparse.csr_array((v.data[keep], v.indices[keep], pre_ptr), shape=(n, n))
    pc = pre.tocsc()
    pc.sort_indices()
    del pre
    # prefix entries meet every later entry of their column; suffix entries only the prefix ones
    position = _csc_positions(v, dtype)
    first, fan = _later_in_column(position, v.indices, None, vc.indptr)
    first_pre, fan_pre = _later_in_column(position, v.indices, keep, pc.indptr)
    del position, keep
    first_pre += vc.indices.size  # the prefix columns follow V's columns in col_rows
    np.copyto(first, first_pre, where=suffix)
    np.copyto(fan, fan_pre, where=suffix)
    del first_pre, fan_pre
    join = _ColumnJoin(
        n=n, indptr=v.indptr.astype(np.int64), data=v.data, first=first, fan=fan,
        col_rows=np.concatenate([vc.indices, pc.indices]).astype(np.int32, copy=False),
        col_data=np.concatenate([vc.data, pc.data]),
    )
    del vc, pc
    tails = _SuffixRows(v, suffix, entry_rows)
    passing = functools.partial(_passing_pairs, join, tails, suffix_mass, s_min, max_distance)
    blocks = _join_blocks(join.triples_by_row(entry_rows), join.reach(entry_rows))
    # numpy releases the GIL in much of a block's work: blocks run on the torch threads' cores
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        pieces = list(pool.map(passing, blocks))
    del join, tails, first, fan, passing
    log.debug("thresholded Jaccard (t = %.3g): %.1f pairs per row kept", max_distance,
              sum(len(p[0]) for p in pieces) / n)
    return _assemble(pieces, order, n)


def _passing_pairs(
    join: _ColumnJoin, tails: _SuffixRows, suffix_mass: np.ndarray, s_min: float, max_distance: float,
    block: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, distance) of the pairs of one row block (r0, r1, width) of the join with
    distance <= max_distance (see :func:`_thresholded_distance`)."""
    r0, r1, width = block
    rows, cols, x = join.block(r0, r1, width)
    maybe = x + np.minimum(suffix_mass[rows], suffix_mass[cols]) >= s_min - _BOUND_SLACK
    rows, cols, x = rows[maybe], cols[maybe], x[maybe]
    s = x + tails.overlap(r0, r1, rows, cols)
    dist = _overlap_distance(s)
    keep = dist <= max_distance
    return rows[keep], cols[keep], dist[keep]


def _suffix_entries(v: sparse.csr_array, entry_rows: np.ndarray, limit: float) -> np.ndarray:
    """bool [nnz]: entry e of V (CSR, rows summing to 1) is in its row's suffix, the longest
    tail of mass < ``limit`` in the global column order (fewest rows first, then index)."""
    n = v.shape[0]
    counts = np.bincount(v.indices, minlength=n)
    col_rank = np.empty(n, np.int64)
    col_rank[np.lexsort((np.arange(n), counts))] = np.arange(n)
    o, _ = _stable_argsort(entry_rows.astype(np.int64) * n + col_rank[v.indices], n * n)  # by row, then column order
    mass = v.data[o].astype(np.float64)
    from_end = np.cumsum(mass[::-1])[::-1]  # mass from each entry to the end of the array
    row_end = np.append(from_end, 0.0)[v.indptr[1:]]
    tail = from_end - row_end[entry_rows]  # mass from each entry to the end of its row
    out = np.empty(v.nnz, dtype=bool)
    out[o] = tail < limit
    return out


class _SuffixRows:
    """The suffix entries of V (band order), for the exact suffix–suffix overlap of a few pairs."""

    def __init__(self, v: sparse.csr_array, suffix: np.ndarray, entry_rows: np.ndarray):
        n = v.shape[0]
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(entry_rows[suffix], minlength=n))])
        self.cols = v.indices[suffix].astype(np.int64)  # sorted within each row
        self.data = v.data[suffix]

    def overlap(self, r0: int, r1: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """float64 [P]: Σ_k min over the shared suffix columns of each pair (rows[p], cols[p]),
        rows in [r0, r1). The block's suffix entries, keyed (row − r0)·N + column, are
        ascending (columns are sorted within each row); each partner's suffix entry is
        looked up among them by its key."""
        out = np.zeros(len(rows))
        e0, e1 = self.indptr[r0], self.indptr[r1]
        if len(rows) == 0 or e0 == e1:
            return out
        n = len(self.indptr) - 1
        local = np.repeat(np.arange(r1 - r0, dtype=np.int64), np.diff(self.indptr[r0 : r1 + 1]))
        block_keys = local * n + self.cols[e0:e1]
        count = self.indptr[cols + 1] - self.indptr[cols]
        total = int(count.sum())
        start = np.cumsum(count) - count
        pos = np.repeat(self.indptr[cols] - start, count) + np.arange(total, dtype=np.int64)
        wanted = np.repeat((rows - r0) * n, count) + self.cols[pos]
        slot = np.minimum(np.searchsorted(block_keys, wanted), len(block_keys) - 1)
        mine = self.data[e0 + slot]
        mine[block_keys[slot] != wanted] = 0.0
        pair = np.repeat(np.arange(len(rows)), count)
        return np.bincount(pair, weights=np.minimum(mine, self.data[pos]), minlength=len(rows))


def _csc_positions(v: sparse.csr_array, dtype: type = np.int64) -> np.ndarray:
    """``dtype`` [nnz]: the position of each entry of V (CSR order) in V's arrays in CSC
    order with sorted indices (scipy's counting-sort conversion of the entry numbers)."""
    nnz = v.nnz
    ids = sparse.csr_array((np.arange(1, nnz + 1, dtype=dtype), v.indices, v.indptr), shape=v.shape).tocsc()
    ids.sort_indices()
    position = np.empty(nnz, dtype)
    position[ids.data - 1] = np.arange(nnz, dtype=dtype)
    return position


def _later_in_column(
    position: np.ndarray, ks: np.ndarray, member: np.ndarray | None, colptr: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each entry (i, k) of V: the position of the first row j > i of column k in a
    column store holding V's entries flagged ``member`` (bool [nnz] in CSR order; None =
    all), in the same sorted CSC order, with column pointers ``colptr``; and how many such
    rows there are. [nnz] each, of ``position``'s dtype, in linear time: entry (i, k) sits
    at CSC position p (``position``), and the members before or at p are the rows <= i of
    column k and every earlier column's, so their count is the first later member's position.
    ks: the column k of each entry."""
    dtype = position.dtype
    if member is None:
        first = position + 1
    else:
        in_csc = np.zeros(len(position), bool)
        in_csc[position] = member
        first = np.cumsum(in_csc, dtype=dtype)[position]
    return first, colptr.astype(dtype, copy=False)[ks + 1] - first


def _assemble(pieces: list, order: np.ndarray, n: int) -> sparse.csr_array:
    """Symmetric CSR [n, n] from upper-triangle pieces (rows, cols, dist) in band order,
    plus the zero diagonal; explicit zeros kept."""
    # The diagonal (d = 0, as Σ_k V[i,k] = 1) joins the upper part; scipy's sparse sum
    # drops entries equal to 0, so zero distances travel as -1 until the end.
    diagonal = np.arange(n, dtype=np.int32)
    dist = np.concatenate([p[2] for p in pieces] + [np.zeros(n, np.float32)])
    dist[dist == 0] = -1.0
    rows = np.concatenate([order[p[0]].astype(np.int32) for p in pieces] + [diagonal])
    cols = np.concatenate([order[p[1]].astype(np.int32) for p in pieces] + [diagonal])
    pieces.clear()
    upper = sparse.coo_array((dist, (rows, cols)), shape=(n, n)).tocsr()
    del rows, cols, dist
    full = upper + upper.T.tocsr()  # pairs are disjoint from their mirror images
    del upper
    full.data[full.data < 0] = 0.0
    full.sort_indices()
    return full


def _stable_argsort(keys: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, keys[order]): the stable ascending order of int64 ``keys`` in [0, bound).
    Where key·2^b + position fits in 63 bits (b bits for the positions) one plain integer
    sort of those does it (4× faster than a stable argsort at 2M keys: numpy's vectorised
    sort); otherwise a stable argsort."""
    total = len(keys)
    shift = max(1, total.bit_length())
    if bound.bit_length() + shift < 63:
        packed = np.sort((keys << shift) | np.arange(total, dtype=np.int64))
        return packed & ((1 << shift) - 1), packed >> shift
    order = np.argsort(keys, kind="stable")
    return order, keys[order]


def _sum_by_key(keys: np.ndarray, weights: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys ascending, float64 sums of their weights), the keys' nonzero sums only:
    what ``np.bincount(keys, weights)`` gives at its nonzero bins, summed in the same order
    (the input's within each key), for keys in [0, bound) too many for dense bins."""
    total = len(keys)
    order, keys = _stable_argsort(keys, bound)
    weights = weights[order]
    del order
    new_key = np.empty(total, bool)
    new_key[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=new_key[1:])
    # bincount over the distinct keys' ranks: the same sequential float64 sums as dense bins
    sums = np.bincount(np.cumsum(new_key) - 1, weights=weights)
    keys = keys[new_key]
    nonzero = sums != 0
    return keys[nonzero], sums[nonzero]


def _join_blocks(triples: np.ndarray, reach: np.ndarray):
    """Row blocks (r0, r1, width) for the join: at most _TRIPLES_PER_BLOCK triples, where
    width spans the block's partners r0..max(reach[r0:r1]). A block is cut further to
    (r1 - r0)·width <= _BINS_PER_BLOCK dense accumulator bins when that keeps at least a
    quarter of its rows; otherwise (partners spread wide: a few rows a block would make
    the per-block overhead dominate) it keeps all its rows and sums by sorting its keys.

    triples: int64 [N+1], cumulative triple counts by row; reach: int64 [N], last partner.
    """
    n = len(reach)
    r0 = 0
    while r0 < n:
        hi = int(np.searchsorted(triples, triples[r0] + _TRIPLES_PER_BLOCK, side="right")) - 1
        hi = min(max(hi, r0 + 1), n)
        widths = np.maximum.accumulate(reach[r0:hi]) - r0 + 1
        bins = np.arange(1, hi - r0 + 1) * widths
        r1 = r0 + max(1, int(np.searchsorted(bins, _BINS_PER_BLOCK, side="right")))
        if 4 * (r1 - r0) < hi - r0:
            r1 = hi
        yield r0, r1, int(widths[r1 - r0 - 1])
        r0 = r1


class _ColumnJoin:
    """The (i, k, j) join of V's rows with (some of) its columns, one row block at a time.

    n: rows of V; indptr int64 [N+1], data float32 [nnz]: V in CSR;
    first [nnz]: position in ``col_rows``/``col_data`` of the first partner of entry (i, k)
    (the first j > i in the banded joins, the column's first row in the dense one); fan
    [nnz]: number of partners (consecutive from ``first``); both of one integer dtype;
    col_rows int32, col_data float32: column lists (V in CSC, possibly followed by others).
    """

    def __init__(self, *, n, indptr, data, first, fan, col_rows, col_data):
        self.n, self.indptr, self.data = n, indptr, data
        self.first, self.fan = first, fan
        self.col_rows, self.col_data = col_rows, col_data

    def triples_by_row(self, entry_rows: np.ndarray) -> np.ndarray:
        """int64 [N+1]: cumulative number of (i, k, j) triples by row i."""
        counts = np.bincount(entry_rows, weights=self.fan, minlength=self.n).astype(np.int64)
        return np.concatenate([[0], np.cumsum(counts)])

    def reach(self, entry_rows: np.ndarray) -> np.ndarray:
        """int64 [N]: the last partner of each row (the row itself when it has none)."""
        last = np.where(self.fan > 0, self.col_rows[np.maximum(self.first + self.fan - 1, 0)], entry_rows)
        return np.maximum.reduceat(last, self.indptr[:-1]).astype(np.int64)

    def keyed_overlaps(self, r0: int, r1: int, row_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(key, overlap) of each triple (i, k, j) with i in [r0, r1): row_key[i − r0] + j
        (row_key's dtype) and min(V[i,k], V[j,k]) (float32); ordered by i, then k (V's CSR
        order), then j, so a sum over a key's triples runs over k in V's column order."""
        e0, e1 = self.indptr[r0], self.indptr[r1]
        fan = self.fan[e0:e1]
        start = (np.cumsum(fan) - fan).astype(self.first.dtype, copy=False)
        pos = np.repeat(self.first[e0:e1] - start, fan)
        pos += np.arange(len(pos), dtype=pos.dtype)
        overlap = self.col_data[pos]
        np.minimum(overlap, np.repeat(self.data[e0:e1], fan), out=overlap)
        key = np.repeat(np.repeat(row_key, np.diff(self.indptr[r0 : r1 + 1])), fan)
        key += self.col_rows[pos]
        return key, overlap

    def block(self, r0: int, r1: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, s) of the pairs i in [r0, r1), j > i, meeting in a triple: int64,
        int64, float64 (s > 0, summed over this join's triples).

        width: partners lie in r0 .. r0 + width - 1 (accumulator bins [r1 - r0, width]).
        """
        pair, overlap = self.keyed_overlaps(r0, r1, np.arange(r1 - r0, dtype=np.int64) * width - r0)
        if (r1 - r0) * width <= _BINS_PER_BLOCK:
            s = np.bincount(pair, weights=overlap, minlength=(r1 - r0) * width)
            del pair, overlap
            keys = np.flatnonzero(s)
            s = s[keys]
        else:
            keys, s = _sum_by_key(pair, overlap, (r1 - r0) * width)
        rows = keys // width
        cols = keys - rows * width + r0
        return rows + r0, cols, s


def estimate_jaccard_memory(
    n: int, k1: int = 30, d: int = 2048, block_size: int = 2048, *, k2: int = 6, max_distance: float = 1.0,
    knn: str = "exact", unit_rows: bool = False, phase: str = "all", nprobe: int | None = None,
) -> int:
    """Estimated peak extra memory (bytes) of :func:`jaccard_distance` on CPU (torch kNN)
    for N = ``n`` float32 features of dimension ``d``; an upper estimate, not a guarantee.

    unit_rows: the features are float32 rows of unit length (what extraction returns), so
        no normalised copy is made.
    phase: ``"all"`` (the whole call) or ``"before_join"`` (up to and including building V:
        what must fit before ``jaccard_distance``'s ``memory_check`` can look at V; see
        :func:`estimate_join_memory` for the rest).
    nprobe: the approximate kNN's lists per query (None: its default).

    Derivation (the kNN phase, building V and the join do not overlap; the normalised copy
    of the features lives through all of them):
    - normalised copy of the features (unless ``unit_rows``): 4·n·d;
    - kNN phase: exact: a copy of the candidate rows (at most 4·n·d) and a block of
      similarities B × min(8·B, n) float32 with B = min(block_size, n), counted twice for
      the matrix product and top-k temporaries; approximate: the IVF index holds a copy of
      the candidate rows (4·n·d at most), and each chunk of C = min(n, IVF_QUERY_CHUNK)
      queries a copy of them and the gather buffer (4·C·d each), the per-list top-k
      (8·C·nprobe·(k1 + 1), twice; :func:`~bmil.cluster.knn.ivf_probes` of an index over
      n rows) and one list's similarities (C × 3 mean list sizes, 4 bytes);
      both: the neighbour lists (12 bytes per entry, twice);
    - V has at most min(2·k2, 10)·k1 nonzeros per row (each row averages 2·k2 rows of the
      pre-expansion weights, whose supports E(i) hold about k1 members: 23 at k1 = 30,
      measured; V itself: 53–238 per row at k1 = 30, k2 = 6 on well and weakly separated
      features); building it: the expansion's pairs (64 bytes per row and rank-list entry)
      and V with the local query expansion's product (_V_BYTES_PER_ENTRY per entry);
    - the join and the result: :func:`estimate_join_memory` with that many entries.
    """
    if n < 1 or k1 < 1 or k2 < 1 or d < 1 or block_size < 1:
        raise ValueError("n, k1, k2, d and block_size must be positive.")
    _validate_scale(max_distance, knn)
    if phase not in _PHASES:
        raise ValueError(f"phase must be one of {_PHASES}, got {phase!r}.")
    copy = 0 if unit_rows else 4 * n * d
    b = min(block_size, n)
    lists = 2 * 12 * n * (k1 + 1)
    if knn == "approximate":
        c = min(n, IVF_QUERY_CHUNK)
        probes = ivf_probes(ivf_lists(n), nprobe)
        blocks = c * (8 * d + 16 * probes * (k1 + 1) + 4 * 3 * max(1, n // ivf_lists(n)))
    else:
        blocks = 2 * 4 * b * min(8 * b, n)
    knn_phase = 4 * n * d + blocks + lists
    v_entries = n * min(n, min(2 * k2, 10) * k1)
    building_v = lists + 64 * n * (k1 + 1) + _V_BYTES_PER_ENTRY * v_entries
    if phase == "before_join":
        return int(copy + max(knn_phase, building_v))
    return int(copy + max(knn_phase, building_v, estimate_join_memory(n, v_entries, k1, max_distance)))


def estimate_join_memory(n: int, v_entries: int, k1: int = 30, max_distance: float = 1.0) -> int:
    """Estimated peak extra memory (bytes) of :func:`jaccard_distance` from V on (the band
    order, the join and the result), V having ``v_entries`` nonzeros; an upper estimate.

    - _JOIN_BYTES_PER_V_ENTRY per entry of V: V in band order, in CSC and the prefix
      columns, the per-entry rows, offsets and counts (int32 below 2^30 entries), and the
      suffix split's sort; measured 48–61 beyond the two terms below on weakly and well
      separated features (N = 20,000–40,000, t = 0.6);
    - the join's fixed per-block budget of triples (64 bytes each, with the sort of a wide
      block) and bins (float64 sums and, in the dense join, a bool mask), for each of the
      at most _JOIN_WORKERS blocks in flight;
    - the result: max_distance < 1 (what clustering asks for): at most 4·k1 pairs per row
      (about 16 measured at t = 0.6 on both kinds of features), 26 bytes each during the
      banded join's assembly; max_distance = 1 (every pair sharing support): weakly
      separated features make nearly every pair share support (9,156 of 20,000 per row
      measured), so the dense worst case, n pairs per row at the dense join's 8 bytes
      (the banded join, 26 bytes a pair, runs only when fewer than n²/_DENSE_SHARE pairs
      can share support: :func:`_nearly_dense`).
    """
    full = max(8 * n * n, 26 * n * n // _DENSE_SHARE)
    result = 26 * n * min(n, 4 * k1) if max_distance < 1.0 else full
    fixed = _JOIN_WORKERS * (64 * _TRIPLES_PER_BLOCK + 9 * max(_BINS_PER_BLOCK, _DENSE_BINS_PER_BLOCK))
    return int(_JOIN_BYTES_PER_V_ENTRY * v_entries + fixed + result)
