"""The two-stream AGW-style ResNet: modality-specific stems, shared trunk, GeM, BN neck."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision
from torch import nn

from bmil.errors import ConfigError
from bmil.model.non_local import NON_LOCAL_WIDTHS, NonLocalBlock
from bmil.model.pooling import GeneralizedMeanPooling
from bmil.model.pretrained import load_imagenet_weights
from bmil.records import INFRARED, VISIBLE

if TYPE_CHECKING:
    from bmil.config import ModelConfig

_RESNET_CONSTRUCTORS: dict[int, Callable[..., torchvision.models.ResNet]] = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
}

# AGW: non-local blocks after the last 2 blocks of layer2 and the last 3 blocks of layer3.
_NON_LOCAL_COUNTS = {"layer2": 2, "layer3": 3}
_TRUNK_LAYERS = ("layer1", "layer2", "layer3", "layer4")
TORCHVISION_WIDTH = 64  # channels of torchvision's stem and layer1 (every ImageNet checkpoint's)


class ModalityStem(nn.Module):
    """ResNet stem (conv1, bn1, relu, maxpool): ``[B, 3, H, W] -> [B, 64, H/4, W/4]``."""

    def __init__(self, conv1: nn.Conv2d, bn1: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv1
        self.bn1 = bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def _resnet(depth: int, width: int) -> torchvision.models.ResNet:
    """torchvision's ResNet of ``depth``, or for ``width`` != 64 the same network with
    ``width`` channels in the stem and layer1, doubling per layer (``width / 64`` as wide),
    initialised as torchvision initialises its own (conv He-normal fan-out, BN 1 and 0)."""
    resnet = _RESNET_CONSTRUCTORS[depth](weights=None)
    if width == TORCHVISION_WIDTH:
        return resnet
    block = type(resnet.layer1[0])
    resnet.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    resnet.bn1 = nn.BatchNorm2d(width)
    in_channels = width
    for index, name in enumerate(_TRUNK_LAYERS):
        planes = width * 2**index
        stride = 1 if index == 0 else 2
        blocks = []
        for position in range(len(getattr(resnet, name))):
            out_channels = planes * block.expansion
            downsample = None
            if position == 0 and (stride != 1 or in_channels != out_channels):
                downsample = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(out_channels),
                )
            blocks.append(block(in_channels, planes, stride if position == 0 else 1, downsample))
            in_channels = out_channels
        setattr(resnet, name, nn.Sequential(*blocks))
    resnet.fc = nn.Linear(in_channels, resnet.fc.out_features)
    for module in resnet.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return resnet


def _set_first_block_stride(layer: nn.Sequential, stride: int) -> None:
    """Set the spatial stride of a ResNet layer's first block (its main path and shortcut)."""
    block = layer[0]
    # torchvision puts the stride on conv2 in Bottleneck (ResNet v1.5) and on conv1 in BasicBlock.
    is_bottleneck = isinstance(block, torchvision.models.resnet.Bottleneck)
    strided_conv = block.conv2 if is_bottleneck else block.conv1
    strided_conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


