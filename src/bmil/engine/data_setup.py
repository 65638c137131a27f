"""From a configuration to records and an evaluation, through the dataset registry
(``bmil.datasets``): nothing here names a dataset."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bmil.config import Config, cores_per_process, default_workers
from bmil.datasets import compare_counts, dataset_counts, get_dataset
from bmil.errors import DatasetError
from bmil.records import MODALITIES, MODALITY_NAMES, Record, record_arrays

log = logging.getLogger(__name__)

Extractor = Callable[[list[Record]], np.ndarray]


PREFETCH = 2
"""Batches each DataLoader worker keeps ready (torch's default ``prefetch_factor``)."""
SHM = "/dev/shm"


def loader_workers(cfg: Config, device: torch.device | str, loaders: int = 1) -> int:
    """DataLoader worker processes of each of ``loaders`` loaders alive at once: ``data.workers``
    when set, else the device default (:func:`bmil.config.default_workers`: 0 on a CPU, up to
    8 on CUDA); with several loaders, at most cores per process / ``loaders`` (at least 1),
    so that stage 2's four loaders on a node of several GPU processes do not start more
    workers than there are cores."""
    cuda = torch.device(device).type == "cuda"
    wanted = cfg.data.workers if cfg.data.workers is not None else default_workers(cuda)
    if loaders <= 1 or wanted == 0:
        return wanted
    return max(1, min(wanted, cores_per_process() // loaders))


def shm_bytes(path: str | Path = SHM) -> int | None:
    """Free bytes of the shared-memory file system that worker processes hand batches
    through (``None`` where there is none, e.g. not Linux)."""
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return None


def shm_workers(workers: int, loaders: int, batch_bytes: int, free: int | None) -> tuple[int, str | None]:
    """Workers per loader that fit in ``free`` bytes of /dev/shm when ``loaders`` loaders of
    ``workers`` workers each hold :data:`PREFETCH` batches of ``batch_bytes`` per worker;
    returns (workers, None) when they fit, else (fewer workers, the sentence to log)."""
    need = loaders * workers * PREFETCH * batch_bytes
    if workers == 0 or free is None or need <= free:
        return workers, None
    fitting = int(free // max(1, loaders * PREFETCH * batch_bytes))
    mib = 1 << 20
    return min(workers, fitting), (
        f"{SHM} has {free / mib:.0f} MiB free but {loaders} loader(s) x {workers} workers x {PREFETCH} prefetched "
        f"batches of {batch_bytes / mib:.0f} MiB need {need / mib:.0f} MiB (too little shared memory ends in "
        f"'Bus error'): using {min(workers, fitting)} workers per loader; give the container more "
        f"(docker run --shm-size=8g) or set data.workers lower"
    )


def extraction_workers(cfg: Config, device: torch.device | str, height: int, width: int) -> int:
    """Workers of a feature-extraction loader (one loader: :func:`loader_workers`), fewer when
    /dev/shm cannot hold their prefetched batches of ``train.extract_batch`` float32 images of
    ``height`` × ``width`` (logged in one sentence)."""
    workers = loader_workers(cfg, device)
    batch_bytes = cfg.train.extract_batch * 3 * height * width * 4
    workers, warning = shm_workers(workers, 1, batch_bytes, shm_bytes() if workers else None)
    if warning:
        log.warning(warning)
    return workers


def prepare_root(cfg: Config) -> Path:
    """The dataset root; a generated dataset (synthetic) is made there when absent."""
    root = Path(cfg.data.root).expanduser()
    entry = get_dataset(cfg.data.dataset)
    if entry.generate is not None:
        _generate_once_per_node(lambda: entry.generate(root, cfg))
    elif not root.is_dir():
        raise DatasetError(f"dataset root {root} not found: set data.root to the folder that holds your {entry.title}")
    return root


def _generate_once_per_node(generate: Callable[[], object]) -> None:
    """Run ``generate`` (idempotent: it finds an existing dataset and does nothing) in the
    first process of each node first, while the node's other processes of a torchrun job
    wait, then in those (which find it made): no two processes write one folder."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        generate()
        return
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if first:
        generate()
    dist.barrier()
    if not first:
        generate()


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
