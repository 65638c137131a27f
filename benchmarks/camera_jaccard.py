"""Global-clustering ARI of the plain, modality-aware and camera-and-modality-aware Jaccard
distances on the same training features (docs/benchmarks.md, "Camera-and-modality-aware
Jaccard").

Features come from a checkpoint (``--checkpoint``, any number, each gives rows) or from a
randomly initialised model of the checkpoint's architecture (``--random-init CKPT``);
the dataset is the checkpoint's configuration with ``KEY=VALUE`` overrides (e.g.
``--set data.root=...``). Each distance feeds DBSCAN (eps, min_samples 4) over all images of
both modalities; ARI against the true ids counts each outlier as its own cluster
(``bmil.cluster.label_quality``).

Example:
    .venv/bin/python benchmarks/camera_jaccard.py --checkpoint runs/x/checkpoints/best_stage1.pt \
        --random-init runs/x/checkpoints/best_stage1.pt --k1 30 20 --eps 0.6 --set data.root=data/synthetic
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bmil.cluster import dbscan_labels, jaccard_distance, label_quality
from bmil.config import load_config, save_config
from bmil.inference import load_model, train_set_features
from bmil.model import build_model
from bmil.records import record_arrays

MODES = ("plain", "modality-aware", "camera+modality-aware")


def features_of(checkpoint: str, overrides: list[str], random_init: bool, seed: int = 0):
    model, cfg = load_model(checkpoint)
    if overrides:
        saved = Path("/tmp") / f"camera_jaccard_{Path(checkpoint).stem}.yaml"
        save_config(cfg, saved)
        cfg = load_config(saved, overrides)
    if random_init:
        torch.manual_seed(seed)
        model = build_model(depth=cfg.model.depth, non_local=cfg.model.non_local, pretrained="none").eval()
    feats, records = train_set_features(model, cfg, "cpu", progress=False)
    return feats, records, cfg


def scores(feats, records, k1: int, k2: int, eps: float) -> list[dict]:
    pids, camids, modality = record_arrays(records)
    rows = []
    for mode in MODES:
        start = time.perf_counter()
        dist = jaccard_distance(
            feats, k1, k2,
            modality=None if mode == "plain" else modality,
            camera=camids if mode.startswith("camera") else None,
        )
        labels = dbscan_labels(dist, eps, 4)
        quality = label_quality(labels, pids, modality)
        rows.append({"mode": mode, "seconds": time.perf_counter() - start, **quality})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="*", default=[], help="trained checkpoints")
    parser.add_argument("--random-init", nargs="*", default=[], help="checkpoints whose architecture to re-init")
    parser.add_argument("--k1", type=int, nargs="+", default=[30])
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.6])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="configuration override, repeatable (e.g. --set data.root=data/synthetic)")
    args = parser.parse_args()
    print("| features | N (vis/ir) | k1 | eps | distance | ARI | clusters | outliers | cross prec. | cross recall |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    sources = [(c, False) for c in args.checkpoint] + [(c, True) for c in args.random_init]
    for checkpoint, random_init in sources:
        feats, records, _ = features_of(checkpoint, args.overrides, random_init)
        _, _, modality = record_arrays(records)
        name = "random init" if random_init else Path(checkpoint).parent.parent.name + "/" + Path(checkpoint).name
        size = f"{len(feats)} ({int(np.sum(modality == 0))}/{int(np.sum(modality == 1))})"
        for k1 in args.k1:
            for eps in args.eps:
                for row in scores(feats, records, k1, args.k2, eps):
                    print(
                        f"| {name} | {size} | {k1} | {eps:g} | {row['mode']} | {row['ari']:.3f} | {row['n_clusters']} "
                        f"| {row['outlier_ratio']:.2f} | {row['cross_precision']:.2f} | {row['cross_recall']:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
