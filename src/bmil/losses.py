"""Contrastive losses against prototype memories (docs/method.md stages 1 and 2).

All functions take batch features already L2-normalised by the caller, return a scalar
tensor that is differentiable w.r.t. the features, and never back-propagate into the
memories (their prototypes are buffers).

The global loss can take its gradient against other prototypes than those its value is
computed with (``backward_memory``): the release's memory computes the gradient w.r.t. the
features against its bank as it is when the backward runs, which another loss term's
backward may already have moved (see :class:`bmil.engine.objectives.GlobalObjective`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bmil.memory import PrototypeMemory


class _MemoryLogits(torch.autograd.Function):
    """``features @ prototypes.T`` whose gradient w.r.t. ``features`` is taken against
    ``backward_prototypes``: ``grad_logits @ backward_prototypes`` (no gradient to either bank)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, prototypes: torch.Tensor,  # type: ignore[override]
                backward_prototypes: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(backward_prototypes)
        return features @ prototypes.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (backward_prototypes,) = ctx.saved_tensors
        return grad @ backward_prototypes, None, None


def memory_logits(
    features: torch.Tensor, prototypes: torch.Tensor, backward_prototypes: torch.Tensor | None = None
) -> torch.Tensor:
    """Similarities ``[B, S]`` of ``features`` ``[B, D]`` to ``prototypes`` ``[S, D]``; with
    ``backward_prototypes`` ``[S, D]`` their gradient w.r.t. ``features`` is taken against
    those instead (the value is unchanged)."""
    prototypes = prototypes.to(features.dtype)
    if backward_prototypes is None:
        return features @ prototypes.T
    return _MemoryLogits.apply(features, prototypes, backward_prototypes.to(features.dtype))


def info_nce(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.05,
) -> torch.Tensor:
    """InfoNCE of each sample against all prototypes: batch-mean cross-entropy.

    Args:
        features: ``[B, D]`` L2-normalised features.
        prototypes: ``[C, D]`` L2-normalised prototypes.
        labels: ``[B]`` the index (0..C-1) of each sample's own prototype.
        temperature: tau; logits are ``features @ prototypes.T / tau``.
    """
    logits = features @ prototypes.to(features.dtype).T / temperature
    return F.cross_entropy(logits, torch.as_tensor(labels, device=features.device).long())


def intra_loss(
    features: torch.Tensor,
    memory: PrototypeMemory,
    labels: torch.Tensor,
    temperature: float = 0.05,
    mean_margin: float = 0.2,
) -> torch.Tensor:
    """Stage-1 intra-modality loss against a modality's memory.

    Hybrid memory (release): ``0.5 * (CE_hard + max(0, CE_mean - mean_margin))``, where
    ``CE_hard`` and ``CE_mean`` are the batch-mean InfoNCE over the hard and the mean bank;
    the hinge is applied to the batch-mean ``CE_mean``, not per sample. Single-bank memory
    (paper): InfoNCE over that bank.
    """
    if not memory.hybrid:
        return info_nce(features, memory.prototypes, labels, temperature)
    hard = info_nce(features, memory.hard, labels, temperature)
    mean = info_nce(features, memory.mean, labels, temperature)
    return 0.5 * (hard + torch.clamp(mean - mean_margin, min=0.0))


def multi_positive_loss(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    positive_mask: torch.Tensor,
    temperature: float = 0.05,
    num_candidates: int = 50,
    backward_prototypes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-positive InfoNCE over each sample's positives and hardest negatives.

    For sample b with positives P_b, the candidates are P_b plus the
    ``num_candidates - |P_b|`` non-positive prototypes most similar to it (all prototypes if
    there are fewer; just P_b if ``|P_b| >= num_candidates``), and
    ``L_b = -(1/|P_b|) * sum_{p in P_b} log softmax_{candidates}(K f_b / tau)[p]``.

    Args:
        features: ``[B, D]`` L2-normalised features.
        prototypes: ``[S, D]`` sub-cluster prototypes.
        positive_mask: ``[B, S]`` bool (see :func:`bmil.memory.positive_mask`).
        temperature: tau.
        num_candidates: size of the candidate set, positives included.
        backward_prototypes: ``[S, D]`` or None: take the gradient w.r.t. ``features``
            against these (see :func:`memory_logits`); the value and the candidates come
            from ``prototypes``.

    Returns:
        The mean of L_b over samples with at least one positive. Samples without a positive
        are excluded; if no sample has one the result is a zero that still depends on
        ``features`` (so ``backward()`` works and gives zero gradients).
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be at least 1, got {num_candidates}")
    positive_mask = torch.as_tensor(positive_mask, device=features.device).bool()
    logits = memory_logits(features, prototypes, backward_prototypes) / temperature  # [B, S]
    num_positives = positive_mask.sum(dim=1)  # [B]

    # Rank the non-positives of each row by similarity (0 = hardest); positives go last.
    negative_logits = logits.detach().masked_fill(positive_mask, float("-inf"))
    by_similarity = torch.argsort(negative_logits, dim=1, descending=True, stable=True)
    ranks = torch.arange(logits.shape[1], device=logits.device).expand_as(by_similarity)
    negative_rank = torch.empty_like(by_similarity).scatter_(1, by_similarity, ranks)
    negatives_kept = (num_candidates - num_positives).clamp(min=0)
    candidates = positive_mask | (negative_rank < negatives_kept[:, None])

    log_prob = logits.masked_fill(~candidates, float("-inf")).log_softmax(dim=1)
    positive_log_prob = torch.where(positive_mask, log_prob, torch.zeros_like(log_prob)).sum(1)
    per_sample = -positive_log_prob / num_positives.clamp(min=1)
    has_positive = (num_positives > 0).to(per_sample.dtype)
    return (per_sample * has_positive).sum() / has_positive.sum().clamp(min=1)


def global_loss(
    features: torch.Tensor,
    memory: PrototypeMemory,
    positive_mask: torch.Tensor,
    temperature: float = 0.05,
    num_candidates: int = 50,
    backward_memory: PrototypeMemory | None = None,
) -> torch.Tensor:
    """Stage-2 split-and-contrast loss against the global (sub-cluster) memory.

    Hybrid memory: ``0.5 * (multi-positive over hard + multi-positive over mean)``; single
    bank: the multi-positive loss over it. ``backward_memory`` (same banks and shapes, or
    None): the gradient w.r.t. ``features`` is taken against its banks.
    """
    def bank(name: str) -> torch.Tensor | None:
        return None if backward_memory is None else getattr(backward_memory, name)

    def term(name: str) -> torch.Tensor:
        return multi_positive_loss(features, getattr(memory, name), positive_mask, temperature, num_candidates,
                                   backward_prototypes=bank(name))

    if not memory.hybrid:
        return term("prototypes")
    return 0.5 * (term("hard") + term("mean"))
