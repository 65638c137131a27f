"""Feature extraction for any model mapping (images [B,3,H,W], modality [B]) to features."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from bmil.data.images import ImageDataset
from bmil.data.transforms import test_transform
from bmil.records import Record, record_arrays

log = logging.getLogger(__name__)

# What extract_features returns for each ``feature`` (n = L2-normalise, f and f' = the BN-neck
# outputs of an image and of its mirror image; without flip both are n(f)).
FEATURES = ("test", "clustering")
FEATURE_DESCRIPTION = "BN-neck output f: n(n(f) + n(f_flip)), n = L2-normalise"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def combine_views(feats: torch.Tensor, flipped: torch.Tensor | None, feature: str = "test") -> torch.Tensor:
    """The feature [B, D] of a batch from its BN-neck outputs ``feats`` [B, D] and those of
    the mirrored images ``flipped`` [B, D] (None: no flip).

    Each view is L2-normalised first (the release's network normalises its eval output);
    ``"test"`` (query, gallery, search, export): n(n(f) + n(f')), unit length;
    ``"clustering"``: (n(f) + n(f')) / 2, not normalised again, so its norm is below 1 and
    smaller the more the two views disagree (the release's ``extract_features``). Without
    flip both are n(f).
    """
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}.")
    unit = torch.nn.functional.normalize(feats, dim=1)
    if flipped is None:
        return unit
    mean = (unit + torch.nn.functional.normalize(flipped, dim=1)) / 2
    return mean if feature == "clustering" else torch.nn.functional.normalize(mean, dim=1)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def extract_features(
    model: nn.Module,
    records: Sequence[Record],
    *,
    height: int,
    width: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    flip: bool = True,
    workers: int = 0,
    amp: bool = True,
    progress: bool = True,
    desc: str = "extract",
    resize: str = "bicubic",
    channels_last: bool = True,
    cache: dict[str, torch.Tensor] | None = None,
    feature: str = "test",
) -> np.ndarray:
    """Features [N, D] float32 of ``records``, in order (:func:`combine_views`).

    feature: ``"test"`` (unit rows: with ``flip`` the normalised mean of the image's and
    its mirror's normalised BN-neck outputs) or ``"clustering"`` (that mean not normalised
    again: rows of norm at most 1, which :func:`bmil.cluster.jaccard_distance` ranks and
    weights as they are). Without ``flip`` both are the normalised BN-neck output.
    ``resize``: the interpolation to ``height`` × ``width``, ``"bicubic"`` (the release's
    clustering features) or ``"lanczos"`` (the release's scoring of query and gallery
    images, ``eval.resize``). Runs under ``inference_mode``,
    in channels_last memory format when ``channels_last``; on CUDA under bf16 autocast when
    ``amp``. The model's train/eval mode is restored afterwards. ``cache``: the resized,
    normalised image tensors by path, read and filled (pass one dict only to calls with the
    same ``height``, ``width`` and ``resize``, and ``workers=0``: see
    :class:`~bmil.data.images.ImageDataset`).
    """
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}.")
    device = torch.device(device)
    _, _, modality = record_arrays(records)
    loader = DataLoader(
        ImageDataset(list(records), test_transform(height, width, resize), tensors=cache),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    modality_t = torch.from_numpy(modality)
    was_training = model.training
    model.eval()
    chunks = []
    with torch.inference_mode(), _autocast(device, amp):
        for images, index in tqdm(loader, desc=desc, disable=not progress, leave=False):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            mods = modality_t[index].to(device)
            feats = model(images, mods).float()
            flipped = model(torch.flip(images, dims=[3]), mods).float() if flip else None
            chunks.append(combine_views(feats, flipped, feature).cpu())
    model.train(was_training)
    if not chunks:
        return np.zeros((0, getattr(model, "feat_dim", 0)), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)
