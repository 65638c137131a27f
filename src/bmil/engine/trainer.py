"""The BMIL epoch loop. Stage 1 and stage 2 are the same loop with different association
steps switched on (DESIGN.md): cluster → build memories → iterate batches."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from bmil.cluster import cluster_counts, label_quality, num_clusters
from bmil.config import Config, config_to_dict, save_config
from bmil.data import PseudoIdentitySampler, TrainDataset, infrared_views, visible_views
from bmil.data.records import INFRARED, MODALITY_NAMES, VISIBLE, Record, record_arrays
from bmil.engine import distributed
from bmil.engine.association import Association, associate
from bmil.engine.checkpoint import load_checkpoint, save_checkpoint
from bmil.engine.datasets import (
    has_labels,
    loader_workers,
    log_dataset_counts,
    one_cluster_hint,
    run_protocol,
    train_records,
)
from bmil.engine.extract import FEATURE_DESCRIPTION, resolve_device
from bmil.engine.inference import feature_extractor
from bmil.engine.memory_check import require_training_memory
from bmil.engine.run_log import RunLogger, write_run_info
from bmil.errors import BmilError, CheckpointError, ConfigError
from bmil.losses import global_loss, intra_loss
from bmil.memory import PrototypeMemory, positive_mask
from bmil.model import model_from_config, model_signature

log = logging.getLogger(__name__)

MODALITIES = (VISIBLE, INFRARED)


class TrainingError(BmilError):
    """Training cannot go on (e.g. a non-finite loss); the message says what to do."""


def seed_everything(seed: int, epoch: int) -> np.random.Generator:
    """Seed torch and Python for one epoch and return the epoch's numpy generator, so an
    epoch's randomness depends only on (seed, epoch): that is what makes resume exact.
    ``epoch`` may be -1 (set-up before the first epoch)."""
    mixed = (seed * 1_000_003 + epoch + 1) % (2**31)
    torch.manual_seed(mixed)
    random.seed(mixed)
    return np.random.default_rng([seed, epoch + 1])


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels where torch has them (``train.deterministic``)."""
    if enabled:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: numpy and Python ``random`` in a worker follow the
    worker's torch seed, which the loader draws from the torch RNG that
    :func:`seed_everything` seeds every epoch; so worker randomness depends only on
    (train.seed, epoch, worker), never on the parent process's numpy state."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def check_signature(expected: dict, state: dict, path: str | Path) -> None:
    """A checkpoint's architecture must equal the configured one."""
    found = state.get("signature")
    if found is not None and found != expected:
        raise CheckpointError(
            f"checkpoint {path} was trained with {found}, but the configuration builds {expected}: "
            "set model.depth/model.non_local to match it"
        )


@dataclass
class _GlobalTargets:
    """Per-modality views of one epoch's global clusters for the global sampler and loss."""

    labels: dict[int, np.ndarray]
    sub_labels: dict[int, np.ndarray]
    sub_to_cluster: torch.Tensor

    @classmethod
    def of(cls, assoc: Association, index: dict[int, np.ndarray], device: torch.device) -> _GlobalTargets:
        return cls(
            labels={m: assoc.global_labels[index[m]] for m in MODALITIES},
            sub_labels={m: assoc.sub.sub_labels[index[m]] for m in MODALITIES},
            sub_to_cluster=torch.from_numpy(assoc.sub.sub_to_cluster).to(device),
        )


