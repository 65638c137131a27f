"""Tests for the prototype memories: construction, momentum updates, positive masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bmil.memory import PrototypeMemory, positive_mask

MU = 0.1


def _unit(*values: float) -> torch.Tensor:
    vector = torch.tensor(values, dtype=torch.float32)
    return vector / vector.norm()


def _moved(prototype: torch.Tensor, target: torch.Tensor, mu: float = MU) -> torch.Tensor:
    moved = mu * prototype + (1 - mu) * target
    return moved / moved.norm()


def test_from_features_uses_normalised_cluster_means_and_ignores_outliers() -> None:
    features = torch.stack(
        [_unit(1, 0), _unit(0, 1), _unit(1, 1), _unit(-1, 0), _unit(0, -1)]
    )
    labels = torch.tensor([0, 0, -1, 1, 1])
    for hybrid in (True, False):
        memory = PrototypeMemory.from_features(features, labels, hybrid=hybrid)
        assert memory.num_clusters == 2 and memory.dim == 2
        expected = torch.stack([_unit(1, 1), _unit(-1, -1)])
        for name in memory.bank_names:
            torch.testing.assert_close(getattr(memory, name), expected)
            assert name in memory.state_dict()
        assert not any(buffer.requires_grad for buffer in memory.buffers())
    assert PrototypeMemory.from_features(features, labels).bank_names == ("hard", "mean")


def test_from_features_rejects_label_gaps() -> None:
    with pytest.raises(ValueError, match="cluster 1"):
        PrototypeMemory.from_features(torch.eye(3), torch.tensor([0, 2, 2]))


def test_hybrid_update_by_hand() -> None:
    # Three clusters in 2-D; the batch has two images of cluster 0 and one of cluster 1.
    features = torch.stack([_unit(1, 0), _unit(0, 1), _unit(-1, 0)])
    memory = PrototypeMemory.from_features(features, torch.tensor([0, 1, 2]))
    with torch.no_grad():
        memory.mean[0] = _unit(1, -0.9)  # hard and mean banks differ after training
        memory.hard[0] = _unit(1, 0.2)
    hard_before = memory.hard.clone()
    mean_before = memory.mean.clone()

    a, b, c = _unit(1, 1), _unit(0.6, -0.8), _unit(0, 1)
    memory.update(torch.stack([a, b, c]), torch.tensor([0, 0, 1]))

    # Mean bank: cluster 0 toward (a + b) / 2, cluster 1 toward c.
    torch.testing.assert_close(memory.mean[0], _moved(mean_before[0], (a + b) / 2))
    torch.testing.assert_close(memory.mean[1], _moved(mean_before[1], c))
    # Hard bank: the hard instance is the one least similar to the *mean* prototype before the
    # update. a.mean0 = (1 - 0.9) / (sqrt2 * |(1, -.9)|) ~ 0.053 < b.mean0 = (0.6 + 0.72) / |(1, -.9)|
    # ~ 0.981: a is hardest, although b is the one least similar to the hard prototype.
    assert float(a @ mean_before[0]) < float(b @ mean_before[0])
    assert float(a @ hard_before[0]) > float(b @ hard_before[0])
    torch.testing.assert_close(memory.hard[0], _moved(hard_before[0], a))
    torch.testing.assert_close(memory.hard[1], _moved(hard_before[1], c))
    # Cluster 2 is not in the batch.
    assert torch.equal(memory.mean[2], mean_before[2])
    assert torch.equal(memory.hard[2], hard_before[2])
    # Unit norm after the update.
    torch.testing.assert_close(memory.mean.norm(dim=1), torch.ones(3))


def test_single_bank_update_is_sequential_by_hand() -> None:
    features = torch.stack([_unit(1, 0), _unit(0, 1), _unit(-1, 0)])
    memory = PrototypeMemory.from_features(features, torch.tensor([0, 1, 2]), hybrid=False)
    assert memory.bank_names == ("prototypes",)
    a, b, c = _unit(0, 1), _unit(1, 1), _unit(1, -1)
    memory.update(torch.stack([a, c, b]), torch.tensor([0, 1, 0]))

    # Cluster 0: first a, then b (batch order).
    step1 = 0.1 * torch.tensor([1.0, 0.0]) + 0.9 * a  # (0.1, 0.9)
    step1 = step1 / math.hypot(0.1, 0.9)
    step2 = _moved(step1, b)
    torch.testing.assert_close(memory.prototypes[0], step2)
    # The order matters: b then a gives another prototype.
    assert (memory.prototypes[0] - _moved(_moved(_unit(1, 0), b), a)).abs().max() > 1e-3
    torch.testing.assert_close(memory.prototypes[1], _moved(_unit(0, 1), c))
    assert torch.equal(memory.prototypes[2], _unit(-1, 0))


def _sequential_reference(prototypes, features, labels, mu=MU):
    prototypes = prototypes.clone()
    for feature, label in zip(features, labels.tolist(), strict=True):
        if label >= 0:
            prototypes[label] = _moved(prototypes[label], feature, mu)
    return prototypes


def _hybrid_reference(mean, hard, features, labels, mu=MU):
    mean, hard = mean.clone(), hard.clone()
    for cluster in sorted(set(labels.tolist()) - {-1}):
        members = features[labels == cluster]
        new_mean = _moved(mean[cluster], members.mean(0), mu)
        similarities = [float(member @ mean[cluster]) for member in members]  # mean before its update
        hardest = members[similarities.index(min(similarities))]
        hard[cluster] = _moved(hard[cluster], hardest, mu)
        mean[cluster] = new_mean
    return mean, hard


def test_updates_match_loop_references_on_random_batches() -> None:
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(40, 8, generator=generator), dim=1)
    labels = torch.arange(40) % 6
    for hybrid in (True, False):
        memory = PrototypeMemory.from_features(features, labels, momentum=0.3, hybrid=hybrid)
        with torch.no_grad():
            for name in memory.bank_names:  # decorrelate the banks
                bank = getattr(memory, name)
                bank.copy_(F.normalize(bank + torch.randn(bank.shape, generator=generator), dim=1))
        for _ in range(3):
            batch = F.normalize(torch.randn(20, 8, generator=generator), dim=1)
            batch_labels = torch.randint(-1, 5, (20,), generator=generator)  # cluster 5 absent
            if hybrid:
                expected = _hybrid_reference(memory.mean, memory.hard, batch, batch_labels, 0.3)
                memory.update(batch, batch_labels)
                torch.testing.assert_close(memory.mean, expected[0])
                torch.testing.assert_close(memory.hard, expected[1])
            else:
                expected = _sequential_reference(memory.prototypes, batch, batch_labels, 0.3)
                memory.update(batch, batch_labels)
                torch.testing.assert_close(memory.prototypes, expected)


def test_update_detaches_and_state_dict_round_trips() -> None:
    features = F.normalize(torch.randn(6, 4), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    memory = PrototypeMemory.from_features(features, labels)
    batch = features.clone().requires_grad_(True)
    memory.update(batch, labels)
    assert not memory.mean.requires_grad and not memory.hard.requires_grad
    copy = PrototypeMemory(3, 4)
    copy.load_state_dict(memory.state_dict())
    assert torch.equal(copy.hard, memory.hard) and torch.equal(copy.mean, memory.mean)


def test_positive_mask() -> None:
    sub_to_cluster = torch.tensor([0, 0, 1, 2, 2])  # clusters 0 and 2 have both modalities
    mask = positive_mask(torch.tensor([2, 1, -1, 0]), sub_to_cluster)
    expected = torch.tensor(
        [
            [False, False, False, True, True],
            [False, False, True, False, False],
            [False, False, False, False, False],
            [True, True, False, False, False],
        ]
    )
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
