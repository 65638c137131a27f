"""Refuse a clustering step that would run out of memory, before it runs out.

kNN + Jaccard on N features is the one step whose memory grows with the data set; a run
that is killed by the kernel halfway through an epoch loses the epoch and says nothing.
Two checks compare an estimate with the memory available at that moment and raise
:class:`ClusteringMemoryError` (one sentence: N, the estimate, what to change) instead:
:func:`require_clustering_memory` before the call, for the kNN and building V (bounded a
priori: :func:`bmil.cluster.estimate_jaccard_memory`, ``phase="before_join"``), and
:func:`join_memory_check`, which ``jaccard_distance`` calls once V is built, for the join
with V's actual size (:func:`bmil.cluster.estimate_join_memory`). The a priori bound on V
(300 entries a row at k1 = 30) is 1.3–6× what features give (53–238 measured), and at a
million images it alone would refuse runs that fit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

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
    """Bytes available on ``device``: host memory for the CPU, the smaller of the GPU's
    available memory (:func:`gpu_available_memory`) and the host's for CUDA (the sparse
    Jaccard phase always runs on the host). ``None`` when it cannot be read."""
    device = torch.device(device)
    host = host_available_memory()
    if device.type != "cuda":
        return host
    free = gpu_available_memory(device)
    return free if host is None else min(free, host)


def gpu_available_memory(device: torch.device | str) -> int:
    """Bytes a new allocation on the CUDA ``device`` can get: the driver's free memory
    (``torch.cuda.mem_get_info``, which counts PyTorch's cached blocks as used) plus the
    blocks PyTorch holds in its cache without using them (reserved − allocated)."""
    device = torch.device(device)
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(int(cached), 0)


def _hints(cfg: ClusterConfig, join: bool = False) -> str:
    """What to change; the join's memory depends on k1 and k2 (V's size), not on the kNN's settings."""
    change = ("lower cluster.k1 or cluster.k2" if join else
              f"lower cluster.block_size (now {cfg.block_size}) or cluster.k1, try cluster.backend="
              f"{'torch' if cfg.backend == 'faiss' else 'faiss'}")
    return f"{change}, free memory or use a machine with more, or set cluster.memory_check=false to try anyway"


def _require(
    estimate: int, what: str, cfg: ClusterConfig, device: torch.device | str, available: int | None,
    join: bool = False,
) -> None:
    """Raise :class:`ClusteringMemoryError` when ``estimate`` bytes exceed ``available``
    (default: :func:`available_memory` of ``device``); ``what`` names the step in the message.
    Nothing when ``cfg.memory_check`` is false or the available memory cannot be read."""
    if not cfg.memory_check:
        return
    if available is None:
        available = available_memory(device)
    if available is None:
        log.debug("available memory unknown: clustering memory check skipped")
        return
    if estimate > available:
        raise ClusteringMemoryError(
            f"{what} needs about {estimate / GIB:.2f} GiB but only {available / GIB:.2f} GiB is available on "
            f"{torch.device(device)}: {_hints(cfg, join)}"
        )
    log.debug("%s needs about %.2f GiB of %.2f GiB available", what, estimate / GIB, available / GIB)


def _estimate_before_join(n: int, dim: int, k1: int, cfg: ClusterConfig) -> int:
    return estimate_jaccard_memory(
        max(n, 1), max(k1, 1), max(dim, 1), cfg.block_size, k2=max(cfg.k2, 1), max_distance=cfg.eps,
        knn=resolve_knn(cfg.knn, n, cfg.approximate_above), unit_rows=True, phase="before_join", nprobe=cfg.nprobe,
    )


def require_clustering_memory(
    n: int,
    dim: int,
    k1: int,
    cfg: ClusterConfig,
    device: torch.device | str = "cpu",
    available: int | None = None,
) -> int:
    """Before clustering ``n`` features of width ``dim`` (unit rows, as extraction returns
    them, already in memory): raise :class:`ClusteringMemoryError` when the kNN and building
    V (bytes: :func:`~bmil.cluster.estimate_jaccard_memory` with ``k1``, ``cfg.k2``,
    ``cfg.block_size``, the distance thresholded at ``cfg.eps``, the kNN method ``cfg.knn``
    picks for ``n``, ``phase="before_join"``) exceed ``available`` bytes (default:
    :func:`available_memory` of ``device``). Returns the estimate in bytes. Skipped
    (estimate still returned) when ``cfg.memory_check`` is false or the available memory
    cannot be read. The join is checked later, by :func:`join_memory_check`.
    """
    estimate = _estimate_before_join(n, dim, k1, cfg)
    _require(estimate, f"clustering N = {n} features (d = {dim}, k1 = {k1}): kNN + Jaccard", cfg, device, available)
    return estimate


def join_memory_check(n: int, cfg: ClusterConfig, available: int | None = None) -> Callable[[int], None] | None:
    """The ``memory_check`` to pass to ``jaccard_distance`` for a clustering of ``n``
    features: raises :class:`ClusteringMemoryError` when the join needs more bytes than are
    available then (``available``, default: the host's available memory at that moment; the
    join runs on the host). None when ``cfg.memory_check`` is false."""
    if not cfg.memory_check:
        return None

    def check(estimate: int) -> None:
        _require(estimate, f"clustering N = {n} features: the Jaccard join", cfg, "cpu", available, join=True)

    return check


def largest_clustering(cfg: Config, num_visible: int, num_infrared: int) -> int:
    """Size N of the largest clustering a training run will do: intra clustering of the
    infrared images or of the visible subset (:func:`~bmil.cluster.visible_subsets`), and,
    when stage 2 clusters globally, its input (:func:`~bmil.cluster.association.global_input`:
    the visible subset intra clustering leaves out, or every visible image, plus every
    infrared one)."""
    c = cfg.cluster
    subset = min(num_visible, max(1, int(c.subset_ratio * num_visible)))
    largest = max(subset, num_infrared)
    if cfg.train.stage2_epochs > 0 and cfg.train.global_association:
        left_out = min(subset, num_visible - subset)
        visible = left_out if c.global_visible == "left_out" and left_out > 0 else num_visible
        largest = max(largest, visible + num_infrared)
    return largest


def require_training_memory(
    cfg: Config, num_visible: int, num_infrared: int, dim: int, available: int | None = None
) -> int:
    """At the start of training, before any features exist: the check of
    :func:`require_clustering_memory` for the largest clustering of the run (N rows) plus
    the features it will hold then (float32 features of every training image and the N
    rows selected from them), so that a run that cannot fit stops before its first epoch
    rather than at the first stage-2 epoch. Returns the estimate in bytes."""
    n = largest_clustering(cfg, num_visible, num_infrared)
    k1 = min(cfg.cluster.k1, max(n - 1, 1))
    features = 4 * max(dim, 1) * (num_visible + num_infrared + n)
    estimate = features + _estimate_before_join(n, dim, k1, cfg.cluster)
    what = (f"training on {num_visible + num_infrared} images (its largest clustering: N = {n}, "
            f"d = {dim}, k1 = {k1}): features + kNN + Jaccard")
    _require(estimate, what, cfg.cluster, "cpu", available)
    return estimate
