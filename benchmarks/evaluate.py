"""Time bmil.evaluation.evaluate on SYSU-MM01-sized problems and print a Markdown table.

3,803 queries (the SYSU-MM01 infrared test images) against galleries of 3,000 and 12,000
images, for every protocol. Distances are float32 cosine distances of synthetic features
(96 identities, cluster centre + noise), so there are realistic numbers of matches and ties.

    .venv/bin/python benchmarks/evaluate.py [--repeats 3] [--gallery 3000 12000]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from bmil.evaluation import evaluate

NUM_QUERIES = 3803
NUM_IDS = 96
FEATURE_DIM = 64


def synthetic_problem(num_q: int, num_g: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((NUM_IDS, FEATURE_DIM)).astype(np.float32)
    q_pids = rng.integers(0, NUM_IDS, num_q)
    g_pids = rng.integers(0, NUM_IDS, num_g)
    q = centres[q_pids] + 1.5 * rng.standard_normal((num_q, FEATURE_DIM)).astype(np.float32)
    g = centres[g_pids] + 1.5 * rng.standard_normal((num_g, FEATURE_DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    distmat = (1.0 - q @ g.T).astype(dtype)
    q_cams = rng.choice([3, 6], num_q)
    g_cams = rng.choice([1, 2, 4, 5], num_g)
    return distmat, q_pids, g_pids, q_cams, g_cams


def best_time(problem, protocol: str, repeats: int) -> tuple[float, dict]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = evaluate(*problem, protocol=protocol)
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is shown")
    parser.add_argument("--gallery", type=int, nargs="+", default=[3000, 12000])
    args = parser.parse_args()

    print(f"numpy {np.__version__}, {platform.processor() or platform.machine()}, best of {args.repeats} runs")
    print()
    print("| queries × gallery | distances | protocol | time (s) | Rank-1 | mAP |")
    print("|---|---|---|---:|---:|---:|")
    cases = [(g, np.float32) for g in args.gallery] + [(args.gallery[0], np.float64)]
    for num_g, dtype in cases:
        problem = synthetic_problem(NUM_QUERIES, num_g, dtype)
        protocols = ("sysu", "regdb", "standard", "llcm") if dtype == np.float32 else ("sysu",)
        for protocol in protocols:
            seconds, result = best_time(problem, protocol, args.repeats)
            print(
                f"| {NUM_QUERIES:,} × {num_g:,} | {np.dtype(dtype).name} | {protocol} | "
                f"{seconds:.3f} | {100 * result['cmc'][0]:.1f} | {100 * result['mAP']:.1f} |"
            )


if __name__ == "__main__":
    main()