class TwoStreamResNet(nn.Module):
    """AGW-style two-stream ResNet for visible-infrared re-ID (docs/method.md, "The network").

    Layout: a visible stem and an infrared stem (conv1, bn1, relu, maxpool each, separate
    parameters that start from the same weights), shared ``layer1``–``layer4`` with
    ``layer4``'s stride set to ``last_stride``, non-local blocks after the last 2 blocks of
    ``layer2`` and the last 3 of ``layer3`` (fewer where a layer has fewer blocks: ResNet-18
    gets 2 + 2), GeM pooling and a BN neck (``BatchNorm1d``, weight ~ N(1, 0.01) as the
    release's ``weights_init_kaiming``, bias 0 and frozen). The default at depth 50 is the
    release's network: 23,550,351 parameters (docs/method.md).

    The trunk's parameter names are torchvision's (``layer2.0.conv1.weight`` ...), the stems'
    are ``visible_stem.conv1.weight`` / ``infrared_stem.conv1.weight`` ..., the non-local
    blocks' ``non_local.layer2.<block index>.*``.

    Args:
        depth: 18, 34 or 50.
        non_local: insert the non-local blocks.
        non_local_width: ``"release"`` (inner width 1, the release's) or ``"half"`` (C/2);
            see :mod:`bmil.model.non_local`.
        pretrained: ``"none"`` (random init), ``"imagenet"`` (torchvision ImageNet weights,
            from the torch hub cache or downloaded) or a path to a torchvision ResNet state
            dict of this depth; see :func:`bmil.model.pretrained.load_imagenet_weights`.
        last_stride: stride of ``layer4`` (1 as in AGW, 2 as in plain ResNet).
        gem_p: GeM exponent (3 in the release).
        gem_learnable: train the GeM exponent (AGW's ``GeneralizedMeanPoolingP``) instead of
            fixing it as the release does.
        width: channels of the stems and ``layer1``, doubling per layer: 64 is torchvision's
            ResNet (the release's, and the only width ImageNet weights exist for); 32 costs
            about a quarter of the compute.

    Attributes:
        feat_dim: width of the output feature (2048 for depth 50, 512 for 18 / 34; scaled by
            ``width / 64``).
    """

    def __init__(
        self,
        depth: int = 50,
        non_local: bool = True,
        pretrained: str | Path = "none",
        last_stride: int = 1,
        gem_p: float = 3.0,
        gem_learnable: bool = False,
        non_local_width: str = "release",
        width: int = TORCHVISION_WIDTH,
    ) -> None:
        super().__init__()
        if depth not in _RESNET_CONSTRUCTORS:
            raise ConfigError(
                f"model.depth must be one of {sorted(_RESNET_CONSTRUCTORS)}, got {depth!r}."
            )
        if last_stride not in (1, 2):
            raise ConfigError(f"model.last_stride must be 1 or 2, got {last_stride!r}.")
        if non_local_width not in NON_LOCAL_WIDTHS:
            raise ConfigError(
                f"model.non_local_width must be one of {', '.join(NON_LOCAL_WIDTHS)}, got {non_local_width!r}."
            )
        if isinstance(width, bool) or not isinstance(width, int) or width < 8:
            raise ConfigError(f"model.width must be an integer of at least 8, got {width!r}.")
        if width != TORCHVISION_WIDTH and str(pretrained) != "none":
            raise ConfigError(
                f"model.width {width} has no pretrained weights (torchvision's ResNets are width "
                f"{TORCHVISION_WIDTH}): set model.pretrained=none or model.width={TORCHVISION_WIDTH}."
            )
        resnet = _resnet(depth, width)
        _set_first_block_stride(resnet.layer4, last_stride)

        self.depth = depth
        self.has_non_local = non_local
        self.non_local_width = non_local_width
        self.gem_learnable = gem_learnable
        self.last_stride = last_stride
        self.width = width
        self.feat_dim = resnet.fc.in_features

        self.visible_stem = ModalityStem(resnet.conv1, resnet.bn1)
        self.infrared_stem = copy.deepcopy(self.visible_stem)
        for name in _TRUNK_LAYERS:
            setattr(self, name, getattr(resnet, name))
        self.non_local = nn.ModuleDict()
        if non_local:
            for name, count in _NON_LOCAL_COUNTS.items():
                layer = getattr(self, name)
                first = max(len(layer) - count, 0)
                width = _block_out_channels(layer[-1])
                self.non_local[name] = nn.ModuleDict(
                    {str(index): NonLocalBlock(width, non_local_width) for index in range(first, len(layer))}
                )

        self.pool = GeneralizedMeanPooling(p=gem_p, learnable=gem_learnable)
        self.neck = nn.BatchNorm1d(self.feat_dim)
        nn.init.normal_(self.neck.weight, 1.0, 0.01)  # the release's BatchNorm1d init
        nn.init.zeros_(self.neck.bias)
        self.neck.bias.requires_grad_(False)  # BNNeck: the bias stays 0

        if str(pretrained) != "none":
            load_imagenet_weights(self, pretrained)

    def forward(self, images: torch.Tensor, modality: torch.Tensor | int) -> torch.Tensor:
        """Embed a batch.

        Args:
            images: ``[B, 3, H, W]`` normalised images (any memory format).
            modality: ``[B]`` integer tensor, 0 = visible, 1 = infrared (both may occur in one
                batch), or one int for the whole batch.

        Returns:
            ``[B, feat_dim]`` BN-neck output, not L2-normalised.
        """
        x = self.stems(images, modality)
        for name in _TRUNK_LAYERS:
            x = self._run_layer(name, x)
        return self.neck(self.pool(x))

    def stems(self, images: torch.Tensor, modality: torch.Tensor | int) -> torch.Tensor:
        """Route each image through its modality's stem: ``[B, 3, H, W] -> [B, 64, h, w]``."""
        if isinstance(modality, int):
            return self._stem_for(modality)(images)
        modality = torch.as_tensor(modality, device=images.device)
        if modality.shape != (images.shape[0],):
            raise ValueError(
                f"modality must have shape [{images.shape[0]}], got {tuple(modality.shape)}"
            )
        is_infrared = modality == INFRARED
        if bool(((modality != VISIBLE) & ~is_infrared).any()):
            raise ValueError("modality values must be 0 (visible) or 1 (infrared)")
        num_infrared = int(is_infrared.sum())
        if num_infrared == 0:
            return self.visible_stem(images)
        if num_infrared == images.shape[0]:
            return self.infrared_stem(images)
        visible_index = torch.nonzero(~is_infrared).squeeze(1)
        infrared_index = torch.nonzero(is_infrared).squeeze(1)
        stacked = torch.cat(
            [
                self.visible_stem(images.index_select(0, visible_index)),
                self.infrared_stem(images.index_select(0, infrared_index)),
            ]
        )
        # Row r of `stacked` belongs to image source_index[r]; invert to restore batch order.
        source_index = torch.cat([visible_index, infrared_index])
        merged = stacked.index_select(0, torch.argsort(source_index))
        if images.is_contiguous(memory_format=torch.channels_last):
            merged = merged.contiguous(memory_format=torch.channels_last)
        return merged

    def _stem_for(self, modality: int) -> ModalityStem:
        if modality == VISIBLE:
            return self.visible_stem
        if modality == INFRARED:
            return self.infrared_stem
        raise ValueError(f"modality must be 0 (visible) or 1 (infrared), got {modality!r}")

    def _run_layer(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, name)
        if name not in self.non_local:
            return layer(x)
        inserted = self.non_local[name]
        for index, block in enumerate(layer):
            x = block(x)
            if str(index) in inserted:
                x = inserted[str(index)](x)
        return x


