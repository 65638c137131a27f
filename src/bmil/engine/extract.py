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
from bmil.data.records import Record, record_arrays
from bmil.data.transforms import test_transform

log = logging.getLogger(__name__)

FEATURE_DESCRIPTION = "BN-neck output, flip-averaged, L2-normalised"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
) -> np.ndarray:
    """L2-normalised features [N, D] float32 of ``records``, in order.

    With ``flip`` the feature is the mean of the image's and its mirror's features
    (docs/method.md, "Test feature"). ``resize``: the interpolation to ``height`` × ``width``,
    ``"bicubic"`` (the release's clustering features) or ``"lanczos"`` (the release's
    scoring of query and gallery images, ``eval.resize``). Runs under ``inference_mode``,
    in channels_last memory format when ``channels_last``; on CUDA under bf16 autocast when
    ``amp``. The model's train/eval mode is restored afterwards. ``cache``: the resized,
    normalised image tensors by path, read and filled (pass one dict only to calls with the
    same ``height``, ``width`` and ``resize``, and ``workers=0``: see
    :class:`~bmil.data.images.ImageDataset`).
    """
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
            if flip:
                feats = feats + model(torch.flip(images, dims=[3]), mods).float()
            chunks.append(torch.nn.functional.normalize(feats, dim=1).cpu())
    model.train(was_training)
    if not chunks:
        return np.zeros((0, getattr(model, "feat_dim", 0)), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)
