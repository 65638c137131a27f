"""Prototype memories: one L2-normalised prototype (or two) per cluster, momentum-updated.

Used for the per-modality intra memories of stage 1 (one prototype per pseudo identity) and
for the global split-and-contrast memory of stage 2 (one prototype per (cluster, modality)
sub-cluster; see :func:`positive_mask`).

Two modes (docs/method.md):

* ``hybrid=True`` (the release's default): two banks, ``mean`` and ``hard``, both ``[C, D]``.
  After a step, for every cluster c present in the batch, ``mean[c]`` moves toward the mean of
  the batch features of c and ``hard[c]`` toward the batch feature of c least similar to
  ``mean[c]`` as it was before this update (the release's ``CM_Hybrid``):
  ``p <- mu * p + (1 - mu) * target``, then re-normalised.
* ``hybrid=False`` (the paper's text): one bank, ``prototypes`` ``[C, D]``; every batch image
  moves its cluster's prototype, ``M[j] <- mu * M[j] + (1 - mu) * f`` then re-normalised,
  sequentially in batch order.

Prototypes are buffers, so they travel with ``state_dict`` and ``.to(device)`` and never get
gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HYBRID_BANKS = ("hard", "mean")
SINGLE_BANK = "prototypes"


class PrototypeMemory(nn.Module):
    """Cluster prototypes ``[C, D]`` (one or two banks) with a momentum update.

    Build with :meth:`from_features`. ``momentum`` is mu: the weight kept by the old prototype
    (0.1 in the paper and release, so a prototype mostly follows the newest features).
    """

    def __init__(
        self, num_clusters: int, dim: int, momentum: float = 0.1, hybrid: bool = True
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.momentum = momentum
        self.hybrid = hybrid
        for name in self.bank_names:
            self.register_buffer(name, torch.zeros(num_clusters, dim))

    @classmethod
    def from_features(
        cls,
        features: torch.Tensor,
        labels: torch.Tensor,
        momentum: float = 0.1,
        hybrid: bool = True,
    ) -> PrototypeMemory:
        """Initialise every prototype to its cluster's L2-normalised mean feature.

        Args:
            features: ``[N, D]`` features, e.g. the clustering features (rows of norm at
                most 1, not unit); each cluster's mean is L2-normalised here.
            labels: ``[N]`` cluster ids 0..C-1, -1 for images left out (outliers). Every id
                in 0..max must occur at least once.

        Returns:
            A memory on ``features``' device, float32, with ``C = labels.max() + 1``.
        """
        labels = torch.as_tensor(labels, device=features.device).long()
        if features.ndim != 2 or labels.shape != (features.shape[0],):
            raise ValueError(
                f"expected features [N, D] and labels [N], got {tuple(features.shape)} and "
                f"{tuple(labels.shape)}"
            )
        kept = labels >= 0
        if not bool(kept.any()):
            raise ValueError("cannot build a prototype memory: every label is -1")
        features = features.detach().float()[kept]
        labels = labels[kept]
        num_clusters = int(labels.max()) + 1
        counts = torch.bincount(labels, minlength=num_clusters)
        if bool((counts == 0).any()):
            empty = int(torch.nonzero(counts == 0)[0])
            raise ValueError(f"cluster labels must be 0..C-1 without gaps; cluster {empty} is empty")
        sums = features.new_zeros(num_clusters, features.shape[1]).index_add_(0, labels, features)
        centroids = F.normalize(sums / counts[:, None].float(), dim=1)

        memory = cls(num_clusters, features.shape[1], momentum=momentum, hybrid=hybrid)
        memory.to(features.device)
        for name in memory.bank_names:
            getattr(memory, name).copy_(centroids)
        return memory

    @property
    def bank_names(self) -> tuple[str, ...]:
        """Buffer names of the banks: ``("hard", "mean")`` or ``("prototypes",)``."""
        return HYBRID_BANKS if self.hybrid else (SINGLE_BANK,)

    @property
    def num_clusters(self) -> int:
        return getattr(self, self.bank_names[0]).shape[0]

    @property
    def dim(self) -> int:
        return getattr(self, self.bank_names[0]).shape[1]

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Momentum-update the prototypes of the clusters in a batch (in place).

        Args:
            features: ``[B, D]`` L2-normalised batch features (detached here).
            labels: ``[B]`` their cluster ids; -1 entries are skipped.
        """
        labels = torch.as_tensor(labels, device=features.device).long()
        if labels.numel() == 0:
            return
        features = features.detach().to(getattr(self, self.bank_names[0]).dtype)
        if self.hybrid:  # on the device throughout: no host synchronisation
            kept = labels >= 0
            labels = torch.where(kept, labels, 0)
            hardest = self._hardest(features, labels, kept)  # judged against the mean bank before it moves
            present = self._update_mean(features, labels, kept)
            self._move_present(self.hard, features[hardest], present)
            return
        kept = labels >= 0
        features, labels = features[kept], labels[kept]
        if labels.numel():
            self._update_sequential(features, labels)

    def moved(self, features: torch.Tensor, labels: torch.Tensor) -> PrototypeMemory:
        """A copy of this memory after :meth:`update` with ``features`` ``[B, D]`` and
        ``labels`` ``[B]``; this memory is left as it is."""
        bank = getattr(self, self.bank_names[0])
        other = PrototypeMemory(self.num_clusters, self.dim, momentum=self.momentum, hybrid=self.hybrid)
        other.to(device=bank.device, dtype=bank.dtype)
        other.load_state_dict(self.state_dict())
        other.update(features, labels)
        return other

    def _move(self, bank: torch.Tensor, clusters: torch.Tensor, targets: torch.Tensor) -> None:
        """``bank[c] <- normalise(mu * bank[c] + (1 - mu) * target)``; ``clusters`` unique."""
        moved = self.momentum * bank[clusters] + (1.0 - self.momentum) * targets
        bank[clusters] = F.normalize(moved, dim=1)

    def _move_present(self, bank: torch.Tensor, targets: torch.Tensor, present: torch.Tensor) -> None:
        """:meth:`_move` of every cluster (``targets`` [C, D]) where ``present`` [C] is true;
        the other rows are left as they are. Shapes never depend on the batch's content."""
        moved = F.normalize(self.momentum * bank + (1.0 - self.momentum) * targets, dim=1)
        bank.copy_(torch.where(present[:, None], moved, bank))

    def _update_mean(self, features: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Move every cluster with kept batch rows toward their mean; returns that mask [C]."""
        weight = kept.to(features.dtype)
        counts = features.new_zeros(self.num_clusters).index_add_(0, labels, weight)
        sums = features.new_zeros(self.num_clusters, features.shape[1])
        sums.index_add_(0, labels, features * weight[:, None])
        present = counts > 0
        self._move_present(self.mean, sums / counts.clamp(min=1.0)[:, None], present)
        return present

    def _hardest(self, features: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Batch position [C] (int64) of each cluster's kept instance least similar to its
        ``mean`` prototype (ties: the earliest in the batch); arbitrary for clusters with
        no kept instance. ``labels``: 0 where not kept."""
        similarity = (features * self.mean[labels]).sum(dim=1)
        similarity = torch.where(kept, similarity, torch.inf)  # rows left out are never the hardest
        # Sort by similarity, then (stably) by cluster: each cluster's run starts at its
        # least similar instance.
        by_similarity = torch.argsort(similarity, stable=True)
        order = by_similarity[torch.argsort(labels[by_similarity], stable=True)]
        positions = torch.arange(len(order), device=labels.device)
        first = torch.full((self.num_clusters,), len(order), dtype=torch.long, device=labels.device)
        first.scatter_reduce_(0, labels[order], positions, reduce="amin")
        return order[first.clamp(max=len(order) - 1)]

    def _update_sequential(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Exactly the per-image sequential update, in rounds: round r applies each cluster's
        r-th batch image, so clusters within a round are distinct and order is preserved."""
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        run_start = torch.ones_like(sorted_labels, dtype=torch.bool)
        run_start[1:] = sorted_labels[1:] != sorted_labels[:-1]
        positions = torch.arange(len(order), device=labels.device)
        start_of_run = torch.cummax(torch.where(run_start, positions, 0), dim=0).values
        occurrence = torch.empty_like(order)
        occurrence[order] = positions - start_of_run
        for round_index in range(int(occurrence.max()) + 1):
            members = torch.nonzero(occurrence == round_index).squeeze(1)
            self._move(self.prototypes, labels[members], features[members])

    def extra_repr(self) -> str:
        return (
            f"num_clusters={self.num_clusters}, dim={self.dim}, momentum={self.momentum}, "
            f"hybrid={self.hybrid}"
        )


def positive_mask(cluster_labels: torch.Tensor, sub_to_cluster: torch.Tensor) -> torch.Tensor:
    """Which global-memory prototypes are positives of each sample.

    Args:
        cluster_labels: ``[B]`` global cluster id of each batch sample (-1: none).
        sub_to_cluster: ``[S]`` global cluster id of each sub-cluster prototype.

    Returns:
        ``[B, S]`` bool, True where ``sub_to_cluster[s] == cluster_labels[b]`` (never for -1).
    """
    cluster_labels = torch.as_tensor(cluster_labels).long()
    sub_to_cluster = torch.as_tensor(sub_to_cluster, device=cluster_labels.device).long()
    same = cluster_labels[:, None] == sub_to_cluster[None, :]
    return same & (cluster_labels[:, None] >= 0)
