"""Refuse a clustering step that would run out of memory, before it starts.

kNN + Jaccard on N features is the one step whose memory grows with the data set; a run
that is killed by the kernel halfway through an epoch loses the epoch and says nothing.
:func:`require_clustering_memory` compares :func:`bmil.cluster.estimate_jaccard_memory`
with the memory available now and raises :class:`ClusteringMemoryError` (one sentence:
N, the estimate, what to change) instead.
"""

from __future__ import annotations

import logging
import os

import torch

from bmil.cluster import estimate_jaccard_memory
from bmil.cluster.knn import resolve_knn
from bmil.config import ClusterConfig, Config
from bmil.errors import BmilError

log = logging.getLogger(__name__)

GIB = float(1 << 30)
MEMINFO = "/proc/meminfo"


class ClusteringMemoryError(BmilError):
    """The clustering step would need more memory than is available."""


def parse_meminfo(text: str) -> int | None:
    """Bytes of ``MemAvailable`` in the text of /proc/meminfo (``None`` when absent)."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            scale = 1024 if len(parts) > 2 and parts[2].lower() == "kb" else 1
            return int(parts[1]) * scale
    return None


def host_available_memory() -> int | None:
    """Bytes of host memory available to a new allocation, or ``None`` when unknown.

    Linux: MemAvailable from /proc/meminfo (free memory plus reclaimable caches); elsewhere
    the free physical pages reported by ``os.sysconf``.
    """
    try:
        with open(MEMINFO) as handle:
            found = parse_meminfo(handle.read())
        if found is not None:
            return found
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes available on ``device``: host memory for the CPU, the smaller of the GPU's free
    memory (``torch.cuda.mem_get_info``) and the host's for CUDA (the sparse Jaccard phase
    always runs on the host). ``None`` when it cannot be read."""
    device = torch.device(device)
    host = host_available_memory()
    if device.type != "cuda":
        return host
    free, _ = torch.cuda.mem_get_info(device)
    return int(free) if host is None else min(int(free), host)


def require_clustering_memory(
    n: int,
    dim: int,
    k1: int,
    cfg: ClusterConfig,
    device: torch.device | str = "cpu",
    available: int | None = None,
) -> int:
    """Raise :class:`ClusteringMemoryError` when kNN + Jaccard on ``n`` features of width
    ``dim`` (bytes: :func:`~bmil.cluster.estimate_jaccard_memory` with ``k1``, ``cfg.k2``,
    ``cfg.block_size``, the distance thresholded at ``cfg.eps`` as clustering computes it,
    and the kNN method ``cfg.knn`` picks for ``n``) exceeds ``available`` bytes (default:
    :func:`available_memory` of ``device``). Returns the estimate in bytes. Skipped
    (estimate still returned) when ``cfg.memory_check`` is false or the available memory
    cannot be read.
    """
    estimate = estimate_jaccard_memory(
        max(n, 1), max(k1, 1), max(dim, 1), cfg.block_size, k2=max(cfg.k2, 1), max_distance=cfg.eps,
        knn=resolve_knn(cfg.knn, n, cfg.approximate_above),
    )
    if not cfg.memory_check:
        return estimate
    if available is None:
        available = available_memory(device)
    if available is None:
        log.debug("available memory unknown: clustering memory check skipped")
        return estimate
    if estimate > available:
        raise ClusteringMemoryError(
            f"clustering N = {n} features (d = {dim}, k1 = {k1}) needs about {estimate / GIB:.2f} GiB "
            f"for kNN + Jaccard but only {available / GIB:.2f} GiB is available on {torch.device(device)}: "
            f"lower cluster.block_size (now {cfg.block_size}) or cluster.k1, try cluster.backend="
            f"{'torch' if cfg.backend == 'faiss' else 'faiss'}, free memory or use a machine with more, "
            "or set cluster.memory_check=false to try anyway"
        )
    log.debug("clustering N = %d needs about %.2f GiB of %.2f GiB available", n, estimate / GIB, available / GIB)
    return estimate


def largest_clustering(cfg: Config, num_visible: int, num_infrared: int) -> int:
    """Size N of the largest clustering a training run will do: all images when stage 2
    clusters globally, otherwise the larger modality (the visible subset counted whole)."""
    t = cfg.train
    if t.stage2_epochs > 0 and t.global_association:
        return num_visible + num_infrared
    return max(num_visible, num_infrared)


def require_training_memory(cfg: Config, num_visible: int, num_infrared: int, dim: int) -> int:
    """At the start of training, the check of :func:`require_clustering_memory` for the
    largest clustering of the run, so a run that cannot fit stops before its first epoch
    rather than at the first stage-2 epoch. Returns the estimate in bytes."""
    n = largest_clustering(cfg, num_visible, num_infrared)
    return require_clustering_memory(n, dim, min(cfg.cluster.k1, max(n - 1, 1)), cfg.cluster)
