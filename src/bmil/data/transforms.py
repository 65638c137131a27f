"""Training and test transforms, including the release's channel augmentation.

All training views share: resize to (H, W) bicubic, pad 10, random crop (H, W), horizontal
flip, to tensor, ImageNet normalisation, channel-wise random erasing (p = 0.5). The
``"channel"`` view (second view of a visible image) first applies colour jitter
(0.5, 0.5, 0.5, 0.5) and channel exchange; the ``"infrared"`` view first applies colour
jitter and, with p = 0.5, the same channel exchange.

Randomness comes from torch's generator (as in torchvision), which DataLoader seeds per
worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel fill of the erased rectangle in the channel-wise random erasing that
# cross-modality re-ID code (CAJ and its descendants) uses, applied after normalisation.
ERASING_FILL = (0.4914, 0.4822, 0.4465)
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
PAD = 10
JITTER = 0.5
VIEWS = ("standard", "channel", "infrared")


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


class ChannelExchange:
    """Replace a 3-channel image by one channel replicated three times, or by its grayscale.

    The four outcomes (R, G, B, grayscale) have equal odds, 1/4 each. Works on an RGB PIL
    image (grayscale = PIL's "L" conversion) or a tensor [3, H, W] (ITU-R 601 weights).
    """

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        choice = int(torch.randint(4, ()))
        if isinstance(image, torch.Tensor):
            if choice < 3:
                single = image[choice]
            else:
                weights = torch.tensor(GRAY_WEIGHTS, dtype=image.dtype, device=image.device)
                single = (image * weights[:, None, None]).sum(dim=0)
            return single.unsqueeze(0).repeat(3, 1, 1)
        rgb = image.convert("RGB")
        single = rgb.getchannel(choice) if choice < 3 else rgb.convert("L")
        return Image.merge("RGB", (single, single, single))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RandomChannelOrGray:
    """With probability ``p`` apply :class:`ChannelExchange`; otherwise return the image unchanged."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p
        self.exchange = ChannelExchange()

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


def train_transform(height: int, width: int, view: str = "standard", pad: int = PAD) -> T.Compose:
    """PIL image -> augmented normalised tensor [3, height, width].

    view: "standard", "channel" (visible second view: jitter + channel exchange) or
    "infrared" (jitter + channel exchange with p = 0.5). pad: pixels of zero padding
    before the random crop (10 at the paper's 288×144; scale it down for small inputs).
    """
    if view not in VIEWS:
        raise ValueError(f"train_transform view must be one of {', '.join(VIEWS)}, got {view!r}.")
    jitter = T.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER, hue=JITTER)
    first = {"standard": [], "channel": [jitter, ChannelExchange()], "infrared": [jitter, RandomChannelOrGray(0.5)]}
    return T.Compose([
        *first[view],
        T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
        T.Pad(pad),
        T.RandomCrop((height, width)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        _normalize(),
        ChannelRandomErasing(p=0.5),
    ])


def test_transform(height: int, width: int) -> T.Compose:
    """PIL image -> normalised tensor [3, height, width]: bicubic resize, no augmentation."""
    return T.Compose([
        T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        _normalize(),
    ])


# The name starts with "test_": keep pytest from collecting it where a test module imports it.
test_transform.__test__ = False


def visible_views(height: int, width: int, channel_aug: bool = True, pad: int = PAD) -> list[T.Compose]:
    """Transforms of a visible training image: [standard, channel], or [standard] when off."""
    views = [train_transform(height, width, "standard", pad)]
    if channel_aug:
        views.append(train_transform(height, width, "channel", pad))
    return views


def infrared_views(height: int, width: int, pad: int = PAD) -> list[T.Compose]:
    """Transforms of an infrared training image: [infrared]."""
    return [train_transform(height, width, "infrared", pad)]
