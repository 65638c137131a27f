"""Loading torchvision ImageNet ResNet weights into the two-stream backbone.

Which weights: torchvision's ``IMAGENET1K_V1`` for every depth (the classic ResNet weights
that AGW-based re-ID code starts from; for ResNet-50 torchvision's default is ``V2``, a
different training recipe).

What is fetched, and when: nothing for ``model.pretrained=none`` or a file path. For
``imagenet`` (the presets' default), when a run builds its model: the file in torch hub's
cache (``imagenet_cache_path``) when present, otherwise torchvision downloads it once from
its URL into that cache (the log names both) and later runs read the cache; offline without
the file, a CheckpointError says where to put it. Datasets are never downloaded.

The stems both receive the checkpoint's ``conv1``/``bn1``; the
trunk receives ``layer1``–``layer4``; the classifier ``fc`` is ignored; the non-local blocks,
GeM and BN neck keep their initialisation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision

from bmil.errors import CheckpointError

if TYPE_CHECKING:
    from bmil.model.backbone import TwoStreamResNet

logger = logging.getLogger(__name__)

_IMAGENET_WEIGHTS = {
    18: torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    34: torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    50: torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
}
_STEM_PREFIXES = ("visible_stem.", "infrared_stem.")
_OPTIONAL_SUFFIX = "num_batches_tracked"  # absent from older torchvision checkpoints


def imagenet_weights_file(depth: int) -> str:
    """File name of torchvision's ImageNet weights for a ResNet depth (e.g. resnet50-0676ba61.pth)."""
    return _IMAGENET_WEIGHTS[depth].url.rsplit("/", 1)[-1]


def imagenet_cache_path(depth: int) -> Path:
    """Where torch hub keeps (or would keep) those weights: ``<hub dir>/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / imagenet_weights_file(depth)


def load_imagenet_weights(model: TwoStreamResNet, source: str | Path) -> None:
    """Copy torchvision ResNet weights into ``model`` (in place).

    Args:
        model: a :class:`~bmil.model.backbone.TwoStreamResNet`.
        source: ``"imagenet"`` — the torch hub cache file if present, else a torchvision
            download; or a path to a state dict of a torchvision ResNet of ``model.depth``
            (optionally wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``, keys
            optionally prefixed ``module.``).

    Raises:
        CheckpointError: the weights cannot be found, downloaded or read, or do not fit a
            torchvision ResNet of ``model.depth`` (missing, extra or wrongly shaped keys).
    """
    if str(source) == "imagenet":
        state, origin = _imagenet_state_dict(model.depth)
    else:
        origin = str(source)
        state = _read_state_dict_file(Path(source))
    state = _unwrap(state, origin)
    _check_fits(model, state, origin)
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        if key.startswith(("conv1.", "bn1.")):
            for prefix in _STEM_PREFIXES:
                mapped[prefix + key] = value
        else:
            mapped[key] = value
    result = model.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:  # _check_fits rules this out; a failure here is a bug
        raise RuntimeError(f"unexpected keys after mapping: {result.unexpected_keys[:3]}")
    logger.info("loaded ResNet-%d weights from %s into both stems and the trunk", model.depth,
                origin)


def _imagenet_state_dict(depth: int) -> tuple[Mapping[str, object], str]:
    cached = imagenet_cache_path(depth)
    if cached.is_file():
        return _read_state_dict_file(cached), str(cached)
    file_name = imagenet_weights_file(depth)
    logger.info("model.pretrained=imagenet: downloading torchvision's ResNet-%d ImageNet weights from %s into %s "
                "(once; later runs read that file)", depth, _IMAGENET_WEIGHTS[depth].url, cached)
    try:
        state = torch.hub.load_state_dict_from_url(
            _IMAGENET_WEIGHTS[depth].url,
            progress=False,
            map_location="cpu",
            check_hash=True,
            file_name=file_name,
        )
    # Any failure (no network, proxy, hash, disk) ends the same way: tell the user where to
    # put the file, never fall back to training from scratch.
    except Exception as exc:
        raise CheckpointError(
            f"ImageNet weights for ResNet-{depth} are not in the torch hub cache and could not "
            f"be downloaded ({type(exc).__name__}): put {file_name} in {cached.parent}/ or set "
            f"model.pretrained=/path/to/{file_name}."
        ) from exc
    return state, _IMAGENET_WEIGHTS[depth].url


def _read_state_dict_file(path: Path) -> Mapping[str, object]:
    if not path.is_file():
        raise CheckpointError(f"Pretrained weights file {path} does not exist or is not a file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or not a weights-only torch pickle
        raise CheckpointError(
            f"Pretrained weights file {path} could not be read as a PyTorch state dict "
            f"({type(exc).__name__}: {exc})."
        ) from exc


def _unwrap(state: object, origin: str) -> dict[str, torch.Tensor]:
    """Accept ``{"state_dict": sd}`` / ``{"model": sd}`` wrappers and DataParallel prefixes."""
    if isinstance(state, Mapping):
        for wrapper_key in ("state_dict", "model"):
            if isinstance(state.get(wrapper_key), Mapping):
                state = state[wrapper_key]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise CheckpointError(
            f"Pretrained weights file {origin} does not hold a state dict of tensors "
            "(expected a torchvision ResNet state_dict)."
        )
    return {str(key).removeprefix("module."): value for key, value in state.items()}


def _expected_shapes(model: TwoStreamResNet) -> dict[str, torch.Size]:
    """torchvision ResNet key -> shape, for every key this model takes from a checkpoint."""
    stem_prefix = _STEM_PREFIXES[0]
    expected = {}
    for key, value in model.state_dict().items():
        if key.startswith(stem_prefix):
            expected[key[len(stem_prefix):]] = value.shape
        elif key.startswith("layer"):
            expected[key] = value.shape
    return expected


def _check_fits(model: TwoStreamResNet, state: Mapping[str, torch.Tensor], origin: str) -> None:
    expected = _expected_shapes(model)
    wanted = f"a torchvision resnet{model.depth} state dict"
    missing = [
        key for key in expected if key not in state and not key.endswith(_OPTIONAL_SUFFIX)
    ]
    if missing:
        raise CheckpointError(
            f"Pretrained weights file {origin} lacks {len(missing)} keys of a ResNet-"
            f"{model.depth} (e.g. '{missing[0]}'); expected {wanted}."
        )
    extra = [key for key in state if key not in expected and not key.startswith("fc.")]
    if extra:
        raise CheckpointError(
            f"Pretrained weights file {origin} has {len(extra)} keys a ResNet-{model.depth} "
            f"does not have (e.g. '{extra[0]}'); expected {wanted}."
        )
    for key, shape in expected.items():
        if key in state and state[key].shape != shape:
            raise CheckpointError(
                f"Pretrained weights file {origin} has '{key}' of shape "
                f"{tuple(state[key].shape)} where a ResNet-{model.depth} needs {tuple(shape)}; "
                f"expected {wanted}."
            )
