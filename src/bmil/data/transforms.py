"""Training and test transforms, including the release's channel augmentation.

The default (``augmentation="release"``) is the release's ``train_sysu.py`` pipelines
(docs/method.md). Every training view: bicubic resize to (H, W), pad,
random crop (H, W), horizontal flip, [colour jitter 0.5 x4], to tensor, ImageNet
normalisation, channel-wise random erasing (p 0.5, fill 0.4914, 0.4822, 0.4465 on the
normalised tensor), [channel step on the normalised, erased tensor]:

- ``"standard"`` (visible view 1): no jitter, no channel step.
- ``"channel"`` (visible view 2): jitter; :class:`ChannelExchange` (one of R, G, B, never
  grayscale; the release's ``ChannelExchange(gray=2)``).
- ``"infrared"`` (stage 1): jitter; :class:`ChannelAdaptiveGray` (3/4 one channel, 1/8
  grayscale, 1/8 unchanged; the release's ``ChannelAdapGray(0.5)``).
- ``"infrared_stage2"``: the same without the jitter.

``augmentation="legacy"`` is bmil's earlier pipeline: jitter and the channel step on the
PIL image before the resize, the channel view's exchange with grayscale as a fourth outcome,
the infrared view's exchange with p = 0.5 (3/8 one channel, 1/8 grayscale, 1/2 unchanged)
and jitter in both stages.

Randomness comes from torch's generator (as in torchvision), which DataLoader seeds per
worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel fill of the erased rectangle in the channel-wise random erasing that
# cross-modality re-ID code (CAJ and its descendants) uses, applied after normalisation.
ERASING_FILL = (0.4914, 0.4822, 0.4465)
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
PAD = 10
JITTER = 0.5
VIEWS = ("standard", "channel", "infrared", "infrared_stage2")
AUGMENTATIONS = ("release", "legacy")


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _replicate(image: torch.Tensor, channel: int) -> torch.Tensor:
    return image[channel].unsqueeze(0).repeat(3, 1, 1)


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (``GRAY_WEIGHTS``, torchvision's ``rgb_to_grayscale``) of a [3, H, W]
    tensor, replicated into three channels (a copy, not a view: later steps write into it)."""
    return F.rgb_to_grayscale(image, num_output_channels=1).repeat(3, 1, 1)


class ChannelExchange:
    """Replace a 3-channel image by one of its channels replicated three times.

    Default (the release's ``ChannelExchange(gray=2)``): R, G or B with odds 1/3 each, never
    grayscale. ``with_gray=True`` (the legacy pipeline) adds grayscale as a fourth outcome,
    1/4 each. Works on a tensor [3, H, W] (grayscale with ITU-R 601 weights) or an RGB PIL
    image (grayscale = PIL's "L" conversion).
    """

    def __init__(self, with_gray: bool = False) -> None:
        self.with_gray = with_gray

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        choice = int(torch.randint(4 if self.with_gray else 3, ()))
        if isinstance(image, torch.Tensor):
            return _replicate(image, choice) if choice < 3 else _grayscale(image)
        rgb = image.convert("RGB")
        single = rgb.getchannel(choice) if choice < 3 else rgb.convert("L")
        return Image.merge("RGB", (single, single, single))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(with_gray={self.with_gray})"


class ChannelAdaptiveGray:
    """The release's ``ChannelAdapGray(0.5)`` on a tensor [3, H, W].

    One of four equally likely draws: R, G or B replicated into all channels (3/4 together);
    otherwise grayscale with probability ``p_gray`` and the image unchanged otherwise
    (1/8 and 1/8 at the default 0.5).
    """

    def __init__(self, p_gray: float = 0.5) -> None:
        self.p_gray = p_gray

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        choice = int(torch.randint(4, ()))
        if choice < 3:
            return _replicate(image, choice)
        return _grayscale(image) if float(torch.rand(())) < self.p_gray else image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p_gray={self.p_gray})"


