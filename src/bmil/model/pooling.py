"""Generalised-mean (GeM) pooling (Radenović et al., TPAMI 2019), as in AGW and the release."""

from __future__ import annotations

import torch
from torch import nn

RELEASE_EPS = 1e-12


class GeneralizedMeanPooling(nn.Module):
    """``[B, C, H, W] -> [B, C]`` generalised mean over the H*W positions.

    Fixed (default, the release's ``agw.py``): ``(mean x**p + 1e-12) ** (1/p)`` with a
    constant ``p`` (3) that is neither a parameter nor a buffer, so it is not in the state
    dict. Learnable (``learnable=True``, AGW's ``GeneralizedMeanPoolingP``):
    ``(mean clamp(x, eps)**p) ** (1/p)`` with ``p`` a trainable scalar parameter
    initialised to ``p``.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = False) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM exponent p must be positive, got {p}")
        self.eps = eps
        self.learnable = learnable
        if learnable:
            self.p = nn.Parameter(torch.tensor([float(p)]))
        else:
            self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At least float32 under mixed precision: x ** 3 overflows float16 for activations > 40.
        work = x if x.dtype == torch.float64 else x.float()
        if not self.learnable:
            pooled = work.pow(self.p).mean(dim=(2, 3)) + RELEASE_EPS
            return pooled.pow(1.0 / self.p).to(x.dtype)
        p = self.p.to(work.dtype)
        pooled = work.clamp(min=self.eps).pow(p).mean(dim=(2, 3))
        return pooled.pow(1.0 / p).to(x.dtype)

    def extra_repr(self) -> str:
        p = float(self.p) if not self.learnable else self.p.item()
        return f"p={p:.4f}, learnable={self.learnable}"