@dataclass
class StageBest:
    """Best evaluation score (mAP of the first setting) and its metrics, per stage."""

    score: float = -1.0
    epoch: int = -1
    metrics: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Runs stage 1 then stage 2 of BMIL as configured, writing everything to ``cfg.output``."""

    def __init__(self, cfg: Config, *, resume: bool = False, progress: bool = True) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.ckpt_dir = self.out / "checkpoints"
        self.dist = distributed.init_distributed(resolve_device(cfg.train.device))
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        self.per_rank_ids = distributed.per_rank_ids(cfg.train.num_ids, self.dist)
        distributed.require_one_forward_per_step(cfg.train.separate_global_step, self.dist)
        if cfg.train.bn_split > 1 and self.dist.enabled:
            raise ConfigError("train.bn_split > 1 emulates the release's multi-GPU BatchNorm batch in one process; "
                              "with torchrun set train.bn_split=1 (each process already has its own BatchNorm batch)")
        set_deterministic(cfg.train.deterministic)
        seed_everything(cfg.train.seed, -1)

        self.records: list[Record] = train_records(cfg)
        log_dataset_counts(cfg)
        self.pids, self.camids, self.modality = record_arrays(self.records)
        self.index = {m: np.flatnonzero(self.modality == m) for m in MODALITIES}
        self.labelled = has_labels(self.records)
        log.info(
            "training images: %d visible, %d infrared%s",
            len(self.index[VISIBLE]), len(self.index[INFRARED]),
            f", {len(np.unique(self.pids))} identities (used only for scoring)" if self.labelled
            else "; the images have no person ids, so evaluation is skipped and no score will be reported",
        )

        self.model = model_from_config(cfg.model).to(self.device)
        self.model, self.sync_bn = distributed.convert_sync_bn(self.model, self.dist, cfg.model.sync_bn)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.signature = model_signature(self.model)
        require_training_memory(cfg, len(self.index[VISIBLE]), len(self.index[INFRARED]), self.signature["feat_dim"])
        self.datasets = self._build_datasets()
        self.start_epoch = 0
        self.best = {1: StageBest(), 2: StageBest()}
        self.last = {1: StageBest(), 2: StageBest()}
        self.history: list[dict[str, Any]] = []
        self._new_optimizer()
        if cfg.train.init_from and not resume:
            self._load_weights(cfg.train.init_from)
        if resume:
            self._resume()
        # Training steps go through DDP when distributed; extraction, state_dict and
        # checkpoints use the bare module (``self.model``), which shares its parameters.
        self.train_model = distributed.wrap_ddp(self.model, self.dist)

    # ---------------------------------------------------------------- setup
    def _views(self, stage: int) -> dict[int, list]:
        """Training views per modality in ``stage`` (the infrared view drops its jitter in stage 2)."""
        d = self.cfg.data
        return {
            VISIBLE: visible_views(d.height, d.width, d.channel_aug, d.pad, d.augmentation),
            INFRARED: infrared_views(d.height, d.width, d.pad, stage=stage, augmentation=d.augmentation),
        }

    def _build_datasets(self) -> dict[int, TrainDataset]:
        views = self._views(1)
        return {
            m: TrainDataset([self.records[i] for i in self.index[m]], views, cache=self.cfg.data.cache_images)
            for m in MODALITIES
        }

    def _set_stage_views(self, stage: int) -> None:
        """Give the training datasets the views of ``stage`` (called at the start of every epoch)."""
        views = self._views(stage)
        for dataset in self.datasets.values():
            dataset.set_transforms(views)

    def _new_optimizer(self) -> None:
        t = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=t.lr_step, gamma=t.lr_gamma)

    def _load_weights(self, path: str | Path) -> None:
        state = load_checkpoint(path)
        check_signature(self.signature, state, path)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            reason = str(err).splitlines()[0]
            raise CheckpointError(f"checkpoint {path} does not fit the configured model: {reason}") from err
        log.info("initialised weights from %s", path)

    def _resume(self) -> None:
        path = self.ckpt_dir / "last.pt"
        state = load_checkpoint(path)
        self._load_weights(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_lr_override(state)
        self.start_epoch = int(state["epoch"]) + 1
        self.best = {int(k): StageBest(**v) for k, v in state["best"].items()}
        self.last = {int(k): StageBest(**v) for k, v in state.get("last", {}).items()} or self.last
        self.history = list(state.get("history", []))
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    # ---------------------------------------------------------------- helpers
    @property
    def total_epochs(self) -> int:
        return self.cfg.train.stage1_epochs + self.cfg.train.stage2_epochs

    def stage_of(self, epoch: int) -> int:
        return 1 if epoch < self.cfg.train.stage1_epochs else 2

    def extract(self, records: list[Record], *, flip: bool = True, desc: str = "extract") -> np.ndarray:
        """Features [N, D] of ``records`` with the current model (L2-normalised). When
        distributed, each rank extracts its shard and all ranks get all features, in order."""
        shard = records[distributed.shard_range(len(records), self.dist)] if self.dist.enabled else records
        extract = feature_extractor(self.model, self.cfg, self.device, flip=flip, progress=self.progress, desc=desc)
        return distributed.gather_shards(self.dist, extract(shard))

    def _loader(self, modality: int, labels: np.ndarray, seed: int) -> DataLoader:
        t = self.cfg.train
        # The release's sampler draws each anchor's companions from other cameras.
        cameras = self.camids[self.index[modality]] if t.sampler == "camera" else None
        sampler = PseudoIdentitySampler(labels, t.num_ids, t.num_instances, t.iterations, seed=seed, cameras=cameras)
        if self.dist.enabled:  # this rank's num_ids / world_size identities of every batch
            sampler = distributed.IdentityShardSampler(sampler, self.dist)
        return DataLoader(
            self.datasets[modality], batch_size=self.per_rank_ids * t.num_instances, sampler=sampler, drop_last=True,
            num_workers=loader_workers(self.cfg, self.device), pin_memory=self.device.type == "cuda",
            persistent_workers=False, worker_init_fn=seed_worker,
        )

    def _forward(self, batches: dict[int, tuple[torch.Tensor, torch.Tensor]], labels: dict[int, np.ndarray]):
        """Features of the batches of both modalities with the labels repeated over each
        image's views. Each modality's images are laid out view-major (all first views, then
        all second views), as the release concatenates them; with ``train.bn_split`` = g the
        batch goes through the network in g passes, pass j taking the j-th contiguous g-th of
        every modality, so each BatchNorm sees what one GPU of the release's g-GPU
        DataParallel sees (g = 2: first-view visible + half the infrared, then the rest)."""
        split = self.cfg.train.bn_split
        images, targets = {}, {}
        for m, (views, index) in batches.items():
            images[m] = views.transpose(0, 1).flatten(0, 1)
            targets[m] = torch.from_numpy(labels[m][index.numpy()]).repeat(views.shape[1])
        chunks = {m: x.chunk(split) for m, x in images.items()}
        parts = []
        for j in range(split):
            x = torch.cat([chunks[m][j] for m in images])
            mods = torch.cat([torch.full((len(chunks[m][j]),), m, dtype=torch.long) for m in images])
            parts.append(self._network(x, mods))
        pieces = {m: [] for m in images}
        for j, feats in enumerate(parts):
            for m, f in zip(images, feats.split([len(chunks[m][j]) for m in images]), strict=True):
                pieces[m].append(f)
        return {m: (torch.cat(pieces[m]), targets[m].to(self.device)) for m in images}

    def _network(self, x: torch.Tensor, mods: torch.Tensor) -> torch.Tensor:
        """One training forward pass: L2-normalised float32 features [B, D] of images ``x``."""
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        amp = self.cfg.train.amp and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            feats = self.train_model(x, mods.to(self.device))
        return F.normalize(feats.float(), dim=1)

    def _step(self, loss: torch.Tensor, epoch: int, step: int) -> None:
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

    # ---------------------------------------------------------------- one epoch
    def associate(self, features: np.ndarray, stage: int, rng: np.random.Generator) -> Association:
        """Pseudo labels of one epoch from the train features [N, D]."""
        c = self.cfg
        if self.device.type == "cuda":  # the kNN (most of the clustering time) then runs on the GPU
            features = torch.from_numpy(features).to(self.device)
        return associate(
            features, self.modality, c.cluster, rng,
            global_association=stage == 2 and c.train.global_association, split=c.loss.split_prototypes,
        )

    def _memories(self, features: np.ndarray, assoc: Association):
        loss = self.cfg.loss
        intra = {}
        for m in MODALITIES:
            labels = assoc.intra[m]
            if num_clusters(labels) == 1:
                log.warning("only one %s cluster this epoch: its intra-modality loss is skipped "
                            "(a contrastive loss needs two)", MODALITY_NAMES[m])
                one_cluster_hint(self.cfg, len(self.records))
            elif np.any(labels >= 0):
                intra[m] = PrototypeMemory.from_features(
                    torch.from_numpy(features[self.index[m]]), torch.from_numpy(labels),
                    momentum=loss.momentum, hybrid=loss.hybrid,
                ).to(self.device)
            else:
                log.warning("no %s cluster this epoch: its intra-modality loss is skipped", MODALITY_NAMES[m])
        glob = None
        if assoc.sub is not None:
            if num_clusters(assoc.global_labels) == 1:
                log.warning("only one global cluster this epoch: the cross-modality loss is skipped "
                            "(a contrastive loss needs two)")
                one_cluster_hint(self.cfg, len(self.records))
            elif np.any(assoc.sub.sub_labels >= 0):
                glob = PrototypeMemory.from_features(
                    torch.from_numpy(features), torch.from_numpy(assoc.sub.sub_labels),
                    momentum=loss.momentum, hybrid=loss.hybrid,
                ).to(self.device)
            else:
                log.warning("no global cluster this epoch: the cross-modality loss is skipped")
        return intra, glob

    def _global_ready(self, assoc: Association) -> bool:
        labels = assoc.global_labels
        return labels is not None and all(np.any(labels[self.index[m]] >= 0) for m in MODALITIES)

    def train_epoch(self, epoch: int, features: np.ndarray, assoc: Association) -> dict[str, float]:
        """Iterate ``train.iterations`` steps; returns the mean losses."""
        c = self.cfg
        intra_mem, glob_mem = self._memories(features, assoc)
        seed = c.train.seed * 1000 + epoch
        loaders = {("intra", m): self._loader(m, assoc.intra[m], seed + m) for m in intra_mem}
        glob = None
        if glob_mem is not None and self._global_ready(assoc):
            glob = _GlobalTargets.of(assoc, self.index, self.device)
            if cluster_counts(assoc.global_labels, self.modality)["cross_clusters"] == 0:
                log.warning("no global cluster holds both modalities this epoch: the cross-modality loss only "
                            "contrasts same-modality prototypes (see bmil cluster-scan to choose cluster.eps)")
            loaders.update({("global", m): self._loader(m, glob.labels[m], seed + 10 + m) for m in MODALITIES})
        elif glob_mem is not None:
            log.warning("the global clusters of this epoch miss a modality: the cross-modality loss is skipped")
        if not loaders:
            log.warning("epoch %d has no cluster at all: no training step this epoch", epoch)
            return {}
        self.model.train()
        sums: dict[str, float] = {}
        iterators = {key: iter(dl) for key, dl in loaders.items()}
        bar = tqdm(range(c.train.iterations), desc=f"epoch {epoch}", disable=not self.progress, leave=False)
        for step in bar:
            batches = {key: next(it) for key, it in iterators.items()}
            # Each part is computed lazily: with separate steps the global forward must see
            # the weights the intra step just produced (the release's two-step iteration).
            parts = []
            if intra_mem:
                parts.append(("loss/intra", lambda b=batches: self._intra_loss(b, assoc, intra_mem)))
            if glob is not None:
                parts.append(("loss/global", lambda b=batches: self._global_loss(b, glob, glob_mem)))
            if c.train.separate_global_step:
                for key, compute in parts:
                    loss, update = compute()
                    sums[key] = sums.get(key, 0.0) + float(loss.detach())
                    self._step(loss, epoch, step)
                    update()
            else:
                computed = [(key, *compute()) for key, compute in parts]
                for key, loss, _ in computed:
                    sums[key] = sums.get(key, 0.0) + float(loss.detach())
                self._step(sum(loss for _, loss, _ in computed), epoch, step)
                for _, _, update in computed:
                    update()
            bar.set_postfix({k.split("/")[1]: f"{v / (step + 1):.3f}" for k, v in sums.items()})
        self._memories_state = {
            "intra": {m: mem.state_dict() for m, mem in intra_mem.items()},
            "global": glob_mem.state_dict() if glob_mem is not None else None,
        }
        return {k: v / c.train.iterations for k, v in sums.items()}

    def _gathered(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A memory update's batch from all ranks, in rank order (= the single-process
        batch), so that every rank moves its memories identically."""
        return distributed.gather_rows(self.dist, features), distributed.gather_rows(self.dist, labels)

    def _intra_loss(self, batches: dict, assoc: Association, memories: dict[int, PrototypeMemory]):
        """Intra-modality loss of one step, and the memory update to run after the step."""
        lc = self.cfg.loss
        feats = self._forward({m: batches[("intra", m)] for m in memories}, assoc.intra)
        loss = sum(intra_loss(f, memories[m], y, lc.temperature, lc.mean_margin) for m, (f, y) in feats.items())

        def update() -> None:
            for m, (f, y) in feats.items():
                memories[m].update(*self._gathered(f.detach(), y))

        return loss, update

    def _global_loss(self, batches: dict, glob: _GlobalTargets, memory: PrototypeMemory):
        """Split-and-contrast loss ½(L_visible + L_infrared) of one step, and its memory update."""
        lc = self.cfg.loss
        feats = self._forward({m: batches[("global", m)] for m in MODALITIES}, glob.labels)
        parts, updates = [], []
        for m, (f, y) in feats.items():
            views, index = batches[("global", m)]
            sub = torch.from_numpy(glob.sub_labels[m][index.numpy()]).repeat_interleave(views.shape[1])
            mask = positive_mask(y, glob.sub_to_cluster)
            parts.append(global_loss(f, memory, mask, lc.temperature, lc.num_candidates))
            updates.append((f.detach(), sub.to(self.device)))

        def update() -> None:
            for f, sub in updates:
                memory.update(*self._gathered(f, sub))

        return 0.5 * (parts[0] + parts[1]), update

    def association_stats(self, assoc: Association) -> dict[str, float]:
        """Cluster counts, and pseudo-label quality against the true ids when known."""
        stats: dict[str, float] = {}
        for m in MODALITIES:
            name = MODALITY_NAMES[m]
            labels = assoc.intra[m]
            stats[f"clusters/{name}"] = num_clusters(labels)
            stats[f"outliers/{name}"] = int(np.sum(labels < 0))
            if self.labelled:
                stats[f"ari/{name}"] = label_quality(labels, self.pids[self.index[m]])["ari"]
        if assoc.global_labels is not None:
            seen = np.arange(len(self.modality)) if assoc.global_index is None else assoc.global_index
            stats["global/images"] = int(len(seen))
            stats["global/visible_images"] = int(np.sum(self.modality[seen] == VISIBLE))
            for key, value in cluster_counts(assoc.global_labels[seen], self.modality[seen]).items():
                stats[f"global/{key}"] = value
            if self.labelled:
                quality = label_quality(assoc.global_labels[seen], self.pids[seen], self.modality[seen])
                for key in ("ari", "nmi", "cross_precision", "cross_recall", "cross_pure_ratio"):
                    stats[f"global/{key}"] = quality[key]
        return stats

    # ---------------------------------------------------------------- evaluation, checkpoints
    def evaluate(self, trials: int | None = None) -> list:
        """The dataset's test protocol with the current model ([] without labels);
        ``trials`` gallery trials (default ``eval.trials``)."""
        return run_protocol(self.cfg, lambda records: self.extract(records, flip=True, desc="test features"), trials)

    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "stage": self.stage_of(epoch),
            "config": config_to_dict(self.cfg),
            "signature": self.signature,
            "best": {k: vars(v) for k, v in self.best.items()},
            "last": {k: vars(v) for k, v in self.last.items()},
            "history": self.history,
            "memories": getattr(self, "_memories_state", None),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "feature": FEATURE_DESCRIPTION,
        }

    def _start_stage2(self) -> None:
        best = self.ckpt_dir / "best_stage1.pt"
        if best.is_file():
            self._load_weights(best)
        self._new_optimizer()
        log.info("stage 2 starts from %s", best if best.is_file() else "the last stage-1 model")

    def _stage_bounds(self, stage: int) -> tuple[int, int]:
        """First and last epoch of ``stage``."""
        t = self.cfg.train
        return (0, t.stage1_epochs - 1) if stage == 1 else (t.stage1_epochs, self.total_epochs - 1)

    def _maybe_evaluate(self, epoch: int, stage: int) -> dict[str, Any] | None:
        """Evaluate at the first epoch of the stage, every ``eval_every`` after it and at its
        last; keep the best model by ``train.select_by`` and the last epoch's model."""
        t = self.cfg.train
        first, last = self._stage_bounds(stage)
        if not self.labelled or not ((epoch - first) % t.eval_every == 0 or epoch == last):
            return None
        trials = (t.stage1_eval_trials or self.cfg.eval.trials) if stage == 1 else None
        results = self.evaluate(trials)
        if not results:
            return None
        metrics = {r.setting: r.mean for r in results}
        score = float(results[0].mean[t.select_by])
        self.history.append({"epoch": epoch, "stage": stage, "metrics": metrics})
        if score > self.best[stage].score:
            self.best[stage] = StageBest(score=score, epoch=epoch, metrics=metrics)
            if self.dist.is_main:
                save_checkpoint(self._state(epoch), self.ckpt_dir / f"best_stage{stage}.pt")
        if epoch == last:
            self.last[stage] = StageBest(score=score, epoch=epoch, metrics=metrics)
        return metrics

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train from ``start_epoch`` to the end; returns the best metrics of each stage."""
        logger = None
        if self.dist.is_main:  # only rank 0 writes the run folder
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
            # Per process: this rank's share of the P×K identities, both modalities' views in one BN pass.
            batch = self.per_rank_ids * self.cfg.train.num_instances
            bn_batch = (batch * (2 if self.cfg.data.channel_aug else 1) + batch) // self.cfg.train.bn_split
            write_run_info(self.out, device=str(self.device), world_size=self.dist.world_size,
                           per_process_batch=batch, bn_batch=bn_batch * (self.dist.world_size if self.sync_bn else 1),
                           sync_bn=self.sync_bn)
            logger = RunLogger(self.out, resume_epoch=self.start_epoch if self.start_epoch else None)
        try:
            for epoch in range(self.start_epoch, self.total_epochs):
                self._run_epoch(epoch, logger)
        finally:
            if logger is not None:
                logger.close()
        return self.summary()

    def _run_epoch(self, epoch: int, logger: RunLogger | None) -> None:
        stage = self.stage_of(epoch)
        self._set_stage_views(stage)
        if epoch == self.cfg.train.stage1_epochs and epoch > 0:
            self._start_stage2()
        rng = seed_everything(self.cfg.train.seed, epoch)
        features = self.extract(self.records, flip=self.cfg.cluster.flip, desc=f"epoch {epoch} features")
        # Rank 0 clusters; the other ranks receive its pseudo labels.
        assoc = distributed.broadcast_object(
            self.dist, self.associate(features, stage, rng) if self.dist.is_main else None
        )
        stats = self.association_stats(assoc)
        losses = self.train_epoch(epoch, features, assoc)
        distributed.average_buffers(self.dist, self.model)  # one set of BN statistics for all ranks
        self.scheduler.step()
        record = {"epoch": epoch, "stage": stage, "lr": self.optimizer.param_groups[0]["lr"], **losses, **stats}
        metrics = self._maybe_evaluate(epoch, stage)
        for setting, values in (metrics or {}).items():
            record.update({f"eval/{setting}/{k}": v for k, v in values.items()})
        if self.dist.is_main:
            logger.log(record, step=epoch)
            save_checkpoint(self._state(epoch), self.ckpt_dir / "last.pt")
            if epoch == self._stage_bounds(stage)[1]:
                save_checkpoint(self._state(epoch), self.ckpt_dir / f"last_stage{stage}.pt")
        distributed.barrier(self.dist)  # the checkpoints exist for every rank (stage 2 reads best_stage1.pt)
        log.info("epoch %d (stage %d): %s", epoch, stage,
                 ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))

    def summary(self) -> dict[str, Any]:
        """Per stage: the selected model's epoch and metrics, how it was selected, and the
        last epoch's metrics (``last``)."""
        selection = (f"best test-set {self.cfg.train.select_by} among the evaluations of the stage "
                     "(selection on the test set, as the authors' release does)")
        return {
            f"stage{k}": {"epoch": v.epoch, "metrics": v.metrics, "selected_by": selection,
                          "last": {"epoch": self.last[k].epoch, "metrics": self.last[k].metrics}}
            for k, v in self.best.items()
        }
