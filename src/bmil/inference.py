"""From a checkpoint or a model to features: the one path for training's clustering and
scoring and for every command (eval, extract, search, export, analyze, cluster-scan).

:func:`extract_features` runs any model mapping (images [B,3,H,W], modality [B]) to
features over a list of records (:func:`combine_views` turns an image's and its mirror's
outputs into one feature). :func:`load_model` is the one way every command gets a model
from a checkpoint: the architecture comes from the configuration saved inside it, so no
configuration file is needed (``bmil eval`` reads its data and protocol from the user's
configuration, never its ``model:`` section). ``expected`` lets a library caller insist on
a given network. :func:`feature_extractor` is the one place that turns a configuration
into an ``extract_features`` call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from bmil.config import Config, ModelConfig, config_from_dict
from bmil.data.images import ImageDataset
from bmil.data.transforms import test_transform
from bmil.engine.checkpoint import load_checkpoint
from bmil.errors import CheckpointError, ConfigError
from bmil.model import model_from_config, model_signature
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


def signature_difference(found: dict | None, expected: dict) -> dict:
    """{key: (found, expected)} for every architecture fact both signatures state and
    that differs (a checkpoint written before a fact was recorded is not held to it)."""
    if not found:
        return {}
    return {k: (found[k], expected[k]) for k in found.keys() & expected.keys() if found[k] != expected[k]}


def _described(signature: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in signature.items())


def load_model(
    checkpoint: str | Path,
    device: torch.device | str = "cpu",
    expected: ModelConfig | None = None,
    *,
    state: dict | None = None,
) -> tuple[nn.Module, Config]:
    """The model of ``checkpoint`` in eval mode on ``device``, and the run's configuration.

    The checkpoint must hold ``config`` (a dict from ``config_to_dict``), ``model`` (the
    state dict) and, when present, ``signature`` (checked against the rebuilt model).
    expected: a ``model:`` section the checkpoint's network must equal (``bmil eval``
    checks the user's configuration this way). state: the already loaded checkpoint dict.
    Raises CheckpointError for a missing, unreadable or mismatching file.
    """
    state = load_checkpoint(checkpoint) if state is None else state
    values = state.get("config")
    if not isinstance(values, dict):
        raise CheckpointError(f"checkpoint {checkpoint} holds no saved configuration: was it written by bmil train?")
    try:
        cfg = config_from_dict(values)
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {checkpoint} holds a configuration this bmil cannot read ({err})") from err
    model = model_from_config(cfg.model, pretrained="none")
    built = model_signature(model)
    if signature_difference(state.get("signature"), built):
        raise CheckpointError(
            f"checkpoint {checkpoint} has signature {state['signature']} but its configuration builds {built}"
        )
    if expected is not None:
        wanted = model_signature(model_from_config(expected, pretrained="none"))
        differ = signature_difference(built, wanted)
        if differ:
            raise CheckpointError(
                f"checkpoint {checkpoint} was trained with {_described({k: v[0] for k, v in differ.items()})}, "
                f"but the configuration builds {_described({k: v[1] for k, v in differ.items()})}: "
                f"set {', '.join(f'model.{k}' for k in differ if k != 'feat_dim')} to match it"
            )
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit the model its configuration describes") from err
    return model.to(torch.device(device)).eval(), cfg


CLUSTERING_RESIZE = "bicubic"  # the release's clustering extractor (get_test_loader, interpolation 3)


def feature_extractor(
    model: nn.Module,
    cfg: Config,
    device: torch.device | str = "cpu",
    *,
    flip: bool = True,
    progress: bool = True,
    desc: str = "test features",
    size: tuple[int, int] | None = None,
    resize: str | None = None,
    cache: dict | None = None,
    feature: str = "test",
):
    """``extract(records) -> [N, D]`` float32 features of ``model`` as ``cfg`` configures
    them: input ``data.height`` × ``data.width`` (or ``size`` = (height, width), e.g. the
    checkpoint's own), resized with ``resize`` (default ``eval.resize``, the scoring resize;
    pass ``"bicubic"`` for the features clustering sees), ``train.extract_batch`` images a
    batch, :func:`~bmil.engine.data_setup.extraction_workers` loader workers (as many as /dev/shm holds), ``train.amp``;
    flip-averaged (``flip``); ``feature`` ``"test"`` (unit rows, for scoring) or
    ``"clustering"`` (the flip average not normalised again) as
    :func:`extract_features` computes them (it reads and fills
    ``cache`` when given)."""
    from bmil.engine.data_setup import extraction_workers

    height, width = size if size is not None else (cfg.data.height, cfg.data.width)
    workers = extraction_workers(cfg, device, height, width)  # as many as /dev/shm holds

    def extract(records: list[Record], *, desc: str = desc) -> np.ndarray:
        return extract_features(
            model, records, height=height, width=width, batch_size=cfg.train.extract_batch,
            device=device, flip=flip, workers=workers, amp=cfg.train.amp, progress=progress, desc=desc,
            resize=resize or cfg.eval.resize, channels_last=cfg.train.channels_last, cache=cache, feature=feature,
        )

    return extract


def train_set_features(
    model: nn.Module, cfg: Config, device: torch.device | str = "cpu", *, progress: bool = True
) -> tuple[np.ndarray, list[Record]]:
    """The features clustering sees [N, D] (bicubic resize; flip-averaged when ``cluster.flip``,
    not normalised again: ``feature="clustering"``) of ``cfg``'s training images, and their
    records (person ids -1 where the dataset has none)."""
    from bmil.engine.data_setup import train_records

    records = train_records(cfg)
    feats = feature_extractor(model, cfg, device, flip=cfg.cluster.flip, progress=progress, desc="train features",
                              resize=CLUSTERING_RESIZE, feature="clustering")(records)
    return feats, records
