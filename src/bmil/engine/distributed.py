"""Data-parallel training under ``torchrun``: process-group set-up, rank helpers, and the
collectives the epoch loop needs.

How a multi-process run divides the work (one process per GPU, NCCL; gloo on the CPU):

* feature extraction: rank r extracts a contiguous shard of the records; the shards are
  gathered in rank order, so every rank holds all features in record order;
* clustering: rank 0 alone clusters; the pseudo labels are broadcast;
* batches: all ranks draw the same P×K batch (same sampler seed) and rank r keeps its
  ``P / world_size`` identities, so a rank's batch is ``(P / world_size) × K`` images per
  modality and the global batch (and so every hyperparameter) is that of one process;
* memories: every memory update uses the batch features gathered from all ranks, in rank
  order (= the single-process batch order), so the memories stay identical on all ranks;
* gradients: averaged by DistributedDataParallel; only rank 0 writes logs and checkpoints.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every helper is the identity.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from bmil.errors import ConfigError

log = logging.getLogger(__name__)

# Rank 0 may evaluate or cluster for many minutes while the others wait in a collective.
_TIMEOUT = timedelta(minutes=120)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group described by torchrun's environment variables (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), or return a
    single-process context when there is none.

    On CUDA each process takes the GPU ``cuda:LOCAL_RANK`` and NCCL; on the CPU, gloo. An
    already initialised group (e.g. a test that spawned processes itself) is reused.
    """
    world = dist.get_world_size() if dist.is_initialized() else env_world_size()
    if world <= 1:
        return DistContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=_TIMEOUT)
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)
    log.info("process %d of %d on %s (%s)", ctx.rank, ctx.world_size, device, dist.get_backend())
    return ctx


