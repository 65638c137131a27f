"""k nearest neighbours: exact (blocked, so that no N×N matrix exists) or approximate (an
inverted file written in torch, for large N).

Three similarities (``metric``): ``"cosine"`` (rows L2-normalised first, so similarity =
inner product in [-1, 1]; the default), ``"ip"`` (the inner product of the rows as given)
and ``"l2"`` (minus the squared Euclidean distance of the rows as given). Results are
sorted by similarity descending; equal similarities are ordered by the lower global index
first (for the exact method also at the k-th place: the k kept neighbours are the k first
in that order).

Several candidate groups (:func:`knn_per_group`, e.g. one per modality) are searched with
one matrix product per block of query rows against all of their candidates, the top-k of
each group taken on its own columns of that product.

Approximate method (``method="approximate"``): an inverted file over the candidate rows,
``nlist = max(IVF_LISTS_PER_SQRT · sqrt(M), M / IVF_LIST_ROWS)`` lists (M candidates; at least
1, at most M / 39),
their centroids from spherical k-means (``_IVF_ITERATIONS`` rounds on at most
``_IVF_TRAIN_PER_LIST`` points per list drawn with a fixed seed, scoring in
:func:`centroid_dtype`); each query searches its ``nprobe`` nearest lists (default
IVF_NPROBE), and each list is searched for all the queries probing it with one matrix product, on the
features' device (CPU or CUDA), ``IVF_QUERY_CHUNK`` queries at a time.
faiss's ``IndexIVFFlat`` was slower than the exact product at d = 2048 on a 2-core CPU.
Similarities of the neighbours it returns are exact inner products; only the neighbour set
can miss true neighbours (recall measured by benchmarks/jaccard.py, docs/benchmarks.md,
"Clustering at scale"). Rows for which the probed lists hold fewer than k candidates are
searched exactly. Candidate sets smaller than ``IVF_MIN_CANDIDATES`` are searched exactly
(an index would not be faster).
"""

from __future__ import annotations

import numpy as np
import torch

_BACKENDS = ("torch", "faiss")
METHODS = ("exact", "approximate")
METRICS = ("cosine", "ip", "l2")
KNN_CHOICES = ("exact", "approximate", "auto")
# IVF parameters of the approximate method (see the module docstring).
IVF_LISTS_PER_SQRT = 4
IVF_NPROBE = 32
# Past (4 · 96)² = 147,456 candidates the lists stop growing at about 96 rows each: a list of
# more rows mixes more identities, and its centroid says less about any of them. At N = 1,000,000
# 4·sqrt(M) lists (200 rows) gave ARI 0.795, lists of 96 rows 0.887 in less time; up to there
# (N = 200,000 and below) nothing changes (docs/benchmarks.md, "Clustering at scale").
IVF_LIST_ROWS = 96
IVF_MIN_CANDIDATES = 2048
_IVF_TRAIN_PER_LIST = 16
_IVF_ITERATIONS = 6
_IVF_SEED = 0
# Queries searched at a time by the approximate method (bounds its per-list results).
IVF_QUERY_CHUNK = 32768
# Rows whose norm is this close to 1 count as unit rows (float32 rounding of a normalised row
# is about 1e-7).
UNIT_TOLERANCE = 1e-5
# Candidates per column block are this many times the query block: the block of
# similarities is block_size × (_COLUMN_FACTOR · block_size) float32 (128 MiB at 2048).
_COLUMN_FACTOR = 8


