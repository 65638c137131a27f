"""Re-identification metrics: CMC, mAP and mINP from a query × gallery distance matrix.

Everything is vectorised over queries: the distance matrix is ranked block by block (a block
is a few thousand queries), and matches, removals and positions are boolean / integer arrays
of the block's shape. Four rules decide which gallery images a query is scored against:

- ``"sysu"`` — the SYSU-MM01 authors' rule: a query from camera 3 ignores gallery images
  from camera 2. Rank-k of the CMC counts *distinct identities* in rank order (the ranking is
  compressed to the first image of each identity); mAP and mINP use every remaining match.
- ``"llcm"`` — the LLCM authors' rule (``eval_llcm`` of their DEEN release, CVPR 2023):
  gallery images with the query's identity *and* camera are removed; Rank-k counts distinct
  identities, mAP and mINP use every remaining match.
- ``"regdb"`` — nothing removed, plain CMC (RegDB; the quick cross-modality score).
- ``"standard"`` — the Market-1501 rule: gallery images with the query's identity and camera
  are removed; plain CMC.

Definitions (Ye et al., "Deep Learning for Person Re-identification", TPAMI 2021): for a
query with m matches at 1-based positions p_1 < … < p_m among its remaining gallery,
AP = (1/m) Σ_i i / p_i and INP = m / p_m; CMC(k) = fraction of queries whose first hit
(image position, or identity position for the distinct-identity rule) is ≤ k.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

logger = logging.getLogger(__name__)

PROTOCOLS = ("sysu", "regdb", "standard", "llcm")
DISTINCT_IDENTITY_CMC = frozenset({"sysu", "llcm"})
NEEDS_CAMERAS = frozenset({"sysu", "standard", "llcm"})

# SYSU-MM01: cameras 2 (visible, indoor) and 3 (infrared, indoor) film the same room, so the
# dataset authors score camera-3 queries without the camera-2 gallery.
SYSU_QUERY_CAMERA = 3
SYSU_IGNORED_GALLERY_CAMERA = 2

# Entries of the distance matrix ranked at once; bounds the block's temporary arrays
# (about 8 int/bool arrays of this many entries) to a few tens of MB.
_BLOCK_ENTRIES = 1 << 21
_LITTLE_ENDIAN = sys.byteorder == "little"


def evaluate(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray | None = None,
    g_camids: np.ndarray | None = None,
    protocol: str = "sysu",
    max_rank: int = 20,
) -> dict:
    """CMC, mAP and mINP of a query × gallery distance matrix.

    distmat: [Q, G] distances, smaller = closer (numpy or anything ``np.asarray`` accepts).
    q_pids, g_pids: [Q], [G] integer person ids. q_camids, g_camids: [Q], [G] camera ids,
    required by ``"sysu"``, ``"standard"`` and ``"llcm"``, ignored by ``"regdb"``.
    Ranking is a stable sort of each row: equal distances keep gallery-index order.
    Queries without any remaining match are skipped.

    Returns ``{"cmc": float64 [max_rank] (Rank-1 first), "mAP": float, "mINP": float,
    "num_valid_queries": int, "num_queries": int}``; rates are fractions in [0, 1]. When the
    gallery holds fewer than ``max_rank`` images the CMC simply saturates at its last value.
    """
    dist, q_pids, g_pids, q_camids, g_camids = _checked_inputs(
        distmat, q_pids, g_pids, q_camids, g_camids, protocol, max_rank
    )
    num_q, num_g = dist.shape
    # Identities as compact codes 0..P-1 (-1: a query identity absent from the gallery).
    identities, g_codes = np.unique(g_pids, return_inverse=True)
    g_codes = g_codes.astype(np.int32)
    q_codes = _codes_of(identities, q_pids)

    hits, aps, inps = [], [], []
    block = max(1, _BLOCK_ENTRIES // max(num_g, 1))
    for start in range(0, num_q, block):
        rows = slice(start, min(start + block, num_q))
        hit, ap, inp = _score_block(
            dist[rows],
            q_codes[rows],
            g_codes,
            None if q_camids is None else q_camids[rows],
            g_camids,
            protocol,
            identities.size,
        )
        hits.append(hit)
        aps.append(ap)
        inps.append(inp)

    hit_positions = np.concatenate(hits)
    num_valid = int(hit_positions.size)
    if num_valid == 0:
        raise ValueError(
            f"No query has a matching gallery image under the {protocol!r} protocol, "
            "so CMC/mAP/mINP are undefined; check that query and gallery share identities."
        )
    if num_valid < num_q:
        logger.info("%d of %d queries have no gallery match and are skipped", num_q - num_valid, num_q)
    hits_at = np.bincount(np.minimum(hit_positions, max_rank + 1), minlength=max_rank + 2)
    cmc = np.cumsum(hits_at[1 : max_rank + 1]) / num_valid
    return {
        "cmc": cmc.astype(np.float64),
        "mAP": float(np.concatenate(aps).mean()),
        "mINP": float(np.concatenate(inps).mean()),
        "num_valid_queries": num_valid,
        "num_queries": int(num_q),
    }


def _checked_inputs(distmat, q_pids, g_pids, q_camids, g_camids, protocol, max_rank):
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown evaluation protocol {protocol!r}; expected one of {PROTOCOLS}.")
    dist = np.asarray(distmat)
    if dist.ndim != 2:
        raise ValueError(f"distmat must be a 2-D [queries, gallery] array, got shape {dist.shape}.")
    if dist.size == 0:
        raise ValueError(f"distmat is empty (shape {dist.shape}); there is nothing to rank.")
    q_pids = np.asarray(q_pids).reshape(-1)
    g_pids = np.asarray(g_pids).reshape(-1)
    if q_pids.size != dist.shape[0] or g_pids.size != dist.shape[1]:
        raise ValueError(
            f"distmat has shape {dist.shape} but there are {q_pids.size} query and {g_pids.size} gallery person ids."
        )
    if not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}.")
    if np.issubdtype(dist.dtype, np.floating) and np.isnan(dist).any():
        raise ValueError("distmat contains NaN distances, which cannot be ranked.")
    if protocol in NEEDS_CAMERAS:
        if q_camids is None or g_camids is None:
            raise ValueError(
                f"The {protocol!r} protocol needs q_camids and g_camids (camera ids of the query and gallery images)."
            )
        q_camids = np.asarray(q_camids).reshape(-1)
        g_camids = np.asarray(g_camids).reshape(-1)
        if q_camids.size != q_pids.size or g_camids.size != g_pids.size:
            raise ValueError(
                f"Got {q_camids.size} query / {g_camids.size} gallery camera ids for "
                f"{q_pids.size} queries and {g_pids.size} gallery images."
            )
    else:
        q_camids = g_camids = None
    return dist, q_pids, g_pids, q_camids, g_camids


def _codes_of(identities: np.ndarray, pids: np.ndarray) -> np.ndarray:
    """Index of each pid in the sorted ``identities``, -1 where it is absent; int32."""
    where = np.minimum(np.searchsorted(identities, pids), identities.size - 1)
    return np.where(identities[where] == pids, where, -1).astype(np.int32)


def stable_ranking(dist: np.ndarray) -> np.ndarray:
    """[B, G] gallery indices of each row sorted by distance, ties in gallery-index order.

    numpy's stable argsort is 3–5× slower than its SIMD sorts, and ties are common (float32
    cosine distances of thousands of images often repeat), so: float32 rows are ranked by
    sorting unique 64-bit keys (order-preserving bits of the distance, then the column
    index); other dtypes by the default argsort, after which runs of equal distances are put
    back in index order by one integer sort of (run number, column index) keys.
    """
    if dist.dtype == np.float16:
        dist = dist.astype(np.float32)  # exact, so ties are unchanged
    num_g = dist.shape[1]
    if dist.dtype == np.float32 and num_g <= np.iinfo(np.uint32).max:
        return _float32_stable_ranking(dist)
    order = np.argsort(dist, axis=1)
    ranked = np.take_along_axis(dist, order, axis=1)
    starts_run = ranked[:, 1:] != ranked[:, :-1]
    if starts_run.all():
        return order
    run = np.zeros(order.shape, dtype=np.int64)
    np.cumsum(starts_run, axis=1, out=run[:, 1:])
    run *= num_g
    run += order
    run.sort(axis=1)  # runs stay in place; inside a run, columns ascend
    return run % num_g


def _float32_stable_ranking(dist: np.ndarray) -> np.ndarray:
    # Adding +0.0 turns -0.0 into +0.0, which compare equal as floats but differ in bits.
    bits = (dist + np.float32(0.0)).view(np.uint32)
    # IEEE-754 bits -> unsigned integers in the same order: flip every bit of a negative
    # number, only the sign bit of a non-negative one.
    flip = (bits.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    keys = (bits ^ flip).astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= np.arange(dist.shape[1], dtype=np.uint64)
    keys.sort(axis=1)  # keys are unique per row, so any sort is stable on the distances
    column = keys.view(np.uint32)[:, 0::2] if _LITTLE_ENDIAN else keys.view(np.uint32)[:, 1::2]
    return column.astype(np.intp)


def _score_block(dist, q_codes, g_codes, q_camids, g_camids, protocol, num_identities):
    """Hit positions, APs and INPs of the block's queries that have at least one match.

    [B, G] arrays below are in rank order (column j = the j-th closest gallery image).
    """
    num_b, num_g = dist.shape
    order = stable_ranking(dist)
    ranked_codes = g_codes[order]
    # Matches in row-major order: within a row, columns (ranks) increase.
    rows, cols = np.nonzero(ranked_codes == q_codes[:, None])
    hidden = None  # [B, G] images hidden from the query by a camera rule, if any
    if protocol == "sysu":
        from_cam3 = q_camids == SYSU_QUERY_CAMERA
        if from_cam3.any():
            hidden = from_cam3[:, None] & (g_camids[order] == SYSU_IGNORED_GALLERY_CAMERA)
            # 1-based position of each image among the images the query is scored against
            kept_position = np.cumsum(~hidden, axis=1, dtype=np.int32)
            kept = ~hidden[rows, cols]
            rows, cols = rows[kept], cols[kept]
            positions = kept_position[rows, cols]
        else:
            positions = cols + 1
    elif protocol in ("standard", "llcm"):
        # Only matches can be hidden (same identity, same camera): shift each kept match up
        # by the number of hidden matches ranked above it in its row.
        same_camera = g_camids[order[rows, cols]] == q_camids[rows]
        hidden_so_far = np.cumsum(same_camera)
        hidden_in_row = np.bincount(rows, weights=same_camera, minlength=num_b).astype(np.int64)
        hidden_before_row = np.cumsum(hidden_in_row) - hidden_in_row
        hidden_above = hidden_so_far - same_camera - hidden_before_row[rows]
        kept = ~same_camera
        rows, cols = rows[kept], cols[kept]
        positions = cols + 1 - hidden_above[kept]
    else:
        positions = cols + 1

    per_query = np.bincount(rows, minlength=num_b)
    valid = per_query > 0
    first = np.cumsum(per_query) - per_query
    match_number = np.arange(rows.size) - first[rows] + 1  # i of the i-th match of its query
    ap_sum = np.bincount(rows, weights=match_number / positions, minlength=num_b)

    counts = per_query[valid]
    first_valid = first[valid]
    ap = ap_sum[valid] / counts
    inp = counts / positions[first_valid + counts - 1]
    if protocol in DISTINCT_IDENTITY_CMC:
        hit = _distinct_identity_hit(
            ranked_codes[valid],
            None if hidden is None else hidden[valid],
            cols[first_valid],
            q_codes[valid],
            num_identities,
        )
    else:
        hit = positions[first_valid]
    return hit.astype(np.int64), ap, inp


def _distinct_identity_hit(ranked_codes, hidden, first_hit_column, q_codes, num_identities):
    """[B] 1-based rank of the query's identity in the identity-compressed ranking.

    That rank is 1 + the number of distinct other identities among the images that are not
    hidden and ranked above the query's first remaining match. (Images of the query's own
    identity ranked above it are all hidden ones.)
    """
    num_b, num_g = ranked_codes.shape
    above = np.arange(num_g)[None, :] < first_hit_column[:, None]
    if hidden is not None:
        above &= ~hidden
    rows, cols = np.nonzero(above)
    seen = np.zeros((num_b, num_identities), dtype=bool)
    seen[rows, ranked_codes[rows, cols]] = True
    seen[np.arange(num_b), q_codes] = False
    return seen.sum(axis=1) + 1