def _comm_device() -> torch.device:
    """Tensors given to collectives live here: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.enabled:
        dist.barrier()


def broadcast_object(ctx: DistContext, value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` (any picklable object, e.g. numpy label arrays) on every rank."""
    if not ctx.enabled:
        return value
    box = [value if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_true(ctx: DistContext, flag: bool) -> bool:
    """True when ``flag`` is true on every rank (so all ranks take the same branch)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_rows(ctx: DistContext, rows: torch.Tensor, *, same_size: bool = False) -> torch.Tensor:
    """Concatenate every rank's ``rows`` [n_r, ...] in rank order → [Σ n_r, ...].

    Ranks may hold different n_r (the trailing dimensions and dtype must agree); with
    ``same_size`` the caller promises equal n_r (training batches), which saves exchanging
    the sizes and the host synchronisation reading them. The result is on ``rows``' device;
    no gradient flows through it.
    """
    if not ctx.enabled:
        return rows
    comm = _comm_device()
    local = rows.detach().to(comm).contiguous()
    if same_size:
        parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(rows.device)
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=comm)
    counts = [torch.zeros_like(count) for _ in range(ctx.world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).to(rows.device)


def average_buffers(ctx: DistContext, model: torch.nn.Module) -> None:
    """Make the model's buffers (BatchNorm running statistics) equal on all ranks: float
    buffers become their mean over ranks, the others rank 0's. Without SyncBatchNorm each
    rank tracks statistics of its own images; extraction and checkpoints need one set."""
    if not ctx.enabled:
        return
    comm = _comm_device()
    for buffer in model.buffers():
        value = buffer.detach().to(comm)
        if value.is_floating_point():
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= ctx.world_size
        else:
            dist.broadcast(value, src=0)
        buffer.copy_(value.to(buffer.device))


def shard_range(n: int, ctx: DistContext) -> slice:
    """This rank's contiguous share of ``n`` items (sizes differ by at most one)."""
    bounds = np.linspace(0, n, ctx.world_size + 1).round().astype(int)
    return slice(int(bounds[ctx.rank]), int(bounds[ctx.rank + 1]))


def gather_shards(ctx: DistContext, local: np.ndarray) -> np.ndarray:
    """Inverse of :func:`shard_range`: every rank's shard [n_r, ...] joined in order."""
    if not ctx.enabled:
        return local
    return gather_rows(ctx, torch.from_numpy(np.ascontiguousarray(local))).numpy()


def per_rank_ids(num_ids: int, ctx: DistContext) -> int:
    """Pseudo identities per rank and batch; ``train.num_ids`` must split evenly."""
    if num_ids % ctx.world_size:
        raise ConfigError(
            f"configuration key 'train.num_ids' ({num_ids}) must be a multiple of the number of "
            f"processes ({ctx.world_size}): each process takes an equal share of every batch's identities"
        )
    return num_ids // ctx.world_size


def require_one_forward_per_step(separate_global_step: bool, ctx: DistContext) -> None:
    """DDP reduces gradients once per forward; the combined step (intra and global losses
    from two forwards, one backward) would run two forwards before one backward."""
    if ctx.enabled and not separate_global_step:
        raise ConfigError(
            "configuration key 'train.separate_global_step' must be true with several processes: "
            "DistributedDataParallel needs one forward pass per backward pass"
        )


class IdentityShardSampler(Sampler[int]):
    """This rank's share of every P×K batch of a pseudo-identity sampler.

    ``batches`` yields ``iterations × num_ids × num_instances`` indices (the same on every
    rank); rank r keeps identities ``[r·p, (r+1)·p)`` of each batch, ``p = num_ids /
    world_size``, so it yields ``iterations × p × num_instances`` indices.
    """

    def __init__(self, batches: Any, ctx: DistContext) -> None:
        self.batches = batches
        self.share = per_rank_ids(batches.num_ids, ctx)
        self.rank = ctx.rank

    def __len__(self) -> int:
        return self.batches.iterations * self.share * self.batches.num_instances

    def indices(self) -> np.ndarray:
        b = self.batches
        grid = b.indices().reshape(b.iterations, b.num_ids, b.num_instances)
        start = self.rank * self.share
        return grid[:, start : start + self.share].reshape(-1)

    def __iter__(self):
        return iter(self.indices().tolist())


def convert_sync_bn(model: torch.nn.Module, ctx: DistContext, enabled: bool) -> tuple[torch.nn.Module, bool]:
    """BatchNorm → SyncBatchNorm when ``enabled`` and the job has several CUDA processes.

    Returns the model and whether it now synchronises. SyncBatchNorm keeps the state-dict
    keys of BatchNorm, so checkpoints load either way. torch synchronises BN on GPUs only:
    on the CPU the request is ignored with a warning.
    """
    if not (enabled and ctx.enabled):
        return model, False
    if ctx.device.type != "cuda":
        log.warning("model.sync_bn needs CUDA processes: BatchNorm stays per process on %s", ctx.device.type)
        return model, False
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model), True


def wrap_ddp(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """The module used for training steps: DistributedDataParallel when distributed.

    ``find_unused_parameters`` is on because an epoch may train one modality only (the
    other has no cluster), which leaves that modality's stem without a gradient.
    """
    if not ctx.enabled:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def node_cores() -> int:
    """CPU cores this process may run on (its affinity set; ``os.cpu_count`` elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextmanager
def clustering_threads(ctx: DistContext) -> Iterator[int]:
    """Context for the clustering step, which rank 0 runs alone while the other ranks wait in
    a collective: rank 0 gets the node's cores as torch threads, less one for each other
    process of the node (a rank waiting on its GPU may spin a core). torchrun sets
    ``OMP_NUM_THREADS=1``, which would leave the kNN and the Jaccard join on one core. The
    torch thread count is restored afterwards. Yields the threads this rank uses; without a
    process group, or on the other ranks, nothing changes."""
    before = torch.get_num_threads()
    if not (ctx.enabled and ctx.is_main):
        yield before
        return
    others = max(0, int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1)
    threads = max(before, node_cores() - others)
    torch.set_num_threads(threads)
    log.debug("clustering on %d threads (was %d)", threads, before)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group if this context joined one."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
