"""The main job on the embedded synthetic dataset: stage 1, stage 2, and the two effects
the paper claims (cross-modality mAP rises in stage 2; the modality-aware Jaccard distance
gives better global clusters than the plain one)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bmil.cluster import label_quality
from bmil.config import Config
from bmil.engine.association import cluster_once
from bmil.engine.checkpoint import load_checkpoint
from bmil.engine.trainer import Trainer

log = logging.getLogger(__name__)


def clustering_ari(trainer: Trainer, features: np.ndarray) -> dict[str, float]:
    """Global DBSCAN on ``features`` [N, D] with the plain and the modality-aware Jaccard
    distance (same eps, k1, k2): ARI, and the precision and recall of the visible-infrared
    pairs the clusters join (see :func:`bmil.cluster.label_quality`)."""
    out = {}
    for name, aware in (("ari_plain", False), ("ari_modality_aware", True)):
        cfg = replace(trainer.cfg.cluster, modality_aware=aware)
        labels = cluster_once(features, cfg, trainer.modality if aware else None)
        quality = label_quality(labels, trainer.pids, trainer.modality)
        out[name] = float(quality["ari"])
        out[name.replace("ari", "cross_precision")] = float(quality["cross_precision"])
        out[name.replace("ari", "cross_recall")] = float(quality["cross_recall"])
    return out


def _headline(metrics: dict[str, Any]) -> dict[str, float]:
    first = next(iter(metrics.values())) if metrics else {}
    return {"rank1": float(first.get("rank1", float("nan"))), "mAP": float(first.get("mAP", float("nan")))}


def stage1_clustering(trainer: Trainer, checkpoint: str | Path) -> dict[str, dict[str, float]]:
    """:func:`clustering_ari` on the training images with ``checkpoint``'s weights, on its test
    features (flip-averaged, as METHOD.md defines a model's feature: ``"test"``) and on the
    features training clusters (``"training"``: the same ones unless ``cluster.flip`` is off)."""
    trainer.model.load_state_dict(load_checkpoint(checkpoint)["model"])
    test = trainer.extract(trainer.records, flip=True, desc="stage-1 test features")
    out = {"test": clustering_ari(trainer, test)}
    if trainer.cfg.cluster.flip:
        out["training"] = out["test"]
    else:
        out["training"] = clustering_ari(trainer, trainer.extract(trainer.records, flip=False, desc="stage-1 features"))
    return out


def run_demo(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Train both stages on the synthetic data; write and return ``summary.json``'s content."""
    trainer = Trainer(cfg, progress=progress)
    result = trainer.fit()
    clustering = stage1_clustering(trainer, Path(cfg.output) / "checkpoints" / "best_stage1.pt")
    summary = {
        "stage1": _headline(result["stage1"]["metrics"]),
        "stage2": _headline(result["stage2"]["metrics"]),
        "clustering": clustering["test"],
        "clustering_training_features": clustering["training"],
        "stage1_epoch": result["stage1"]["epoch"],
        "stage2_epoch": result["stage2"]["epoch"],
        "selected_by": result["stage1"]["selected_by"],
        "stage1_last": _headline(result["stage1"]["last"]["metrics"]),
        "stage2_last": _headline(result["stage2"]["last"]["metrics"]),
    }
    flat = {
        "stage1.mAP": summary["stage1"]["mAP"], "stage1.rank1": summary["stage1"]["rank1"],
        "stage2.mAP": summary["stage2"]["mAP"], "stage2.rank1": summary["stage2"]["rank1"],
        "clustering.ari_plain": clustering["test"]["ari_plain"],
        "clustering.ari_modality_aware": clustering["test"]["ari_modality_aware"],
    }
    summary.update(flat)
    Path(cfg.output, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def demo_table(summary: dict[str, Any]) -> str:
    """The demo's Markdown result table."""
    training = summary["clustering_training_features"]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    return "\n".join([
        "| result | value |",
        "|---|---|",
        f"| stage 1 cross-modality Rank-1 / mAP (%) | {pct(summary['stage1.rank1'])} / {pct(summary['stage1.mAP'])} |",
        f"| stage 2 cross-modality Rank-1 / mAP (%) | {pct(summary['stage2.rank1'])} / {pct(summary['stage2.mAP'])} |",
        f"| global clustering ARI on stage-1 features, plain Jaccard | {summary['clustering.ari_plain']:.3f} |",
        "| global clustering ARI on stage-1 features, modality-aware Jaccard | "
        f"{summary['clustering.ari_modality_aware']:.3f} |",
        f"| visible–infrared pairs joined, plain: precision / recall | {_pairs(summary['clustering'], 'plain')} |",
        "| visible–infrared pairs joined, modality-aware: precision / recall | "
        f"{_pairs(summary['clustering'], 'modality_aware')} |",
        *([] if training == summary["clustering"] else [
            "| the same ARI on the unflipped features training clusters (cluster.flip=false): plain / modality-aware | "
            f"{training['ari_plain']:.3f} / {training['ari_modality_aware']:.3f} |"]),
        f"| models kept | {summary['selected_by']}; last epoch: stage 1 {_scores(summary['stage1_last'])}, "
        f"stage 2 {_scores(summary['stage2_last'])} |",
    ]) + ("\n\nStage-1 features: the best stage-1 model's test features (flip-averaged, as training clusters them), "
          "all training images.")


def _pairs(clustering: dict[str, float], distance: str) -> str:
    """'precision / recall' of the visible-infrared pairs one clustering joins."""
    return f"{clustering[f'cross_precision_{distance}']:.2f} / {clustering[f'cross_recall_{distance}']:.2f}"


def _scores(headline: dict[str, float]) -> str:
    """'Rank-1 / mAP' in % of one evaluation."""
    return f"{100 * headline['rank1']:.1f} / {100 * headline['mAP']:.1f}"
