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

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from bmil.data.jitter import TensorColorJitter

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
JITTERS = ("pil", "tensor")


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


def _jitter(backend: str = "pil") -> T.ColorJitter:
    """Colour jitter 0.5 ×4: torchvision's on PIL images ("pil") or :class:`TensorColorJitter`
    on float tensors ("tensor"; the same random draws, see :mod:`bmil.data.jitter`)."""
    cls = TensorColorJitter if backend == "tensor" else T.ColorJitter
    return cls(brightness=JITTER, contrast=JITTER, saturation=JITTER, hue=JITTER)


class TrainView(T.Compose):
    """One release training view: PIL image -> normalised tensor [3, H, W].

    ``transforms`` lists its steps (resize, pad, random crop, flip, [jitter], to-tensor,
    normalise, erasing, [channel step]) as ``T.Compose`` would run them; this class runs the
    same steps with the same random draws in the same order, on a uint8 tensor after the
    resize: pad + crop is one slice of the image into a zero canvas, the flip a tensor flip.
    With torchvision's PIL jitter the output equals ``T.Compose(view.transforms)`` bit for bit;
    with :class:`TensorColorJitter` the jitter runs on the float tensor.

    The resize is the only step before the first random one, so :meth:`resize` (deterministic)
    and :meth:`from_resized` (random) split the view: a cache of resized images
    (:class:`bmil.data.resized_cache.ResizedCache`) gives the same tensors as decoding anew.
    """

    def __init__(self, height: int, width: int, pad: int, jitter: T.ColorJitter | None,
                 channel_step: ChannelExchange | ChannelAdaptiveGray | None) -> None:
        self.height, self.width, self.pad = height, width, pad
        self.resize_step = T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC)
        self.crop, self.flip = T.RandomCrop((height, width)), T.RandomHorizontalFlip()
        self.jitter, self.normalize = jitter, _normalize()
        self.erasing, self.channel_step = ChannelRandomErasing(p=0.5), channel_step
        self._mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        self._std = torch.tensor(IMAGENET_STD)[:, None, None]
        steps = [self.resize_step, T.Pad(pad), self.crop, self.flip, jitter, T.ToTensor(), self.normalize,
                 self.erasing, channel_step]
        super().__init__([step for step in steps if step is not None])
        # Only the shape of the padded image matters to RandomCrop.get_params.
        self._padded = torch.empty((3, height + 2 * pad, width + 2 * pad), device="meta")

    def resize(self, image: Image.Image) -> torch.Tensor:
        """The bicubic resize of an RGB PIL image: uint8 tensor [H, W, 3]."""
        return torch.from_numpy(np.array(self.resize_step(image), dtype=np.uint8))

    def _crop_flip(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pad with zeros, random crop, random horizontal flip of uint8 [H, W, 3]."""
        height, width, pad = self.height, self.width, self.pad
        top, left, _, _ = T.RandomCrop.get_params(self._padded, (height, width))
        top, left = top - pad, left - pad  # the crop's corner in image coordinates
        out = torch.zeros_like(pixels)
        rows = slice(max(0, top), min(height, top + height))
        cols = slice(max(0, left), min(width, left + width))
        out[rows.start - top : rows.stop - top, cols.start - left : cols.stop - left] = pixels[rows, cols]
        if torch.rand(1) < self.flip.p:
            out = out.flip(1)
        return out

    def from_resized(self, pixels: torch.Tensor) -> torch.Tensor:
        """The view's random steps on a resized image ``pixels`` (uint8 [H, W, 3], as
        :meth:`resize` returns it): float tensor [3, H, W]."""
        if tuple(pixels.shape) != (self.height, self.width, 3) or pixels.dtype != torch.uint8:
            raise ValueError(f"TrainView expects uint8 pixels of shape ({self.height}, {self.width}, 3), "
                             f"got {pixels.dtype} {tuple(pixels.shape)}.")
        crop = self._crop_flip(pixels)
        if self.jitter is not None and not isinstance(self.jitter, TensorColorJitter):
            image = F.to_tensor(self.jitter(Image.fromarray(crop.numpy())))
        else:
            image = self._to_float(crop)
            if self.jitter is not None:
                image = self.jitter(image)
        image = self.erasing(self._normalize_(image))
        return image if self.channel_step is None else self.channel_step(image)

    def _to_float(self, crop: torch.Tensor) -> torch.Tensor:
        """F.to_tensor's arithmetic (to float, divide by 255): uint8 [H, W, 3] -> [3, H, W]."""
        image = torch.empty((3, self.height, self.width), dtype=self._mean.dtype)
        return image.copy_(crop.permute(2, 0, 1)).div_(255)

    def _normalize_(self, image: torch.Tensor) -> torch.Tensor:
        """T.Normalize's arithmetic (subtract the mean, divide by the std), in place."""
        return image.sub_(self._mean).div_(self._std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.from_resized(self.resize(image))


def _release_view(height: int, width: int, view: str, pad: int, jitter: str) -> TrainView:
    """The release's ``view`` (jitter after the flip, the channel step after erasing)."""
    steps = {
        "standard": (None, None),
        "channel": (_jitter(jitter), ChannelExchange()),
        "infrared": (_jitter(jitter), ChannelAdaptiveGray(0.5)),
        "infrared_stage2": (None, ChannelAdaptiveGray(0.5)),
    }[view]
    return TrainView(height, width, pad, *steps)


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
    height: int, width: int, view: str = "standard", pad: int = PAD, augmentation: str = "release",
    jitter: str = "pil",
) -> T.Compose:
    """PIL image -> augmented normalised tensor [3, height, width].

    view: "standard", "channel" (visible second view), "infrared" (stage 1) or
    "infrared_stage2" (see the module docstring). pad: pixels of zero padding before the
    random crop (10 at the paper's 288×144; scale it down for small inputs).
    augmentation: "release" (default; a :class:`TrainView`) or "legacy" (a ``T.Compose``).
    jitter: the release views' colour jitter, "pil" (torchvision's, default) or "tensor"
    (:class:`~bmil.data.jitter.TensorColorJitter`: the same draws, on the float tensor).
    """
    if view not in VIEWS:
        raise ValueError(f"train_transform view must be one of {', '.join(VIEWS)}, got {view!r}.")
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"train_transform augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}."
        )
    if jitter not in JITTERS:
        raise ValueError(f"train_transform jitter must be one of {', '.join(JITTERS)}, got {jitter!r}.")
    if augmentation == "release":
        return _release_view(height, width, view, pad, jitter)
    return T.Compose([
        *_legacy_steps(view),
        T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
        T.Pad(pad),
        T.RandomCrop((height, width)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        _normalize(),
        ChannelRandomErasing(p=0.5),
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
    height: int, width: int, channel_aug: bool = True, pad: int = PAD, augmentation: str = "release",
    jitter: str = "pil",
) -> list[T.Compose]:
    """Transforms of a visible training image: [standard, channel], or [standard] when off."""
    views = [train_transform(height, width, "standard", pad, augmentation, jitter)]
    if channel_aug:
        views.append(train_transform(height, width, "channel", pad, augmentation, jitter))
    return views


def infrared_views(
    height: int, width: int, pad: int = PAD, stage: int = 1, augmentation: str = "release", jitter: str = "pil",
) -> list[T.Compose]:
    """Transforms of an infrared training image in ``stage`` (1 or 2): [infrared view].

    Stage 2 drops the colour jitter, as the release's stage-2 ``transform_thermal`` does.
    """
    if stage not in (1, 2):
        raise ValueError(f"infrared_views stage must be 1 or 2, got {stage!r}.")
    view = "infrared" if stage == 1 else "infrared_stage2"
    return [train_transform(height, width, view, pad, augmentation, jitter)]
