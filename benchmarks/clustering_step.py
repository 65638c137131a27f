"""Benchmark: one full epoch's clustering step at SYSU-MM01 size.

34,167 × 2048 clustered random unit features from benchmarks/jaccard.py (about N/80
identities, visible:infrared about 2:1 — SYSU-MM01 has 22,258:11,909 — with an offset
between the modalities),
then what a stage-2 epoch runs (``bmil.cluster.association`` ``intra_labels`` and ``global_labels``, default cluster
settings: k1 30, k2 6, eps 0.6, min_samples 4): visible Jaccard + DBSCAN on a random 50 %
subset, infrared Jaccard + DBSCAN, global modality-aware Jaccard + DBSCAN + modality split.
With ``--device cuda`` the features are a CUDA tensor, so the kNN runs on the GPU (the
trainer does the same on CUDA). Prints a Markdown table.

    .venv/bin/python benchmarks/clustering_step.py [--device cuda] [--n 34167]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bmil.cluster import random_subset  # noqa: E402
from bmil.cluster.association import cluster_once, global_labels  # noqa: E402
from bmil.config import ClusterConfig  # noqa: E402
from bmil.inference import resolve_device  # noqa: E402
from bmil.records import INFRARED, VISIBLE  # noqa: E402
from jaccard import make_features  # noqa: E402  (the Jaccard benchmark's feature generator)

SYSU_TRAIN_IMAGES = 34_167  # 22,258 visible + 11,909 infrared


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def clusters(labels: np.ndarray) -> str:
    return f"{len(np.unique(labels[labels >= 0])):,} clusters, {int(np.sum(labels < 0)):,} outliers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--n", type=int, default=SYSU_TRAIN_IMAGES)
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    cfg = ClusterConfig()
    feats, modality = make_features(args.n, args.dim)
    features = torch.from_numpy(feats).to(device) if device.type == "cuda" else feats
    rng = np.random.default_rng(0)

    rows = []
    for mod, label in ((VISIBLE, "visible (50 % subset)"), (INFRARED, "infrared")):
        own = features[modality == mod]
        if mod == VISIBLE:  # what intra_labels does: cluster a fresh random subset
            own = own[random_subset(len(own), cfg.subset_ratio, rng)]
        labels, seconds = timed(lambda x=own: cluster_once(x, cfg), device)
        rows.append((label, len(own), seconds, clusters(labels)))
    (glob, sub), seconds = timed(lambda: global_labels(features, modality, cfg, split=True), device)
    cross = int(np.sum(np.bincount(sub.sub_to_cluster) == 2)) if len(sub.sub_to_cluster) else 0
    rows.append(("global, modality-aware", args.n, seconds, f"{clusters(glob)}, {cross:,} with both modalities"))
    total = sum(r[2] for r in rows)

    print(f"One stage-2 clustering step, N = {args.n:,} × {args.dim} ({int(np.sum(modality == 0)):,} visible, "
          f"{int(np.sum(modality == 1)):,} infrared), k1 {cfg.k1}, k2 {cfg.k2}, eps {cfg.eps}, lqe {cfg.lqe}; "
          f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print("| step | images | seconds | result |")
    print("|---|---|---|---|")
    for label, n, seconds, result in rows:
        print(f"| {label} | {n:,} | {seconds:.1f} | {result} |")
    print(f"| **whole step** | {args.n:,} | **{total:.1f}** | |")


if __name__ == "__main__":
    main()
