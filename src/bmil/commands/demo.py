"""``bmil demo``: the main job on the embedded synthetic dataset: stage 1, stage 2, and the two effects
the paper claims (cross-modality mAP rises in stage 2; the modality-aware Jaccard distance
gives better global clusters than the plain one)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bmil.cluster import label_quality
from bmil.cluster.association import cluster_once, global_input
from bmil.commands import preset_path
from bmil.config import Config, load_config
from bmil.engine.checkpoint import load_checkpoint
from bmil.engine.trainer import Trainer

log = logging.getLogger(__name__)


def clustering_ari(trainer: Trainer, features: np.ndarray, index: np.ndarray | None = None) -> dict[str, float]:
    """Global DBSCAN on ``features`` [N, D] (only the rows ``index``, default all) with the
    plain and the modality-aware Jaccard distance (same eps, k1, k2): ARI, and the precision
    and recall of the visible-infrared pairs the clusters join (see
    :func:`bmil.cluster.label_quality`), and ``images``, how many were clustered."""
    index = np.arange(len(features)) if index is None else index
    modality, pids = trainer.run.modality[index], trainer.run.pids[index]
    out = {"images": float(len(index))}
    for name, aware in (("ari_plain", False), ("ari_modality_aware", True)):
        cfg = replace(trainer.cfg.cluster, modality_aware=aware)
        labels = cluster_once(features[index], cfg, modality if aware else None)
        quality = label_quality(labels, pids, modality)
        out[name] = float(quality["ari"])
        out[name.replace("ari", "cross_precision")] = float(quality["cross_precision"])
        out[name.replace("ari", "cross_recall")] = float(quality["cross_recall"])
    return out


def _headline(metrics: dict[str, Any]) -> dict[str, float]:
    first = next(iter(metrics.values())) if metrics else {}
    return {"rank1": float(first.get("rank1", float("nan"))), "mAP": float(first.get("mAP", float("nan")))}


def first_global_input(trainer: Trainer) -> np.ndarray:
    """Positions of the images stage 2's first global clustering sees (the visible half its
    epoch's split leaves out of intra clustering, and every infrared image), drawn as the
    trainer draws them at that epoch."""
    _, subsets = trainer.epoch_split(trainer.cfg.train.stage1_epochs)
    return global_input(trainer.run.modality, trainer.cfg.cluster, subsets[1] if subsets is not None else None)


def stage1_clustering(trainer: Trainer, checkpoint: str | Path) -> dict[str, dict[str, float]]:
    """:func:`clustering_ari` with ``checkpoint``'s weights (the model stage 2 starts from) on
    the images stage 2's first global clustering sees (``"global"``: the comparison the
    paper's effect is about) and on all training images (``"all"``); both on its flip-averaged
    clustering features (:func:`~bmil.inference.combine_views`). ``"training"``: the
    ``"global"`` comparison on the features training clusters (the same ones unless
    ``cluster.flip`` is off)."""
    trainer.run.model.load_state_dict(load_checkpoint(checkpoint)["model"])
    flipped = trainer.extract(trainer.run.records, flip=True, desc="stage-1 features")
    index = first_global_input(trainer)
    out = {"global": clustering_ari(trainer, flipped, index), "all": clustering_ari(trainer, flipped)}
    if trainer.cfg.cluster.flip:
        out["training"] = out["global"]
    else:
        unflipped = trainer.extract(trainer.run.records, flip=False, desc="stage-1 features")
        out["training"] = clustering_ari(trainer, unflipped, index)
    return out


def run_demo(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Train both stages on the synthetic data; write and return ``summary.json``'s content."""
    trainer = Trainer(cfg, progress=progress)
    result = trainer.fit()
    clustering = stage1_clustering(trainer, Path(cfg.output) / "checkpoints" / "best_stage1.pt")
    summary = {
        "stage1": _headline(result["stage1"]["metrics"]),
        "stage2": _headline(result["stage2"]["metrics"]),
        "clustering": clustering["global"],
        "clustering_all_images": clustering["all"],
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
        "clustering.ari_plain": clustering["global"]["ari_plain"],
        "clustering.ari_modality_aware": clustering["global"]["ari_modality_aware"],
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
        "| the same ARI on all training images: plain / modality-aware | "
        f"{summary['clustering_all_images']['ari_plain']:.3f} / "
        f"{summary['clustering_all_images']['ari_modality_aware']:.3f} |",
        *([] if training == summary["clustering"] else [
            "| the same ARI on the unflipped features training clusters (cluster.flip=false): plain / modality-aware | "
            f"{training['ari_plain']:.3f} / {training['ari_modality_aware']:.3f} |"]),
        f"| models kept | {summary['selected_by']}; last epoch: stage 1 {_scores(summary['stage1_last'])}, "
        f"stage 2 {_scores(summary['stage2_last'])} |",
    ]) + ("\n\nStage-1 features: the best stage-1 model's clustering features (the mean of the image's and its "
          "mirror's unit BN-neck outputs, as training clusters them). "
          f"Global clustering: the {summary['clustering']['images']:.0f} images stage 2's first epoch clusters "
          "(the visible half intra clustering leaves out, and every infrared image).")


def _pairs(clustering: dict[str, float], distance: str) -> str:
    """'precision / recall' of the visible-infrared pairs one clustering joins."""
    return f"{clustering[f'cross_precision_{distance}']:.2f} / {clustering[f'cross_recall_{distance}']:.2f}"


def _scores(headline: dict[str, float]) -> str:
    """'Rank-1 / mAP' in % of one evaluation."""
    return f"{100 * headline['rank1']:.1f} / {100 * headline['mAP']:.1f}"


def run(args: argparse.Namespace) -> int:
    """Train on the synthetic data (``configs/demo.yaml`` with the command line's overrides,
    ``--out`` the run folder) and print the result table."""
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"output={args.out}")
    cfg = load_config(preset_path("demo"), overrides)
    summary = run_demo(cfg, progress=not args.quiet)
    print(demo_table(summary))
    print(f"\nsummary written to {Path(cfg.output) / 'summary.json'}")
    return 0
