"""The training optimiser: the release's Adam (L2 weight decay added to the gradient)."""

from __future__ import annotations

import torch

from bmil.engine.run import adam


def test_fused_adam_steps_as_the_adam_formula():
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(50, generator=gen)
    grads = [torch.randn(50, generator=gen) for _ in range(3)]
    p = torch.nn.Parameter(start.clone())
    opt = adam([p], lr=1e-2, weight_decay=0.1)  # large: L2 and decoupled decay differ
    assert opt.defaults["fused"] is True
    # Adam by hand (Kingma & Ba, with torch's defaults beta 0.9 / 0.999, eps 1e-8), float64
    w, m, v = start.double(), torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        g = g.double() + 0.1 * w
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w - 1e-2 * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
