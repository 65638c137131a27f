"""Neighbour encoding of the Jaccard distance (steps 1–5): the kNN rank lists, k-reciprocal
neighbours, their expansion, the row-stochastic weights V and the local query expansion.

Also the checks of :func:`~bmil.cluster.jaccard.jaccard_distance`'s arguments and the
feature rows it takes (unit, below unit length, or normalised here).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse

from bmil.cluster.jaccard.join import _workers
from bmil.cluster.knn import METHODS, UNIT_TOLERANCE, as_float_tensor, knn_per_group, row_norms

LQE_MODES = ("release", "paper")
# Entries of the [B, m, m] reciprocity and [B, m, m/2] expansion gathers per row block.
_GATHER_PER_BLOCK = 1 << 22
# Membership queries of the expansion per row block: small, so the search stays in cache.
_MEMBERSHIP_PER_BLOCK = 1 << 17
# Up to this many bools a block, membership is read from a table [rows, N + 1] of R(i, k1)
# (a read a query instead of a binary search); beyond, searched.
_MEMBERSHIP_TABLE = 1 << 24
# Bytes of the gathered rows per chunk of the dot products: small chunks stay in cache.
_BYTES_PER_DOT_CHUNK = 1 << 24


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
    # length, so no finite row overflows): one reduction instead of a pass of isfinite over
    # every entry.
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


def _reciprocal(rank: np.ndarray, full_len: int, half_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(bool [N, full_len], bool [N, half_len]): rank[i, p] is a k-reciprocal neighbour of i
    for the list length m = full_len, resp. half_len (i in rank[rank[i, p], :m]); half_len <=
    full_len. One gather rank[rank[i, :full_len], :full_len] per block of rows serves both
    lengths; blocks run on the torch threads' cores (numpy releases the GIL in them)."""
    n = rank.shape[0]
    full = np.empty((n, full_len), dtype=bool)
    half = np.empty((n, half_len), dtype=bool)
    head = rank[:, :full_len]

    def block(rows: tuple[int, int]) -> None:
        r0, r1 = rows
        hit = head[head[r0:r1]] == np.arange(r0, r1)[:, None, None]  # [B, m, m]
        full[r0:r1] = hit.any(axis=2)
        half[r0:r1] = hit[:, :half_len, :half_len].any(axis=2)

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        list(pool.map(block, _row_blocks(n, full_len * full_len, _GATHER_PER_BLOCK // _workers())))
    return full, half


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
    if (r1 - r0) * (n + 1) <= _MEMBERSHIP_TABLE:  # a table [B, N + 1] of R(i, k1): one read per query
        table = np.zeros((r1 - r0, n + 1), bool)  # row b: R(r0 + b, k1) (and the sentinel, never read)
        table[np.arange(r1 - r0)[:, None], own] = True
        inside = table.ravel()[half_keys - r0 * stride] & half_ok  # half_keys - r0·stride = b·(N + 1) + j
    else:
        pos = np.minimum(np.searchsorted(own_keys, half_keys.ravel()), own_keys.size - 1)
        inside = (own_keys[pos] == half_keys.ravel()).reshape(half_keys.shape) & half_ok
    # |R(c, kh) ∩ R(i, k1)| > 2/3·|R(c, kh)|, in integers
    accept = recip_full[r0:r1] & (3 * inside.sum(axis=2) > 2 * half_ok.sum(axis=2))
    return _sorted_distinct(np.concatenate([
        own_keys[own_keys % stride != sentinel],
        half_keys[accept[:, :, None] & half_ok],
    ]))


def _sorted_distinct(keys: np.ndarray) -> np.ndarray:
    """``np.unique(keys)`` for 1-D int64 keys by a sort and a mask of the first of equal
    neighbours (numpy's vectorised sort; np.unique hashes first, several times slower here)."""
    keys = np.sort(keys)
    first = np.empty(len(keys), bool)
    first[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    return keys[first]


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


def _expanded(lqe_matrix: sparse.csr_array, v: sparse.csr_array) -> sparse.csr_array:
    """Step 5, V ← Q @ V, float32 CSR [N, N] with sorted indices: Q's row blocks multiplied
    on the pool's threads (scipy's product releases the GIL), each row summed as in one
    product of the whole."""
    n = lqe_matrix.shape[0]
    parts = min(_workers(), max(1, n // 1024))
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)

    def block(b: int) -> sparse.csr_array:
        out = sparse.csr_array(lqe_matrix[bounds[b] : bounds[b + 1]] @ v)
        out.sort_indices()
        return out

    with ThreadPoolExecutor(max_workers=parts) as pool:
        blocks = list(pool.map(block, range(parts)))
    if parts == 1:
        return blocks[0]
    return sparse.csr_array(sparse.vstack(blocks, format="csr"))


def _softmax_weights(cos: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int) -> sparse.csr_array:
    """V [N, N] float32 CSR: softmax over each row's pairs of −(2 − 2·cos).

    cos: float64 [P] cosines of the pairs (rows[p], cols[p]), sorted by row.
    """
    weights = np.exp(2.0 * cos - 2.0)
    weights /= np.bincount(rows, weights=weights, minlength=n)[rows]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    return sparse.csr_array((weights.astype(np.float32), cols, indptr), shape=(n, n))
