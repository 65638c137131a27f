"""The objectives of an epoch and the optimiser steps of an iteration (engine/objectives.py,
engine/step.py), each against a re-computation by hand: the steps built from two intra and
one global objective, a step's losses as the hand sum of InfoNCE / multi-positive terms on
one forward, and the memory moves after the step by the momentum rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bmil.engine.forward import forward_batches
from bmil.engine.objectives import GlobalObjective, IntraObjective
from bmil.engine.step import batch_iterators, iteration_steps, next_batches
from bmil.memory import PrototypeMemory
from bmil.records import INFRARED, VISIBLE

TAU, MARGIN, MU = 0.05, 0.2, 0.1
N = {VISIBLE: 12, INFRARED: 10}  # images of each modality in the toy training set
VIEWS = {VISIBLE: 2, INFRARED: 1}
B = 4  # images per batch


class Toy(nn.Module):
    """A linear embedding of the flattened image, shifted by the modality (no BatchNorm: a
    mixed batch gives each row what it gives alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 2, 8)
        self.shift = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) + modality[:, None].float() * self.shift


def _unit(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=1)


def _memory(labels: np.ndarray, generator: torch.Generator) -> PrototypeMemory:
    """A hybrid memory of the clusters of ``labels`` whose hard bank differs from its mean bank."""
    memory = PrototypeMemory.from_features(_unit(len(labels), 8, generator), torch.from_numpy(labels), momentum=MU)
    memory.hard.copy_(_unit(memory.num_clusters, 8, generator))
    return memory


def _identity(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return features, labels


@pytest.fixture
def toy():
    """Two intra objectives and one global objective over a toy training set, a toy network
    and one batch of each of their loaders."""
    g = torch.Generator().manual_seed(0)
    intra_labels = {VISIBLE: np.arange(N[VISIBLE]) % 3, INFRARED: np.arange(N[INFRARED]) % 4}
    global_labels = {VISIBLE: np.arange(N[VISIBLE]) % 3, INFRARED: (np.arange(N[INFRARED]) + 1) % 3}
    # Every global cluster holds both modalities: sub-cluster 2c + m is cluster c's prototype of modality m.
    sub_labels = {m: 2 * global_labels[m] + m for m in (VISIBLE, INFRARED)}
    sub_to_cluster = torch.tensor([0, 0, 1, 1, 2, 2])
    batches = {}
    for name in ("intra/visible", "intra/infrared", "global"):
        for m in (VISIBLE, INFRARED):
            index = torch.randperm(N[m], generator=g)[:B]
            batches[(name, m)] = (torch.randn(B, VIEWS[m], 3, 4, 2, generator=g), index)
    intra = [
        IntraObjective(name=f"intra/{n}", group="intra", loaders={m: [batches[(f"intra/{n}", m)]]},
                       labels={m: intra_labels[m]}, memory=_memory(intra_labels[m], g), gather=_identity,
                       modality=m, temperature=TAU, mean_margin=MARGIN)
        for m, n in ((VISIBLE, "visible"), (INFRARED, "infrared"))
    ]
    all_sub = np.r_[sub_labels[VISIBLE], sub_labels[INFRARED]]
    glob = GlobalObjective(
        name="global", group="global", loaders={m: [batches[("global", m)]] for m in (VISIBLE, INFRARED)},
        labels=global_labels, memory=_memory(all_sub, g), gather=_identity, sub_labels=sub_labels,
        sub_to_cluster=sub_to_cluster, temperature=TAU, num_candidates=50,
    )
    torch.manual_seed(0)
    return {"intra": intra, "global": glob, "batches": batches, "net": Toy(), "sub_labels": sub_labels,
            "intra_labels": intra_labels, "global_labels": global_labels}


def _features(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], m: int) -> torch.Tensor:
    """The network's unit features of one batch, view-major (all first views, then all second)."""
    views, _ = batch
    x = torch.cat([views[:, v] for v in range(views.shape[1])])
    with torch.no_grad():
        return F.normalize(net(x, torch.full((len(x),), m)), dim=1)


