"""The Jaccard join's compiled kernels (bmil.cluster.jaccard.kernels) against the numpy join
they replace, bit for bit, and both against hand-worked cases."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy import sparse

import bmil.cluster.jaccard.join as join_module
from bmil.cluster import jaccard_distance
from bmil.cluster.jaccard import kernels
from helpers import noisy_blobs


def same_bits(a: sparse.csr_array, b: sparse.csr_array) -> bool:
    return (
        np.array_equal(a.indptr, b.indptr)
        and np.array_equal(a.indices, b.indices)
        and np.array_equal(a.data.view(np.int32), b.data.view(np.int32))
    )


def test_the_compiled_kernels_are_installed():
    # numba is a dependency: the suite must run the kernels, not only the numpy join
    assert kernels.AVAILABLE


@pytest.mark.parametrize("noise", [0.4, 1.2])
@pytest.mark.parametrize(("max_distance", "join"), [(1.0, "dense"), (1.0, "banded"), (0.6, None), (0.3, None)])
def test_compiled_join_equals_the_numpy_join_bit_for_bit(monkeypatch, noise, max_distance, join):
    # Small blocks, four in flight: the in-order writer and the per-thread accumulators
    # must give what one numpy pass gives, for every join and both modes.
    x, modality = noisy_blobs(260, 3, noise)
    if join is not None:
        monkeypatch.setattr(join_module, "_DENSE_SHARE", {"dense": 1 << 40, "banded": 0}[join])
    monkeypatch.setattr(join_module, "_TRIPLES_PER_BLOCK", 2000)
    monkeypatch.setattr(join_module, "_DENSE_BINS_PER_BLOCK", 260 * 5)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    for mod in (None, modality):
        compiled = jaccard_distance(x, 10, 4, modality=mod, max_distance=max_distance)
        with monkeypatch.context() as m:
            m.setattr(kernels, "AVAILABLE", False)
            plain = jaccard_distance(x, 10, 4, modality=mod, max_distance=max_distance)
        assert compiled.nnz > 260 and same_bits(compiled, plain)


# V [4, 4], rows summing to 1, with explicit zeros at (0, 2) and (0, 3): row 0 meets row 2
# in columns 2 and 3 and row 3 in column 3, with terms min(0, ·) = 0 only, so those pairs
# have s = 0 (absent), and row 2 is listed twice by the sparse kernel before it is dropped.
#   s(0, 1) = min(.5, .25) + min(.5, .75) = .75  ->  d = 1 − .75/1.25 = 0.4
#   s(2, 3) = min(.5, 1) = .5                     ->  d = 1 − .5/1.5  = 2/3
#   s(i, i) = 1                                   ->  d = 0
V_ROWS = [0, 0, 0, 0, 1, 1, 2, 2, 3]
V_COLS = [0, 1, 2, 3, 0, 1, 2, 3, 3]
V_DATA = [0.5, 0.5, 0.0, 0.0, 0.25, 0.75, 0.5, 0.5, 1.0]
EXPECTED = {(0, 0): 0.0, (0, 1): 0.4, (1, 0): 0.4, (1, 1): 0.0, (2, 2): 0.0, (2, 3): 2 / 3, (3, 2): 2 / 3, (3, 3): 0.0}


def hand_worked_v() -> sparse.csr_array:
    v = sparse.csr_array((np.array(V_DATA, np.float32), (V_ROWS, V_COLS)), shape=(4, 4))
    assert v.nnz == 9  # the explicit zeros are stored
    return v


def as_pairs(dist: sparse.csr_array) -> dict:
    coo = dist.tocoo()
    return {(int(i), int(j)): float(d) for i, j, d in zip(coo.row, coo.col, coo.data, strict=True)}


HAND_WORKED_JOINS = [("dense", 1.0), ("banded", 1.0), ("banded", 0.7), ("banded", 0.5), ("banded", 0.3)]


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(("join", "max_distance"), HAND_WORKED_JOINS)
def test_joins_on_a_hand_worked_v(monkeypatch, compiled, join, max_distance):
    monkeypatch.setattr(kernels, "AVAILABLE", compiled)
    v = hand_worked_v()
    if join == "dense":
        dist = join_module._dense_min_overlap_distance(v)
    else:
        order = join_module._band_order(v)
        in_order = join_module._rows_in_order(v, order)
        if max_distance >= 1.0:
            dist = join_module._min_overlap_distance(in_order, order)
        else:
            dist = join_module._thresholded_distance(in_order, order, max_distance)
    expected = {pair: d for pair, d in EXPECTED.items() if d <= max_distance}
    assert dist.has_sorted_indices and dist.nnz == len(expected)
    got = as_pairs(dist)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[p] for p in expected], list(expected.values()), rtol=1e-6)


def test_a_pair_whose_distance_rounds_to_one_is_not_stored():
    # s = 2^-30: d = 1 − s/(2 − s) is within float32 rounding of 1, so the pair is absent
    # from the dense kernel's output as from the numpy join's; the diagonal is always kept.
    tiny = np.float32(2.0**-30)
    v = sparse.csr_array(np.array([[1 - tiny, tiny], [tiny, 1 - tiny]], np.float32))
    acc, touched, counts = np.zeros(2), np.zeros(1, np.uint64), np.empty(2, np.int64)
    cols, dist = np.empty(5, np.int32), np.empty(5, np.float32)
    colptr = v.tocsc().indptr.astype(np.int32)
    column_store = v.tocsc()
    stored = kernels.dense_rows(
        0, 2, v.indptr.astype(np.int64), v.data, colptr[v.indices], np.diff(colptr)[v.indices],
        column_store.indices.astype(np.int32), column_store.data, acc, touched, counts, cols, dist,
    )
    assert stored == 2 and counts.tolist() == [1, 1] and cols[:2].tolist() == [0, 1] and dist[:2].tolist() == [0, 0]
    assert np.all(acc == 0) and np.all(touched == 0)  # left clear for the next block


def test_sparse_kernel_lists_a_partner_of_zero_terms_twice_and_drops_it():
    # Row 0's entries (columns 2 and 3, both explicit zeros) meet row 1's twice: the
    # branch-free list holds row 1 twice (its bin stays 0), and no pair comes out.
    indptr = np.array([0, 2, 4], np.int64)
    data = np.array([0.0, 0.0, 0.5, 0.5], np.float32)
    first = np.array([0, 1, 0, 0], np.int32)  # entry e of row 0 meets column-store slot e
    fan = np.array([1, 1, 0, 0], np.int32)
    col_rows, col_data = np.array([1, 1], np.int32), np.array([0.5, 0.5], np.float32)
    acc, touched = np.zeros(2), np.full(3, -1, np.int64)
    rows, cols, sums = np.empty(2, np.int64), np.empty(2, np.int64), np.empty(2)
    stored = kernels.sparse_rows(0, 2, indptr, data, first, fan, col_rows, col_data, np.zeros(2), acc, touched,
                                 rows, cols, sums)
    assert stored == 0 and touched[:2].tolist() == [1, 1] and np.all(acc == 0)


def test_the_dense_result_is_an_ordinary_writable_matrix(monkeypatch):
    # The dense join's arrays are views of a bound-sized memory map: exactly nnz long,
    # writable, and they survive a copy and a pickle.
    monkeypatch.setattr(join_module, "_DENSE_SHARE", 1 << 40)
    x, modality = noisy_blobs(200, 1)
    dist = jaccard_distance(x, 10, 4, modality=modality)
    assert len(dist.data) == len(dist.indices) == dist.nnz > 200 * 20
    before = dist.data.copy()
    restored = pickle.loads(pickle.dumps(dist))
    assert same_bits(restored, dist)
    dist.data[:] = 0.5
    assert np.array_equal(restored.data, before) and np.all(dist.copy().data == 0.5)


def test_kernels_compile_without_a_disk_cache_where_numba_has_nowhere_to_write(monkeypatch):
    # numba refuses cache=True when it finds no writable cache directory (a read-only
    # install): the kernels then compile once per process instead of failing the import.
    import numba

    real = numba.njit

    def njit(**options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'f.py'")
        return real(**options)

    monkeypatch.setattr(numba, "njit", njit)

    def twice(x):
        return 2 * x

    compiled = kernels._jit(twice)
    assert compiled(21) == 42 and len(compiled.signatures) == 1  # a numba dispatcher, compiled


@pytest.mark.parametrize("limit", [0.05, 0.3, 0.9])
def test_suffix_flags_equal_the_numpy_ones(monkeypatch, limit):
    # The thresholded join's prefix/suffix split decides which terms are summed where, so
    # the compiled flags must be the numpy ones exactly (rows summing to 1, mixed sizes).
    rng = np.random.default_rng(4)
    v = sparse.random(400, 400, density=0.05, random_state=5, dtype=np.float32, format="csr")
    v = sparse.csr_array(v.multiply(1 / np.maximum(v.sum(axis=1), 1e-9)[:, None]).astype(np.float32))
    v.data[rng.random(v.nnz) < 0.05] = 0.0  # explicit zeros too
    entry_rows = join_module._entry_rows(v, np.int32)
    compiled = join_module._suffix_entries(v, entry_rows, limit)
    monkeypatch.setattr(kernels, "AVAILABLE", False)
    plain = join_module._suffix_entries(v, entry_rows, limit)
    assert 0 < compiled.sum() < v.nnz and np.array_equal(compiled, plain)
