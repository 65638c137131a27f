"""Generalised-mean (GeM) pooling (Radenović et al., TPAMI 2019), as in AGW."""

from __future__ import annotations

import torch
from torch import nn


class GeneralizedMeanPooling(nn.Module):
    """``[B, C, H, W] -> [B, C]``: ``(mean over H*W of clamp(x, eps) ** p) ** (1 / p)``.

    ``p = 1`` is average pooling (for inputs >= eps), ``p -> inf`` approaches max pooling.
    With ``learnable=True`` (default, as AGW's ``GeneralizedMeanPoolingP``) ``p`` is a
    trainable scalar parameter initialised to ``p``; otherwise it is a fixed buffer.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM exponent p must be positive, got {p}")
        self.eps = eps
        self.learnable = learnable
        p_tensor = torch.tensor([float(p)])
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 even under mixed precision: x ** 3 overflows float16 for activations > 40.
        p = self.p.float()
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3))
        return pooled.pow(1.0 / p).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}, learnable={self.learnable}"
