"""P×K sampling over pseudo identities (cluster labels), outliers left out.

Two ways to fill a batch (``train.sampler``):

- ``camera`` (default, the release's ``RandomMultipleGallerySampler`` in
  ``clustercontrast/utils/data/sampler.py``, with ``train_sysu.py``'s loader): passes over
  the pseudo identities, each pass a random order of all of them; for each identity a random
  anchor image, then ``num_instances - 1`` images drawn from that identity's images taken by
  *other cameras* than the anchor's, or, when no other camera took it, from its other images.
  The draw is without replacement when that pool holds at least ``num_instances`` images and
  with replacement otherwise (the release's threshold). Batches are ``num_ids`` consecutive
  identities of a pass; the pass's last incomplete batch is dropped (the release's
  ``drop_last``) and the next pass begins (its ``IterLoader`` restarting the sampler).
- ``uniform`` (bmil's earlier sampler): each batch draws ``num_ids`` distinct identities at
  random and ``num_instances`` of their images uniformly, cameras ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


def warn_few_identities(clusters: int, num_ids: int, warned: set[int] | None = None) -> None:
    """The few-clusters warning; with ``warned`` (the batch sizes already warned about, owned
    by the caller and updated here) once per ``num_ids`` (a new sampler is made every epoch
    and the count changes between epochs: the first count is named)."""
    if warned is not None:
        if num_ids in warned:
            return
        warned.add(num_ids)
    log.warning(
        "only %d pseudo identities for %d per batch: identities repeat within a batch; set train.num_ids to "
        "at most the clusters an epoch gives (e.g. train.num_ids=%d), or make more clusters with a lower "
        "cluster.eps (bmil cluster-scan shows the counts); this warning is not repeated",
        clusters, num_ids, max(2, clusters),
    )


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

    Each batch of ``num_ids × num_instances`` indices holds ``num_ids`` pseudo identities
    (labels >= 0; -1 outliers are never sampled), ``num_instances`` consecutive indices each.
    With fewer than ``num_ids`` clusters, identities repeat within a batch (a warning is
    logged; ``warned``, a set shared by the samplers of one run, says it once per ``num_ids``:
    :func:`warn_few_identities`).

    cameras: None — the ``uniform`` rule: distinct identities per batch; a cluster with at
    least ``num_instances`` images contributes distinct images, a smaller one all its images
    plus random repeats. An int array-like [N] of each image's camera — the ``camera`` rule
    (the release's): passes over all identities in random order, each identity an anchor
    first and then companions from other cameras (see the module docstring). A single-image
    identity repeats its image (the release would yield that one index and shift the batches).

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
        cameras: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        warned: set[int] | None = None,
    ) -> None:
        if num_ids < 1 or num_instances < 1 or iterations < 1:
            raise ValueError("PseudoIdentitySampler needs num_ids, num_instances and iterations of at least 1.")
        labels = _as_array(labels)
        self.members = cluster_members(labels)
        if not self.members:
            raise ValueError("PseudoIdentitySampler got no cluster (every label is -1 or the label set is empty).")
        self.member_cameras: list[np.ndarray] | None = None
        if cameras is not None:
            cameras = _as_array(cameras)
            if cameras.shape != labels.shape:
                raise ValueError(
                    f"PseudoIdentitySampler got {len(cameras)} cameras for {len(labels)} labels; they must match."
                )
            self.member_cameras = [cameras[members] for members in self.members]
        self.num_ids = num_ids
        self.num_instances = num_instances
        self.iterations = iterations
        self.seed = seed
        self.epoch = 0
        if len(self.members) < num_ids:
            warn_few_identities(len(self.members), num_ids, warned)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the order with (seed, epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.iterations * self.num_ids * self.num_instances

    # ------------------------------------------------------------ uniform rule
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

    def _uniform_indices(self, rng: np.random.Generator) -> list[np.ndarray]:
        return [
            self._instances(self.members[identity], rng)
            for _ in range(self.iterations)
            for identity in self._batch_identities(rng)
        ]

    # ------------------------------------------------------------- camera rule
    def _anchor_and_companions(self, identity: int, rng: np.random.Generator) -> np.ndarray:
        members, cameras = self.members[identity], self.member_cameras[identity]
        anchor = int(rng.integers(len(members)))
        pool = members[cameras != cameras[anchor]]
        if len(pool) == 0:  # one camera only: any other image of the identity
            pool = np.delete(members, anchor)
        if len(pool) == 0:  # a single image
            pool = members[anchor : anchor + 1]
        companions = rng.choice(pool, size=self.num_instances - 1, replace=len(pool) < self.num_instances)
        return np.concatenate([members[anchor : anchor + 1], companions])

    def _camera_indices(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Whole passes, each cut to full batches, drawn pass by pass (so a longer epoch
        begins with the same batches), until ``iterations × num_ids`` identity visits."""
        count, wanted = len(self.members), self.iterations * self.num_ids
        kept = count - count % self.num_ids if count >= self.num_ids else count
        chunks: list[np.ndarray] = []
        while len(chunks) < wanted:
            for identity in rng.permutation(count)[:kept].tolist():
                chunks.append(self._anchor_and_companions(identity, rng))
        return chunks[:wanted]

    def indices(self) -> np.ndarray:
        """All indices of this epoch, int64 [iterations * num_ids * num_instances]."""
        rng = np.random.default_rng([self.seed, self.epoch])
        chunks = self._uniform_indices(rng) if self.member_cameras is None else self._camera_indices(rng)
        return np.concatenate(chunks).astype(np.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())


def _as_array(values: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    values = values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return values.astype(np.int64).reshape(-1)
