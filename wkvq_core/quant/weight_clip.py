"""Learnable weight clipping (OmniQuant LWC) and the fake-quantized linear used during calibration."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..config import FP_BITS, WeightQuantConfig
from ..errors import ConfigError
from .primitives import dequantize_weight, fake_quant_per_token, fake_quant_weight, quantize_weight


class LearnableWeightClip(nn.Module):
    """Per-group clip logits: the group max is scaled by sigmoid(gamma), the min by sigmoid(beta)."""

    def __init__(self, out_features: int, n_groups: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((out_features, n_groups, 1), init))
        self.beta = nn.Parameter(torch.full((out_features, n_groups, 1), init))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.gamma), torch.sigmoid(self.beta)


class QuantLinear(nn.Module):
    """A linear whose weight is fake-quantized group-wise on every forward (straight-through rounding).

    `fake_quant(w)` is public so an attention module can quantize a weight with smoothing folded in
    (v_proj / o_proj) using this layer's clip factors. `weight_quant` / `act_quant` switch quantization on and off.
    A target sets `scale_bits` (significant bits of the scales, as its export needs them; None: fp16's 11) and
    `input_rounding` (what its engine does to the input of a quantized-weight matmul; None: nothing).
    """

    def __init__(self, linear: nn.Linear, config: WeightQuantConfig, act_bits: int = FP_BITS) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        group = self.in_features if config.group_size == -1 else config.group_size
        if config.enabled and self.in_features % group:
            raise ConfigError(
                f"group_size {config.group_size} does not divide in_features {self.in_features} of a linear layer; "
                "use a divisor of every linear's input size or -1 (one group per output row)"
            )
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.bits, self.group_size, self.act_bits = config.bits, config.group_size, act_bits
        self.scale_bits: int | None = None
        self.input_rounding: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.clip = (
            LearnableWeightClip(self.out_features, self.in_features // group, config.lwc_init)
            if config.lwc and config.enabled
            else None
        )
        self.weight_quant = config.enabled
        self.act_quant = act_bits != FP_BITS
        # fake_quant(weight) and the bias held during evaluation (model.frozen_weights), smoothing folded in
        self.frozen_weight: torch.Tensor | None = None
        self.frozen_bias: torch.Tensor | None = None
        self.input_observer: Callable[[torch.Tensor], None] | None = None  # sees the matmul's input (calib.gptq)
        for name in ("fixed_codes", "fixed_scale", "fixed_zero"):  # a fixed quantization (fix_quantization_)
            self.register_buffer(name, None, persistent=False)

    def _clip_factors(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.clip.factors() if self.clip is not None else (None, None)

    def fix_quantization_(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """From now on the quantized weight is these codes, scales and zeros (as `quantize` returns them), whatever
        weight is passed (GPTQ's rounding of the weight with its smoothing folded in)."""
        self.fixed_codes, self.fixed_scale, self.fixed_zero = codes, scale, zero

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.weight_quant:
            return weight
        if self.fixed_codes is not None:
            return dequantize_weight(self.fixed_codes, self.fixed_scale, self.fixed_zero, self.group_size, weight.dtype)
        return fake_quant_weight(weight, self.bits, self.group_size, *self._clip_factors(), self.scale_bits)

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes, scales and zeros of `weight` under the learned clipping (for export), or the fixed ones."""
        if self.fixed_codes is not None:
            return self.fixed_codes, self.fixed_scale, self.fixed_zero
        return quantize_weight(weight, self.bits, self.group_size, *self._clip_factors(), self.scale_bits)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._quantized_linear(x, self.fake_quant(weight), bias)

    def _quantized_linear(self, x: torch.Tensor, quantized_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.act_quant:
            x = fake_quant_per_token(x, self.act_bits)
        if self.input_rounding is not None and self.weight_quant:
            x = self.input_rounding(x)
        if self.input_observer is not None:
            self.input_observer(x)
        return F.linear(x, quantized_weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen_weight is not None:
            return self._quantized_linear(x, self.frozen_weight, self.frozen_bias)
        return self.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w_bits={self.bits}, group={self.group_size}"
