"""The objectives of one epoch (the stage table of the README's developer map, as code): a stage is the list of its
objectives — intra for each modality, and in stage 2 the global one — each built from the
epoch's association, or absent (with a warning) when the association is degenerate.

An objective names the loaders it draws from (keyed by modality), the label each image of
its batches carries, the loss of a step's forward output and the memory update to run
after the step. Objectives of one ``group`` share a forward pass and an optimiser step, and
their losses are summed and logged as ``loss/<group>``: the two intra objectives form the
group ``intra`` (BatchNorm sees both modalities' batches together), the global objective
the group ``global``. How the groups make an iteration's optimiser steps is
:mod:`bmil.engine.step`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from bmil.cluster import cluster_counts, num_clusters
from bmil.cluster.association import Association
from bmil.config import Config
from bmil.engine.data_setup import one_cluster_hint
from bmil.engine.forward import ModalityFeatures
from bmil.losses import global_loss, intra_loss
from bmil.memory import PrototypeMemory, positive_mask
from bmil.records import MODALITIES, MODALITY_NAMES, VISIBLE

log = logging.getLogger(__name__)

LoaderFactory = Callable[[int, np.ndarray, int], DataLoader]
"""(modality, labels [N_m], seed) → the epoch's P×K loader over that modality's images."""
Gather = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(features, labels) of this process's batch → those of the whole (distributed) batch."""


@dataclass
class Objective:
    """One term of a stage's loss.

    name: e.g. ``intra/visible``, ``global``. group: objectives of one group share a forward
    and a step, logged as ``loss/<group>``. loaders: modality → the loader its batches come
    from. labels: modality → the label [N_m] of every image of that modality (by dataset
    position) that the forward attaches to the batch rows. memory: the prototypes it
    contrasts against and updates.
    """

    name: str
    group: str
    loaders: dict[int, DataLoader]
    labels: dict[int, np.ndarray]
    memory: PrototypeMemory
    gather: Gather
    _pending: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def loss(self, outputs: dict[int, ModalityFeatures]) -> torch.Tensor:
        """The objective's loss (a scalar) of one step's forward ``outputs``."""
        raise NotImplementedError

    def update(self) -> None:
        """Momentum update of the memory with the features of the last :meth:`loss`, gathered
        over the processes (run after the optimiser step)."""
        for features, labels in self._pending:
            self.memory.update(*self.gather(features, labels))
        self._pending = []


@dataclass
class IntraObjective(Objective):
    """InfoNCE of one modality's batch against that modality's cluster prototypes."""

    modality: int = VISIBLE
    temperature: float = 0.05
    mean_margin: float = 0.0

    def loss(self, outputs: dict[int, ModalityFeatures]) -> torch.Tensor:
        f, y = outputs[self.modality][:2]
        self._pending = [(f.detach(), y)]
        return intra_loss(f, self.memory, y, self.temperature, self.mean_margin)


@dataclass
class GlobalObjective(Objective):
    """The stage-2 global loss, ½(L_visible + L_infrared): each modality's batch against the
    global memory of one prototype per (global cluster, modality), positives being every
    prototype of the image's global cluster, against the hardest negatives. docs/method.md and
    the paper also call it the cross-modality, split-and-contrast or multi-positive loss.

    sub_labels: modality → sub-cluster of every image [N_m]; sub_to_cluster: [S] the global
    cluster of each sub-cluster (prototype).

    gradient (``loss.global_gradient``): ``release``: the infrared term's gradient w.r.t. the
    features is taken against the prototypes after the visible batch's momentum update, the
    visible term's against the prototypes as they were. The release calls its one global
    memory twice (infrared, then visible) and back-propagates the sum once; its memory moves
    the bank in place in its backward, and autograd runs the later (visible) call's backward
    first. ``simultaneous``: both against the prototypes as they were. In both, the loss
    values, the hardest negatives and the memory update after the step (visible batch, then
    infrared) are the same.
    """

    sub_labels: dict[int, np.ndarray] = field(default_factory=dict)
    sub_to_cluster: torch.Tensor | None = None
    temperature: float = 0.05
    num_candidates: int = 50
    gradient: str = "release"

    def loss(self, outputs: dict[int, ModalityFeatures]) -> torch.Tensor:
        parts, self._pending = [], []
        for m in MODALITIES:  # visible first: the order the release's memory moves in
            f, y, index, views = outputs[m]
            # Rows are view-major (all first views, then all second views), as the labels y.
            sub = torch.from_numpy(self.sub_labels[m][index.numpy()]).repeat(views).to(f.device)
            # release: the gradient against the prototypes the batches before this one moved.
            moved = None
            if self.gradient == "release" and self._pending:
                moved = self.memory
                for features, labels in self._pending:
                    moved = moved.moved(*self.gather(features, labels))
            parts.append(global_loss(f, self.memory, positive_mask(y, self.sub_to_cluster),
                                     self.temperature, self.num_candidates, backward_memory=moved))
            self._pending.append((f.detach(), sub))
        return 0.5 * (parts[0] + parts[1])


