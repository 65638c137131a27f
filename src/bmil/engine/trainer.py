"""The BMIL epoch loop. Stage 1 and stage 2 are the same loop (README, "For developers"): cluster → build
the stage's objectives from the association → step through them; then evaluate, keep the
selected model and write the run folder. Set-up and resume live in :mod:`bmil.engine.run`,
the objectives in :mod:`bmil.engine.objectives`, an iteration's optimiser steps in
:mod:`bmil.engine.step`, the batch forward in :mod:`bmil.engine.forward`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bmil.cluster.association import Association, associate, draw_subsets, features_read
from bmil.config import Config, save_config
from bmil.engine import distributed
from bmil.engine.checkpoint import save_checkpoint
from bmil.engine.data_setup import loader_workers, run_protocol
from bmil.engine.epoch_stats import association_stats
from bmil.engine.objectives import Objective, build_objectives
from bmil.engine.run import StageBest, build_run, seed_everything
from bmil.engine.run_log import RunLogger, write_run_info
from bmil.engine.step import batch_iterators, iteration_steps, next_batches
from bmil.inference import CLUSTERING_RESIZE, feature_extractor
from bmil.records import INFRARED, VISIBLE, Record

log = logging.getLogger(__name__)


class Trainer:
    """Runs stage 1 then stage 2 of BMIL as configured, writing everything to ``cfg.output``.

    ``run`` (:class:`~bmil.engine.run.Run`) holds the set-up and resumable state (records and
    their arrays, model, datasets, optimiser, progress); the trainer reads it there.
    """

    def __init__(self, cfg: Config, *, resume: bool = False, progress: bool = True) -> None:
        self.cfg = cfg
        self.run = build_run(cfg, resume=resume)
        self.out = Path(cfg.output)
        self.progress = progress and self.run.dist.is_main
        self.memory_state: dict[str, Any] | None = None  # the last epoch's memories, saved with checkpoints
        # data.cache_images with no loader workers: the resized images extraction reads, per resize.
        keep = cfg.data.cache_images and loader_workers(cfg, self.run.device) == 0
        self.tensor_caches: dict[str, dict] | None = {} if keep else None

    @property
    def start_epoch(self) -> int:
        return self.run.start_epoch

    @property
    def total_epochs(self) -> int:
        return self.cfg.train.stage1_epochs + self.cfg.train.stage2_epochs

    def stage_of(self, epoch: int) -> int:
        return 1 if epoch < self.cfg.train.stage1_epochs else 2

    def _stage_bounds(self, stage: int) -> tuple[int, int]:
        """First and last epoch of ``stage``."""
        t = self.cfg.train
        return (0, t.stage1_epochs - 1) if stage == 1 else (t.stage1_epochs, self.total_epochs - 1)

    # ---------------------------------------------------------------- one epoch
    def extract(
        self, records: list[Record], *, flip: bool = True, desc: str = "extract", resize: str = CLUSTERING_RESIZE,
        feature: str = "clustering",
    ) -> np.ndarray:
        """Features [N, D] of ``records`` with the current model, resized and combined
        (``feature``, :func:`~bmil.inference.combine_views`) as clustering sees them
        unless ``resize`` / ``feature`` say otherwise. When distributed, each rank extracts
        its shard and all ranks get all features, in order."""
        shard = records[distributed.shard_range(len(records), self.run.dist)] if self.run.dist.enabled else records
        cache = None if self.tensor_caches is None else self.tensor_caches.setdefault(resize, {})
        extract = feature_extractor(self.run.model, self.cfg, self.run.device, flip=flip, progress=self.progress,
                                    desc=desc, resize=resize, cache=cache, feature=feature)
        return distributed.gather_shards(self.run.dist, extract(shard))

    def associate(
        self, features: np.ndarray, stage: int, rng: np.random.Generator,
        subsets: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Association:
        """Pseudo labels of one epoch from the train features [N, D] (``subsets``: the
        epoch's visible split when already drawn from ``rng``)."""
        c = self.cfg
        if self.run.device.type == "cuda":  # the kNN (most of the clustering time) then runs on the GPU
            features = torch.from_numpy(features).to(self.run.device)
        return associate(
            features, self.run.modality, c.cluster, rng, global_association=self.global_association(stage),
            split=c.loss.split_prototypes, subsets=subsets,
        )

    def epoch_split(self, epoch: int) -> tuple[np.random.Generator, tuple[np.ndarray, np.ndarray] | None]:
        """Seed ``epoch`` and draw its visible split (:func:`draw_subsets`, the first draw from
        the epoch's generator); returns the generator, which association goes on drawing from."""
        rng = seed_everything(self.cfg.train.seed, epoch, self.run.dist.rank)  # augmentations differ per rank
        return rng, draw_subsets(self.run.modality, self.cfg.cluster, rng)

    def global_association(self, stage: int) -> bool:
        return stage == 2 and self.cfg.train.global_association

    def epoch_features(self, epoch: int, positions: np.ndarray | None) -> np.ndarray:
        """The clustering features [N, D] of the epoch: extracted for the images at
        ``positions`` only (None: all), zero rows for the others, which the epoch never reads."""
        desc = f"epoch {epoch} features"
        if positions is None:
            return self.extract(self.run.records, flip=self.cfg.cluster.flip, desc=desc)
        read = self.extract([self.run.records[i] for i in positions], flip=self.cfg.cluster.flip, desc=desc)
        features = np.zeros((len(self.run.records), read.shape[1]), dtype=read.dtype)
        features[positions] = read
        return features

    def association_stats(self, assoc: Association) -> dict[str, float]:
        """Cluster counts, and pseudo-label quality against the true ids when known."""
        return association_stats(assoc, self.run.modality, self.run.pids if self.run.labelled else None)

    def objectives(self, epoch: int, features: np.ndarray, assoc: Association) -> list[Objective]:
        """The epoch's objectives (intra per modality, global in stage 2), degenerate ones left out."""
        r = self.run
        return build_objectives(features, assoc, r.modality, self.cfg, loader=r.loader,
                                seed=self.cfg.train.seed * 1000 + epoch, device=r.device, gather=r.gathered)

    def train_epoch(self, epoch: int, features: np.ndarray, assoc: Association) -> dict[str, float]:
        """Iterate ``train.iterations`` steps through the epoch's objectives; returns the mean
        loss of each group (``loss/intra``, ``loss/global``)."""
        objectives = self.objectives(epoch, features, assoc)
        if not objectives:
            log.warning("epoch %d has no cluster at all: no training step this epoch", epoch)
            return {}
        self.run.model.train()
        steps = iteration_steps(objectives, self.cfg.train.separate_global_step)
        sums: dict[str, torch.Tensor] = {}  # on the device: read on the host only for the progress bar
        iterators = batch_iterators(objectives)
        bar = tqdm(range(self.cfg.train.iterations), desc=f"epoch {epoch}", disable=not self.progress, leave=False)
        for i in bar:
            # Every batch of the iteration is drawn first; with separate steps the global
            # forward then sees the weights the intra step just produced (the release).
            batches = next_batches(iterators)
            for step in steps:
                losses = step.loss(batches, self.run.forward)
                for group, loss in losses.items():
                    key = f"loss/{group}"
                    sums[key] = sums.get(key, 0.0) + loss.detach().double()  # as a Python float sum
                self.run.step(sum(losses.values()), epoch, i)
                step.update()
            if self.progress:
                bar.set_postfix({k.split("/")[1]: f"{float(v) / (i + 1):.3f}" for k, v in sums.items()})
        self.memory_state = {
            "intra": {o.modality: o.memory.state_dict() for o in objectives if o.group == "intra"},
            "global": next((o.memory.state_dict() for o in objectives if o.group == "global"), None),
        }
        return {k: float(v) / self.cfg.train.iterations for k, v in sums.items()}

    # ---------------------------------------------------------------- evaluation, checkpoints
    def evaluate(self, trials: int | None = None) -> list:
        """The dataset's test protocol with the current model ([] without labels);
        ``trials`` gallery trials (default ``eval.trials``)."""
        def extract(records: list[Record]) -> np.ndarray:
            return self.extract(records, flip=True, desc="test features", resize=self.cfg.eval.resize,
                                feature="test")

        return run_protocol(self.cfg, extract, trials)

    def _save(self, epoch: int, name: str) -> None:
        save_checkpoint(self.run.state(epoch, self.stage_of(epoch), self.memory_state), self.run.ckpt_dir / name)

    def _start_stage2(self) -> None:
        best = self.run.ckpt_dir / "best_stage1.pt"
        found = self.run.start_weights(best)  # rank 0's file and weights, on every rank
        self.run.new_optimizer()
        log.info("stage 2 starts from %s", best if found else "the last stage-1 model")

    def _maybe_evaluate(self, epoch: int, stage: int) -> dict[str, Any] | None:
        """Evaluate at the first epoch of the stage, every ``eval_every`` after it and at its
        last. The selected model (``train.select_by``) is the best of the scheduled
        evaluations (the release's ``epoch % 2 == 0``); the last epoch's scores are kept as
        ``last`` and compete for selection only with ``train.select_last``."""
        t, r = self.cfg.train, self.run
        first, last = self._stage_bounds(stage)
        scheduled = (epoch - first) % t.eval_every == 0
        if not r.labelled or not (scheduled or epoch == last):
            return None
        trials = (t.stage1_eval_trials or self.cfg.eval.trials) if stage == 1 else None
        results = self.evaluate(trials)
        if not results:
            return None
        metrics = {res.setting: res.mean for res in results}
        score = float(results[0].mean[t.select_by])
        r.history.append({"epoch": epoch, "stage": stage, "metrics": metrics})
        if (scheduled or t.select_last) and score > r.best[stage].score:
            r.best[stage] = StageBest(score=score, epoch=epoch, metrics=metrics)
            if r.dist.is_main:
                self._save(epoch, f"best_stage{stage}.pt")
        if epoch == last:
            r.last[stage] = StageBest(score=score, epoch=epoch, metrics=metrics)
        return metrics

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train from ``start_epoch`` to the end; returns the best metrics of each stage."""
        logger = None
        if self.run.dist.is_main:  # only rank 0 writes the run folder
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
            # Per process: this rank's share of the P×K identities, both modalities' views in one BN pass.
            t = self.cfg.train
            batch = self.run.rank_ids(INFRARED) * t.num_instances
            visible = self.run.rank_ids(VISIBLE) * t.num_instances
            bn_batch = (visible * (2 if self.cfg.data.channel_aug else 1) + batch) // t.bn_split
            write_run_info(self.out, device=str(self.run.device), world_size=self.run.dist.world_size,
                           per_process_batch=batch,
                           bn_batch=bn_batch * (self.run.dist.world_size if self.run.sync_bn else 1),
                           sync_bn=self.run.sync_bn)
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
        self.run.set_stage_views(stage)
        if epoch == self.cfg.train.stage1_epochs and epoch > 0:
            self._start_stage2()
        # The split is drawn first (the same on every rank) so that only the images the
        # epoch's association reads are extracted: stage 1 skips visible subset 1.
        rng, subsets = self.epoch_split(epoch)
        positions = features_read(self.run.modality, subsets, global_association=self.global_association(stage))
        features = self.epoch_features(epoch, positions)
        # Rank 0 clusters; the other ranks receive its pseudo labels.
        with distributed.clustering_threads(self.run.dist):
            assoc = distributed.broadcast_object(
                self.run.dist, self.associate(features, stage, rng, subsets) if self.run.dist.is_main else None
            )
        stats = self.association_stats(assoc)
        losses = self.train_epoch(epoch, features, assoc)
        distributed.average_buffers(self.run.dist, self.run.model)  # one set of BN statistics for all ranks
        self.run.scheduler.step()
        record = {"epoch": epoch, "stage": stage, "lr": self.run.optimizer.param_groups[0]["lr"], **losses, **stats}
        metrics = self._maybe_evaluate(epoch, stage)
        for setting, values in (metrics or {}).items():
            record.update({f"eval/{setting}/{k}": v for k, v in values.items()})
        if self.run.dist.is_main:
            logger.log(record, step=epoch)
            self._save(epoch, "last.pt")
            if epoch == self._stage_bounds(stage)[1]:
                self._save(epoch, f"last_stage{stage}.pt")
        distributed.barrier(self.run.dist)  # the checkpoints exist for every rank (stage 2 reads best_stage1.pt)
        log.info("epoch %d (stage %d): %s", epoch, stage,
                 ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))

    def summary(self) -> dict[str, Any]:
        """Per stage: the selected model's epoch and metrics, how it was selected, and the
        last epoch's metrics (``last``)."""
        t = self.cfg.train
        selection = (f"best test-set {t.select_by} among the stage's evaluations every {t.eval_every} epochs"
                     f"{' and at its last' if t.select_last else ''} "
                     "(selection on the test set, as the authors' release does)")
        return {
            f"stage{k}": {"epoch": v.epoch, "metrics": v.metrics, "selected_by": selection,
                          "last": {"epoch": self.run.last[k].epoch, "metrics": self.run.last[k].metrics}}
            for k, v in self.run.best.items()
        }
