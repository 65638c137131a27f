"""Benchmark: time, peak memory, stored pairs, neighbour recall and DBSCAN agreement of the
(modality-aware) Jaccard distance: full or thresholded, exact or approximate neighbours.

Features (``--features``):
- ``clean``: about N/80 identities, visible:infrared about 2:1, same-identity cosine about
  0.5, other identities 0 (the original benchmark's features);
- ``well``: 16 images per identity, 35 % infrared, a modality offset, same-identity cosine
  about 0.54 (DBSCAN at eps 0.6 recovers the identities);
- ``weak``: the same with same-identity cosine about 0.25, as early in training.

Each configuration runs in a fresh subprocess so that its peak RSS (the increase over the
RSS after the features exist) is its own:
- ``knn``: the bare kNN the modality-aware distance needs (max(k1//2, k2) nearest of each
  modality for every row), exact, as ``jaccard_distance`` runs it (``knn_per_group``: one
  product per block of rows against all rows); ``knn_approx``: the same with the
  approximate method, and its recall@k1//2 against exact search on 2,000 sampled query rows
  (also the recall of the same-identity neighbours);
- ``full``: jaccard_distance with max_distance 1 (every pair sharing support), exact kNN;
- ``thr``: max_distance = eps, exact kNN; ``thr_approx``: max_distance = eps, approximate kNN.
Both thresholded runs cluster with DBSCAN (eps, min_samples 4); the table gives the ARI of
the approximate run's labels against the exact run's, and of each against the true ids
(outliers counted as singletons in both).

Each worker first makes two small calls (full and thresholded) that load the join's compiled
kernels (once per process; training repeats the call every epoch), then times its call
(``--repeats R``: R times, keeping the fastest; the floor is timed before the first run and
after each, and the fastest of those is kept).

Every exact configuration also times, in the same process (so that the ratios share the
machine's load): the floor, one matrix product of each block of 2,048 rows against all rows
plus its top-k (the least any exact kNN can cost), before and after the configuration's runs
(the fastest is the floor); the exact modality-aware kNN as ``jaccard_distance`` runs
it; and the same neighbours found by one search per modality (``knn`` with ``candidates``).
The ratios are to the floor.

    python benchmarks/jaccard.py --features weak --sizes 20000 --configs knn full thr thr_approx
    python benchmarks/jaccard.py --features well --sizes 34167 --configs knn knn_approx thr thr_approx
    python benchmarks/jaccard.py --features well --sizes 200000 --configs knn_approx thr_approx
    python benchmarks/jaccard.py --features well --sizes 34167 --configs knn_approx --nprobe 64

``--nprobe`` and ``--lists-per-sqrt`` override the approximate index's IVF_NPROBE and
IVF_LISTS_PER_SQRT (bmil.cluster.knn) in the worker processes only, to compare settings.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

CONFIGS = ("knn", "knn_approx", "full", "thr", "thr_approx")
FEATURES = ("clean", "well", "weak")
# noise norm per feature kind: same-identity cosine about 1 / (1 + noise²) (before the offset)
_NOISE = {"well": 0.9, "weak": 1.73}
_RECALL_QUERIES = 2000


def make_features(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``clean`` features [n, dim] and modality [n] of :func:`make_identity_features`
    (what benchmarks/clustering_step.py clusters)."""
    feats, modality, _ = make_identity_features(n, dim, "clean", seed)
    return feats, modality


