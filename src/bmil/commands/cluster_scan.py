"""Choose DBSCAN's eps by looking, not by trial and error: ``bmil cluster-scan``.

The features are extracted once and each Jaccard distance (visible, infrared, global) is
computed once; only DBSCAN runs per eps, since eps changes nothing before it. For every eps
the scan reports what training would log for an epoch: clusters and outliers per modality
and global, the share of global clusters holding both modalities, and ARI/NMI against the
true ids where the data set has them.

Unlike a training epoch, the visible images are clustered whole (no random subset), so
one eps gives one answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bmil.cluster import cluster_counts, dbscan_labels, label_quality, num_clusters, relabel
from bmil.cluster.association import cluster_distance
from bmil.commands import config_from_args
from bmil.config import ClusterConfig, Config
from bmil.errors import ConfigError
from bmil.records import MODALITIES, MODALITY_NAMES, record_arrays


def parse_eps(text: str) -> list[float]:
    """``"0.3:0.7:0.05"`` → [0.3, 0.35, …, 0.7] (both ends included), ``"0.4,0.6"`` → [0.4, 0.6],
    ``"0.5"`` → [0.5]. Every eps must lie in (0, 1); raises ConfigError otherwise."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--eps {text!r} must be START:STOP:STEP with STOP >= START and STEP > 0, or comma-separated values"
        ) from None
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise ConfigError(f"--eps {text!r} must give values in (0, 1)")
    return values


def _labels(distance, eps: float, min_samples: int, n: int) -> np.ndarray:
    if distance is None:
        return np.full(n, -1, dtype=np.int64)
    return relabel(dbscan_labels(distance, eps, min_samples))


def _quality(labels: np.ndarray, pids: np.ndarray | None) -> dict[str, float]:
    if pids is None:
        return {}
    quality = label_quality(labels, pids)
    return {"ari": quality["ari"], "nmi": quality["nmi"]}


def scan_eps(
    features: np.ndarray,
    modality: np.ndarray,
    eps_values: Sequence[float],
    cfg: ClusterConfig,
    pids: np.ndarray | None = None,
) -> list[dict[str, float]]:
    """One row per eps of the clustering statistics of ``features`` [N, d] (L2-normalised).

    modality: int [N] (0 visible, 1 infrared). pids: true ids [N], or None when unknown
    (then no ARI/NMI). The distances follow ``cfg`` (k1, k2, modality_aware, lqe, backend,
    knn) with the same small-data fallbacks as training, thresholded at the largest eps.

    Each row: ``eps``; ``<modality>/clusters``, ``<modality>/outliers`` (per-modality
    clustering); ``global/clusters``, ``global/outliers``, ``global/cross_clusters``,
    ``global/cross_share`` (cross / clusters, NaN without clusters); with ids,
    ``<modality>/ari``, ``<modality>/nmi``, ``global/ari``, ``global/nmi``.
    """
    modality = np.asarray(modality, dtype=np.int64)
    index = {m: np.flatnonzero(modality == m) for m in MODALITIES}
    # the distances keep the pairs within the largest eps scanned: every DBSCAN run sees all it needs
    cfg = dataclasses.replace(cfg, eps=max(float(e) for e in eps_values)) if len(eps_values) else cfg
    intra = {m: cluster_distance(features[index[m]], cfg) for m in MODALITIES}
    glob = cluster_distance(features, cfg, modality if cfg.modality_aware else None)
    rows = []
    for eps in eps_values:
        row: dict[str, float] = {"eps": float(eps)}
        for m in MODALITIES:
            name = MODALITY_NAMES[m]
            labels = _labels(intra[m], eps, cfg.min_samples, len(index[m]))
            row[f"{name}/clusters"] = num_clusters(labels)
            row[f"{name}/outliers"] = int(np.sum(labels < 0))
            quality = _quality(labels, None if pids is None else pids[index[m]])
            row.update({f"{name}/{k}": v for k, v in quality.items()})
        labels = _labels(glob, eps, cfg.min_samples, len(features))
        counts = cluster_counts(labels, modality)
        row["global/clusters"] = counts["clusters"]
        row["global/outliers"] = counts["outliers"]
        row["global/cross_clusters"] = counts["cross_clusters"]
        row["global/cross_share"] = counts["cross_clusters"] / counts["clusters"] if counts["clusters"] else math.nan
        row.update({f"global/{k}": v for k, v in _quality(labels, pids).items()})
        rows.append(row)
    return rows


def scan_table(rows: Sequence[dict[str, float]]) -> str:
    """Markdown table of :func:`scan_eps` rows (ARI/NMI columns only when present)."""
    names = [MODALITY_NAMES[m] for m in MODALITIES]
    labelled = bool(rows) and "global/ari" in rows[0]
    header = ["eps"]
    for name in names:
        header += [f"{name} clusters", f"{name} outliers"] + ([f"{name} ARI"] if labelled else [])
    header += ["global clusters", "global outliers", "both modalities"]
    header += ["global ARI", "global NMI"] if labelled else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---:"] * len(header)) + "|"]
    for row in rows:
        cells = [f"{row['eps']:.3g}"]
        for name in names:
            cells += [str(row[f"{name}/clusters"]), str(row[f"{name}/outliers"])]
            cells += [f"{row[f'{name}/ari']:.3f}"] if labelled else []
        share = row["global/cross_share"]
        cells += [str(row["global/clusters"]), str(row["global/outliers"]),
                  "–" if math.isnan(share) else f"{100 * share:.1f} %"]
        cells += [f"{row['global/ari']:.3f}", f"{row['global/nmi']:.3f}"] if labelled else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cluster_scan(
    cfg: Config,
    checkpoint: str | Path,
    eps_values: Sequence[float],
    device: torch.device | str = "cpu",
    *,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Extract the training features of ``cfg``'s data set once with ``checkpoint``'s model
    (its architecture and input size come from the checkpoint; feature as in training:
    ``cluster.flip``),
    then :func:`scan_eps` with ``cfg.cluster``. ARI/NMI only when every image has an id."""
    from bmil.engine.data_setup import has_labels, train_records
    from bmil.inference import CLUSTERING_RESIZE, feature_extractor, load_model

    model, trained = load_model(checkpoint, device)
    records = train_records(cfg)
    features = feature_extractor(
        model, cfg, device, flip=cfg.cluster.flip, progress=progress, desc="train features",
        size=(trained.data.height, trained.data.width), resize=CLUSTERING_RESIZE, feature="clustering",
    )(records)
    pids, _, modality = record_arrays(records)
    if torch.device(device).type == "cuda":  # the kNN of every distance then runs on the GPU, as in training
        features = torch.from_numpy(features).to(device)
    return scan_eps(features, modality, eps_values, cfg.cluster, pids if has_labels(records) else None)


def run(args: argparse.Namespace) -> int:
    """Print the scan of ``--eps`` as a table (and write its rows to ``--out`` as JSON)."""
    from bmil.inference import resolve_device

    eps_values = parse_eps(args.eps)
    cfg = config_from_args(args)
    rows = cluster_scan(cfg, args.checkpoint, eps_values, resolve_device(args.device), progress=not args.quiet)
    print(f"{cfg.data.dataset} training set, k1={cfg.cluster.k1}, k2={cfg.cluster.k2}, "
          f"min_samples={cfg.cluster.min_samples}, {'modality-aware' if cfg.cluster.modality_aware else 'plain'} "
          "global distance; visible images clustered whole (no subset)")
    print(scan_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"rows written to {args.out}")
    return 0
