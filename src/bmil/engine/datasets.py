"""From a configuration to records and an evaluation: the one place that knows which
reader and which protocol belong to which dataset."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bmil import data
from bmil.config import Config
from bmil.data.records import INFRARED, VISIBLE, Record, record_arrays
from bmil.errors import DatasetError

log = logging.getLogger(__name__)

Extractor = Callable[[list[Record]], np.ndarray]


def prepare_root(cfg: Config) -> Path:
    """The dataset root; the synthetic dataset is generated there when absent."""
    root = Path(cfg.data.root).expanduser()
    if cfg.data.dataset == "synthetic":
        s = cfg.data.synthetic
        data.make_synthetic(
            root, num_ids=s.num_ids, num_train_ids=s.num_train_ids, images_per_camera=s.images_per_camera,
            height=s.height, width=s.width, seed=s.seed,
        )
    elif not root.is_dir():
        raise DatasetError(f"dataset root {root} not found: set data.root to the {cfg.data.dataset} folder")
    return root


def train_records(cfg: Config) -> list[Record]:
    """Training records of the configured dataset, checked to hold both modalities."""
    root = prepare_root(cfg)
    name = cfg.data.dataset
    if name in ("synthetic", "sysu"):
        records = data.sysu_train(root)
    elif name == "regdb":
        records = data.regdb_train(root, cfg.data.trial)
    elif name == "llcm":
        records = data.llcm_train(root)
    else:
        records = data.folder_train(root)
    _, _, modality = record_arrays(records)
    for mod, label in ((VISIBLE, "visible"), (INFRARED, "infrared")):
        if not np.any(modality == mod):
            raise DatasetError(f"no {label} training images found under {root}: bmil needs both modalities")
    return records


def log_dataset_counts(cfg: Config) -> list[str]:
    """Log what the dataset root holds (INFO) and each difference from the published counts
    (WARNING, one line each, e.g. "SYSU-MM01 train ids: found 8, expected 395"); returns the
    differences. Only file lists are read, no image is decoded; synthetic and folder data
    have no published counts and are skipped."""
    from bmil.data.check import compare_counts, dataset_counts

    name = cfg.data.dataset
    if name not in ("sysu", "regdb", "llcm"):
        return []
    counts = dataset_counts(name, Path(cfg.data.root).expanduser())
    if name == "regdb":  # the trained trial only
        counts = {k: v for k, v in counts.items() if k.startswith(f"trial {cfg.data.trial} ")}
    log.info("%s: %s", name, ", ".join(f"{k} {v}" for k, v in counts.items()))
    differences = compare_counts(name, counts)
    for line in differences:
        log.warning("%s (bmil check-data --dataset %s lists every difference)", line, name)
    return differences


def has_labels(records: list[Record]) -> bool:
    """True when every record carries a person id (scores can be computed)."""
    pids, _, _ = record_arrays(records)
    return bool(len(pids)) and bool(np.all(pids >= 0))


def run_protocol(cfg: Config, extract: Extractor, trials: int | None = None) -> list:
    """Evaluate with the dataset's test protocol; ``[]`` for unlabelled user folders."""
    from bmil import evaluation

    root = Path(cfg.data.root).expanduser()
    name = cfg.data.dataset
    n_trials = cfg.eval.trials if trials is None else trials
    if name in ("synthetic", "sysu"):
        return [evaluation.evaluate_sysu(extract, root, mode=cfg.eval.mode, trials=n_trials, shots=cfg.eval.shots)]
    if name == "regdb":
        return evaluation.evaluate_regdb(extract, root, trial=cfg.data.trial, direction=cfg.eval.direction)
    if name == "llcm":
        direction = {"v2t": "v2i", "t2v": "i2v"}.get(cfg.eval.direction, cfg.eval.direction)
        return evaluation.evaluate_llcm(extract, root, direction=direction, trials=n_trials)
    log.info("evaluation skipped: the folder dataset has no person ids, so no score can be computed")
    return []