def _rows(labels: np.ndarray, batch: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    """The label of every row of a batch, repeated over its views."""
    views, index = batch
    return np.tile(labels[index.numpy()], views.shape[1])


def _cross_entropy(f: torch.Tensor, bank: torch.Tensor, y: np.ndarray) -> float:
    logits = (f.double() @ bank.double().T) / TAU
    return float(-torch.log_softmax(logits, dim=1)[torch.arange(len(y)), torch.from_numpy(y)].mean())


def _multi_positive(f: torch.Tensor, bank: torch.Tensor, y: np.ndarray, sub_to_cluster: torch.Tensor) -> float:
    """Every prototype a candidate (6 < 50): -mean over positives of log softmax, batch mean."""
    log_prob = torch.log_softmax((f.double() @ bank.double().T) / TAU, dim=1)
    per_row = [-float(log_prob[b, sub_to_cluster == y[b]].mean()) for b in range(len(y))]
    return float(np.mean(per_row))


def test_steps_of_two_intra_and_one_global_objective(toy):
    """With separate_global_step (the release) intra and global take a step each, intra first;
    without, one step holds both groups. Groups keep the objectives' order."""
    visible, infrared = toy["intra"]
    glob = toy["global"]
    separate = iteration_steps([visible, infrared, glob], separate_global_step=True)
    assert [s.groups for s in separate] == [{"intra": (visible, infrared)}, {"global": (glob,)}]
    (one,) = iteration_steps([visible, infrared, glob], separate_global_step=False)
    assert one.groups == {"intra": (visible, infrared), "global": (glob,)}
    assert list(one.groups) == ["intra", "global"]
    assert one.objectives == [visible, infrared, glob]
    # Stage 1 (no global objective): one step either way.
    assert [s.groups for s in iteration_steps([visible, infrared], True)] == [{"intra": (visible, infrared)}]


def test_iteration_draws_one_batch_of_every_loader(toy):
    objectives = [*toy["intra"], toy["global"]]
    batches = next_batches(batch_iterators(objectives))
    assert list(batches) == [("intra/visible", VISIBLE), ("intra/infrared", INFRARED),
                             ("global", VISIBLE), ("global", INFRARED)]
    for key, (views, index) in batches.items():
        assert views is toy["batches"][key][0] and index is toy["batches"][key][1]


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "summed"])
def test_step_loss_is_the_hand_sum_of_the_objectives_losses_on_one_forward(toy, separate):
    """Each group is one forward of its objectives' batches together; its loss is the sum of
    its objectives' losses: intra ½(CE_hard + max(0, CE_mean − margin)) per modality, global
    ½(L_visible + L_infrared), each ½(multi-positive over hard + over mean)."""
    net, batches = toy["net"], toy["batches"]
    calls = []

    def forward(inputs, labels):
        calls.append(sorted(inputs))
        return forward_batches(net, inputs, labels, torch.device("cpu"))

    steps = iteration_steps([*toy["intra"], toy["global"]], separate)
    losses = {}
    for step in steps:
        losses.update(step.loss(batches, forward))
    assert calls == [[VISIBLE, INFRARED], [VISIBLE, INFRARED]]  # one forward per group, both modalities

    expected_intra = 0.0
    for objective, m in zip(toy["intra"], (VISIBLE, INFRARED), strict=True):
        batch = batches[(objective.name, m)]
        f, y = _features(net, batch, m), _rows(toy["intra_labels"][m], batch)
        hard = _cross_entropy(f, objective.memory.hard, y)
        mean = _cross_entropy(f, objective.memory.mean, y)
        expected_intra += 0.5 * (hard + max(0.0, mean - MARGIN))
    glob = toy["global"]
    parts = []
    for m in (VISIBLE, INFRARED):
        batch = batches[("global", m)]
        f, y = _features(net, batch, m), _rows(toy["global_labels"][m], batch)
        parts.append(0.5 * sum(_multi_positive(f, getattr(glob.memory, bank), y, glob.sub_to_cluster)
                               for bank in ("hard", "mean")))
    assert set(losses) == {"intra", "global"}
    assert float(losses["intra"].detach()) == pytest.approx(expected_intra, rel=1e-5)
    assert float(losses["global"].detach()) == pytest.approx(0.5 * (parts[0] + parts[1]), rel=1e-5)
    # The losses carry the network's gradient.
    assert losses["intra"].requires_grad and losses["global"].requires_grad


def _hand_update(banks: dict[str, torch.Tensor], f: torch.Tensor, y: np.ndarray) -> dict[str, torch.Tensor]:
    """The hybrid momentum rule, cluster by cluster: mean ← n(μ·mean + (1−μ)·batch mean),
    hard ← n(μ·hard + (1−μ)·f_h), f_h the cluster's row least similar to the old mean."""
    mean, hard = banks["mean"].double().clone(), banks["hard"].double().clone()
    f = f.double()
    for c in np.unique(y[y >= 0]):
        rows = f[torch.from_numpy(y == c)]
        h = rows[int(torch.argmin(rows @ mean[c]))]
        mean[c] = F.normalize(MU * mean[c] + (1 - MU) * rows.mean(0), dim=0)
        hard[c] = F.normalize(MU * hard[c] + (1 - MU) * h, dim=0)
    return {"mean": mean, "hard": hard}


def test_update_moves_every_memory_by_the_momentum_rule(toy):
    """After the loss, update() moves each intra memory with its batch (intra labels) and the
    global memory with the visible batch, then the infrared one (sub-cluster labels)."""
    net, batches = toy["net"], toy["batches"]
    objectives = [*toy["intra"], toy["global"]]
    before = {o.name: {k: v.clone() for k, v in o.memory.state_dict().items()} for o in objectives}
    (step,) = iteration_steps(objectives, separate_global_step=False)
    step.loss(batches, lambda inputs, labels: forward_batches(net, inputs, labels, torch.device("cpu")))
    for o in objectives:  # nothing moves before update()
        assert all(torch.equal(v, before[o.name][k]) for k, v in o.memory.state_dict().items())
    step.update()

    for objective, m in zip(toy["intra"], (VISIBLE, INFRARED), strict=True):
        batch = batches[(objective.name, m)]
        expected = _hand_update(before[objective.name], _features(net, batch, m), _rows(toy["intra_labels"][m], batch))
        for bank in ("mean", "hard"):
            torch.testing.assert_close(getattr(objective.memory, bank).double(), expected[bank], atol=1e-6, rtol=0)
    expected = before["global"]
    for m in (VISIBLE, INFRARED):
        batch = batches[("global", m)]
        expected = _hand_update(expected, _features(net, batch, m), _rows(toy["sub_labels"][m], batch))
    for bank in ("mean", "hard"):
        torch.testing.assert_close(getattr(toy["global"].memory, bank).double(), expected[bank], atol=1e-6, rtol=0)
    # Every cluster of a batch moved; one absent from every batch did not.
    moved = (toy["global"].memory.mean != before["global"]["mean"]).any(dim=1)
    present = np.unique(np.concatenate([_rows(toy["sub_labels"][m], batches[("global", m)]) for m in (0, 1)]))
    assert moved.numpy().tolist() == [c in present for c in range(6)]
    # A second update() has nothing pending: the memories stay.
    after = {k: v.clone() for k, v in toy["global"].memory.state_dict().items()}
    step.update()
    assert all(torch.equal(v, after[k]) for k, v in toy["global"].memory.state_dict().items())