class RandomChannelOrGray:
    """With probability ``p`` apply ``ChannelExchange(with_gray=True)``; otherwise return the
    image unchanged (the legacy infrared view)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p
        self.exchange = ChannelExchange(with_gray=True)

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        return self.exchange(image) if float(torch.rand(())) < self.p else image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class ChannelRandomErasing:
    """Random erasing (Zhong et al., AAAI 2020) of a normalised tensor [C, H, W].

    With probability ``p`` one rectangle (area fraction in ``scale``, aspect ratio in
    [min_aspect, 1/min_aspect], up to 100 tries to fit) is overwritten channel by channel:
    ``fill`` gives one constant per channel (default: the CAJ-style constants
    ERASING_FILL); ``fill="random"`` draws one standard-normal value per channel.
    """

    def __init__(
        self,
        p: float = 0.5,
        scale: tuple[float, float] = (0.02, 0.4),
        min_aspect: float = 0.3,
        fill: Sequence[float] | str = ERASING_FILL,
    ) -> None:
        if isinstance(fill, str) and fill != "random":
            raise ValueError(f"ChannelRandomErasing fill must be per-channel values or 'random', got {fill!r}.")
        self.p = p
        self.scale = scale
        self.min_aspect = min_aspect
        self.fill = fill

    def _fill_values(self, channels: int, like: torch.Tensor) -> torch.Tensor:
        if isinstance(self.fill, str):
            return torch.randn(channels, dtype=like.dtype, device=like.device)
        values = torch.tensor(self.fill, dtype=like.dtype, device=like.device)
        return values[:channels] if len(values) >= channels else values[:1].expand(channels)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(())) >= self.p:
            return image
        channels, height, width = image.shape
        for _ in range(100):
            area = _uniform(*self.scale) * height * width
            aspect = _uniform(self.min_aspect, 1.0 / self.min_aspect)
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < height and 0 < w < width:
                top = int(torch.randint(height - h + 1, ()))
                left = int(torch.randint(width - w + 1, ()))
                image = image.clone()
                image[:, top : top + h, left : left + w] = self._fill_values(channels, image)[:, None, None]
                return image
        return image

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(p={self.p}, scale={self.scale}, min_aspect={self.min_aspect}, fill={self.fill!r})"


def _normalize() -> T.Normalize:
    return T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _jitter() -> T.ColorJitter:
    return T.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER, hue=JITTER)


def _release_steps(view: str) -> tuple[list, list]:
    """(steps after the flip, before to-tensor; steps after erasing) of a release view."""
    return {
        "standard": ([], []),
        "channel": ([_jitter()], [ChannelExchange()]),
        "infrared": ([_jitter()], [ChannelAdaptiveGray(0.5)]),
        "infrared_stage2": ([], [ChannelAdaptiveGray(0.5)]),
    }[view]


def _legacy_steps(view: str) -> list:
    """Steps before the resize of a legacy view (jitter in both infrared stages)."""
    infrared = [_jitter(), RandomChannelOrGray(0.5)]
    return {
        "standard": [],
        "channel": [_jitter(), ChannelExchange(with_gray=True)],
        "infrared": infrared,
        "infrared_stage2": infrared,
    }[view]


def train_transform(
    height: int, width: int, view: str = "standard", pad: int = PAD, augmentation: str = "release"
) -> T.Compose:
    """PIL image -> augmented normalised tensor [3, height, width].

    view: "standard", "channel" (visible second view), "infrared" (stage 1) or
    "infrared_stage2" (see the module docstring). pad: pixels of zero padding before the
    random crop (10 at the paper's 288×144; scale it down for small inputs).
    augmentation: "release" (default) or "legacy".
    """
    if view not in VIEWS:
        raise ValueError(f"train_transform view must be one of {', '.join(VIEWS)}, got {view!r}.")
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"train_transform augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}."
        )
    before_resize, after_flip, after_erasing = [], [], []
    if augmentation == "release":
        after_flip, after_erasing = _release_steps(view)
    else:
        before_resize = _legacy_steps(view)
    return T.Compose([
        *before_resize,
        T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
        T.Pad(pad),
        T.RandomCrop((height, width)),
        T.RandomHorizontalFlip(),
        *after_flip,
        T.ToTensor(),
        _normalize(),
        ChannelRandomErasing(p=0.5),
        *after_erasing,
    ])


TEST_RESIZES = {"bicubic": T.InterpolationMode.BICUBIC, "lanczos": T.InterpolationMode.LANCZOS}


def test_transform(height: int, width: int, resize: str = "bicubic") -> T.Compose:
    """PIL image -> normalised tensor [3, height, width], no augmentation.

    resize: ``"bicubic"`` (the release's clustering extractor, ``get_test_loader``) or
    ``"lanczos"`` (PIL's Lanczos, ``Image.ANTIALIAS``, which the release's query and gallery
    loader ``TestData`` uses when scoring).
    """
    if resize not in TEST_RESIZES:
        raise ValueError(f"test_transform resize must be one of {', '.join(TEST_RESIZES)}, got {resize!r}.")
    return T.Compose([
        T.Resize((height, width), interpolation=TEST_RESIZES[resize]),
        T.ToTensor(),
        _normalize(),
    ])


# The name starts with "test_": keep pytest from collecting it where a test module imports it.
test_transform.__test__ = False


def visible_views(
    height: int, width: int, channel_aug: bool = True, pad: int = PAD, augmentation: str = "release"
) -> list[T.Compose]:
    """Transforms of a visible training image: [standard, channel], or [standard] when off."""
    views = [train_transform(height, width, "standard", pad, augmentation)]
    if channel_aug:
        views.append(train_transform(height, width, "channel", pad, augmentation))
    return views


def infrared_views(
    height: int, width: int, pad: int = PAD, stage: int = 1, augmentation: str = "release"
) -> list[T.Compose]:
    """Transforms of an infrared training image in ``stage`` (1 or 2): [infrared view].

    Stage 2 drops the colour jitter, as the release's stage-2 ``transform_thermal`` does.
    """
    if stage not in (1, 2):
        raise ValueError(f"infrared_views stage must be 1 or 2, got {stage!r}.")
    view = "infrared" if stage == 1 else "infrared_stage2"
    return [train_transform(height, width, view, pad, augmentation)]