def as_unit_tensor(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``features`` [N, d] as a float32 torch tensor with L2-normalised rows (same device).

    A zero row stays zero (similarity 0 to everything). Float32 features whose rows are
    already unit length (within UNIT_TOLERANCE, as bmil's extraction returns them) are
    returned as they are, sharing memory with ``features`` (read only): at N = 200,000 ×
    2048 the normalised copy would be 1.5 GiB.
    """
    x = as_float_tensor(features)
    if x.shape[0] and _rows_are_unit(x):
        return x
    return torch.nn.functional.normalize(x, dim=1)


def _rows_are_unit(x: torch.Tensor) -> bool:
    """Whether every row of ``x`` [N, d] has L2 norm within UNIT_TOLERANCE of 1."""
    for r0 in range(0, x.shape[0], 8192):
        norms = torch.linalg.vector_norm(x[r0 : r0 + 8192], dim=1)
        if not bool(((norms - 1).abs() <= UNIT_TOLERANCE).all()):
            return False
    return True


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """float32 [N]: the L2 norm of each row of ``x`` [N, d] (same device), a block at a time."""
    if x.shape[0] == 0:
        return x.new_zeros(0)
    return torch.cat([torch.linalg.vector_norm(x[r0 : r0 + 8192], dim=1) for r0 in range(0, x.shape[0], 8192)])


def _index_array(values: np.ndarray | torch.Tensor | None, n: int, name: str) -> np.ndarray:
    """Sorted unique int64 indices in 0..n-1 (all of them when ``values`` is None)."""
    if values is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D integer index array.")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{name} must hold indices in 0..{n - 1}.")
    uniq = np.unique(arr)
    if uniq.size != arr.size:
        raise ValueError(f"{name} must not contain repeated indices.")
    return uniq


def _order_ties(sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by similarity descending, then index ascending."""
    order = np.lexsort((idx, -sims), axis=-1)
    return np.take_along_axis(sims, order, -1), np.take_along_axis(idx, order, -1)


def _topk_flag_cut(
    sims: torch.Tensor, k: int, ties: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-min(k, width) of each row; sets ``ties`` where the k-th and (k+1)-th are equal."""
    kk = min(k + 1, sims.shape[1])
    s, i = torch.topk(sims, kk, dim=1, largest=True, sorted=True)
    if kk == k + 1:
        ties |= s[:, k - 1] == s[:, k]
        s, i = s[:, :k], i[:, :k]
    return s, i


def _scores(q: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[B, C] ranking scores of the queries ``q`` [B, d] against the candidates ``c`` [C, d]:
    the inner products, or with ``bias`` [C] (−|c|², the "l2" metric) 2·q·c − |c|², which
    orders a query's candidates as minus their squared distance to it does."""
    if bias is None:
        return q @ c.T
    return torch.addmm(bias, q, c.T, alpha=2.0)


def _topk_torch(
    queries: torch.Tensor,
    cands: torch.Tensor,
    segments: list[tuple[int, int, int]],
    block_size: int,
    bias: torch.Tensor | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Running top-k over column blocks for every query row, for each segment of the candidates.

    segments: (start, stop, k) of each group of candidate columns ``cands[start:stop]``
    (disjoint; k <= stop − start). Each block of query rows is multiplied once by each
    column block of ``cands`` (all segments together); each segment's top-k is taken on
    its own columns of that product. bias: [M] or None (:func:`_scores`).

    Returns, per segment, (scores [Q, k], positions [Q, k] into ``cands``, tie_rows bool
    [Q]); tie_rows marks rows where a block's k-th and (k+1)-th scores were equal, so
    torch.topk may have picked an arbitrary member of a tie group that straddles the cut.
    """
    nq, m = queries.shape[0], cands.shape[0]
    col_block = max(block_size * _COLUMN_FACTOR, max(k for _, _, k in segments) + 1)
    out = [(np.empty((nq, k), np.float32), np.empty((nq, k), np.int64), np.zeros(nq, bool)) for _, _, k in segments]
    for q0 in range(0, nq, block_size):
        q = queries[q0 : q0 + block_size]
        ties = [torch.zeros(len(q), dtype=torch.bool, device=q.device) for _ in segments]
        best: list = [None] * len(segments)
        for c0 in range(0, m, col_block):
            c1 = min(c0 + col_block, m)
            sims = _scores(q, cands[c0:c1], None if bias is None else bias[c0:c1])
            for g, (a, b, k) in enumerate(segments):
                lo, hi = max(a, c0), min(b, c1)
                if lo >= hi:
                    continue
                part = sims if (lo, hi) == (c0, c1) else sims[:, lo - c0 : hi - c0]
                s, i = _topk_flag_cut(part, k, ties[g])
                i = i + lo
                if best[g] is not None:
                    s, pos = _topk_flag_cut(torch.cat([best[g][0], s], 1), k, ties[g])
                    i = torch.gather(torch.cat([best[g][1], i], 1), 1, pos)
                best[g] = (s, i)
        for g in range(len(segments)):
            out[g][0][q0 : q0 + len(q)] = best[g][0].cpu().numpy()
            out[g][1][q0 : q0 + len(q)] = best[g][1].cpu().numpy()
            out[g][2][q0 : q0 + len(q)] = ties[g].cpu().numpy()
    return out


def _exact_rows(
    queries: torch.Tensor, cands: torch.Tensor, k: int, bias: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Full stable sort for a few rows: the exact (score desc, position asc) top-k."""
    s, i = torch.sort(_scores(queries, cands, bias), dim=1, descending=True, stable=True)
    return s[:, :k].cpu().numpy(), i[:, :k].cpu().numpy()


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    """float32 [N]: |x_i|² of each row, a block at a time."""
    return torch.cat([(x[r0 : r0 + 8192] ** 2).sum(1) for r0 in range(0, x.shape[0], 8192)])


def _knn_torch_groups(
    x: torch.Tensor, q_rows: np.ndarray, groups: list[tuple[np.ndarray, int]], block_size: int, metric: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact top-k of the ``q_rows`` in each group (candidate rows [M_g], k_g): one product
    per block of queries against all groups' candidates (:func:`_topk_torch`), which are
    ``x`` itself when they are all its rows in order (no copy), else one gathered copy."""
    dev = x.device
    union = np.concatenate([rows for rows, _ in groups])
    in_order = len(union) == x.shape[0] and bool(np.array_equal(union, np.arange(x.shape[0])))
    cands = x if in_order else x[torch.from_numpy(union).to(dev)]
    queries = x if len(q_rows) == x.shape[0] else x[torch.from_numpy(q_rows).to(dev)]
    bias = -_squared_norms(cands) if metric == "l2" else None
    ends = np.cumsum([len(rows) for rows, _ in groups])
    segments = [(int(e - len(rows)), int(e), k) for e, (rows, k) in zip(ends, groups, strict=True)]
    found = _topk_torch(queries, cands, segments, block_size, bias)
    results = []
    for (a, b, k), (sims, pos, tie_rows) in zip(segments, found, strict=True):
        # A tie group cut at the k-th place may have kept the wrong members (torch.topk picks
        # arbitrarily among equals): redo those rare rows with a stable full sort.
        redo = np.flatnonzero(tie_rows)
        for r0 in range(0, len(redo), block_size):
            rows = redo[r0 : r0 + block_size]
            s, p = _exact_rows(queries[torch.from_numpy(rows).to(dev)], cands[a:b], k,
                               None if bias is None else bias[a:b])
            sims[rows], pos[rows] = s, p + a
        if metric == "l2":
            sims = sims - _squared_norms(queries).cpu().numpy()[:, None]
        results.append(_order_ties(sims, union[pos]))
    return results


def _knn_torch(
    x: torch.Tensor, q_rows: np.ndarray, c_rows: np.ndarray, k: int, block_size: int, metric: str = "ip"
) -> tuple[np.ndarray, np.ndarray]:
    return _knn_torch_groups(x, q_rows, [(c_rows, k)], block_size, metric)[0]


def _knn_faiss(
    x: torch.Tensor, q_rows: np.ndarray, c_rows: np.ndarray, k: int, metric: str = "ip"
) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    feats = x.cpu().numpy()
    index = (faiss.IndexFlatL2 if metric == "l2" else faiss.IndexFlatIP)(feats.shape[1])
    index.add(np.ascontiguousarray(feats[c_rows]))
    sims, pos = index.search(np.ascontiguousarray(feats[q_rows]), k)
    if metric == "l2":
        sims = -sims  # faiss returns squared distances
    return _order_ties(sims.astype(np.float32), c_rows[pos])


def ivf_lists(m: int) -> int:
    """Number of inverted lists of the approximate index over ``m`` candidates:
    IVF_LISTS_PER_SQRT·sqrt(m), or m / IVF_LIST_ROWS when that is more; at least 1 and at
    most m // 39 (k-means needs points per list)."""
    return int(max(1, min(max(IVF_LISTS_PER_SQRT * np.sqrt(m), m / IVF_LIST_ROWS), m // 39)))


def ivf_probes(nlist: int, nprobe: int | None = None) -> int:
    """Lists a query searches in an index of ``nlist`` lists: ``nprobe`` (None: IVF_NPROBE),
    at most nlist."""
    return int(min(nlist, IVF_NPROBE if nprobe is None else nprobe))


def _candidate_mean(x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Mean [d] of the rows ``x[rows]``, gathered a block at a time."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for r0 in range(0, len(rows), 8192):
        total += x[torch.from_numpy(rows[r0 : r0 + 8192]).to(x.device)].sum(0, dtype=torch.float64)
    return (total / max(len(rows), 1)).to(x.dtype)


def centroid_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the index's row × centroid products (k-means, assignment, probing):
    bfloat16 on CUDA and on CPUs that multiply it natively (AVX-512 BF16 or AMX; 5× float32
    on a 2-core AVX-512 EPYC), float32 elsewhere (emulated bfloat16 products ran 3.7× slower
    than float32 with AVX2 kernels). Only the lists searched depend on it, not the
    similarities returned."""
    if device.type == "cuda":
        return torch.bfloat16
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: absent means no
    native = any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return torch.bfloat16 if native and avx512 else torch.float32


def _kmeans_centroids(x: torch.Tensor, rows: np.ndarray, nlist: int, center: torch.Tensor) -> torch.Tensor:
    """Spherical k-means centroids [nlist, d] (unit rows) of the candidates ``x[rows]``
    (M rows) less their mean ``center`` [d], on at most _IVF_TRAIN_PER_LIST points per list
    drawn with a fixed seed; scoring in :func:`centroid_dtype`. Only the drawn rows are copied.

    Centring matters: features share a common direction (a modality's offset), and
    uncentred k-means puts most rows in a few lists (at 1M infrared rows the largest held
    31,403 against a median of 43), so a query scans ten times the intended candidates."""
    gen = torch.Generator().manual_seed(_IVF_SEED)
    m = len(rows)
    drawn = torch.randperm(m, generator=gen)[: min(m, _IVF_TRAIN_PER_LIST * nlist)].numpy()
    sample = torch.nn.functional.normalize(x[torch.from_numpy(rows[drawn]).to(x.device)] - center, dim=1)
    centroids = sample[torch.randperm(len(sample), generator=gen)[:nlist].to(x.device)].clone()
    for _ in range(_IVF_ITERATIONS):
        assign = _nearest_centroid(sample, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, sample)
        empty = torch.linalg.vector_norm(sums, dim=1) == 0
        sums[empty] = centroids[empty]  # an empty list keeps its centroid
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


def _nearest_centroid(
    x: torch.Tensor,
    centroids: torch.Tensor,
    nprobe: int = 1,
    rows: np.ndarray | None = None,
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the ``nprobe`` centroids with the largest inner product with each row of
    ``x`` less ``center`` (of the rows ``x[rows]`` when given, gathered a block at a time;
    products in :func:`centroid_dtype`, blocked): int64 [R] for nprobe = 1, else [R, nprobe]. A row's
    order over centroids is that of its centred, normalised row: (x − μ)·c = x·c − μ·c."""
    dtype = centroid_dtype(x.device)
    c = centroids.to(dtype)
    offset = None if center is None else (centroids @ center)[None, :]
    out = []
    count = x.shape[0] if rows is None else len(rows)
    for r0 in range(0, count, 8192):
        block = slice(r0, r0 + 8192) if rows is None else torch.from_numpy(rows[r0 : r0 + 8192]).to(x.device)
        sims = (x[block].to(dtype) @ c.T).float()
        if offset is not None:
            sims -= offset
        out.append(torch.topk(sims, nprobe, dim=1).indices)
    idx = torch.cat(out)
    return idx[:, 0] if nprobe == 1 else idx


def _search_lists(
    queries: torch.Tensor, probe: np.ndarray, sorted_cands: torch.Tensor, list_ptr: np.ndarray, k: int,
    sorted_bias: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of each query [Q, d] within each of its probed lists (``probe`` [Q, nprobe]):
    (scores [Q, nprobe·k] float32 (:func:`_scores`, with ``sorted_bias`` [M] when given),
    positions into ``sorted_cands`` [Q, nprobe·k] int32; −inf and −1 where a list holds
    fewer than k rows).

    Lists are searched one at a time: the queries probing a list are gathered into one
    reused buffer and multiplied by its members in one product (BLAS-efficient, unlike
    scanning per query). Reusing the buffers matters: a fresh tensor of tens of MiB per list
    costs page faults that made the gather 20× slower than the copy itself."""
    dev = queries.device
    nq, nprobe = probe.shape
    flat = probe.ravel()  # pair q·nprobe + slot probes list flat[pair]
    order = np.argsort(flat, kind="stable")  # pairs grouped by list
    bounds = np.searchsorted(flat[order], np.arange(len(list_ptr)))
    # Results in the grouped order (one contiguous slice per list), put back in pair order at the end.
    found_s = np.full((nq * nprobe, k), -np.inf, np.float32)
    found_p = np.full((nq * nprobe, k), -1, np.int32)
    counts, sizes = np.diff(bounds), np.diff(list_ptr)
    searched = np.flatnonzero((counts > 0) & (sizes > 0))
    if len(searched):
        q_buf = torch.empty((int(counts[searched].max()), queries.shape[1]), dtype=queries.dtype, device=dev)
        s_buf = torch.empty(int((counts[searched] * sizes[searched]).max()), dtype=queries.dtype, device=dev)
    for lst in searched:
        a, b = list_ptr[lst], list_ptr[lst + 1]
        p0, p1 = bounds[lst], bounds[lst + 1]
        qs = torch.from_numpy(order[p0:p1] // nprobe).to(dev)
        q = torch.index_select(queries, 0, qs, out=q_buf[: p1 - p0])
        s = torch.mm(q, sorted_cands[a:b].T, out=s_buf[: (p1 - p0) * (b - a)].view(p1 - p0, b - a))
        if sorted_bias is not None:
            s.mul_(2.0).add_(sorted_bias[a:b])
        kk = min(k, b - a)
        sims, pos = torch.topk(s, kk, dim=1)
        found_s[p0:p1, :kk] = sims.cpu().numpy()
        found_p[p0:p1, :kk] = pos.cpu().numpy() + a
    best_s = np.empty_like(found_s)
    best_p = np.empty_like(found_p)
    best_s[order], best_p[order] = found_s, found_p
    return best_s.reshape(nq, nprobe * k), best_p.reshape(nq, nprobe * k)


def _knn_ivf(
    x: torch.Tensor, q_rows: np.ndarray, c_rows: np.ndarray, k: int, nprobe: int | None, block_size: int,
    metric: str = "ip",
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k of the ``q_rows`` among the ``c_rows``: an inverted file over the
    candidates (k-means lists), each query searching its ``nprobe`` nearest lists (None:
    IVF_NPROBE)
    (:func:`_search_lists`), IVF_QUERY_CHUNK queries at a time so that the per-list
    results ([chunk, nprobe·k], 8 bytes per entry) stay bounded. Similarities are exact
    float32 inner products (``metric="ip"``) or minus squared distances (``"l2"``; the lists
    probed are still those of the largest inner product with the centred query).
    """
    dev = x.device
    nlist = ivf_lists(len(c_rows))
    nprobe = ivf_probes(nlist, nprobe)
    # The index holds one copy of the candidate rows, grouped by list (sorted_cands); the
    # k-means sample and the list assignment gather from x a block at a time.
    center = _candidate_mean(x, c_rows)
    centroids = _kmeans_centroids(x, c_rows, nlist, center)
    assign = _nearest_centroid(x, centroids, rows=c_rows, center=center).cpu().numpy()
    members = np.argsort(assign, kind="stable")  # positions into c_rows, grouped by list
    list_ptr = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=nlist))])
    sorted_cands = x[torch.from_numpy(c_rows[members]).to(dev)]
    sorted_bias = -_squared_norms(sorted_cands) if metric == "l2" else None
    out_s = np.empty((len(q_rows), k), np.float32)
    out_i = np.empty((len(q_rows), k), np.int64)
    for q0 in range(0, len(q_rows), IVF_QUERY_CHUNK):
        rows = q_rows[q0 : q0 + IVF_QUERY_CHUNK]
        queries = x[torch.from_numpy(rows).to(dev)]
        probe = _nearest_centroid(queries, centroids, nprobe, center=center).cpu().numpy().reshape(len(rows), nprobe)
        best_s, best_p = _search_lists(queries, probe, sorted_cands, list_ptr, k, sorted_bias)
        if metric == "l2":
            best_s -= _squared_norms(queries).cpu().numpy()[:, None]
        top = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
        out_s[q0 : q0 + len(rows)] = np.take_along_axis(best_s, top, 1)
        found = np.take_along_axis(best_p, top, 1)
        out_i[q0 : q0 + len(rows)] = np.where(found >= 0, members[np.maximum(found, 0)], -1)
    short = np.flatnonzero((out_i < 0).any(axis=1))
    if len(short):  # fewer than k candidates in the probed lists: search those rows exactly
        s_exact, p_exact = _knn_torch(x, q_rows[short], c_rows, k, block_size, metric)
        out_s[short] = s_exact
        out_i[short] = np.searchsorted(c_rows, p_exact)
    return _order_ties(out_s, c_rows[out_i])


def resolve_knn(choice: str, n: int, approximate_above: int) -> str:
    """The kNN method for a clustering of ``n`` samples: ``choice`` ("exact", "approximate"
    or "auto"; auto = "approximate" when n > ``approximate_above``, else "exact")."""
    if choice not in KNN_CHOICES:
        raise ValueError(f"knn must be one of {KNN_CHOICES}, got {choice!r}.")
    if choice == "auto":
        return "approximate" if n > approximate_above else "exact"
    return choice


def knn(
    features: np.ndarray | torch.Tensor,
    k: int,
    *,
    candidates: np.ndarray | torch.Tensor | None = None,
    queries: np.ndarray | torch.Tensor | None = None,
    backend: str = "torch",
    block_size: int = 2048,
    method: str = "exact",
    nprobe: int | None = None,
    metric: str = "cosine",
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours by ``metric`` (exact unless ``method="approximate"``).

    features: float array or tensor [N, d] (CPU or CUDA; on CUDA the products run there).
        With ``metric="cosine"`` rows are L2-normalised here, so they need not be unit length.
    k: neighbours per query, 1 <= k <= number of candidates.
    candidates: optional int indices [M] of the rows to search among (e.g. one modality);
        default all N rows.
    queries: optional unique int indices [Q] of the query rows, default all N rows; the
        results' rows come in ascending index order, whatever the order given.
    backend: "torch" (blocked matrix products, running top-k; memory per block
        block_size × 8·block_size float32) or "faiss" (IndexFlatIP / IndexFlatL2, CPU; equal
        similarities may be cut differently at the k-th place).
    block_size: query rows per block.
    method: "exact" or "approximate" (the inverted file; see the module docstring).
    nprobe: inverted lists searched per query by the approximate method (None: IVF_NPROBE).
    metric: "cosine" (default), "ip" (inner product of the rows as given) or "l2" (nearest
        by Euclidean distance of the rows as given); see the module docstring.

    Returns (sims [Q, k] float32, idx [Q, k] int64): similarities descending (cosines, inner
    products, or minus squared distances for "l2"), equal ones by lower index first; idx in
    the global 0..N-1 numbering. A query that is also a candidate finds itself (normally
    first; with "ip" only when no candidate has a larger inner product with it than its
    own squared norm).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
    x = as_unit_tensor(features) if metric == "cosine" else as_float_tensor(features)
    return knn_unit_rows(
        x, k, candidates=candidates, queries=queries, backend=backend,
        block_size=block_size, method=method, nprobe=nprobe, metric="l2" if metric == "l2" else "ip",
    )


def as_float_tensor(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``features`` [N, d] as a float32 torch tensor, rows as given (same device; no copy
    when they are float32 already)."""
    x = features.detach() if isinstance(features, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(features))
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array [N, d], got shape {tuple(x.shape)}.")
    return x.to(torch.float32)


def _check_search(backend: str, method: str, block_size: int, nprobe, metric: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
    if method not in METHODS:
        raise ValueError(f"knn method must be one of {METHODS}, got {method!r}.")
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}.")
    if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe < 1):
        raise ValueError(f"nprobe must be a positive integer, got {nprobe!r}.")
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2' here, got {metric!r}.")


def knn_unit_rows(
    x: torch.Tensor,
    k: int,
    *,
    candidates: np.ndarray | torch.Tensor | None = None,
    queries: np.ndarray | torch.Tensor | None = None,
    backend: str = "torch",
    block_size: int = 2048,
    method: str = "exact",
    nprobe: int | None = None,
    metric: str = "ip",
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn` on a float32 tensor ``x`` [N, d] taken as it is: with ``metric="ip"``
    (the default) on rows that are already unit length (as :func:`as_unit_tensor` returns)
    this is the cosine search without the copy that normalising makes; ``"l2"``: nearest
    by Euclidean distance."""
    return knn_per_group(
        x, [candidates], [k], queries=queries, backend=backend, block_size=block_size, method=method,
        nprobe=nprobe, metric=metric,
    )[0]


def knn_per_group(
    x: torch.Tensor,
    groups: list,
    ks: list[int],
    *,
    queries: np.ndarray | torch.Tensor | None = None,
    backend: str = "torch",
    block_size: int = 2048,
    method: str = "exact",
    nprobe: int | None = None,
    metric: str = "ip",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``ks[g]`` nearest of each query among each group of candidates ``groups[g]``
    (int indices [M_g], disjoint; None = all rows), as :func:`knn_unit_rows` would find them
    group by group: the same neighbours, the same order, ties included.

    The exact torch search multiplies each block of query rows once by all groups'
    candidates and takes each group's top-k on its own columns of the product (for the
    modality-aware distance, one search over all rows instead of one per modality, and no
    copy of the rows when the groups are all rows in order, e.g. visible then infrared).
    The faiss backend and the approximate method search group by group.

    Returns [(sims [Q, k_g] float32, idx [Q, k_g] int64)] per group (see :func:`knn`).
    """
    _check_search(backend, method, block_size, nprobe, metric)
    if len(groups) != len(ks) or not groups:
        raise ValueError("groups and ks must be non-empty and of the same length.")
    n = x.shape[0]
    rows = [_index_array(g, n, "candidates") for g in groups]
    for c_rows, k in zip(rows, ks, strict=True):
        if not 1 <= k <= len(c_rows):
            raise ValueError(f"k must be between 1 and the number of candidates ({len(c_rows)}), got {k}.")
    if len(rows) > 1 and len(np.unique(np.concatenate(rows))) != sum(len(r) for r in rows):
        raise ValueError("candidate groups must not share rows.")
    q_rows = _index_array(queries, n, "queries")
    if len(q_rows) == 0:
        return [(np.empty((0, k), np.float32), np.empty((0, k), np.int64)) for k in ks]
    with torch.no_grad():
        out = [None] * len(rows)
        fused = []
        for g, (c_rows, k) in enumerate(zip(rows, ks, strict=True)):
            if method == "approximate" and len(c_rows) >= IVF_MIN_CANDIDATES:
                out[g] = _knn_ivf(x, q_rows, c_rows, k, nprobe, block_size, metric)
            elif backend == "faiss":
                out[g] = _knn_faiss(x, q_rows, c_rows, k, metric)
            else:
                fused.append(g)
        if fused:
            found = _knn_torch_groups(x, q_rows, [(rows[g], ks[g]) for g in fused], block_size, metric)
            for g, result in zip(fused, found, strict=True):
                out[g] = result
    return out