def _block_out_channels(block: nn.Module) -> int:
    """Output width of a torchvision BasicBlock or Bottleneck."""
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return last_bn.num_features


def build_model(
    depth: int = 50,
    non_local: bool = True,
    pretrained: str | Path = "none",
    last_stride: int = 1,
    gem_p: float = 3.0,
    gem_learnable: bool = False,
    non_local_width: str = "release",
    width: int = TORCHVISION_WIDTH,
) -> TwoStreamResNet:
    """Build a :class:`TwoStreamResNet` (same arguments); the defaults are the release's network."""
    return TwoStreamResNet(
        depth=depth,
        non_local=non_local,
        pretrained=pretrained,
        last_stride=last_stride,
        gem_p=gem_p,
        gem_learnable=gem_learnable,
        non_local_width=non_local_width,
        width=width,
    )


def model_from_config(model_cfg: ModelConfig, pretrained: str | Path | None = None) -> TwoStreamResNet:
    """The network a ``model:`` configuration section describes.

    pretrained: overrides ``model_cfg.pretrained`` (``"none"`` when loading a checkpoint).
    """
    return build_model(
        depth=model_cfg.depth,
        non_local=model_cfg.non_local,
        pretrained=model_cfg.pretrained if pretrained is None else pretrained,
        last_stride=model_cfg.last_stride,
        gem_learnable=model_cfg.gem_learnable,
        non_local_width=model_cfg.non_local_width,
        width=model_cfg.width,
    )


def model_signature(model: TwoStreamResNet) -> dict[str, int | bool | str | None]:
    """The architecture facts a checkpoint must match: depth, width, last_stride, non_local,
    non_local_width (None without non-local blocks), gem_learnable and feat_dim."""
    return {
        "depth": model.depth,
        "width": model.width,
        "last_stride": model.last_stride,
        "non_local": model.has_non_local,
        "non_local_width": model.non_local_width if model.has_non_local else None,
        "gem_learnable": model.gem_learnable,
        "feat_dim": model.feat_dim,
    }