def _memory(features: np.ndarray, labels: np.ndarray, cfg: Config, device: torch.device) -> PrototypeMemory:
    return PrototypeMemory.from_features(
        torch.from_numpy(features), torch.from_numpy(labels), momentum=cfg.loss.momentum, hybrid=cfg.loss.hybrid,
    ).to(device)


def intra_objectives(features: np.ndarray, assoc: Association, index: dict[int, np.ndarray], cfg: Config,
                     loader: LoaderFactory, seed: int, device: torch.device, gather: Gather) -> list[Objective]:
    """One intra objective per modality with at least two clusters (warnings otherwise)."""
    out: list[Objective] = []
    for m in MODALITIES:
        labels = assoc.intra[m]
        if num_clusters(labels) == 1:
            log.warning("only one %s cluster this epoch: its intra-modality loss is skipped "
                        "(a contrastive loss needs two)", MODALITY_NAMES[m])
            one_cluster_hint(cfg, len(features))
        elif not np.any(labels >= 0):
            log.warning("no %s cluster this epoch: its intra-modality loss is skipped", MODALITY_NAMES[m])
        else:
            out.append(IntraObjective(
                name=f"intra/{MODALITY_NAMES[m]}", group="intra", loaders={m: loader(m, labels, seed + m)},
                labels={m: labels}, memory=_memory(features[index[m]], labels, cfg, device), gather=gather,
                modality=m, temperature=cfg.loss.temperature, mean_margin=cfg.loss.mean_margin,
            ))
    return out


def global_objective(features: np.ndarray, assoc: Association, modality: np.ndarray, cfg: Config,
                     loader: LoaderFactory, seed: int, device: torch.device, gather: Gather) -> Objective | None:
    """The global objective of a stage-2 association, or None (with a warning) when it has
    fewer than two global clusters or one modality has none."""
    if assoc.sub is None:
        return None
    if num_clusters(assoc.global_labels) == 1:
        log.warning("only one global cluster this epoch: the cross-modality loss is skipped "
                    "(a contrastive loss needs two)")
        one_cluster_hint(cfg, len(features))
        return None
    if not np.any(assoc.sub.sub_labels >= 0):
        log.warning("no global cluster this epoch: the cross-modality loss is skipped")
        return None
    index = {m: np.flatnonzero(modality == m) for m in MODALITIES}
    labels = {m: assoc.global_labels[index[m]] for m in MODALITIES}
    if not all(np.any(labels[m] >= 0) for m in MODALITIES):
        log.warning("the global clusters of this epoch miss a modality: the cross-modality loss is skipped")
        return None
    if cluster_counts(assoc.global_labels, modality)["cross_clusters"] == 0:
        log.warning("no global cluster holds both modalities this epoch: the cross-modality loss only "
                    "contrasts same-modality prototypes (see bmil cluster-scan to choose cluster.eps)")
    return GlobalObjective(
        name="global", group="global",
        loaders={m: loader(m, labels[m], seed + 10 + m) for m in MODALITIES}, labels=labels,
        memory=_memory(features, assoc.sub.sub_labels, cfg, device), gather=gather,
        sub_labels={m: assoc.sub.sub_labels[index[m]] for m in MODALITIES},
        sub_to_cluster=torch.from_numpy(assoc.sub.sub_to_cluster).to(device),
        temperature=cfg.loss.temperature, num_candidates=cfg.loss.num_candidates,
        gradient=cfg.loss.global_gradient,
    )


def build_objectives(features: np.ndarray, assoc: Association, modality: np.ndarray, cfg: Config, *,
                     loader: LoaderFactory, seed: int, device: torch.device, gather: Gather) -> list[Objective]:
    """The objectives of one epoch from its ``association`` of the train features [N, D]
    (``modality`` [N] of 0/1): intra per modality, then global (stage 2); the degenerate
    ones are left out with a warning. ``seed``: the epoch's loader seed (intra loaders draw
    with seed + m, global ones with seed + 10 + m)."""
    index = {m: np.flatnonzero(modality == m) for m in MODALITIES}
    objectives = intra_objectives(features, assoc, index, cfg, loader, seed, device, gather)
    glob = global_objective(features, assoc, modality, cfg, loader, seed, device, gather)
    return objectives + ([glob] if glob is not None else [])
