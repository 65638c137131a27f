"""Benchmark: the approximate modality-aware kNN step of the Jaccard distance at large N
(e.g. 1,000,000 × 2048), stage by stage, optionally on a subset of the query rows.

The features are benchmarks/jaccard.py's ``well`` kind (16 images per identity, 35 %
infrared), unit float32 rows; the k1//2 = 15 nearest of each modality are searched with
``bmil.cluster.knn(method="approximate")`` (the call jaccard_distance makes in step 1),
candidates = all rows of the modality, queries = all N rows or ``--queries`` of them drawn
at random. Each stage of the inverted file is timed (module functions wrapped, not copied):
k-means training, assigning the candidates to lists, probing (queries × centroids), and the
rest (grouping the candidates by list, the list-by-list search and the final top-k). The
index build (k-means, assignment) does not depend on the number of queries; probing and the
search are proportional to it, and ``extrapolated`` scales them to all N queries.

Peak RSS is the increase over the RSS once the features exist (VmHWM reset there).
``--recall`` exact queries (drawn from the searched ones) give recall@15 against exact search.

    python benchmarks/knn_scale.py --n 1000000 --queries 100000 --recall 1000
    python benchmarks/knn_scale.py --n 200000
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jaccard import _rss_kib, make_identity_features, recall_of_rows, reset_peak_rss  # noqa: E402  (benchmarks/jaccard.py)


def _timed(module, name: str, stage_of, times: dict) -> None:
    """Wrap module.name so that each call's seconds add to times[stage_of(args, kwargs)]."""
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            key = stage_of(args, kwargs)
            times[key] = times.get(key, 0.0) + time.perf_counter() - t0

    setattr(module, name, wrapper)


def time_ivf_stages(knn_module, times: dict) -> None:
    """Add the seconds of the approximate index's stages to ``times``: "kmeans" (training),
    "assign" (candidates to lists), "probe" (queries × centroids, nprobe > 1)."""
    _timed(knn_module, "_kmeans_centroids", lambda a, kw: "kmeans", times)
    _timed(knn_module, "_nearest_centroid",
           lambda a, kw: "assign" if kw.get("rows") is not None else ("probe" if len(a) > 2 and a[2] > 1 else "other"),
           times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k", type=int, default=15, help="neighbours per modality (k1 // 2)")
    parser.add_argument("--queries", type=int, default=None, help="query rows drawn at random (default all N)")
    parser.add_argument("--recall", type=int, default=0, help="queries checked against exact search")
    args = parser.parse_args()

    import torch

    knn_module = importlib.import_module("bmil.cluster.knn")  # the module (bmil.cluster.knn is the function)
    times: dict = {}
    time_ivf_stages(knn_module, times)

    t0 = time.perf_counter()
    feats, modality, pid = make_identity_features(args.n, args.dim, "well")
    gen_s = time.perf_counter() - t0
    x = torch.from_numpy(feats)  # unit float32 rows: no copy
    base = _rss_kib("VmRSS")
    reset_peak_rss()
    rng = np.random.default_rng(2)
    q_rows = None if args.queries is None else np.sort(rng.choice(args.n, args.queries, replace=False))
    nq = args.n if q_rows is None else len(q_rows)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    idx = []
    per_modality = []
    for m in (0, 1):
        members = np.flatnonzero(modality == m)
        t1 = time.perf_counter()
        idx.append(knn_module.knn_unit_rows(x, args.k, candidates=members, queries=q_rows, method="approximate")[1])
        per_modality.append({"candidates": int(len(members)), "lists": knn_module.ivf_lists(len(members)),
                             "seconds": time.perf_counter() - t1})
    total = time.perf_counter() - t0
    peak = (_rss_kib("VmHWM") - base) * 1024
    load1 = os.getloadavg()
    search = total - times.get("kmeans", 0.0) - times.get("assign", 0.0) - times.get("probe", 0.0)
    build = times.get("kmeans", 0.0) + times.get("assign", 0.0)
    scale = args.n / nq
    out = {
        "n": args.n, "dim": args.dim, "queries": nq, "generate_s": gen_s, "seconds": total,
        "kmeans_s": times.get("kmeans", 0.0), "assign_s": times.get("assign", 0.0),
        "probe_s": times.get("probe", 0.0), "search_rest_s": search, "per_modality": per_modality,
        "peak_gib": peak / 2**30, "features_gib": feats.nbytes / 2**30,
        "extrapolated_all_queries_s": build + scale * (total - build),
        "load_start": load0, "load_end": load1,
    }
    if args.recall:
        lists = np.concatenate(idx, axis=1)
        pos = np.sort(rng.choice(nq, min(args.recall, nq), replace=False))
        rows = pos if q_rows is None else q_rows[pos]
        t1 = time.perf_counter()
        out["recall"], out["recall_same_id"] = recall_of_rows(feats, modality, pid, rows, lists[pos], args.k)
        out["recall_exact_s"] = time.perf_counter() - t1
    print(json.dumps(out))


if __name__ == "__main__":
    main()
