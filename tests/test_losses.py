"""Tests for the contrastive losses against hand computations and a dense reference, and the
global loss when every global cluster holds one modality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bmil.cluster import split_by_modality
from bmil.losses import global_loss, info_nce, intra_loss, multi_positive_loss
from bmil.memory import PrototypeMemory, positive_mask
from bmil.records import INFRARED, VISIBLE
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


# ---------------------------------------------------------------- the global step's gradient order


def _global_objective(banks: dict[str, torch.Tensor], sub_to_cluster, sub_labels, gradient: str):
    from bmil.engine.objectives import GlobalObjective

    memory = PrototypeMemory(len(banks["mean"]), banks["mean"].shape[1], hybrid=True).double()
    for name, bank in banks.items():
        getattr(memory, name).copy_(bank)
    return GlobalObjective(
        name="global", group="global", loaders={}, labels={}, memory=memory,
        gather=lambda f, y: (f, y), sub_labels={m: np.asarray(s) for m, s in sub_labels.items()},
        sub_to_cluster=torch.as_tensor(sub_to_cluster), temperature=0.05, num_candidates=50, gradient=gradient,
    )


def _global_step(objective, fv: np.ndarray, fi: np.ndarray, sub_to_cluster: np.ndarray):
    """The objective's loss on unit rows ``fv`` (visible, one view each) and ``fi``
    (infrared), each image's own sub-cluster its dataset position's label; returns the
    loss and the gradients w.r.t. the rows (through an L2 normalisation, as the network's)."""
    from bmil.engine.forward import ModalityFeatures

    leaves = {m: torch.tensor(x, dtype=torch.float64, requires_grad=True) for m, x in ((VISIBLE, fv), (INFRARED, fi))}
    outputs = {}
    for m, leaf in leaves.items():
        index = torch.arange(len(leaf))
        clusters = torch.as_tensor(sub_to_cluster)[torch.as_tensor(objective.sub_labels[m])]
        outputs[m] = ModalityFeatures(F.normalize(leaf, dim=1), clusters, index, 1)
    loss = objective.loss(outputs)
    loss.backward()
    return loss, leaves[VISIBLE].grad.numpy(), leaves[INFRARED].grad.numpy()


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _hand_moved(mean: np.ndarray, hard: np.ndarray, f: np.ndarray, subs: np.ndarray, mu: float = 0.1):
    """The release's hybrid update in numpy: per sub-cluster of the batch, the mean moves to
    the batch mean, the hard bank to the instance least similar to the mean before the move."""
    mean, hard = mean.copy(), hard.copy()
    for s in np.unique(subs):
        rows = f[subs == s]
        hardest = rows[np.argmin(rows @ mean[s])]
        mean[s] = _normalize(mu * mean[s] + (1 - mu) * rows.mean(0))
        hard[s] = _normalize(mu * hard[s] + (1 - mu) * hardest)
    return mean, hard


def _hand_gradient(f: np.ndarray, forward_banks, backward_banks, positives: np.ndarray, tau: float = 0.05):
    """d/df of ½·½·(multi-positive over hard + over mean) of one modality's batch, every
    prototype a candidate: per bank (softmax − target)/τ/B @ the backward bank."""
    grad = np.zeros_like(f)
    target = positives / positives.sum(1, keepdims=True)
    for fwd, bwd in zip(forward_banks, backward_banks, strict=True):
        logits = f @ fwd.T / tau
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad += 0.25 * (p - target) / tau / len(f) @ bwd
    return grad - (grad * f).sum(1, keepdims=True) * f  # through the L2 normalisation of the unit rows


@pytest.mark.parametrize("gradient", ["release", "simultaneous"])
def test_global_gradient_order_three_prototypes_by_hand(gradient: str) -> None:
    """Three prototypes (global cluster 0: a visible and an infrared one; cluster 1: infrared
    only). release: the infrared gradient is taken against the prototypes after the visible
    batch's momentum update (the release's in-place bank, visible backward first);
    simultaneous: against the prototypes as they were. Numpy formulas, not bmil's code."""
    rng = np.random.default_rng(3)
    mean, hard = _normalize(rng.normal(size=(3, 5))), _normalize(rng.normal(size=(3, 5)))
    sub_to_cluster = np.array([0, 0, 1])
    fv, fi = _normalize(rng.normal(size=(3, 5))), _normalize(rng.normal(size=(2, 5)))
    sv, si = np.array([0, 0, 0]), np.array([1, 2])
    objective = _global_objective({"hard": torch.tensor(hard), "mean": torch.tensor(mean)}, sub_to_cluster,
                                  {VISIBLE: sv, INFRARED: si}, gradient)
    loss, grad_v, grad_i = _global_step(objective, fv, fi, sub_to_cluster)

    pos_v = sub_to_cluster[None, :] == sub_to_cluster[sv][:, None]
    pos_i = sub_to_cluster[None, :] == sub_to_cluster[si][:, None]
    moved_mean, moved_hard = _hand_moved(mean, hard, fv, sv)
    expected_v = _hand_gradient(fv, (hard, mean), (hard, mean), pos_v)
    backward_i = (moved_hard, moved_mean) if gradient == "release" else (hard, mean)
    expected_i = _hand_gradient(fi, (hard, mean), backward_i, pos_i)
    np.testing.assert_allclose(grad_v, expected_v, atol=1e-10)
    np.testing.assert_allclose(grad_i, expected_i, atol=1e-10)
    # The moved prototypes really change the infrared gradient (the case tells the rules apart).
    other = _hand_gradient(fi, (hard, mean), (hard, mean) if gradient == "release" else (moved_hard, moved_mean),
                           pos_i)
    assert np.abs(other - expected_i).max() > 1e-3

    # The value does not depend on the order; the update after the step is visible, then infrared.
    def mp(f, bank, pos):
        logits = f @ bank.T / 0.05
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return float(np.mean(-(log_p * pos).sum(1) / pos.sum(1)))

    value = 0.25 * (mp(fv, hard, pos_v) + mp(fv, mean, pos_v) + mp(fi, hard, pos_i) + mp(fi, mean, pos_i))
    assert float(loss.detach()) == pytest.approx(value, rel=1e-10)
    objective.update()
    final_mean, final_hard = _hand_moved(moved_mean, moved_hard, fi, si)
    np.testing.assert_allclose(objective.memory.mean.numpy(), final_mean, atol=1e-12)
    np.testing.assert_allclose(objective.memory.hard.numpy(), final_hard, atol=1e-12)


def test_global_gradient_order_matches_the_release_memory() -> None:
    """Expected numbers from the authors' release: its ``clustercontrast/models/cm.py``
    (HEAD 79cc647, ``ClusterMemory`` with ``CMhybrid`` and ``has_multi_pos_loss``, momentum
    0.1, τ 0.05, its 50-candidate list) run on the CPU in float64 on this case: 52 prototypes
    in 26 clusters of two, unit rows of numpy's ``default_rng(0)`` drawn in the order below;
    ``loss_ir = memory(f_ir, proxy_ir)``, ``loss_rgb = memory(f_rgb, proxy_rgb)``,
    ``0.5 * (loss_ir + loss_rgb)).backward()``; gradients w.r.t. the unit rows fed to it."""
    rng = np.random.default_rng(0)
    s, d = 52, 4
    mean, hard = _normalize(rng.normal(size=(s, d))), _normalize(rng.normal(size=(s, d)))
    sub_to_cluster = np.repeat(np.arange(s // 2), 2)
    fv, fi = _normalize(rng.normal(size=(4, d))), _normalize(rng.normal(size=(3, d)))
    sv, si = np.array([0, 0, 2, 0]), np.array([1, 3, 5])
    release_loss = 16.27349880725293
    release_grad_v = np.array([[-0.0981389116, 0.3441447308, -0.437905528, -0.9234538339],
                               [0.082278696, 0.21589295, -0.4409675892, -1.0071357336],
                               [0.4462789621, 0.7308602557, 0.7521637645, -1.0867451199],
                               [0.842125971, -0.4353091965, -1.3467691691, -1.4635332311]])
    release_grad_i = np.array([[1.3527597179, -1.7822870042, -1.3857075161, -0.4943799323],
                               [0.3460921021, 0.7545724978, 1.7332021634, 0.7280878629],
                               [1.4053189099, -0.3417344533, -0.0337329673, -0.3324109489]])
    release_mean_after = np.array([[-0.1936461372, 0.2927737343, 0.9119086725, -0.2126200534],
                                   [0.5667805189, 0.3649048221, -0.0156106951, 0.7384853556],
                                   [0.8226173898, -0.2338547529, -0.5146075879, -0.0615760915],
                                   [-0.7538772013, 0.5948818034, -0.0752177841, -0.2685648718],
                                   [-0.4233796213, -0.2460502162, 0.3202078167, 0.8109722199],
                                   [0.2764751788, 0.4959536334, 0.2479970585, 0.7849133251]])
    release_hard_after = np.array([[-0.6340820543, 0.6258405228, 0.4529241545, -0.0335156493],
                                   [0.529958606, 0.400217957, -0.1162207324, 0.7385541309],
                                   [0.8553850611, -0.1605602763, -0.490820859, 0.0403940503],
                                   [-0.7706909785, 0.5860376696, -0.0672280194, -0.2409889186],
                                   [-0.2826742382, 0.7691132157, 0.5666947783, -0.0861229631],
                                   [0.3061898193, 0.411874233, 0.3010272942, 0.8037350178]])
    banks = {"hard": torch.tensor(hard), "mean": torch.tensor(mean)}
    for gradient in ("release", "simultaneous"):
        objective = _global_objective(banks, sub_to_cluster, {VISIBLE: sv, INFRARED: si}, gradient)
        loss, grad_v, grad_i = _global_step(objective, fv, fi, sub_to_cluster)
        assert float(loss.detach()) == pytest.approx(release_loss, rel=1e-9)
        np.testing.assert_allclose(grad_v, release_grad_v, atol=1e-9)
        if gradient == "release":
            np.testing.assert_allclose(grad_i, release_grad_i, atol=1e-9)
        else:
            assert np.abs(grad_i - release_grad_i).max() > 1e-3
        objective.update()
        np.testing.assert_allclose(objective.memory.mean.numpy()[:6], release_mean_after, atol=1e-9)
        np.testing.assert_allclose(objective.memory.hard.numpy()[:6], release_hard_after, atol=1e-9)
        np.testing.assert_array_equal(objective.memory.mean.numpy()[6:], mean[6:])