def make_identity_features(
    n: int, dim: int, kind: str = "clean", seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit float32 features [n, dim], modality [n] (0 visible, 1 infrared) and ids [n].

    clean: each sample = centre of one of n/80 identities + noise (norm about 1) + modality
    shift (norm 0.5, infrared only), a third infrared. well / weak: n/16 identities of 16
    images each, 35 % infrared, noise norm 0.9 / 1.73, the same shift. Generated in chunks
    so that the only large allocation is the result.
    """
    rng = np.random.default_rng(seed)
    per_id, noise, infrared = (80, 1.0, 1 / 3) if kind == "clean" else (16, _NOISE[kind], 0.35)
    ids = max(1, n // per_id)
    centres = rng.standard_normal((ids, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    shift = rng.standard_normal(dim, dtype=np.float32)
    shift *= 0.5 / np.linalg.norm(shift)
    pid = rng.integers(0, ids, n) if kind == "clean" else rng.permutation(np.arange(n) % ids)
    modality = (rng.random(n) < infrared).astype(np.int64)
    feats = np.empty((n, dim), dtype=np.float32)
    for r0 in range(0, n, 4096):
        r1 = min(r0 + 4096, n)
        chunk = rng.standard_normal((r1 - r0, dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
        chunk += centres[pid[r0:r1]]
        chunk += modality[r0:r1, None].astype(np.float32) * shift
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        feats[r0:r1] = chunk
    return feats, modality, pid


def _singletons(labels: np.ndarray) -> np.ndarray:
    """DBSCAN labels with each outlier (-1) its own cluster, as bmil.cluster.label_quality
    counts them (sklearn's ARI would otherwise treat all outliers as one large cluster)."""
    out = labels.copy()
    outliers = out < 0
    out[outliers] = out.max() + 1 + np.arange(outliers.sum())
    return out


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the process's RSS high-water mark (VmHWM) to its current RSS, where the kernel allows."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def floor_seconds(feats: np.ndarray, k: int, block_size: int = 2048) -> float:
    """Seconds of the bare floor: each block of ``block_size`` rows multiplied by all rows,
    then its top-k (k = ``k``), float32, torch."""
    import torch

    x = torch.from_numpy(feats)
    t0 = time.perf_counter()
    with torch.no_grad():
        for r0 in range(0, len(x), block_size):
            torch.topk(x[r0 : r0 + block_size] @ x.T, k, dim=1)
    return time.perf_counter() - t0


def fused_modality_knn(feats: np.ndarray, modality: np.ndarray, k: int) -> np.ndarray:
    """idx [N, 2k]: the k nearest of each modality, exact, as jaccard_distance searches
    (knn_per_group: one product per block of rows against all rows)."""
    import torch

    knn_module = importlib.import_module("bmil.cluster.knn")
    found = knn_module.knn_per_group(torch.from_numpy(feats), [np.flatnonzero(modality == m) for m in (0, 1)], [k, k])
    return np.concatenate([idx for _, idx in found], axis=1)


def _modality_knn(feats: np.ndarray, modality: np.ndarray, k: int, method: str, queries=None) -> np.ndarray:
    """idx [Q, 2k]: the k nearest of each modality (exact or approximate), one search per modality."""
    from bmil.cluster import knn

    parts = [
        knn(feats, k, candidates=np.flatnonzero(modality == m), queries=queries, method=method)[1] for m in (0, 1)
    ]
    return np.concatenate(parts, axis=1)


def _recall(feats, modality, pid, approx: np.ndarray, k: int) -> tuple[float, float]:
    """recall@k per modality of ``approx`` [N, 2k] against exact search on sampled rows;
    and the share of the exact same-identity neighbours found."""
    rows = np.sort(np.random.default_rng(1).choice(len(feats), min(_RECALL_QUERIES, len(feats)), replace=False))
    return recall_of_rows(feats, modality, pid, rows, approx[rows], k)


def recall_of_rows(feats, modality, pid, rows: np.ndarray, found: np.ndarray, k: int) -> tuple[float, float]:
    """recall@k per modality of ``found`` [len(rows), 2k], the approximate neighbours of
    ``rows``, against exact search; and the share of the exact same-identity neighbours found.
    ``feats`` with unit rows are searched without a normalised copy (bmil.cluster.knn)."""
    exact = _modality_knn(feats, modality, k, "exact", queries=rows)
    hit = np.array([np.isin(e, a) for e, a in zip(exact, found, strict=True)])
    same = pid[exact] == pid[rows, None]
    return float(hit.mean()), float(hit[same].mean())


def _set_ivf(nprobe: int | None, lists_per_sqrt: float | None) -> None:
    """Benchmark-only override of the approximate index's parameters in this process:
    nprobe becomes the default of knn / knn_unit_rows (which jaccard_distance calls)."""
    knn_module = importlib.import_module("bmil.cluster.knn")  # the module (bmil.cluster.knn is the function)

    if nprobe is not None:
        knn_module.knn.__kwdefaults__["nprobe"] = nprobe
        knn_module.knn_unit_rows.__kwdefaults__["nprobe"] = nprobe
    if lists_per_sqrt is not None:
        knn_module.IVF_LISTS_PER_SQRT = lists_per_sqrt


def warm_up(eps: float) -> float:
    """Seconds of two small calls (full and thresholded) that load the join's compiled
    kernels, once per process; training's repeated calls pay this once, so the timed call
    comes after it."""
    from bmil.cluster import jaccard_distance

    feats, modality, _ = make_identity_features(640, 32, "weak", seed=1)
    t0 = time.perf_counter()
    for t in (1.0, eps):
        jaccard_distance(feats, 30, 6, modality=modality, max_distance=t)
    return time.perf_counter() - t0


def worker(config: str, n: int, args: argparse.Namespace) -> dict:
    """Run one configuration on fresh features; time, peak-RSS increase (bytes) and more."""
    import torch  # noqa: F401  (imported before the baseline, like any caller would)

    _set_ivf(args.nprobe, args.lists_per_sqrt)

    from bmil.cluster import dbscan_labels, jaccard_distance, label_quality

    feats, modality, pid = make_identity_features(n, args.dim, args.features)
    kk = max(args.k1 // 2, args.k2)
    out: dict = {"warm_up": warm_up(args.eps)}
    exact = config in ("knn", "full", "thr")
    if exact:
        floors = [floor_seconds(feats, kk)]
    base = _rss_kib("VmRSS")
    seconds, peaks = [], []
    for _ in range(args.repeats):
        lists = dist = None  # the previous run's result is freed before the next
        reset_peak_rss()
        t0 = time.perf_counter()
        if config == "knn":
            lists = fused_modality_knn(feats, modality, kk)
        elif config == "knn_approx":
            lists = _modality_knn(feats, modality, kk, "approximate")
        else:
            t = 1.0 if config == "full" else args.eps
            dist = jaccard_distance(
                feats, args.k1, args.k2, modality=modality, max_distance=t,
                knn="approximate" if config == "thr_approx" else "exact",
            )
            out["pairs_per_row"] = dist.nnz / n
        seconds.append(time.perf_counter() - t0)
        peaks.append((_rss_kib("VmHWM") - base) * 1024)
        if exact:  # the floor after each run too, so that both see the same spells of load
            floors.append(floor_seconds(feats, kk))
    out["seconds"], out["peak_bytes"] = min(seconds), max(peaks)
    if exact:
        out["floor"] = min(floors)
        t1 = time.perf_counter()
        if config != "knn":
            fused_modality_knn(feats, modality, kk)
        out["knn"] = out["seconds"] if config == "knn" else time.perf_counter() - t1
        t1 = time.perf_counter()
        _modality_knn(feats, modality, kk, "exact")
        out["knn_per_modality"] = time.perf_counter() - t1
    if config == "knn_approx":
        out["recall"], out["recall_same_id"] = _recall(feats, modality, pid, lists, kk)
    if config in ("thr", "thr_approx"):
        labels = dbscan_labels(dist, args.eps, 4)
        np.save(os.path.join(args.out, f"labels_{config}_{n}.npy"), labels)
        out["ari_ids"] = label_quality(labels, pid)["ari"]
    return out


def run_config(config: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--sizes", str(n), "--dim", str(args.dim),
           "--k1", str(args.k1), "--k2", str(args.k2), "--eps", str(args.eps), "--features", args.features,
           "--out", args.out, "--repeats", str(args.repeats)]
    if args.nprobe is not None:
        cmd += ["--nprobe", str(args.nprobe)]
    if args.lists_per_sqrt is not None:
        cmd += ["--lists-per-sqrt", str(args.lists_per_sqrt)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(n: int, config: str, res: dict, args: argparse.Namespace, ari: str) -> str:
    from bmil.cluster import estimate_jaccard_memory

    approximate = config in ("knn_approx", "thr_approx")
    t = 1.0 if config == "full" else args.eps
    method = "approximate" if approximate else "exact"
    estimate = "–" if config.startswith("knn") else (
        f"{estimate_jaccard_memory(n, args.k1, args.dim, k2=args.k2, max_distance=t, knn=method) / 2**30:.2f} GiB"
    )
    floor = res.get("floor") or args.bare_seconds
    ratio = f"{res['seconds'] / floor:.2f}" if floor else "–"
    searches = "–" if "knn" not in res else (
        f"{res['knn']:.1f} ({res['knn'] / floor:.2f}) | {res['knn_per_modality']:.1f} "
        f"({res['knn_per_modality'] / floor:.2f})"
    )
    searches = searches if "knn" in res else "– | –"
    pairs = f"{res['pairs_per_row']:.0f}" if "pairs_per_row" in res else "–"
    recall = f"{res['recall']:.3f} ({res['recall_same_id']:.3f})" if "recall" in res else "–"
    ari_ids = f"{res['ari_ids']:.3f}" if "ari_ids" in res else "–"
    what = {"knn": "bare kNN", "knn_approx": "bare kNN", "full": "full", "thr": f"t = {args.eps}",
            "thr_approx": f"t = {args.eps}"}[config]
    return (
        f"| {n:,} | {args.features} | {what} | {'approximate' if approximate else 'exact'} | {res['seconds']:.1f} | "
        f"{f'{floor:.1f}' if floor else '–'} | {ratio} | {searches} | {res['peak_bytes'] / 2**30:.2f} GiB | "
        f"{estimate} | {pairs} | {recall} | {ari} | {ari_ids} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 34167])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k1", type=int, default=30)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--eps", type=float, default=0.6)
    parser.add_argument("--features", choices=FEATURES, default="clean")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=1,
                        help="time each configuration's call this many times and keep the fastest "
                        "(and the fastest floor, timed before the first run and after each)")
    parser.add_argument("--bare-seconds", type=float, default=None,
                        help="seconds to divide by for configurations that do not measure the floor (the "
                             "approximate ones), e.g. N = 34,167's exact floor")
    parser.add_argument("--nprobe", type=int, default=None,
                        help="lists probed per query by the approximate kNN (default bmil.cluster.knn.IVF_NPROBE)")
    parser.add_argument("--lists-per-sqrt", type=float, default=None,
                        help="inverted lists per sqrt(candidates) (default bmil.cluster.knn.IVF_LISTS_PER_SQRT)")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0], args)))
        return
    args.out = args.out or tempfile.mkdtemp(prefix="bmil-jaccard-")
    load = os.getloadavg()[0]
    knn_module = importlib.import_module("bmil.cluster.knn")  # the module (bmil.cluster.knn is the function)

    nprobe = args.nprobe if args.nprobe is not None else knn_module.IVF_NPROBE
    lists = args.lists_per_sqrt if args.lists_per_sqrt is not None else knn_module.IVF_LISTS_PER_SQRT
    print(f"k1 = {args.k1}, k2 = {args.k2}, d = {args.dim}, float32, torch exact kNN, eps {args.eps}; "
          f"approximate: {lists:g}·sqrt(M) lists, nprobe {nprobe}; load average at start {load:.2f}\n")
    print("| N | features | distance | kNN | seconds | floor s | ratio to floor | modality-aware kNN s (ratio) "
          "| one search per modality s (ratio) | peak RSS increase | estimate | pairs per row "
          "| recall@k1/2 (same id) | DBSCAN ARI approx vs exact | ARI vs true ids |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for config in args.configs:
            res = run_config(config, n, args)
            ari = "–"
            exact_path = os.path.join(args.out, f"labels_thr_{n}.npy")
            if config == "thr_approx" and os.path.exists(exact_path):
                from sklearn.metrics import adjusted_rand_score

                approx_labels = np.load(os.path.join(args.out, f"labels_thr_approx_{n}.npy"))
                ari = f"{adjusted_rand_score(_singletons(np.load(exact_path)), _singletons(approx_labels)):.4f}"
            note = f"<!-- load {os.getloadavg()[0]:.1f}, warm-up {res['warm_up']:.2f} s -->"
            print(_row(n, config, res, args, ari), note, flush=True)


if __name__ == "__main__":
    main()
