"""The sparse min-overlap join of the Jaccard distance (step 6): s(i, j) = Σ_k min(V[i,k],
V[j,k]) for the pairs of rows of V sharing support, d = 1 − s/(2 − s), assembled into the
symmetric CSR result.

Three joins, one arithmetic (:func:`_overlap_distance`): the banded column join of the full
result (:func:`_min_overlap_distance`), the dense join when nearly every pair shares support
(:func:`_dense_min_overlap_distance`) and the thresholded join that skips pairs a bound proves
farther than ``max_distance`` (:func:`_thresholded_distance`).
"""

from __future__ import annotations

import functools
import logging
import mmap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.csgraph import reverse_cuthill_mckee

from bmil.cluster.jaccard import kernels

log = logging.getLogger(__name__)

# Work per row block of the join: (row, shared column, partner) triples and dense
# accumulator bins [rows in block, N]; both bound the block's temporary memory. 2^20 bins
# (8 MB of float64) were the fastest of 2^17 to 2^22 at N = 20,000 (fewer, larger blocks:
# less per-block overhead and less waiting between the pool's threads).
_TRIPLES_PER_BLOCK = 1 << 21
_BINS_PER_BLOCK = 1 << 20
# A block of widely spread partners still sums in dense bins when it has at most this many
# bins per triple: zeroing and scanning a bin costs far less than sorting a triple's key.
_BINS_PER_TRIPLE = 16
# The full result is summed densely (_dense_min_overlap_distance) when V's triples, both
# directions, are at least N²/_DENSE_SHARE: the dense join computes every pair twice but
# skips the banded join's mirror and sort, and stores 8 bytes a pair against the banded
# assembly's 26; its N² bins cost about 1 ns each, so far below that share of triples the
# banded join is faster. Its blocks hold up to _DENSE_BINS_PER_BLOCK bins (8 MB of float64,
# about the size of a core's share of the cache).
_DENSE_SHARE = 50
_DENSE_BINS_PER_BLOCK = 1 << 20
_JOIN_WORKERS = 4  # at most this many row blocks of a join in flight at once
# Thresholded join: suffix mass limit as a share of s_min (0.85: on weakly and well
# separated features about 3× fewer triples than the full join, about 1.3 candidate pairs
# per passing pair), and a slack for float rounding in the pruning bound.
_SUFFIX_SHARE = 0.85
_BOUND_SLACK = 1e-6
# The exact suffix–suffix overlaps of a row block look their entries up in a dense float32
# table [rows, N] of at most this many entries (4 MiB), otherwise by binary search.
_LOOKUP_PER_BLOCK = 1 << 20


def _workers() -> int:
    """Row blocks in flight at once in the thread pools: the torch threads, at most _JOIN_WORKERS."""
    return max(1, min(torch.get_num_threads(), _JOIN_WORKERS))


def _band_order(v: sparse.csr_array) -> np.ndarray:
    """A row order (reverse Cuthill–McKee of V's symmetrised pattern) that puts rows that
    share support next to each other, so a block of rows meets a narrow band of partners."""
    n = v.shape[0]
    pattern = sparse.csr_matrix((np.ones(v.nnz, np.int8), v.indices, v.indptr), shape=(n, n))
    return reverse_cuthill_mckee((pattern + pattern.T).tocsr(), symmetric_mode=True).astype(np.int64)


