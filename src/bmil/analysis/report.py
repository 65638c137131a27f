"""``bmil analyze``: the paper's diagnostic figures as PNG files and their numbers as JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from bmil.analysis.curves import read_curves
from bmil.analysis.distances import distance_summary, identity_pair_distances
from bmil.analysis.figures import plot_curves, plot_distance_histograms, plot_neighbour_share, plot_tsne
from bmil.analysis.neighbours import neighbour_modality_share, share_summary
from bmil.analysis.tsne import tsne_points
from bmil.cluster import clustering_k1, jaccard_distance
from bmil.config import ClusterConfig
from bmil.errors import DatasetError

log = logging.getLogger(__name__)


def _write_json(values: dict, path: Path) -> Path:
    path.write_text(json.dumps(values, indent=2))
    return path


def analyze_features(
    features: np.ndarray,
    modality: np.ndarray,
    pids: np.ndarray | None,
    out_dir: str | Path,
    cluster: ClusterConfig | None = None,
    *,
    neighbours: int = 30,
    tsne_ids: int = 10,
    seed: int = 0,
) -> dict[str, Path]:
    """Figures 1a, 3, 1b/5 of ``features`` [N, d] into ``out_dir``; returns {name: path}.

    modality: [N] 0/1. pids: [N] person ids (-1 unknown) or None: figures 3 and the t-SNE
    need ids and are skipped without them. cluster: k1, k2, eps, lqe of the Jaccard
    distances (defaults: those of docs/method.md), k1 shrunk to fit small sets as training shrinks it
    (:func:`bmil.cluster.clustering_k1`).
    Files: neighbours.{png,json}, distances.{png,json}, tsne.{png,json}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cluster = cluster or ClusterConfig()
    modality = np.asarray(modality, np.int64)
    written: dict[str, Path] = {}

    k = min(neighbours, len(features) - 1)
    share = neighbour_modality_share(features, modality, k)
    summary = share_summary(share, modality)
    written["neighbours.png"] = plot_neighbour_share(summary, k, out / "neighbours.png")
    written["neighbours.json"] = _write_json({"k": k, "share": summary}, out / "neighbours.json")

    labelled = pids is not None and bool(np.any(np.asarray(pids) >= 0))
    if not labelled:
        log.info("no person ids: the distance histograms and the t-SNE are skipped")
        return written
    pids = np.asarray(pids)
    k1 = clustering_k1(cluster.k1, len(features), modality)  # training's rule, for both distances
    if k1 < 2:
        log.warning("a modality has fewer than 2 images: the distance histograms and the t-SNE are skipped")
        return written
    k2 = max(1, min(cluster.k2, k1))
    pairs, numbers = {}, {"k1": k1, "k2": k2, "eps": cluster.eps}
    for name, mod in (("plain", None), ("modality-aware", modality)):
        dist = jaccard_distance(features, k1, k2, modality=mod, lqe=cluster.lqe, backend=cluster.backend)
        pairs[name] = identity_pair_distances(dist, pids, modality)
        numbers[name] = {group: distance_summary(v, cluster.eps) for group, v in pairs[name].items()}
    written["distances.png"] = plot_distance_histograms(pairs, cluster.eps, out / "distances.png")
    written["distances.json"] = _write_json(numbers, out / "distances.json")

    tsne = tsne_points(features, pids, modality, tsne_ids, seed)
    written["tsne.png"] = plot_tsne(tsne["points"], tsne["pids"], tsne["modality"], out / "tsne.png")
    written["tsne.json"] = _write_json(
        {key: np.asarray(value).tolist() for key, value in tsne.items()}, out / "tsne.json"
    )
    return written


def analyze_run(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Figure 4 of a run folder: curves.{png,json} (into ``run_dir/analysis`` by default)."""
    curves = read_curves(run_dir)
    if not curves:
        raise DatasetError(f"{Path(run_dir) / 'metrics.jsonl'} logs no pseudo-label quality (ari/..., global/ari)")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    return {
        "curves.png": plot_curves(curves, out / "curves.png"),
        "curves.json": _write_json(curves, out / "curves.json"),
    }
