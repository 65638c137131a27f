"""A training run's set-up and resumable state: records, model (DDP when distributed),
training datasets and loaders, optimiser and schedule, checkpoint loading and saving, and
the optimiser step. :func:`build_run` makes it; :class:`~bmil.engine.trainer.Trainer` runs
the epochs on it."""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bmil.cluster.memory_check import require_training_memory
from bmil.config import Config, TrainConfig, config_to_dict, cores_per_process
from bmil.data import PseudoIdentitySampler, TrainDataset, infrared_views, visible_views
from bmil.data.resized_cache import resized_caches
from bmil.engine import distributed
from bmil.engine.checkpoint import load_checkpoint
from bmil.engine.data_setup import (
    has_labels,
    loader_workers,
    log_dataset_counts,
    shm_bytes,
    shm_workers,
    train_records,
)
from bmil.engine.forward import Batches, ModalityFeatures, forward_batches
from bmil.errors import BmilError, CheckpointError, ConfigError
from bmil.inference import FEATURE_DESCRIPTION, resolve_device, signature_difference
from bmil.model import model_from_config, model_signature
from bmil.records import INFRARED, MODALITIES, VISIBLE, Record, record_arrays

log = logging.getLogger(__name__)


class TrainingError(BmilError):
    """Training cannot go on (e.g. a non-finite loss); the message says what to do."""


def seed_everything(seed: int, epoch: int, rank: int = 0) -> np.random.Generator:
    """Seed torch and Python for one epoch and return the epoch's numpy generator, so an
    epoch's randomness depends only on (seed, epoch, rank): that is what makes resume exact.
    ``epoch`` may be -1 (set-up before the first epoch). torch and Python (the augmentations
    drawn in the training process) differ per ``rank``; the numpy generator, which draws the
    epoch's visible split and must be the same on every rank, does not."""
    mixed = (seed * 1_000_003 + epoch + 1 + rank * 7_919_000_003) % (2**31)
    torch.manual_seed(mixed)
    random.seed(mixed)
    return np.random.default_rng([seed, epoch + 1])


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels where torch has them (``train.deterministic``); otherwise cuDNN
    picks its fastest convolution algorithms (training batches all have one size, so the
    search is made once per shape)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def worker_seed(seed: int, modality: int, rank: int) -> int:
    """The seed of a training loader's worker generator: distinct per (loader ``seed``, which
    already holds the epoch, ``modality``, ``rank``)."""
    return int(np.random.SeedSequence([seed, modality, rank]).generate_state(1, np.uint64)[0] >> 1)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: numpy and Python ``random`` in a worker follow the
    worker's torch seed, which the loader draws from the torch RNG that
    :func:`seed_everything` seeds every epoch; so worker randomness depends only on
    (train.seed, epoch, worker), never on the parent process's numpy state."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def check_signature(expected: dict, state: dict, path: str | Path) -> None:
    """A checkpoint's architecture must equal the configured one (in every fact the
    checkpoint records: one written before ``width`` was recorded is not held to it)."""
    found = state.get("signature")
    if signature_difference(found, expected):
        raise CheckpointError(
            f"checkpoint {path} was trained with {found}, but the configuration builds {expected}: "
            "set model.depth, model.width, model.last_stride, model.non_local, model.non_local_width "
            "and model.gem_learnable to match it"
        )


