"""A linear layer holding packed integer weights, dequantized once per dtype and device and kept for later forwards.

The kept copy costs what the full-precision weight costs in memory (the artifact and the packed buffers stay small);
`PackedLinear.keep_dequantized = False` dequantizes on every forward instead, trading speed for that memory. torch's
CPU int4 matmul (`_weight_int4pack_mm_for_cpu`) was measured 30x slower than an fp32 matmul at decode shapes
(SmolLM2's 1536 x 576, 8 rows), so it is not used.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..quant.packing import unpack_bits
from ..quant.primitives import dequantize_weight, fake_quant_per_token


class PackedLinear(nn.Module):
    """qweight: uint8 (out, packed_size(in, bits)); scales, zeros: fp16 (out, in // group)."""

    keep_dequantized = True

    def __init__(self, qweight, scales, zeros, bias, in_features: int, bits: int, group_size: int, act_bits: int = 16):
        super().__init__()
        self.in_features, self.out_features = in_features, qweight.shape[0]
        self.bits, self.group_size, self.act_bits = bits, group_size, act_bits
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)
        self._kept: tuple[tuple, torch.Tensor] | None = None
        self.input_rounding: Callable[[torch.Tensor], torch.Tensor] | None = None  # a target's (`QuantLinear`)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        codes = unpack_bits(self.qweight, self.bits, self.in_features)
        return dequantize_weight(codes, self.scales, self.zeros, self.group_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits != 16:
            x = fake_quant_per_token(x, self.act_bits)
        if self.input_rounding is not None:
            x = self.input_rounding(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._weight(x.dtype), bias)

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight, kept while the packed tensors are unchanged (in-place edits bump `_version`)."""
        key = (dtype, *((t.device, t.data_ptr(), t._version) for t in (self.qweight, self.scales, self.zeros)))
        if self._kept is not None and self._kept[0] == key:
            return self._kept[1]
        weight = self.dequantized_weight(dtype)
        self._kept = (key, weight) if self.keep_dequantized else None
        return weight

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight itself: packed codes, scales and zero points."""
        return self.qweight.nbytes + self.scales.nbytes + self.zeros.nbytes

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"
