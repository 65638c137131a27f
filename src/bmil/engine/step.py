"""The optimiser steps of one training iteration.

An iteration draws one batch from every loader of the epoch's objectives, then takes its
steps in order. A :class:`Step` is the objectives one optimiser step sums, by group: each
group is one forward of its objectives' batches together (BatchNorm sees them as one batch),
its objectives' losses summed and logged as ``loss/<group>``. After the optimiser step,
:meth:`Step.update` moves the memories of the step's objectives.

With ``train.separate_global_step`` (the release) the groups ``intra`` and ``global`` take
one step each, in that order, so the global forward sees the weights the intra step
produced; otherwise one step sums both groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from bmil.engine.forward import Batches, ModalityFeatures
from bmil.engine.objectives import Objective

Forward = Callable[[Batches, dict[int, np.ndarray]], dict[int, ModalityFeatures]]
"""(modality → batch, modality → labels [N_m]) → modality → features; e.g. ``Run.forward``."""
IterationBatches = dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]
"""(objective name, modality) → one batch of that loader: views [B, V, 3, H, W], positions [B]."""


@dataclass(frozen=True)
class Step:
    """One optimiser step: ``groups`` maps a group name (``intra``, ``global``) to the
    objectives that share its forward, in the order they are computed."""

    groups: dict[str, tuple[Objective, ...]]

    @property
    def objectives(self) -> list[Objective]:
        """Every objective of the step, group by group."""
        return [o for group in self.groups.values() for o in group]

    def loss(self, batches: IterationBatches, forward: Forward) -> dict[str, torch.Tensor]:
        """Group name → scalar loss: one ``forward`` of the group's batches, the sum of its
        objectives' losses. The optimiser step takes the sum of the values, in this order."""
        return {name: group_loss(group, batches, forward) for name, group in self.groups.items()}

    def update(self) -> None:
        """The momentum update of every objective's memory with the features of the last
        :meth:`loss` (call after the optimiser step)."""
        for objective in self.objectives:
            objective.update()


def group_loss(group: tuple[Objective, ...] | list[Objective], batches: IterationBatches,
               forward: Forward) -> torch.Tensor:
    """The summed loss (a scalar) of ``group``'s objectives on one ``forward`` of their batches together."""
    inputs = {m: batches[(o.name, m)] for o in group for m in o.loaders}
    labels = {m: o.labels[m] for o in group for m in o.loaders}
    outputs = forward(inputs, labels)
    return sum(o.loss(outputs) for o in group)


def iteration_steps(objectives: list[Objective], separate_global_step: bool) -> list[Step]:
    """The steps of one iteration over ``objectives``, grouped by ``Objective.group`` in
    order of first appearance: one step per group with ``separate_global_step``, else one
    step holding every group."""
    groups: dict[str, list[Objective]] = {}
    for objective in objectives:
        groups.setdefault(objective.group, []).append(objective)
    if separate_global_step:
        return [Step({name: tuple(group)}) for name, group in groups.items()]
    return [Step({name: tuple(group) for name, group in groups.items()})]


def batch_iterators(objectives: list[Objective]) -> dict[tuple[str, int], Iterator]:
    """(objective name, modality) → an iterator over that loader, for one epoch."""
    return {(o.name, m): iter(loader) for o in objectives for m, loader in o.loaders.items()}


def next_batches(iterators: dict[tuple[str, int], Iterator]) -> IterationBatches:
    """One batch from every iterator: all the batches an iteration's steps read."""
    return {key: next(it) for key, it in iterators.items()}
