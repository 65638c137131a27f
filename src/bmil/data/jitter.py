"""Colour jitter on float tensors, with torchvision's ``ColorJitter`` random draws.

:class:`TensorColorJitter` draws its factors exactly as ``torchvision.transforms.ColorJitter``
does (the same calls on torch's generator, in the same order: a permutation of the four
adjustments, then the brightness, contrast, saturation and hue factors), so a pipeline that
uses it consumes the same random numbers as one using torchvision's. It applies them to a
float tensor [3, H, W] in [0, 1] with a few whole-image tensor operations instead of PIL's
per-step uint8 images:

- brightness, contrast, saturation: torchvision's tensor formulas (blend with black, with the
  mean of the ITU-R 601 luma, with the luma), clamped to [0, 1];
- hue: the shift of the HSV hue by ``factor`` turns, value and saturation kept, computed from
  max, min and the RGB differences directly (no HSV image), equal to torchvision's tensor
  ``adjust_hue`` up to float rounding.

Against torchvision on PIL images the result differs only by PIL's rounding to 8 bits after
every step and its hue shift of ``int(255 · factor)`` steps of 1/256 turn.
"""

from __future__ import annotations

import torch
from torchvision import transforms as T

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# The hue (sixths of a turn) at which R, G, B is the minimum channel: cyan, magenta, yellow.
_MIN_HUE = (3.0, 5.0, 1.0)


def _luma(image: torch.Tensor) -> torch.Tensor:
    """[1, H, W] luma of a float [3, H, W] tensor (torchvision's rgb_to_grayscale order)."""
    r, g, b = image.unbind(0)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(0)


def _blend(image: torch.Tensor, other: torch.Tensor | float, ratio: float) -> torch.Tensor:
    return (ratio * image + (1.0 - ratio) * other).clamp_(0.0, 1.0)


def adjust_brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor`` · image, clamped to [0, 1]. image: float [3, H, W] in [0, 1]."""
    return (factor * image).clamp_(0.0, 1.0)


def adjust_contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend of the image with the mean of its luma (a scalar) by ``factor``."""
    return _blend(image, _luma(image).mean(), factor)


def adjust_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend of the image with its luma by ``factor`` (0: grayscale)."""
    return _blend(image, _luma(image), factor)


def adjust_hue(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Shift the HSV hue of a float [3, H, W] image in [0, 1] by ``factor`` turns
    (-0.5 ≤ factor ≤ 0.5), keeping HSV saturation and value.

    With V = max, C = max - min and the hue H in sixths of a turn (0 ≤ H < 6; the channel
    that holds the max decides, R before G before B on ties, as in torchvision), the shifted
    hue is H' = (H + 6·factor) mod 6, and channel n of the result is
    V - C · clamp(2 - d_n, 0, 1), d_n being the distance around the hue circle from H' to
    the hue where channel n is the minimum (R: 3, G: 5, B: 1). Only arithmetic, min/max and
    clamp: comparisons and ``torch.where`` cost several times more on a CPU.
    """
    r, g, b = image.unbind(0)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    not_r = torch.sign(maxc - r)  # 0 where R holds the max, else 1 (maxc - r >= 0)
    not_g = torch.sign(maxc - g)
    # H·C is A = g - b where R holds the max, B = b - r + 2C where G does (and R does not),
    # D = r - g + 4C where B does: A + not_r·((B - A) + not_g·(D - B)), with
    # B - A = 3b - (r + g + b) + 2C and D - B = 3r - (r + g + b) + 2C.
    base = 2.0 * chroma - (r + g + b)
    inner = torch.addcmul(torch.add(base, b, alpha=3.0), not_g, torch.add(base, r, alpha=3.0))
    scaled = torch.addcmul(g - b, not_r, inner)
    hue = scaled.div_(chroma.clamp_min(1e-12)).add_(6.0 * factor)  # C = 0: scaled = 0, any hue
    hue = torch.add(hue, torch.floor(hue * (1.0 / 6.0)), alpha=-6.0)  # mod 6, arithmetic only
    minimum_at = torch.tensor(_MIN_HUE, dtype=image.dtype, device=image.device)[:, None, None]
    distance = (hue - minimum_at).abs_()
    distance = torch.minimum(distance, 6.0 - distance)
    return torch.addcmul(maxc, chroma, distance.neg_().add_(2.0).clamp_(0.0, 1.0), value=-1.0)


_ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


class TensorColorJitter(T.ColorJitter):
    """``torchvision.transforms.ColorJitter`` for float tensors [3, H, W] in [0, 1], with the
    same parameters, the same random draws and the same order of adjustments (see the
    module docstring); returns a new tensor."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        order, *factors = self.get_params(self.brightness, self.contrast, self.saturation, self.hue)
        # A gray image (R = G = B, e.g. an infrared one) stays gray through every step, and
        # the hue shift of a gray image is the image itself: skip it.
        gray = torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
        for fn_id in order.tolist():
            factor = factors[fn_id]
            if factor is not None and not (gray and fn_id == 3):
                image = _ADJUST[fn_id](image, float(factor))
        return image
