"""From a configuration to records and an evaluation, through the dataset registry
(``bmil.data.registry``): nothing here names a dataset."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bmil.config import Config, default_workers
from bmil.data.records import MODALITIES, MODALITY_NAMES, Record, record_arrays
from bmil.data.registry import get_dataset
from bmil.errors import DatasetError

log = logging.getLogger(__name__)

Extractor = Callable[[list[Record]], np.ndarray]


def loader_workers(cfg: Config, device: torch.device | str) -> int:
    """DataLoader worker processes: ``data.workers`` when set, else the device default
    (:func:`bmil.config.default_workers`: 0 on a CPU, min(8, cores / GPU processes) on CUDA)."""
    if cfg.data.workers is not None:
        return cfg.data.workers
    return default_workers(torch.device(device).type == "cuda")


def prepare_root(cfg: Config) -> Path:
    """The dataset root; a generated dataset (synthetic) is made there when absent."""
    root = Path(cfg.data.root).expanduser()
    entry = get_dataset(cfg.data.dataset)
    if entry.generate is not None:
        entry.generate(root, cfg)
    elif not root.is_dir():
        raise DatasetError(f"dataset root {root} not found: set data.root to the folder that holds your {entry.title}")
    return root


def train_records(cfg: Config) -> list[Record]:
    """Training records of the configured dataset, checked to hold both modalities."""
    root = prepare_root(cfg)
    records = get_dataset(cfg.data.dataset).train(root, cfg)
    _, _, modality = record_arrays(records)
    for mod in MODALITIES:
        if not np.any(modality == mod):
            raise DatasetError(
                f"no {MODALITY_NAMES[mod]} training images found under {root}: bmil needs both modalities"
            )
    return records


def log_dataset_counts(cfg: Config) -> list[str]:
    """Log what the dataset root holds (INFO) and each difference from the published counts
    (WARNING, one line each, e.g. "SYSU-MM01 train ids: found 8, expected 395"); returns the
    differences. Only file lists are read, no image is decoded; datasets without published
    counts (synthetic, folder) are skipped."""
    from bmil.data.check import compare_counts, dataset_counts

    name = cfg.data.dataset
    entry = get_dataset(name)
    if not entry.published_counts or not entry.checkable:
        return []
    counts = dataset_counts(name, Path(cfg.data.root).expanduser())
    if entry.per_trial:  # the trained trial only
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


def can_score(cfg: Config) -> bool:
    """Whether the configured dataset has a test protocol for this configuration."""
    entry = get_dataset(cfg.data.dataset)
    return entry.test is not None and bool(entry.scorable(cfg))


def run_protocol(cfg: Config, extract: Extractor, trials: int | None = None) -> list:
    """Evaluate with the dataset's test protocol (``eval.trials`` galleries unless
    ``trials``); ``[]`` with a log line when the dataset cannot be scored (an unlabelled folder)."""
    if not can_score(cfg):
        log.info("evaluation skipped: the %s has no person ids, so no score can be computed "
                 "(a folder laid out as <camera>/<person id>/ is scored with data.ids_from_folders=true)",
                 get_dataset(cfg.data.dataset).title)
        return []
    root = Path(cfg.data.root).expanduser()
    return get_dataset(cfg.data.dataset).test(extract, root, cfg, cfg.eval.trials if trials is None else trials)


_HINTED: set[tuple] = set()


def one_cluster_advice(cfg: Config, images: int) -> str:
    """What to change when clustering ``images`` images gave a single cluster, from the
    numbers at hand: ``cluster.k1`` (how many neighbours each image's reciprocal list holds)
    should stay below the size of the clusters a batch needs, about images / (2 ×
    ``train.num_ids``); when it already does, ``cluster.eps`` is what merges everything."""
    c = cfg.cluster
    target = max(c.min_samples, images // (2 * cfg.train.num_ids))
    if c.k1 > target:
        change = (f"lower cluster.k1 from {c.k1} to about {target} (at most images / (2 × train.num_ids) = "
                  f"{images} / {2 * cfg.train.num_ids}, so that a neighbour list stays within one person)")
    else:
        change = (f"cluster.k1={c.k1} is already small for {images} images, so lower cluster.eps from {c.eps:g} "
                  f"(e.g. cluster.eps={max(0.05, c.eps - 0.15):.2g})")
    return (f"{change}, and choose cluster.eps with `bmil cluster-scan --config ... --checkpoint CKPT "
            "--eps 0.2:0.7:0.05`")


def one_cluster_hint(cfg: Config, images: int) -> None:
    """Once per run (output folder and clustering settings): what to change when an epoch's
    clustering gives a single cluster, which skips a loss (:func:`one_cluster_advice`)."""
    key = (cfg.output, cfg.cluster.k1, cfg.cluster.k2, cfg.cluster.eps)
    if key in _HINTED:
        return
    _HINTED.add(key)
    log.warning(
        "clustering gave a single cluster on %d training images with cluster.k1=%d, cluster.eps=%g: %s; "
        "this hint is not repeated",
        images, cfg.cluster.k1, cfg.cluster.eps, one_cluster_advice(cfg, images),
    )
