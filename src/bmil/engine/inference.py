"""A trained model for inference, and the configured feature extractor.

:func:`load_model` is the one way every command (eval, extract, search, export, analyze,
cluster-scan) gets a model from a checkpoint: the architecture comes from the configuration
saved inside it, so no configuration file is needed (``bmil eval`` reads its data and
protocol from the user's configuration, never its ``model:`` section). ``expected`` lets a
library caller insist on a given network. :func:`feature_extractor` is
the one place that turns a configuration into an ``extract_features`` call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bmil.config import Config, ModelConfig, config_from_dict
from bmil.engine.checkpoint import load_checkpoint
from bmil.engine.extract import extract_features
from bmil.errors import CheckpointError, ConfigError
from bmil.model import model_from_config, model_signature
from bmil.records import Record


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
    :func:`bmil.engine.extract.extract_features` computes them (it reads and fills
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
