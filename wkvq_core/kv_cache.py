"""`WKVQuantCache`: a transformers 5.x cache that stores K/V packed (WKVQuant 2D quantization, POQ).

Each cached token is one byte record per KV head: the packed codes of K~ (or V~), then the fp16 scales, then the
fp16 zero points of its groups (the first `sink_tokens` of a sequence are kept unquantized instead). Records live
in preallocated storage that grows geometrically (appending is amortised O(1)); `keys` / `values` are views of its
filled part, shaped like a `DynamicLayer`'s tensors, so cropping, batch selection and beam reordering work unchanged.

Two ways to read it:
- `update` stores the new tokens' smoothed K/V packed and returns the dequantized past *and* new tokens (prefill,
  and what `WKVAttention` falls back to);
- `update_and_attend` stores them and computes one decode step's attention straight from the records
  (`packed_attention`): no full-precision copy of the past, the token's own K/V in full precision (POQ).
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicLayer

from .packed_attention import packed_decode_attention
from .packing import pack_bits, packed_size, unpack_bits
from .primitives import dequantize_per_token, quantize_per_token

GROWTH, MIN_GROWTH = 1.25, 256  # storage grows to max(1.25 x, + 256 tokens) of what it must hold


class PackedKVLayer(DynamicLayer):
    """Packed records of the quantized tokens; the first `sink_tokens` of a sequence are kept unquantized in an
    inner `DynamicLayer` (`sinks`) and come first in what `update` returns."""

    def __init__(self, bits: int, group_size: int | None = None, sink_tokens: int = 0) -> None:
        super().__init__()
        self.bits, self.group_size, self.sink_tokens = bits, group_size, sink_tokens
        self.sinks = DynamicLayer()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        self.n_groups = self.head_dim // (self.group_size or self.head_dim)
        self.code_bytes = packed_size(self.head_dim, self.bits)
        empty = key_states.new_empty(*key_states.shape[:2], 0, self.code_bytes + 4 * self.n_groups, dtype=torch.uint8)
        self.keys, self.values = empty, empty.clone()
        self._key_store, self._value_store = self.keys, self.values
        self.is_initialized = True

    def _append(self, store: torch.Tensor, filled: torch.Tensor, records: torch.Tensor) -> torch.Tensor:
        """`filled` (a view of `store`'s first tokens, or a tensor that replaced it after a reorder or batch
        operation) with `records` appended; returns the new storage, of which [..., :n] is the filled part."""
        n, extra = filled.shape[-2], records.shape[-2]
        backed = filled.shape[:2] == store.shape[:2] and (n == 0 or filled.data_ptr() == store.data_ptr())
        if not backed or n + extra > store.shape[-2]:
            capacity = max(int((n + extra) * GROWTH), n + extra + MIN_GROWTH)
            grown = filled.new_empty(*filled.shape[:2], capacity, filled.shape[-1])
            grown[..., :n, :] = filled
            store = grown
        store[..., n : n + extra, :] = records
        return store

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale, zero = quantize_per_token(x.float(), self.bits, self.group_size)
        return torch.cat([pack_bits(codes, self.bits), scale.view(torch.uint8), zero.view(torch.uint8)], dim=-1)

    def _decode(self, records: torch.Tensor) -> torch.Tensor:
        if records.shape[-2] == 0:  # every token so far is a sink
            return records.new_empty(*records.shape[:-1], self.head_dim, dtype=self.dtype)
        c, g = self.code_bytes, 2 * self.n_groups
        codes = unpack_bits(records[..., :c], self.bits, self.head_dim)
        scale = records[..., c : c + g].contiguous().view(torch.float16)
        zero = records[..., c + g :].contiguous().view(torch.float16)
        return dequantize_per_token(codes, scale, zero, dtype=torch.float32).to(self.dtype)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        sink = min(max(self.sink_tokens - self.sinks.get_seq_length(), 0), key_states.shape[-2])
        if sink:
            self.sinks.update(key_states[..., :sink, :], value_states[..., :sink, :])
        if sink < key_states.shape[-2]:
            n = self.keys.shape[-2] + key_states.shape[-2] - sink
            self._key_store = self._append(self._key_store, self.keys, self._encode(key_states[..., sink:, :]))
            self._value_store = self._append(self._value_store, self.values, self._encode(value_states[..., sink:, :]))
            self.keys, self.values = self._key_store[..., :n, :], self._value_store[..., :n, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._store(key_states, value_states)
        keys, values = self._decode(self.keys), self._decode(self.values)
        if self.sinks.get_seq_length():
            keys, values = torch.cat([self.sinks.keys, keys], dim=-2), torch.cat([self.sinks.values, values], dim=-2)
        return keys, values

    def update_and_attend(self, query: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float, poq: bool,
                          key_transform=None, own_key: torch.Tensor | None = None) -> torch.Tensor:
        """Store one new token's K~/V~ (B, H_kv, 1, D) and return its attention output (B, 1, H, D) over the
        stored past, with its own K/V in full precision when `poq` (else its stored record); `key_transform`: see
        `packed_decode_attention`, with `own_key` the token's key as the attention uses it (default: key_states)."""
        to_sinks = self.sinks.get_seq_length() < self.sink_tokens
        self._store(key_states, value_states)
        sinks = (self.sinks.keys, self.sinks.values) if self.sinks.get_seq_length() else None
        records = (self.keys, self.values)
        if to_sinks:  # kept unquantized: its stored K/V are its own
            sinks = (sinks[0][..., :-1, :], sinks[1][..., :-1, :])
        elif poq:
            records = (records[0][..., :-1, :], records[1][..., :-1, :])
        own = (key_states if own_key is None else own_key, value_states) if to_sinks or poq else None
        return packed_decode_attention(query, sinks, records, own, self._decode, attention_mask, scaling,
                                       self.bits if self.n_groups == 1 else None, key_transform)

    def get_seq_length(self) -> int:
        return self.sinks.get_seq_length() + super().get_seq_length()

    def reset(self) -> None:
        super().reset()
        self.sinks = DynamicLayer()
        self._key_store = self._value_store = None

    def crop(self, tokens_to_remove: int) -> None:
        packed = super().get_seq_length()
        super().crop(-min(-tokens_to_remove, packed) if tokens_to_remove < 0 else tokens_to_remove)
        if tokens_to_remove < -packed:
            self.sinks.crop(tokens_to_remove + packed)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.sinks.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.sinks.batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.sinks.reorder_cache(beam_idx)

    def nbytes(self) -> int:
        """Bytes of the stored tokens (the filled part of the storage)."""
        layers = [self] + ([self.sinks] if self.sinks.get_seq_length() else [])
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in layers if layer.is_initialized)

    def allocated_bytes(self) -> int:
        """Bytes held, including the storage's room for tokens still to come."""
        sinks = self.sinks.keys.nbytes + self.sinks.values.nbytes if self.sinks.get_seq_length() else 0
        return self._key_store.nbytes + self._value_store.nbytes + sinks if self.is_initialized else 0


