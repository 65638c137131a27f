"""P×K sampling over pseudo identities (cluster labels), outliers left out."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


def cluster_members(labels: np.ndarray) -> list[np.ndarray]:
    """Dataset indices of every cluster (label >= 0), clusters in label order, indices ascending."""
    indices = np.flatnonzero(labels >= 0)
    if len(indices) == 0:
        return []
    order = indices[np.argsort(labels[indices], kind="stable")]
    _, starts = np.unique(labels[order], return_index=True)
    return np.split(order, starts[1:])


class PseudoIdentitySampler(Sampler[int]):
    """Yields ``iterations × num_ids × num_instances`` dataset indices, batch after batch.

    Each batch of ``num_ids × num_instances`` indices holds ``num_ids`` distinct pseudo
    identities (labels >= 0; -1 outliers are never sampled), ``num_instances`` consecutive
    indices each. A cluster with at least ``num_instances`` images contributes distinct
    images; a smaller one contributes all its images plus random repeats. With fewer than
    ``num_ids`` clusters, identities repeat within a batch (a warning is logged once).

    labels: int array-like [N] of pseudo labels. The order depends only on
    (seed, epoch); ``set_epoch`` changes the epoch. Uses its own numpy Generator.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        num_ids: int = 8,
        num_instances: int = 16,
        iterations: int = 200,
        seed: int = 0,
    ) -> None:
        if num_ids < 1 or num_instances < 1 or iterations < 1:
            raise ValueError("PseudoIdentitySampler needs num_ids, num_instances and iterations of at least 1.")
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        self.members = cluster_members(labels.astype(np.int64).reshape(-1))
        if not self.members:
            raise ValueError("PseudoIdentitySampler got no cluster (every label is -1 or the label set is empty).")
        self.num_ids = num_ids
        self.num_instances = num_instances
        self.iterations = iterations
        self.seed = seed
        self.epoch = 0
        if len(self.members) < num_ids:
            log.warning(
                "only %d pseudo identities for %d per batch: identities repeat within a batch",
                len(self.members), num_ids,
            )

    def set_epoch(self, epoch: int) -> None:
        """Reseed the order with (seed, epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.iterations * self.num_ids * self.num_instances

    def _batch_identities(self, rng: np.random.Generator) -> np.ndarray:
        count = len(self.members)
        if count >= self.num_ids:
            return rng.choice(count, size=self.num_ids, replace=False)
        # Fewer clusters than slots: whole shuffled rounds, so repeats stay balanced.
        rounds = -(-self.num_ids // count)
        return np.concatenate([rng.permutation(count) for _ in range(rounds)])[: self.num_ids]

    def _instances(self, members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        k = self.num_instances
        if len(members) >= k:
            return rng.choice(members, size=k, replace=False)
        extra = rng.choice(members, size=k - len(members), replace=True)
        return np.concatenate([rng.permutation(members), extra])

    def indices(self) -> np.ndarray:
        """All indices of this epoch, int64 [iterations * num_ids * num_instances]."""
        rng = np.random.default_rng([self.seed, self.epoch])
        chunks = [
            self._instances(self.members[identity], rng)
            for _ in range(self.iterations)
            for identity in self._batch_identities(rng)
        ]
        return np.concatenate(chunks).astype(np.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())
