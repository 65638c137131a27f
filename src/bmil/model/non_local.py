"""Non-local block (Wang et al., CVPR 2018) as used by AGW and by the BMIL release.

Dot-product form: the affinity between positions i and j is ``theta(x_i) . phi(x_j) / N``
(N = H*W positions, no softmax), the response is the affinity-weighted sum of ``g(x_j)``,
projected back to the input width by a 1x1 conv followed by a BatchNorm whose weight and
bias start at zero, and added to the input. A freshly built block is therefore the identity
map, so inserting it into a pretrained ResNet does not change the network at first.

Inner width (docs/method.md): the release computes it as
``reduc_ratio // reduc_ratio`` = 1 channel, whatever the input width; that is what produced
the published numbers and is the default (``"release"``). ``"half"`` is the C/2 width of the
non-local paper and of AGW's intent (7.3 million more parameters at depth 50).
"""

from __future__ import annotations

import torch
from torch import nn

NON_LOCAL_WIDTHS = ("release", "half")


def inner_width(channels: int, width: str = "release") -> int:
    """Inner channels of a block on ``channels`` inputs: 1 (``"release"``) or C/2 (``"half"``)."""
    if width == "release":
        return 1
    if width == "half":
        return max(channels // 2, 1)
    raise ValueError(f"non-local width must be one of {', '.join(NON_LOCAL_WIDTHS)}, got {width!r}")


class NonLocalBlock(nn.Module):
    """Residual dot-product non-local block: ``[B, C, H, W] -> [B, C, H, W]``.

    Args:
        channels: C, the width of the input and output.
        width: ``"release"`` (inner width 1) or ``"half"`` (inner width C/2).
    """

    def __init__(self, channels: int, width: str = "release") -> None:
        super().__init__()
        inner = inner_width(channels, width)
        self.channels = channels
        self.inner_channels = inner
        self.g = nn.Conv2d(channels, inner, kernel_size=1)
        self.theta = nn.Conv2d(channels, inner, kernel_size=1)
        self.phi = nn.Conv2d(channels, inner, kernel_size=1)
        self.output = nn.Sequential(
            nn.Conv2d(inner, channels, kernel_size=1),
            nn.BatchNorm2d(channels),
        )
        # Zero-initialised output BN: the residual branch contributes nothing at start.
        nn.init.zeros_(self.output[1].weight)
        nn.init.zeros_(self.output[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        positions = height * width
        # flatten(2) copies when x is channels_last, so this works in either memory format.
        g = self.g(x).flatten(2).transpose(1, 2)  # [B, N, C']
        theta = self.theta(x).flatten(2).transpose(1, 2)  # [B, N, C']
        phi = self.phi(x).flatten(2)  # [B, C', N]
        affinity = torch.bmm(theta, phi) / positions  # [B, N, N], no softmax
        response = torch.bmm(affinity, g)  # [B, N, C']
        response = response.transpose(1, 2).reshape(batch, self.inner_channels, height, width)
        return x + self.output(response)