def _join_order(v: sparse.csr_array) -> tuple[sparse.csr_array, np.ndarray]:
    """(V with its rows in the order the banded joins take them, with sorted indices; that
    order, row i being sample order[i]). The numpy join needs the band order
    (:func:`_band_order`) to keep its blocks' dense bins narrow; the compiled kernels sum each
    row in one accumulator over all N columns, so V keeps the samples' order. The result is
    the same either way: a pair's sum runs over its shared columns in column order, whichever
    of its two rows comes first."""
    if kernels.AVAILABLE:
        v.sort_indices()
        return v, np.arange(v.shape[0], dtype=np.int64)
    order = _band_order(v)
    return _rows_in_order(v, order), order


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

    v: V with its rows in the join's order (:func:`_join_order`), row i being sample
    ``order[i]``; each row meets only the partners after it in that
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
    blocks = _join_blocks(join.triples_by_row(entry_rows), None if kernels.AVAILABLE else join.reach(entry_rows))
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
    partner (in dense bins [rows, N], or row by row in the compiled kernel's accumulator), in
    V's column order as there, so both (i, j) and (j, i)
    are computed, from the same terms in the same order: the result is exactly symmetric
    and equal to the banded join's, bit for bit. Computing each pair twice costs less than
    the banded join's mirror and sort once half of all pairs are stored; the blocks' pairs
    come out sorted by row and column and each block's thread copies them straight into the
    result's arrays (:class:`_InOrderWriter`), mapped at a bound (a row's pairs are at most
    its triples and N) whose unwritten pages take no memory (:func:`_fresh_pages`). Peak:
    the result, 8 bytes per stored pair, plus V twice and the blocks in flight.
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
    indices, data = _fresh_pages(bound, out_dtype), _fresh_pages(bound, np.float32)
    indptr = np.zeros(n + 1, out_dtype)
    writer = _InOrderWriter(indptr, indices, data)
    write_block = functools.partial(_dense_block_written, join, out_dtype, writer)
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        list(pool.map(write_block, *zip(*enumerate(_dense_blocks(triples)), strict=True)))
    stored = writer.stored
    np.cumsum(indptr, out=indptr)
    return sparse.csr_array((data[:stored], indices[:stored], indptr), shape=(n, n))


def _fresh_pages(count: int, dtype: type) -> np.ndarray:
    """An uninitialised array [count] of ``dtype`` on its own anonymous memory map, without
    numpy's transparent-huge-page advice: a page takes memory only once written, so the
    unwritten tail of a bound-sized array costs nothing. No huge pages: faulting them in can
    stall on memory compaction once memory is fragmented (as after the kNN), which made
    writing a 1.5 GB result more than twice as slow on a 2-core VM with the common THP
    setting (``madvise``)."""
    nbytes = max(1, count * np.dtype(dtype).itemsize)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=count)


class _InOrderWriter:
    """Writes the row blocks' pairs into the result's arrays in block order, each block's
    copy done by the thread that computed it: block b takes its place (the pairs stored
    before it) as soon as block b − 1 has taken its own, then copies without a lock, so the
    copies, and the first touches of the result's pages, run on all the pool's threads."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray):
        self.indptr, self.indices, self.data = indptr, indices, data
        self.stored, self._next = 0, 0
        self._turn = threading.Condition()

    def write(self, b: int, block: tuple[int, int], counts: np.ndarray, cols: np.ndarray, dist: np.ndarray) -> None:
        """Store block number ``b`` (rows r0..r1): counts [r1 − r0], cols and dist [P]."""
        with self._turn:
            self._turn.wait_for(lambda: self._next == b)
            start = self.stored
            self.stored += len(cols)
            self._next += 1
            self._turn.notify_all()
        r0, r1 = block
        self.indptr[r0 + 1 : r1 + 1] = counts
        self.indices[start : start + len(cols)] = cols
        self.data[start : start + len(cols)] = dist


def _dense_block_written(
    join: _ColumnJoin, out_dtype: type, writer: _InOrderWriter, b: int, block: tuple[int, int]
) -> None:
    """:func:`_dense_block` of block number ``b``, stored by ``writer``."""
    writer.write(b, block, *_dense_block(join, out_dtype, block))


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
    if kernels.AVAILABLE:
        return join.dense_rows(r0, r1, out_dtype)
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
    # numpy and scipy release the GIL in most of this work: V's columns are built on the
    # pool while this thread splits the rows; the row blocks then run on the torch threads' cores
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        columns = pool.submit(_all_later_partners, v, dtype)
        suffix = _suffix_entries(v, entry_rows, _SUFFIX_SHARE * s_min)
        suffix_mass = np.bincount(entry_rows, weights=np.where(suffix, v.data, 0.0), minlength=n)
        tails = pool.submit(_SuffixRows, v, suffix, entry_rows)
        keep = ~suffix  # (copies: eliminate_zeros would compact v's own index arrays in place)
        pre_ptr = np.concatenate([[0], np.cumsum(np.bincount(entry_rows[keep], minlength=n))])
        pc = sparse.csr_array((v.data[keep], v.indices[keep], pre_ptr), shape=(n, n)).tocsc()
        pc.sort_indices()
        # prefix entries meet every later entry of their column; suffix entries only the prefix ones
        vc, position, first, fan = columns.result()
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
        passing = functools.partial(_passing_pairs, join, tails.result(), suffix_mass, s_min, max_distance)
        blocks = _join_blocks(join.triples_by_row(entry_rows), None if kernels.AVAILABLE else join.reach(entry_rows))
        pieces = list(pool.map(passing, blocks))
    del join, tails, first, fan, passing
    log.debug("thresholded Jaccard (t = %.3g): %.1f pairs per row kept", max_distance,
              sum(len(p[0]) for p in pieces) / n)
    return _assemble(pieces, order, n)


def _all_later_partners(
    v: sparse.csr_array, dtype: type
) -> tuple[sparse.csc_array, np.ndarray, np.ndarray, np.ndarray]:
    """(V in CSC with sorted indices, each entry's CSC position, and the first position and
    number of the later rows j > i of its column (:func:`_later_in_column`)), of ``dtype``."""
    vc = v.tocsc()
    vc.sort_indices()
    position = _csc_positions(v, dtype)
    first, fan = _later_in_column(position, v.indices, None, vc.indptr)
    return vc, position, first, fan


def _passing_pairs(
    join: _ColumnJoin, tails: _SuffixRows, suffix_mass: np.ndarray, s_min: float, max_distance: float,
    block: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, distance) of the pairs of one row block (r0, r1, width) of the join with
    distance <= max_distance (see :func:`_thresholded_distance`)."""
    r0, r1, width = block
    # x + min(m_i, m_j) >= s_min needs x >= s_min − m_i: pairs short of that (loosened by a
    # second slack for the rounding of the rearranged sum; positive, so s > 0 as without it)
    # are dropped in the accumulator, most of the pairs sharing a triple
    least = np.maximum(s_min - 2 * _BOUND_SLACK - suffix_mass[r0:r1], np.finfo(np.float64).tiny)
    rows, cols, x = join.block(r0, r1, width, least)
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
    if kernels.AVAILABLE:
        out = np.empty(v.nnz, dtype=bool)
        kernels.suffix_flags(v.indptr.astype(np.int64, copy=False), v.indices, v.data, col_rank, limit, out)
        return out
    o, _ = _stable_argsort(entry_rows.astype(np.int64) * n + col_rank[v.indices], n * n)  # by row, then column order
    mass = v.data[o].astype(np.float64)
    from_end = np.cumsum(mass[::-1])[::-1]  # mass from each entry to the end of the array
    ends = v.indptr[1:]  # mass after each row's last entry: from_end there, 0 past the array's end
    inner = ends < v.nnz
    row_end = np.zeros(n)
    row_end[inner] = from_end[ends[inner]]
    tail = from_end - row_end[entry_rows]  # mass from each entry to the end of its row
    out = np.empty(v.nnz, dtype=bool)
    out[o] = tail < limit
    return out


