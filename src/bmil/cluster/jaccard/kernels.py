"""Compiled (numba) row kernels of the min-overlap join: each row's sums in one pass over its
(row, column, partner) triples, in a reused float64 accumulator, with no per-triple arrays.

They compute exactly what the numpy join of :mod:`bmil.cluster.jaccard.join` computes, bit for
bit: a pair's terms min(V[i,k], V[j,k]) are added in float64 in the same order (V's CSR order
of k), and the distance is the same sequence of IEEE operations (no fast-math, so no fused
multiply–add). The numpy join stays as the path when numba is not installed (``AVAILABLE``).

The kernels release the GIL (``nogil``): the join's thread pool runs one row block per thread.
They compile on first use (a few seconds) and are cached on disk by numba; a process loads
them from there on its first call (about 0.3 s).

Shared arguments (V [N, N] in CSR; a column store of partners):
    indptr int64 [N+1], data float32 [nnz]: V's rows;
    first, fan [nnz] (int32 or int64): entry e = (i, k) meets the partners
        ``col_rows[first[e] : first[e] + fan[e]]`` with values ``col_data[...]`` (int32, float32);
    acc float64 [N], zero on entry and on return: the accumulator, one per thread.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # the numpy join runs instead
    numba = None

AVAILABLE = numba is not None


def _jit(fn):
    """numba's ``njit(nogil=True)``, cached on disk where numba finds a writable place
    (beside this file, else the user's cache directory), else compiled once per process."""
    if not AVAILABLE:
        return fn
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # numba: "no locator available", a read-only install without a cache
        return numba.njit(nogil=True)(fn)


if AVAILABLE:
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def _trailing_zeros(typingctx, word):
        """int64: the number of trailing zero bits of a nonzero uint64 (LLVM's cttz)."""
        if word != types.uint64:
            return None

        def codegen(context, builder, signature, args):
            return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

        return types.int64(types.uint64), codegen


@_jit
def _distance(s: float) -> np.float32:
    """float32 max(1 − s/(2 − s), 0) of a float64 overlap s, as ``join._overlap_distance``."""
    d = 1.0 - s / (2.0 - s)
    return np.float32(d if d > 0.0 else 0.0)


@_jit
def dense_rows(r0, r1, indptr, data, first, fan, col_rows, col_data, acc, touched, counts, cols, dist):
    """Rows [r0, r1) against every row: the pairs with d < 1 (the diagonal 0), ascending by
    row and column, written to ``cols`` (int) and ``dist`` (float32) from position 0, each
    row's number in ``counts`` [r1 − r0]. Returns the pairs written. touched: uint64
    [N/64 + 1] zeros (zeros again on return), a bit per bin a triple reached: the scan
    visits those bins only, in order (skipping the empty ones without a branch on each).
    cols and dist need one slot more than the pairs (the branch-free store writes one ahead).
    """
    one = np.uint64(1)
    out = 0
    for i in range(r0, r1):
        for e in range(indptr[i], indptr[i + 1]):
            a = data[e]
            for p in range(first[e], first[e] + fan[e]):
                j = col_rows[p]
                b = col_data[p]
                acc[j] += a if a < b else b
                touched[j >> 6] |= one << np.uint64(j & 63)
        start = out
        for w in range(touched.shape[0]):
            word = touched[w]
            touched[w] = 0
            while word:
                j = w * 64 + _trailing_zeros(word)
                word &= word - one
                s = acc[j]
                acc[j] = 0.0
                d = _distance(s)  # 1 for s = 0 (a partner met through zero terms only)
                if j == i:  # d(i, i) = 0 whatever the rounding of s(i, i) ≈ 1
                    d = np.float32(0.0) if s > 0.0 else np.float32(1.0)
                cols[out] = j
                dist[out] = d
                out += d < 1.0
        counts[i - r0] = out - start
    return out


@_jit
def sparse_rows(r0, r1, indptr, data, first, fan, col_rows, col_data, least, acc, touched, rows, cols, sums):
    """Rows [r0, r1) against their partners: the pairs with s > 0 and s >= least[i − r0]
    (least float64 [r1 − r0]; zeros for every pair), each row's partners in the order
    they were first met, written to ``rows``, ``cols`` (int64) and ``sums`` (float64) from
    position 0. Returns the pairs written. touched: int64 scratch of at least one more
    entry than the most triples of a row: a partner is listed whenever its bin is empty
    before the add (branch-free), so a partner whose terms are all 0 can be listed twice,
    and is then dropped like any pair with s = 0.
    """
    out = 0
    for i in range(r0, r1):
        count = 0
        for e in range(indptr[i], indptr[i + 1]):
            a = data[e]
            for p in range(first[e], first[e] + fan[e]):
                j = col_rows[p]
                s = acc[j]
                touched[count] = j
                count += s == 0.0
                b = col_data[p]
                acc[j] = s + (a if a < b else b)
        bar = least[i - r0]
        for t in range(count):
            j = touched[t]
            s = acc[j]
            acc[j] = 0.0
            if s > 0.0 and s >= bar:
                rows[out] = i
                cols[out] = j
                sums[out] = s
                out += 1
    return out


@_jit
def suffix_overlaps(r0, r1, rows, cols, indptr, columns, values, table, out):
    """out[p] = Σ_k min(W[rows[p], k], W[cols[p], k]) (float64 sums of the float32 terms, in
    the order of cols[p]'s entries) for a sparse W [N, N] (CSR: indptr int64 [N+1], columns
    int64, values float32). rows: ascending, in [r0, r1). table: float32 [N] zeros, one row
    of W at a time spread over it (zeros again on return)."""
    p = 0
    pairs = rows.shape[0]
    for i in range(r0, r1):
        if p == pairs or rows[p] != i:
            continue
        for e in range(indptr[i], indptr[i + 1]):
            table[columns[e]] = values[e]
        while p < pairs and rows[p] == i:
            j = cols[p]
            s = 0.0
            for e in range(indptr[j], indptr[j + 1]):
                a = table[columns[e]]
                b = values[e]
                s += a if a < b else b
            out[p] = s
            p += 1
        for e in range(indptr[i], indptr[i + 1]):
            table[columns[e]] = 0.0


@_jit
def suffix_flags(indptr, indices, data, col_rank, limit, out):
    """out[e] (bool [nnz]): entry e of V (CSR: indptr int64 [N+1], indices, data float32) is
    in its row's suffix, the longest tail of mass < ``limit`` when each row's entries are
    ordered by ``col_rank`` (int64 [N], distinct). The tails are differences of one float64
    sum over all entries from the end (row by row in that order), as the numpy version
    computes them, so the flags are the same."""
    nnz = data.shape[0]
    order = np.empty(nnz, np.int64)
    for r in range(indptr.shape[0] - 1):
        e0, e1 = indptr[r], indptr[r + 1]
        order[e0:e1] = e0 + np.argsort(col_rank[indices[e0:e1]])
    from_end = np.empty(nnz)
    total = 0.0
    for t in range(nnz - 1, -1, -1):
        total += np.float64(data[order[t]])
        from_end[t] = total
    for r in range(indptr.shape[0] - 1):
        e0, e1 = indptr[r], indptr[r + 1]
        row_end = from_end[e1] if e1 < nnz else 0.0
        for t in range(e0, e1):
            out[order[t]] = from_end[t] - row_end < limit
