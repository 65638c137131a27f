"""k-reciprocal Jaccard distance (Zhong et al., CVPR 2017) and BMIL's modality-aware variant,
computed sparsely: no N×N matrix anywhere; memory linear in N plus the result itself.

Steps (docs/method.md, "The Jaccard distance, step by step"), each vectorised over row blocks:

1. ``rank[i]``: the k1 nearest neighbours of i, i itself first (exact kNN). Modality-aware:
   the k1//2 nearest visible and the k1//2 nearest infrared (both from one product per block
   of rows against all rows), merged, sorted by similarity. "Nearest" is by cosine for unit
   rows; rows below unit length are ranked as the release ranks them (see
   :func:`jaccard_distance`).
   Camera-and-modality-aware (beyond the paper): within the query's own modality its own
   camera gets at most an even share of the k1//2 places (``encoding._camera_balanced``).
2. Reciprocity R(i, k) by gathering ``rank[rank[i, :k+1], :k+1]`` and looking for i.
3. Expansion E(i): R(i, k1) plus R(c, round(k1/2)) of each candidate c whose half set
   overlaps R(i, k1) by more than 2/3; membership via ``searchsorted`` on row-offset keys.
4. V (CSR): softmax over E(i) of −(2 − 2·x_i·x_j) (the cosine for unit rows); the inner
   products from the kNN where i's rank list has them, otherwise gathered dot products.
5. Local query expansion as a sparse row-averaging matrix: V ← Q @ V.
6. s(i, j) = Σ_k min(V[i,k], V[j,k]) for pairs sharing support, joining the rows of V with
   its columns block by block (each unordered pair once, a row's sums in one float64
   accumulator, by compiled kernels; numpy's ``bincount`` over rows in a banded order where
   numba is absent, with the same result); d = 1 − s/(2 − s), clipped at 0. When nearly
   every pair shares support (the full result of weakly separated features) each block of
   rows instead sums all its partners and is written straight into the result
   (``join._dense_min_overlap_distance``).

Modules: ``encoding`` (steps 1–5), ``join`` (step 6 and the result), ``kernels`` (the
join's compiled row kernels), ``memory`` (the memory estimates).

The result stores every pair with d < 1 (the pairs that share support), explicit zeros
included (the diagonal is exactly 0); an absent pair has distance 1. On clustered
features that is a few k1 pairs per row (81 at k1 = 30 in benchmarks/jaccard.py); on
unstructured features (random vectors, hub-ridden spaces) nearly every pair can share
support, and the result, 8 bytes per stored pair, approaches a dense N×N matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from scipy import sparse

from bmil.cluster.jaccard.encoding import (
    LQE_MODES,
    _expanded,
    _expansion,
    _feature_rows,
    _modality_neighbours,
    _pair_cosines,
    _plain_neighbours,
    _reciprocal,
    _Search,
    _softmax_weights,
    _validate,
    _validate_camera,
    _validate_scale,
)
from bmil.cluster.jaccard.join import (
    _dense_min_overlap_distance,
    _join_order,
    _min_overlap_distance,
    _nearly_dense,
    _thresholded_distance,
)
from bmil.cluster.jaccard.memory import estimate_jaccard_memory, estimate_join_memory

__all__ = ["LQE_MODES", "estimate_jaccard_memory", "estimate_join_memory", "jaccard_distance"]

log = logging.getLogger(__name__)


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
    recip_full, recip_half = _reciprocal(nb.rank, full_len, half_len)
    rows, cols = _expansion(nb.rank, recip_full, recip_half, full_len, half_len)
    del recip_full, recip_half
    cos = _pair_cosines(x, rows, cols, nb)
    v = _softmax_weights(cos, rows, cols, n)
    del rows, cols, cos
    if nb.lqe_matrix is not None:
        v = _expanded(nb.lqe_matrix, v)
    del nb
    if memory_check is not None:
        memory_check(estimate_join_memory(n, v.nnz, k1, max_distance))
    if max_distance >= 1.0 and _nearly_dense(v):
        dist = _dense_min_overlap_distance(v)
    else:
        v, order = _join_order(v)  # (the numpy join's reordered copy replaces V here)
        if max_distance >= 1.0:
            dist = _min_overlap_distance(v, order)
        else:
            dist = _thresholded_distance(v, order, float(max_distance))
    log.debug("Jaccard distance: N = %d, %.1f stored pairs per row", n, dist.nnz / n)
    return dist
