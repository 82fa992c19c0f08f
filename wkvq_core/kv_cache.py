"""`WKVQuantCache`: a transformers 5.x cache that stores K/V packed (WKVQuant 2D quantization, POQ).

Each cached token is one byte record per KV head: the packed codes of K~ (or V~), then the fp16 scales, then the
fp16 zero points of its groups. Records are concatenated along the sequence dim like a `DynamicLayer`'s tensors,
so cropping, batch selection and beam reordering work unchanged. `update` receives the new tokens' smoothed
K/V in full precision, stores them packed and returns the dequantized past *and* new tokens; the attention then
uses the new tokens' own K/V in full precision (POQ).
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicLayer

from .packing import pack_bits, packed_size, unpack_bits
from .primitives import dequantize_per_token, quantize_per_token


class PackedKVLayer(DynamicLayer):
    def __init__(self, bits: int, group_size: int | None = None) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        self.n_groups = self.head_dim // (self.group_size or self.head_dim)
        self.code_bytes = packed_size(self.head_dim, self.bits)
        empty = key_states.new_empty(*key_states.shape[:2], 0, self.code_bytes + 4 * self.n_groups, dtype=torch.uint8)
        self.keys, self.values = empty, empty.clone()
        self.is_initialized = True

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale, zero = quantize_per_token(x.float(), self.bits, self.group_size)
        return torch.cat([pack_bits(codes, self.bits), scale.view(torch.uint8), zero.view(torch.uint8)], dim=-1)

    def _decode(self, records: torch.Tensor) -> torch.Tensor:
        c, g = self.code_bytes, 2 * self.n_groups
        codes = unpack_bits(records[..., :c], self.bits, self.head_dim)
        scale = records[..., c : c + g].contiguous().view(torch.float16)
        zero = records[..., c + g :].contiguous().view(torch.float16)
        return dequantize_per_token(codes, scale, zero, dtype=torch.float32).to(self.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, self._encode(key_states)], dim=-2)
        self.values = torch.cat([self.values, self._encode(value_states)], dim=-2)
        return self._decode(self.keys), self._decode(self.values)


class WKVQuantCache(Cache):
    """Packed KV cache for a WKVQuant model: `model.generate(ids, **with_cache(WKVQuantCache(model.config)))`.

    Bits and group size come from `config.quantization_config` (a loaded artifact) unless given.
    """

    stores_packed = True  # WKVAttention passes full-precision K~/V~ to `update` and lets the cache quantize

    def __init__(self, config, kv_bits: int | None = None, kv_group_size: int | None = None) -> None:
        quant = getattr(config, "quantization_config", None) or {}
        bits = kv_bits or quant.get("kv_bits")
        if not bits or bits >= 16:
            raise ValueError("WKVQuantCache needs kv_bits between 2 and 8 (from the argument or the model config)")
        group = kv_group_size or quant.get("kv_group_size")
        super().__init__(layers=[PackedKVLayer(bits, group) for _ in range(config.num_hidden_layers)])

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)
