"""Non-local block (Wang et al., CVPR 2018) as used by AGW for cross-modality re-ID.

Dot-product form, as in AGW: the affinity between positions i and j is
``theta(x_i) . phi(x_j) / N`` (N = H*W positions), the response is the affinity-weighted sum
of ``g(x_j)``, projected back to the input width by a 1x1 conv followed by a BatchNorm whose
weight and bias start at zero, and added to the input. A freshly built block is therefore the
identity map, so inserting it into a pretrained ResNet does not change the network at first.
"""

from __future__ import annotations

import torch
from torch import nn


class NonLocalBlock(nn.Module):
    """Residual dot-product non-local block: ``[B, C, H, W] -> [B, C, H, W]``.

    Args:
        channels: C, the width of the input and output.
        reduction: the inner width is ``channels // reduction`` (AGW uses 2).
    """

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        inner = max(channels // reduction, 1)
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
        affinity = torch.bmm(theta, phi) / positions  # [B, N, N]
        response = torch.bmm(affinity, g)  # [B, N, C']
        response = response.transpose(1, 2).reshape(batch, self.inner_channels, height, width)
        return x + self.output(response)