class _SuffixRows:
    """The suffix entries of V (the join's row order), for the exact suffix–suffix overlap of a few pairs."""

    def __init__(self, v: sparse.csr_array, suffix: np.ndarray, entry_rows: np.ndarray):
        n = v.shape[0]
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(entry_rows[suffix], minlength=n))])
        self.cols = v.indices[suffix].astype(np.int64)  # sorted within each row
        self.data = v.data[suffix]

    def overlap(self, r0: int, r1: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """float64 [P]: Σ_k min over the shared suffix columns of each pair (rows[p], cols[p]),
        rows in [r0, r1). Compiled (``kernels.suffix_overlaps``, rows ascending as the join
        gives them): each row's suffix spread over a table [N]. Otherwise the block's suffix
        entries, keyed (row − r0)·N + column, are
        ascending (columns are sorted within each row); each partner's suffix entry is
        looked up among them: in a dense table [rows, U + 1] over the U distinct suffix
        columns of the block's rows (the last slot, 0, for any other column) when it has at
        most _LOOKUP_PER_BLOCK entries, otherwise by its key."""
        out = np.zeros(len(rows))
        e0, e1 = self.indptr[r0], self.indptr[r1]
        if len(rows) == 0 or e0 == e1:
            return out
        n = len(self.indptr) - 1
        if kernels.AVAILABLE:  # rows come ascending from the join
            kernels.suffix_overlaps(r0, r1, rows, cols, self.indptr, self.cols, self.data, np.zeros(n, np.float32), out)
            return out
        local = np.repeat(np.arange(r1 - r0, dtype=np.int64), np.diff(self.indptr[r0 : r1 + 1]))
        count = self.indptr[cols + 1] - self.indptr[cols]
        total = int(count.sum())
        start = np.cumsum(count) - count
        pos = np.repeat(self.indptr[cols] - start, count) + np.arange(total, dtype=np.int64)
        present, slot_of = np.unique(self.cols[e0:e1], return_inverse=True)
        width = len(present) + 1
        if (r1 - r0) * width <= _LOOKUP_PER_BLOCK:  # one read per lookup
            slot = np.full(n, len(present), np.int64)
            slot[present] = np.arange(len(present))
            table = np.zeros((r1 - r0) * width, np.float32)
            table[local * width + slot_of] = self.data[e0:e1]
            mine = table[np.repeat((rows - r0) * width, count) + slot[self.cols[pos]]]
        else:
            block_keys = local * n + self.cols[e0:e1]
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
    """Symmetric CSR [n, n] from upper-triangle pieces (rows, cols, dist) in the join's row
    order, plus the zero diagonal; explicit zeros kept."""
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
    sort of those does it (numpy's vectorised sort, much faster than a stable argsort);
    otherwise a stable argsort."""
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


def _join_blocks(triples: np.ndarray, reach: np.ndarray | None):
    """Row blocks (r0, r1, width) for the join: at most _TRIPLES_PER_BLOCK triples, where
    width spans the block's partners r0..max(reach[r0:r1]) (reach None: the compiled
    kernels' blocks, cut by triples only, width N). A block is cut further to
    (r1 - r0)·width <= _BINS_PER_BLOCK dense accumulator bins when that keeps at least a
    quarter of its rows or needs at most _BINS_PER_TRIPLE bins per triple of the cut block;
    otherwise (partners spread so wide that a block of a few rows would spend its time on
    bins, or on per-block overhead) it keeps all its rows and sums by sorting its keys.

    triples: int64 [N+1], cumulative triple counts by row; reach: int64 [N], last partner.
    """
    n = len(triples) - 1
    r0 = 0
    while r0 < n:
        hi = int(np.searchsorted(triples, triples[r0] + _TRIPLES_PER_BLOCK, side="right")) - 1
        hi = min(max(hi, r0 + 1), n)
        if reach is None:
            yield r0, hi, n
            r0 = hi
            continue
        widths = np.maximum.accumulate(reach[r0:hi]) - r0 + 1
        bins = np.arange(1, hi - r0 + 1) * widths
        r1 = r0 + max(1, int(np.searchsorted(bins, _BINS_PER_BLOCK, side="right")))
        cut_bins = int(bins[r1 - r0 - 1])
        cheap = cut_bins <= min(_BINS_PER_BLOCK, _BINS_PER_TRIPLE * int(triples[r1] - triples[r0]))
        if 4 * (r1 - r0) < hi - r0 and not cheap:
            r1 = hi
        yield r0, r1, int(widths[r1 - r0 - 1])
        r0 = r1


class _ColumnJoin:
    """The (i, k, j) join of V's rows with (some of) its columns, one row block at a time.

    n: rows of V; indptr int64 [N+1], data float32 [nnz]: V in CSR;
    first [nnz]: position in ``col_rows``/``col_data`` of the first partner of entry (i, k)
    (the first j > i in the banded joins, the column's first row in the dense one); fan
    [nnz]: number of partners (consecutive from ``first``); both of one integer dtype;
    col_rows int32, col_data float32: column lists (V in CSC, possibly followed by others),
    kept side by side as one 8-byte unit per entry (``columns``: int32 [M, 2], the value's
    bits then the row), so that a triple's partner and value come with one gather.
    """

    def __init__(self, *, n, indptr, data, first, fan, col_rows, col_data):
        self.n, self.indptr, self.data = n, indptr, data
        self.first, self.fan = first, fan
        self.columns = np.empty((len(col_rows), 2), np.int32)
        self.columns[:, 0] = col_data.view(np.int32)
        self.columns[:, 1] = col_rows
        self._local = threading.local()  # the compiled kernels' per-thread buffers

    @property
    def col_rows(self) -> np.ndarray:
        """int32 [M]: the row of each column-list entry (a strided view)."""
        return self.columns[:, 1]

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
        (row_key's dtype) and min(V[i,k], V[j,k]) (float64, of the float32 values); ordered
        by i, then k (V's CSR order), then j, so a sum over a key's triples runs over k in
        V's column order."""
        e0, e1 = self.indptr[r0], self.indptr[r1]
        fan = self.fan[e0:e1]
        start = (np.cumsum(fan) - fan).astype(self.first.dtype, copy=False)
        pos = np.repeat(self.first[e0:e1] - start, fan)
        pos += np.arange(len(pos), dtype=pos.dtype)
        # one gather of (value bits, row) units: np.take on the 8-byte view
        partner = np.take(self.columns.view(np.int64).ravel(), pos).view(np.int32).reshape(-1, 2)
        del pos
        overlap = np.empty(len(partner))
        np.minimum(partner[:, 0].view(np.float32), np.repeat(self.data[e0:e1], fan), out=overlap)
        key = np.repeat(np.repeat(row_key, np.diff(self.indptr[r0 : r1 + 1])), fan)
        key += partner[:, 1]
        return key, overlap

    def block(
        self, r0: int, r1: int, width: int, least: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, s) of the pairs i in [r0, r1), j > i, meeting in a triple: int64,
        int64, float64 (s > 0, summed over this join's triples).

        width: partners lie in r0 .. r0 + width - 1 (accumulator bins [r1 - r0, width]).
        least: None, or float64 [r1 − r0], positive: only the pairs with s >= least[i − r0]
            (checked on the accumulator, before any pair is extracted).
        """
        if kernels.AVAILABLE:
            return self.sparse_rows(r0, r1, width, least)
        pair, overlap = self.keyed_overlaps(r0, r1, np.arange(r1 - r0, dtype=np.int64) * width - r0)
        if (r1 - r0) * width <= _BINS_PER_BLOCK:
            s = np.bincount(pair, weights=overlap, minlength=(r1 - r0) * width)
            del pair, overlap
            found = s > 0 if least is None else s.reshape(r1 - r0, width) >= least[:, None]
            keys = np.flatnonzero(found)
            s = s[keys]
        else:
            keys, s = _sum_by_key(pair, overlap, (r1 - r0) * width)
            if least is not None:
                kept = s >= least[keys // width]
                keys, s = keys[kept], s[kept]
        rows = keys // width
        cols = keys - rows * width + r0
        return rows + r0, cols, s

    def _kernel_arguments(self) -> tuple:
        """(indptr, data, first, fan, col_rows, col_data) as the compiled kernels take them
        (the column store's two halves as strided views)."""
        return (self.indptr, self.data, self.first, self.fan, self.col_rows, self.columns[:, 0].view(np.float32))

    def _scratch(self, name: str, size: int, dtype: type) -> np.ndarray:
        """This thread's buffer ``name`` of at least ``size`` entries (its first ``size``),
        kept for the thread's next block: allocating per block would fault fresh pages in
        every time. "acc" and "touched_bits" start as zeros (the kernels leave them zero)."""
        held = getattr(self._local, name, None)
        if held is None or len(held) < size or held.dtype != dtype:
            held = np.zeros(size, dtype) if name in ("acc", "touched_bits") else np.empty(size, dtype)
            setattr(self._local, name, held)
        return held[:size]

    def dense_rows(self, r0: int, r1: int, out_dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`_dense_block` by the compiled kernel (``kernels.dense_rows``); cols and dist
        are views of this thread's buffers, valid until its next block."""
        triples = int(self.fan[self.indptr[r0] : self.indptr[r1]].sum())
        bound = min(triples, (r1 - r0) * self.n) + 1  # + 1: see the kernel
        counts = np.empty(r1 - r0, np.int64)
        cols, dist = self._scratch("cols", bound, out_dtype), self._scratch("dist", bound, np.float32)
        acc = self._scratch("acc", self.n, np.float64)
        touched = self._scratch("touched_bits", self.n // 64 + 1, np.uint64)
        stored = kernels.dense_rows(r0, r1, *self._kernel_arguments(), acc, touched, counts, cols, dist)
        return counts, cols[:stored], dist[:stored]

    def sparse_rows(
        self, r0: int, r1: int, width: int, least: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`block` by the compiled kernel (``kernels.sparse_rows``); each row's pairs in
        the order its partners were first met, not ascending; views of this thread's
        buffers, valid until its next block."""
        triples = int(self.fan[self.indptr[r0] : self.indptr[r1]].sum())
        bound = min(triples, (r1 - r0) * width)
        if least is None:
            least = np.zeros(r1 - r0)
        rows, cols = self._scratch("rows", bound, np.int64), self._scratch("cols", bound, np.int64)
        sums, touched = self._scratch("sums", bound, np.float64), self._scratch("touched", triples + 1, np.int64)
        acc = self._scratch("acc", self.n, np.float64)
        stored = kernels.sparse_rows(r0, r1, *self._kernel_arguments(), least, acc, touched, rows, cols, sums)
        return rows[:stored], cols[:stored], sums[:stored]
