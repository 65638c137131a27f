"""Profile: where one clustering call's time and memory go (the modality-aware thresholded
Jaccard distance with approximate or exact neighbours, then DBSCAN), on benchmarks/jaccard.py's
``well`` (default) or ``weak`` features.

Stages: the kNN (for the approximate method split into k-means training, assigning the
candidates to lists, probing and the search proper, by wrapping bmil.cluster.knn's module
functions), the rest of ``jaccard_distance`` (reciprocity, expansion, weights, LQE and the
thresholded join) and DBSCAN. Peak RSS is the increase over the RSS once the features exist,
per phase (the high-water mark is reset after the kNN).

    python benchmarks/clustering_profile.py --n 200000 --knn approximate
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jaccard import _rss_kib, make_identity_features, reset_peak_rss  # noqa: E402  (benchmarks/jaccard.py)
from knn_scale import _timed, time_ivf_stages  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--knn", choices=("exact", "approximate"), default="approximate")
    parser.add_argument("--eps", type=float, default=0.6)
    parser.add_argument("--features", choices=("well", "weak"), default="well")
    args = parser.parse_args()

    import torch  # noqa: F401

    from bmil.cluster import dbscan_labels, jaccard_distance, label_quality

    knn_module = importlib.import_module("bmil.cluster.knn")
    jaccard_module = importlib.import_module("bmil.cluster.jaccard")
    encoding_module = importlib.import_module("bmil.cluster.jaccard.encoding")
    times: dict = {}
    time_ivf_stages(knn_module, times)
    _timed(encoding_module, "knn_per_group", lambda a, kw: "knn", times)
    peaks: dict = {}
    search = encoding_module.knn_per_group

    def knn_then_mark(*a, **kw):  # after each kNN call: note the peak so far, reset it
        try:
            return search(*a, **kw)
        finally:
            peaks["knn"] = max(peaks.get("knn", 0), _rss_kib("VmHWM") - base)
            reset_peak_rss()

    encoding_module.knn_per_group = knn_then_mark
    sizes: dict = {}
    thresholded = jaccard_module._thresholded_distance

    def note_v(v, *a, **kw):  # V's entries: what the sparse phase's memory grows with
        sizes["v_per_row"] = v.nnz / v.shape[0]
        return thresholded(v, *a, **kw)

    jaccard_module._thresholded_distance = note_v

    feats, modality, pid = make_identity_features(args.n, args.dim, args.features)
    base = _rss_kib("VmRSS")
    reset_peak_rss()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    dist = jaccard_distance(feats, 30, 6, modality=modality, max_distance=args.eps, knn=args.knn)
    t1 = time.perf_counter()
    peaks["jaccard_rest"] = _rss_kib("VmHWM") - base
    reset_peak_rss()
    labels = dbscan_labels(dist, args.eps, 4)
    t2 = time.perf_counter()
    peaks["dbscan"] = _rss_kib("VmHWM") - base
    out = {
        "n": args.n, "features": args.features, "knn_method": args.knn, "call_s": t2 - t0, "jaccard_s": t1 - t0,
        "knn_s": times.get("knn", 0.0), "kmeans_s": times.get("kmeans", 0.0), "assign_s": times.get("assign", 0.0),
        "probe_s": times.get("probe", 0.0),
        "search_s": times.get("knn", 0.0) - sum(times.get(s, 0.0) for s in ("kmeans", "assign", "probe")),
        "jaccard_rest_s": t1 - t0 - times.get("knn", 0.0), "dbscan_s": t2 - t1,
        "peak_gib": {k: v / 2**20 for k, v in peaks.items()}, "pairs_per_row": dist.nnz / args.n,
        "v_per_row": sizes.get("v_per_row"),
        "ari_ids": label_quality(labels, pid)["ari"], "load_start": load0, "load_end": os.getloadavg(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