class WKVQuantCache(Cache):
    """Packed KV cache for a WKVQuant model: `model.generate(ids, **with_cache(WKVQuantCache(model.config)))`.

    Bits, group size and sink tokens come from `config.quantization_config` (a loaded artifact) unless given.
    """

    stores_packed = True  # WKVAttention passes full-precision K~/V~ to `update` and lets the cache quantize

    def __init__(self, config, kv_bits: int | None = None, kv_group_size: int | None = None,
                 sink_tokens: int | None = None) -> None:
        quant = getattr(config, "quantization_config", None) or {}
        bits = kv_bits or quant.get("kv_bits")
        if not bits or bits >= 16:
            raise ValueError("WKVQuantCache needs kv_bits between 2 and 8 (from the argument or the model config)")
        group = kv_group_size or quant.get("kv_group_size")
        sinks = quant.get("kv_sink_tokens", 0) if sink_tokens is None else sink_tokens
        super().__init__(layers=[PackedKVLayer(bits, group, sinks) for _ in range(config.num_hidden_layers)])

    def nbytes(self) -> int:
        """Bytes of the stored tokens."""
        return sum(layer.nbytes() for layer in self.layers if layer.is_initialized)

    def allocated_bytes(self) -> int:
        """Bytes held, including the storage's room for tokens still to come (at most 25 % or 256 tokens more)."""
        return sum(layer.allocated_bytes() for layer in self.layers if layer.is_initialized)
