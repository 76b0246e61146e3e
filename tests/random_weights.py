"""Random weights for parity tests against HF / timm models (imported by path: tests/ is put on ``sys.path``)."""

from __future__ import annotations

import torch


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, in place; returns ``model`` in eval mode. HF and timm zero their biases, set LayerNorm
    gains to 1 and BLIP-2 initialises with std 1e-10: parity on such weights would hide transposes and missing
    terms. 1-D ``*weight`` (LayerNorm gains) near 1, matrices ~ N(0, 0.05^2), biases ~ N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g) * (1 if p.dim() > 1 else 4))
    return model.eval()
