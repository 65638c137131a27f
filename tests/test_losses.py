"""Tests for the contrastive losses against hand computations and a dense reference, and the
global loss when every global cluster holds one modality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bmil.cluster import split_by_modality
from bmil.data.records import INFRARED, VISIBLE
from bmil.losses import global_loss, info_nce, intra_loss, multi_positive_loss
from bmil.memory import PrototypeMemory, positive_mask
from helpers import clustered_features


def _memory(banks: dict[str, torch.Tensor]) -> PrototypeMemory:
    hybrid = "hard" in banks
    first = next(iter(banks.values()))
    memory = PrototypeMemory(first.shape[0], first.shape[1], hybrid=hybrid)
    with torch.no_grad():
        for name, bank in banks.items():
            getattr(memory, name).copy_(bank)
    return memory


def test_info_nce_two_prototypes_by_hand() -> None:
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # tau = 0.5: sample 0 logits (2, 0), label 0; sample 1 logits (1.2, 1.6), label 0.
    expected_0 = math.log(1 + math.exp(-2.0))
    expected_1 = -1.2 + math.log(math.exp(1.2) + math.exp(1.6))
    loss = info_nce(features, prototypes, torch.tensor([0, 0]), temperature=0.5)
    assert loss.item() == pytest.approx((expected_0 + expected_1) / 2, rel=1e-6)


def test_intra_loss_hinge_on_mean_bank() -> None:
    features = torch.tensor([[1.0, 0.0]])
    labels = torch.tensor([0])
    hard = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # own prototype orthogonal: large CE
    ce_hard = math.log(1 + math.exp(1 / 0.05))  # logits (0, 20), label 0
    # Mean bank far from the margin: own prototype identical, other orthogonal.
    confident = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ce_confident = math.log(1 + math.exp(-20.0))  # ~2e-9 < 0.2: hinge gives 0
    loss = intra_loss(features, _memory({"hard": hard, "mean": confident}), labels)
    assert ce_confident < 0.2
    assert loss.item() == pytest.approx(0.5 * ce_hard, rel=1e-6)
    # Mean bank above the margin: the hinge passes CE - 0.2.
    unsure = torch.tensor([[0.6, 0.8], [0.8, 0.6]])  # logits (12, 16), label 0
    ce_unsure = math.log(1 + math.exp(4.0))
    loss = intra_loss(features, _memory({"hard": hard, "mean": unsure}), labels)
    assert loss.item() == pytest.approx(0.5 * (ce_hard + ce_unsure - 0.2), rel=1e-6)
    # Single bank: plain InfoNCE.
    loss = intra_loss(features, _memory({"prototypes": unsure}), labels)
    assert loss.item() == pytest.approx(ce_unsure, rel=1e-6)


def _log_softmax_at(logits: list[float], index: int) -> float:
    return logits[index] - math.log(sum(math.exp(v) for v in logits))


def test_multi_positive_one_and_two_positives_by_hand() -> None:
    tau = 0.5
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    prototypes = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # Sample 0: cluster with two sub-clusters (prototypes 0 and 1); sample 1: a
    # single-modality cluster (prototype 2 only).
    mask = torch.tensor([[True, True, False], [False, False, True]])
    logits_0 = [1.0 / tau, 0.6 / tau, 0.0]
    logits_1 = [0.0, 0.8 / tau, 1.0 / tau]
    loss_0 = -0.5 * (_log_softmax_at(logits_0, 0) + _log_softmax_at(logits_0, 1))
    loss_1 = -_log_softmax_at(logits_1, 2)
    loss = multi_positive_loss(features, prototypes, mask, temperature=tau)
    assert loss.item() == pytest.approx((loss_0 + loss_1) / 2, rel=1e-6)
    # A single positive with all prototypes as candidates is InfoNCE.
    single = multi_positive_loss(features[1:], prototypes, mask[1:], temperature=tau)
    plain = info_nce(features[1:], prototypes, torch.tensor([2]), temperature=tau)
    assert single.item() == pytest.approx(plain.item(), rel=1e-6)


def test_multi_positive_keeps_the_hardest_negatives() -> None:
    tau = 1.0
    features = torch.tensor([[1.0, 0.0]])
    angles = [0.0, 0.5, 1.0, 1.5, 2.5]  # similarity cos(angle): 1, .88, .54, .07, -.8
    prototypes = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    mask = torch.tensor([[False, False, True, False, False]])  # positive: prototype 2
    # 3 candidates: the positive plus the 2 most similar negatives (prototypes 0 and 1).
    sims = [math.cos(a) for a in angles]
    expected = -_log_softmax_at([sims[2], sims[0], sims[1]], 0)
    loss = multi_positive_loss(features, prototypes, mask, temperature=tau, num_candidates=3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Moving an easy (dropped) negative changes nothing; moving a kept one does.
    easier = prototypes.clone()
    easier[4] = torch.tensor([math.cos(2.0), math.sin(2.0)])
    assert multi_positive_loss(
        features, easier, mask, temperature=tau, num_candidates=3
    ).item() == pytest.approx(expected, rel=1e-6)
    harder = prototypes.clone()
    harder[4] = torch.tensor([math.cos(0.2), math.sin(0.2)])  # now among the two hardest
    expected_harder = -_log_softmax_at([sims[2], sims[0], math.cos(0.2)], 0)
    assert multi_positive_loss(
        features, harder, mask, temperature=tau, num_candidates=3
    ).item() == pytest.approx(expected_harder, rel=1e-6)


def _dense_reference(features, prototypes, mask, tau, num_candidates):
    """Per-sample loop straight from docs/method.md."""
    losses = []
    for b in range(features.shape[0]):
        sims = (prototypes @ features[b]).tolist()
        positives = [s for s in range(len(sims)) if mask[b, s]]
        if not positives:
            continue
        negatives = sorted(
            (s for s in range(len(sims)) if not mask[b, s]), key=lambda s: -sims[s]
        )
        candidates = positives + negatives[: max(num_candidates - len(positives), 0)]
        logits = [sims[s] / tau for s in candidates]
        log_norm = math.log(sum(math.exp(v) for v in logits))
        losses.append(-sum(sims[p] / tau - log_norm for p in positives) / len(positives))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("num_candidates", [1, 3, 6, 50])
def test_multi_positive_matches_dense_reference(num_candidates: int) -> None:
    generator = torch.Generator().manual_seed(num_candidates)
    features = F.normalize(torch.randn(12, 6, generator=generator, dtype=torch.float64), dim=1)
    prototypes = F.normalize(torch.randn(15, 6, generator=generator, dtype=torch.float64), dim=1)
    sub_to_cluster = torch.randint(0, 8, (15,), generator=generator)
    cluster_labels = torch.randint(-1, 9, (12,), generator=generator)
    mask = cluster_labels[:, None] == sub_to_cluster[None, :]
    assert mask.any(1).sum() >= 2 and (~mask.any(1)).any()  # some rows without positives
    loss = multi_positive_loss(features, prototypes, mask, 0.1, num_candidates)
    expected = _dense_reference(features, prototypes, mask, 0.1, num_candidates)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_no_positive_gives_differentiable_zero() -> None:
    features = F.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)
    prototypes = F.normalize(torch.randn(5, 4), dim=1)
    loss = multi_positive_loss(features, prototypes, torch.zeros(3, 5, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(features.grad, torch.zeros(3, 4))


def test_global_loss_combines_banks() -> None:
    generator = torch.Generator().manual_seed(3)
    features = F.normalize(torch.randn(4, 5, generator=generator), dim=1)
    hard = F.normalize(torch.randn(6, 5, generator=generator), dim=1)
    mean = F.normalize(torch.randn(6, 5, generator=generator), dim=1)
    mask = torch.tensor([0, 1, 2, 0])[:, None] == torch.tensor([0, 0, 1, 2, 2, 3])[None, :]
    hybrid = global_loss(features, _memory({"hard": hard, "mean": mean}), mask, 0.05, 4)
    expected = 0.5 * (
        _dense_reference(features, hard, mask, 0.05, 4)
        + _dense_reference(features, mean, mask, 0.05, 4)
    )
    assert hybrid.item() == pytest.approx(expected, rel=1e-5)
    single = global_loss(features, _memory({"prototypes": mean}), mask, 0.05, 4)
    assert single.item() == pytest.approx(_dense_reference(features, mean, mask, 0.05, 4), rel=1e-5)


@pytest.mark.parametrize("hybrid", [True, False])
def test_gradients_reach_features_not_memory(hybrid: bool) -> None:
    raw = torch.randn(6, 8, requires_grad=True)
    features = F.normalize(raw, dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    memory = PrototypeMemory.from_features(F.normalize(torch.randn(6, 8), dim=1), labels,
                                           hybrid=hybrid)
    mask = labels[:, None] == torch.tensor([0, 1, 2])[None, :]
    loss = intra_loss(features, memory, labels) + global_loss(features, memory, mask)
    loss.backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0 and torch.isfinite(raw.grad).all()
    for buffer in memory.buffers():
        assert not buffer.requires_grad and buffer.grad is None


def test_losses_when_every_global_cluster_holds_one_modality():
    x, modality, pids = clustered_features({VISIBLE: 12, INFRARED: 12}, ids=3)
    labels = pids + 3 * modality  # six clusters, none mixed
    sub = split_by_modality(labels, modality)
    assert np.array_equal(sub.sub_to_cluster, np.arange(6))
    memory = PrototypeMemory.from_features(torch.from_numpy(x), torch.from_numpy(sub.sub_labels))
    mask = positive_mask(torch.from_numpy(labels), torch.from_numpy(sub.sub_to_cluster))
    assert torch.equal(mask.sum(1), torch.ones(24, dtype=torch.long))
    loss = global_loss(torch.from_numpy(x), memory, mask)
    assert torch.isfinite(loss) and loss > 0
