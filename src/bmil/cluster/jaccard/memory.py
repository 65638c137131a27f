"""Memory estimates of the Jaccard distance: the whole call (:func:`estimate_jaccard_memory`)
and the part from V on (:func:`estimate_join_memory`), upper estimates used to refuse a call
before it runs out of memory."""

from __future__ import annotations

from bmil.cluster.jaccard.encoding import _validate_scale
from bmil.cluster.jaccard.join import (
    _BINS_PER_BLOCK,
    _DENSE_BINS_PER_BLOCK,
    _DENSE_SHARE,
    _JOIN_WORKERS,
    _TRIPLES_PER_BLOCK,
)
from bmil.cluster.knn import IVF_QUERY_CHUNK, ivf_lists, ivf_probes

# Bytes per entry of V while it is built (V with the local query expansion's product) and
# during the join.
_V_BYTES_PER_ENTRY = 24
_JOIN_BYTES_PER_V_ENTRY = 72
_PHASES = ("all", "before_join")


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
