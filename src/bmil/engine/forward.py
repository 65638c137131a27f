"""The training forward pass of one step: the batches of both modalities through the
network together, laid out as the release lays them out."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Batches = dict[int, tuple[torch.Tensor, torch.Tensor]]
"""modality → (views [B, V, 3, H, W], dataset positions [B]) as a training loader yields them."""


class ModalityFeatures(NamedTuple):
    """The forward output of one modality's batch.

    features: L2-normalised float32 [B·V, D], view-major (all first views, then all second).
    targets: int64 [B·V] on the device: the label of each row's image, repeated over views.
    index: the batch's dataset positions [B] (CPU), as the loader gave them.
    views: V, the views per image.
    """

    features: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor
    views: int


def network_features(network: nn.Module, x: torch.Tensor, modality: torch.Tensor, device: torch.device,
                     amp: bool = False) -> torch.Tensor:
    """One pass: L2-normalised float32 features [B, D] of images ``x`` [B, 3, H, W] of
    ``modality`` [B] (bfloat16 autocast when ``amp`` and on CUDA; channels-last on CUDA)."""
    x = x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        feats = network(x, modality.to(device))
    return F.normalize(feats.float(), dim=1)


@contextmanager
def running_stats_frozen(network: nn.Module) -> Iterator[None]:
    """Within the block, every BatchNorm of ``network`` that tracks running statistics still
    normalises a training-mode batch with that batch's statistics but leaves its running mean,
    variance and batch count unchanged (as a DataParallel replica other than the first does)."""
    norms = [m for m in network.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def forward_batches(network: nn.Module, batches: Batches, labels: dict[int, np.ndarray], device: torch.device,
                    *, bn_split: int = 1, amp: bool = False) -> dict[int, ModalityFeatures]:
    """Features of the batches of every modality in ``batches`` in one forward, with each
    image's label (``labels[m]`` [N_m], indexed by dataset position) repeated over its views.

    Each modality's images are laid out view-major (all first views, then all second views),
    as the release concatenates them; with ``bn_split`` = g the batch goes through the
    network in g passes, pass j taking the j-th contiguous g-th of every modality, so each
    BatchNorm sees what one GPU of the release's g-GPU DataParallel sees (g = 2: first-view
    visible + half the infrared, then the rest). Only the first pass updates the BatchNorm
    running statistics, as only replica 0's buffers survive DataParallel; every pass normalises
    with its own batch statistics. Outputs keep the order of ``batches``.
    """
    images, targets = {}, {}
    for m, (views, index) in batches.items():
        # Each (pinned) batch goes to the device whole, asynchronously; it is laid out there.
        images[m] = views.to(device, non_blocking=True).transpose(0, 1).flatten(0, 1)
        targets[m] = torch.from_numpy(labels[m][index.numpy()]).repeat(views.shape[1]).to(device, non_blocking=True)
    chunks = {m: x.chunk(bn_split) for m, x in images.items()}
    parts = []
    for j in range(bn_split):
        x = torch.cat([chunks[m][j] for m in images])
        mods = torch.cat([torch.full((len(chunks[m][j]),), m, dtype=torch.long, device=device) for m in images])
        if j == 0:
            parts.append(network_features(network, x, mods, device, amp))
        else:
            with running_stats_frozen(network):
                parts.append(network_features(network, x, mods, device, amp))
    pieces: dict[int, list[torch.Tensor]] = {m: [] for m in images}
    for j, feats in enumerate(parts):
        for m, f in zip(images, feats.split([len(chunks[m][j]) for m in images]), strict=True):
            pieces[m].append(f)
    return {
        m: ModalityFeatures(torch.cat(pieces[m]), targets[m], index, int(views.shape[1]))
        for m, (views, index) in batches.items()
    }
