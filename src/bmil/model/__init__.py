"""The two-stream backbone and its parts (docs/method.md, "The network")."""

from bmil.model.backbone import (
    ModalityStem,
    TwoStreamResNet,
    build_model,
    model_from_config,
    model_signature,
)
from bmil.model.non_local import NON_LOCAL_WIDTHS, NonLocalBlock
from bmil.model.pooling import GeneralizedMeanPooling
from bmil.model.pretrained import (
    imagenet_cache_path,
    imagenet_weights_file,
    load_imagenet_weights,
)

__all__ = [
    "NON_LOCAL_WIDTHS",
    "GeneralizedMeanPooling",
    "ModalityStem",
    "NonLocalBlock",
    "TwoStreamResNet",
    "build_model",
    "imagenet_cache_path",
    "imagenet_weights_file",
    "load_imagenet_weights",
    "model_from_config",
    "model_signature",
]