def adam(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Adam:
    """The release's optimiser (Adam, L2 weight decay added to the gradient), in torch's fused
    kernel: one pass over the parameters instead of about ten (the demo's ResNet-18 on a 2-core
    CPU: 5.3 ms a step against 20 ms for the multi-tensor loop); the same update up to
    floating-point rounding."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)


def align_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor of the shape of its parameter (Adam's moments)
    that parameter's memory layout, dtype and device, in place.

    ``load_state_dict`` moves the saved state to the parameter's device and dtype but keeps
    the saved strides: a checkpoint written from NCHW parameters (on the CPU) and loaded for
    channels_last ones (on CUDA) would leave moments the fused Adam kernel refuses."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if not torch.is_tensor(value) or value.shape != param.shape:
                    continue
                if value.stride() != param.stride() or value.dtype != param.dtype or value.device != param.device:
                    state[key] = torch.empty_like(param).copy_(value)


@dataclass
class StageBest:
    """One evaluation kept for a stage (the selected or the last): its ``train.select_by``
    score of the first setting, epoch and metrics."""

    score: float = -1.0
    epoch: int = -1
    metrics: dict[str, Any] = field(default_factory=dict)


def batch_ids(train: TrainConfig, modality: int) -> int:
    """P, the pseudo identities of one training batch of ``modality`` (``train.num_ids``, or
    ``train.visible_num_ids`` for visible images when set)."""
    if modality == VISIBLE and train.visible_num_ids is not None:
        return train.visible_num_ids
    return train.num_ids


def stage_views(cfg: Config, stage: int) -> dict[int, list]:
    """Training views per modality in ``stage`` (the infrared view drops its jitter in stage 2)."""
    d = cfg.data
    return {
        VISIBLE: visible_views(d.height, d.width, d.channel_aug, d.pad, d.augmentation, d.jitter),
        # data.infrared_jitter false: the jitter-free stage-2 view in stage 1 too (the release's RegDB).
        INFRARED: infrared_views(d.height, d.width, d.pad, stage=stage if d.infrared_jitter else 2,
                                 augmentation=d.augmentation, jitter=d.jitter),
    }


@dataclass
class Run:
    """Everything a training run holds between epochs.

    records: the training records; pids, camids, modality: their arrays [N]; index: modality
    → positions [N_m] of its images. model: the bare network (extraction, state_dict,
    checkpoints); train_model: the same parameters behind DDP when distributed (training
    steps). datasets: modality → its training dataset. start_epoch, best, last, history: the
    progress a checkpoint restores.
    """

    cfg: Config
    dist: distributed.DistContext
    records: list[Record]
    pids: np.ndarray
    camids: np.ndarray
    modality: np.ndarray
    index: dict[int, np.ndarray]
    labelled: bool
    model: nn.Module
    sync_bn: bool
    signature: dict[str, Any]
    datasets: dict[int, TrainDataset]
    train_model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    start_epoch: int = 0
    best: dict[int, StageBest] = field(default_factory=lambda: {1: StageBest(), 2: StageBest()})
    last: dict[int, StageBest] = field(default_factory=lambda: {1: StageBest(), 2: StageBest()})
    history: list[dict[str, Any]] = field(default_factory=list)
    stage: int = 1
    _workers_said: tuple | None = field(default=None, repr=False)
    _few_ids_warned: set[int] = field(default_factory=set, repr=False)  # batch sizes warned about

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.output) / "checkpoints"

    def rank_ids(self, modality: int) -> int:
        """This process's share of the identities of every batch of ``modality``
        (:func:`batch_ids`)."""
        return distributed.per_rank_ids(batch_ids(self.cfg.train, modality), self.dist)

    # ------------------------------------------------------------ optimiser and weights
    def new_optimizer(self) -> None:
        """A fresh Adam and StepLR schedule (each stage starts one)."""
        t = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = adam(params, t.lr, t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=t.lr_step, gamma=t.lr_gamma)

    def read_checkpoint(self, path: str | Path, *, required: bool = True) -> dict[str, Any] | None:
        """The checkpoint at ``path`` as rank 0 reads it, on every rank: ranks on other nodes
        need not see the file (no shared file system), and all ranks load the same bytes.
        ``None`` when rank 0 finds no file and ``required`` is false; a missing (required)
        or unreadable file raises :class:`CheckpointError` on every rank."""
        reply = None
        if self.dist.is_main:
            try:
                found = required or Path(path).is_file()
                reply = ("state", load_checkpoint(path)) if found else ("absent", None)
            except CheckpointError as err:
                reply = ("error", str(err))
        kind, value = distributed.broadcast_object(self.dist, reply)
        if kind == "error":
            raise CheckpointError(value)
        return value if kind == "state" else None

    def load_weights(self, path: str | Path, state: dict[str, Any] | None = None) -> None:
        """Model weights from a checkpoint of the same architecture (``state``: the checkpoint
        already read, else rank 0 reads ``path``)."""
        state = self.read_checkpoint(path) if state is None else state
        check_signature(self.signature, state, path)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            reason = str(err).splitlines()[0]
            raise CheckpointError(f"checkpoint {path} does not fit the configured model: {reason}") from err
        log.info("initialised weights from %s", path)

    def start_weights(self, path: str | Path) -> bool:
        """Load ``path`` (stage 2's ``best_stage1.pt``) when rank 0 has it; returns whether it
        did. Every rank takes rank 0's answer and weights."""
        state = self.read_checkpoint(path, required=False)
        if state is not None:
            self.load_weights(path, state)
        return state is not None

    def resume(self) -> None:
        """Weights, optimiser, schedule and progress from ``checkpoints/last.pt`` (rank 0's)."""
        path = self.ckpt_dir / "last.pt"
        state = self.read_checkpoint(path)
        self.load_weights(path, state)
        self.optimizer.load_state_dict(state["optimizer"])
        align_optimizer_state(self.optimizer)  # the checkpoint may come from another device or layout
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_lr_override(state)
        self.start_epoch = int(state["epoch"]) + 1
        self.best = {int(k): StageBest(**v) for k, v in state["best"].items()}
        self.last = {int(k): StageBest(**v) for k, v in state.get("last", {}).items()} or self.last
        self.history = list(state.get("history", []))
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    def _apply_lr_override(self, state: dict[str, Any]) -> None:
        """A resumed run with another ``train.lr`` (e.g. after a non-finite loss) scales the
        restored schedule to it; the optimizer state otherwise keeps the saved lr."""
        saved = float(state.get("config", {}).get("train", {}).get("lr", self.cfg.train.lr))
        if saved == self.cfg.train.lr or saved <= 0:
            return
        factor = self.cfg.train.lr / saved
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            group["initial_lr"] = group.get("initial_lr", saved) * factor
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        log.warning("train.lr changed from %g to %g on resume: the schedule is scaled by %g",
                    saved, self.cfg.train.lr, factor)

    def state(self, epoch: int, stage: int, memories: dict[str, Any] | None) -> dict[str, Any]:
        """The checkpoint of the end of ``epoch``."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "stage": stage,
            "config": config_to_dict(self.cfg),
            "signature": self.signature,
            "best": {k: vars(v) for k, v in self.best.items()},
            "last": {k: vars(v) for k, v in self.last.items()},
            "history": self.history,
            "memories": memories,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "feature": FEATURE_DESCRIPTION,
        }

    # ------------------------------------------------------------ batches and steps
    def set_stage_views(self, stage: int) -> None:
        """Give the training datasets the views of ``stage`` (called at the start of every epoch)."""
        self.stage = stage
        views = stage_views(self.cfg, stage)
        for dataset in self.datasets.values():
            dataset.set_transforms(views)

    @property
    def loaders_alive(self) -> int:
        """Training loaders iterated together: one per modality, twice that in stage 2 with
        the global objective."""
        return 2 * len(MODALITIES) if self.stage == 2 and self.cfg.train.global_association else len(MODALITIES)

    def workers(self, modality: int) -> int:
        """Worker processes of one training loader (:func:`~bmil.engine.data_setup.loader_workers`
        for the loaders alive now, lowered to what /dev/shm holds); logged when it changes."""
        loaders = self.loaders_alive
        workers = loader_workers(self.cfg, self.device, loaders)
        d, t = self.cfg.data, self.cfg.train
        views = len(stage_views(self.cfg, self.stage)[modality])
        batch_bytes = self.rank_ids(modality) * t.num_instances * views * 3 * d.height * d.width * 4
        workers, warning = shm_workers(workers, loaders, batch_bytes, shm_bytes() if workers else None)
        said = (workers, loaders, warning)
        if said != self._workers_said:
            self._workers_said = said
            if warning:
                log.warning(warning)
            source = f"data.workers={d.workers}" if d.workers is not None else "the device default"
            log.info("data loading: %d worker(s) per loader x %d loaders (%s; %d cores per process on this node)",
                     workers, loaders, source, cores_per_process())
        return workers

    def loader(self, modality: int, labels: np.ndarray, seed: int) -> DataLoader:
        """The P×K loader of one epoch over ``modality``'s images with pseudo labels
        ``labels`` [N_m] (-1: never drawn); this process's share of each batch when distributed.

        The sampler's ``seed`` is the same on every rank (all ranks cut the same batches);
        the augmentations are drawn per rank: worker w of a loader is seeded from
        (``seed``, modality, rank, w), so ranks and workers differ and a rerun repeats them."""
        t = self.cfg.train
        # The release's sampler draws each anchor's companions from other cameras.
        cameras = self.camids[self.index[modality]] if t.sampler == "camera" else None
        num_ids = batch_ids(t, modality)
        sampler = PseudoIdentitySampler(labels, num_ids, t.num_instances, t.iterations, seed=seed, cameras=cameras,
                                        warned=self._few_ids_warned)
        if self.dist.enabled:  # this rank's num_ids / world_size identities of every batch
            sampler = distributed.IdentityShardSampler(sampler, self.dist)
        workers = self.workers(modality)
        # With workers, DataLoader seeds worker w with (a draw of this generator) + w.
        generator = torch.Generator().manual_seed(worker_seed(seed, modality, self.dist.rank)) if workers else None
        return DataLoader(
            self.datasets[modality], batch_size=self.rank_ids(modality) * t.num_instances, sampler=sampler,
            drop_last=True, num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False, worker_init_fn=seed_worker, generator=generator,
        )

    def forward(self, batches: Batches, labels: dict[int, np.ndarray]) -> dict[int, ModalityFeatures]:
        """:func:`~bmil.engine.forward.forward_batches` through the training model
        (``train.bn_split`` passes, ``train.amp``)."""
        t = self.cfg.train
        return forward_batches(self.train_model, batches, labels, self.device, bn_split=t.bn_split, amp=t.amp)

    def gathered(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A memory update's batch from all ranks, in rank order (= the single-process
        batch), so that every rank moves its memories identically."""
        # Every rank's batch of a modality has rank_ids × num_instances images (drop_last): no size exchange.
        return (distributed.gather_rows(self.dist, features, same_size=True),
                distributed.gather_rows(self.dist, labels, same_size=True))

    def step(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        """One optimiser step on ``loss``; a non-finite loss (on any rank) raises
        :class:`TrainingError` saying where and what to do."""
        # Every rank must take the same branch, or the others would wait in DDP's all-reduce.
        if not distributed.all_true(self.dist, math.isfinite(float(loss.detach()))):
            raise TrainingError(self._non_finite_message(epoch, step))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def _non_finite_message(self, epoch: int, step: int) -> str:
        last = self.ckpt_dir / "last.pt"
        if epoch > 0 and last.is_file():
            saved = f"{last} holds the end of epoch {epoch - 1}: lower train.lr and continue with --resume"
        else:
            saved = "no epoch has finished yet: lower train.lr and start again"
        return f"the loss became non-finite at epoch {epoch} step {step}; {saved}"


def build_run(cfg: Config, *, resume: bool = False) -> Run:
    """Set up a run of ``cfg``: the process group, seeds, records (both modalities checked),
    the model (SyncBatchNorm / channels-last as configured), the memory check, datasets,
    optimiser, then ``train.init_from`` or, with ``resume``, ``checkpoints/last.pt``."""
    dist = distributed.init_distributed(resolve_device(cfg.train.device))
    for m in MODALITIES:  # a clear error when ranks cannot share the ids
        distributed.per_rank_ids(batch_ids(cfg.train, m), dist)
    distributed.require_one_forward_per_step(cfg.train.separate_global_step, dist)
    if cfg.train.bn_split > 1 and dist.enabled:
        raise ConfigError("train.bn_split > 1 emulates the release's multi-GPU BatchNorm batch in one process; "
                          "with torchrun set train.bn_split=1 (each process already has its own BatchNorm batch)")
    set_deterministic(cfg.train.deterministic)
    seed_everything(cfg.train.seed, -1)

    records = train_records(cfg)
    log_dataset_counts(cfg)
    pids, camids, modality = record_arrays(records)
    index = {m: np.flatnonzero(modality == m) for m in MODALITIES}
    labelled = has_labels(records)
    log.info(
        "training images: %d visible, %d infrared%s",
        len(index[VISIBLE]), len(index[INFRARED]),
        f", {len(np.unique(pids))} identities (used only for scoring)" if labelled
        else "; the images have no person ids, so evaluation is skipped and no score will be reported",
    )
    model = model_from_config(cfg.model).to(dist.device)
    model, sync_bn = distributed.convert_sync_bn(model, dist, cfg.model.sync_bn)
    if dist.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    signature = model_signature(model)
    require_training_memory(cfg, len(index[VISIBLE]), len(index[INFRARED]), signature["feat_dim"])
    views = stage_views(cfg, 1)
    d = cfg.data
    resized, reason = resized_caches({m: len(index[m]) for m in MODALITIES}, d.height, d.width, d.resized_cache_gib)
    if reason:
        log.warning("%s", reason)
    datasets = {m: TrainDataset([records[i] for i in index[m]], views, cache=d.cache_images, resized=resized.get(m))
                for m in MODALITIES}
    run = Run(cfg=cfg, dist=dist, records=records, pids=pids, camids=camids, modality=modality, index=index,
              labelled=labelled, model=model, sync_bn=sync_bn, signature=signature, datasets=datasets)
    run.new_optimizer()
    if cfg.train.init_from and not resume:
        run.load_weights(cfg.train.init_from)
    if resume:
        run.resume()
    # Training steps go through DDP when distributed; extraction, state_dict and
    # checkpoints use the bare module (``model``), which shares its parameters.
    run.train_model = distributed.wrap_ddp(model, dist)
    return run
