"""Activation-aware equivalent scaling (AWQ, Lin et al. 2023) as an initialisation: a linear's input channel c is
divided by s_c where the preceding operator writes it (an RMSNorm's weight, a projection's output row) and its weight
column multiplied by s_c, exact in full precision. s = mean|x|^alpha (normalised), alpha searched on a grid for the
least output error of the scaled weights quantized to nearest on the layer's grid."""

from __future__ import annotations

from typing import Callable

import torch

from ..config import EQUALIZE_ALPHAS
from .primitives import fake_quant_weight


def activation_scales(magnitude: torch.Tensor, alpha: float) -> torch.Tensor:
    """mean|x| per channel ** alpha, normalised so that max * min = 1 (AWQ's normalisation)."""
    s = magnitude.clamp(min=1e-4) ** alpha
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scales(
    x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int, scale_bits: int | None = None,
    expand: Callable[[torch.Tensor], torch.Tensor] = lambda s: s,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda m: m,
) -> torch.Tensor:
    """The scales (free channels) with the least summed squared output error of `weights` (each (out, in)) on inputs
    x (tokens, in) once scaled and quantized to nearest. `reduce` maps per-input-channel magnitudes to the free
    channels, `expand` free scales to input channels (GQA: V's channels shared by several heads of o_proj)."""
    magnitude = reduce(x.abs().mean(dim=0))
    targets = [x @ w.T for w in weights]
    best, best_error = None, float("inf")
    for alpha in EQUALIZE_ALPHAS:
        free = activation_scales(magnitude, alpha)
        s = expand(free)
        scaled_x = x / s
        error = sum((scaled_x @ fake_quant_weight(w * s, bits, group_size, scale_bits=scale_bits).T - t).pow(2).sum()
                    for w, t in zip(weights, targets)).item()
        if error < best_error:
            best, best_error = free, error
    return best
