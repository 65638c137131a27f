"""Benchmark: time and peak memory of the sparse (modality-aware) Jaccard distance.

For each N, clustered random unit features (about N/80 identities, visible:infrared about
2:1, an offset between the modalities) are generated; each configuration runs in a fresh
subprocess so that its peak RSS is its own. Prints a Markdown table.

    python benchmarks/jaccard.py --sizes 5000 20000 34167 --dim 2048 --k1 30 --k2 6
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

CONFIGS = ("knn_plain", "plain", "knn_modality", "modality")


def make_features(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit float32 features [n, dim] around n/80 identity centres, and modality [n].

    Each sample = centre + noise (norm about 1) + modality shift (norm 0.5, infrared
    only); two samples of one identity have cosine about 0.5, of two identities about 0.
    Generated in chunks so that the only large allocation is the result.
    """
    rng = np.random.default_rng(seed)
    ids = max(1, n // 80)
    centres = rng.standard_normal((ids, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    shift = rng.standard_normal(dim, dtype=np.float32)
    shift *= 0.5 / np.linalg.norm(shift)
    pid = rng.integers(0, ids, n)
    modality = (rng.random(n) < 1 / 3).astype(np.int64)
    feats = np.empty((n, dim), dtype=np.float32)
    for r0 in range(0, n, 4096):
        r1 = min(r0 + 4096, n)
        chunk = rng.standard_normal((r1 - r0, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        chunk += centres[pid[r0:r1]]
        chunk += modality[r0:r1, None].astype(np.float32) * shift
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        feats[r0:r1] = chunk
    return feats, modality


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(config: str, n: int, dim: int, k1: int, k2: int) -> dict:
    """Run one configuration on fresh features; time and peak-RSS increase (bytes)."""
    import torch  # noqa: F401  (imported before the baseline, like any caller would)

    from bmil.cluster import jaccard_distance, knn

    feats, modality = make_features(n, dim)
    base = _rss_kib("VmRSS")
    try:  # reset the high-water mark to the current RSS where the kernel allows it
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    nnz_per_row = None
    if config == "knn_plain":
        knn(feats, k1)
    elif config == "knn_modality":
        kk = max(k1 // 2, k2)
        for m in (0, 1):
            knn(feats, kk, candidates=np.flatnonzero(modality == m))
    else:
        dist = jaccard_distance(feats, k1, k2, modality=modality if config == "modality" else None)
        nnz_per_row = dist.nnz / n
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    return {"seconds": seconds, "peak_bytes": (peak - base) * 1024, "nnz_per_row": nnz_per_row}


def run_config(config: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--sizes", str(n), "--dim", str(args.dim),
           "--k1", str(args.k1), "--k2", str(args.k2)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 34167])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k1", type=int, default=30)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from bmil.cluster import estimate_jaccard_memory

    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0], args.dim, args.k1, args.k2)))
        return

    print(f"k1 = {args.k1}, k2 = {args.k2}, d = {args.dim}, float32, torch backend\n")
    print(
        "| N | distance | Jaccard s | its kNN s | ratio | peak RSS increase | kNN alone peak "
        "| estimate_jaccard_memory | nonzeros per row |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for mode in ("plain", "modality"):
            bare = run_config(f"knn_{mode}", n, args)
            full = run_config(mode, n, args)
            name = "plain" if mode == "plain" else "modality-aware"
            print(
                f"| {n:,} | {name} | {full['seconds']:.1f} | {bare['seconds']:.1f} | "
                f"{full['seconds'] / bare['seconds']:.2f} | {full['peak_bytes'] / 2**30:.2f} GiB | "
                f"{bare['peak_bytes'] / 2**30:.2f} GiB | "
                f"{estimate_jaccard_memory(n, args.k1, args.dim) / 2**30:.2f} GiB | {full['nnz_per_row']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
