"""`WKVQuantCache`: a transformers 5.x cache that stores K/V packed (WKVQuant 2D quantization, POQ).

Each cached token is one byte record per KV head: the packed codes of K~ (or V~), then the fp16 scales, then the
fp16 zero points of its groups (the first `sink_tokens` of a sequence are kept unquantized instead). Records live
in segments of storage, each as long as one chunk of the decode attention (`packed_attention.CHUNK_TOKENS`), that
are allocated page by page (`page_tokens`, 16 by default, as vLLM's blocks): the memory held stays within one page
per layer of the format's size (`nbytes()`), and appending copies at most one segment. `keys` / `values` give the
records as one tensor shaped like a `DynamicLayer`'s.

Two ways to read it:
- `update` stores the new tokens' smoothed K/V packed and returns the dequantized past *and* new tokens (prefill,
  and what `WKVAttention` falls back to);
- `update_and_attend` stores them and computes one decode step's attention straight from the records
  (`packed_attention`): no full-precision copy of the past, the token's own K/V in full precision (POQ).
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicLayer

from . import packed_attention
from ..quant.packing import pack_bits, packed_size, unpack_bits
from ..quant.primitives import dequantize_per_token, quantize_per_token
from .packed_attention import packed_decode_attention

PAGE_TOKENS = 16  # storage is allocated in pages of this many tokens


class _Records:
    """`keys` / `values` of a `PackedKVLayer`: its stored records (B, H_kv, n, R) as one tensor (a copy when they
    span several segments), None before the first update. transformers empties a layer by assigning None."""

    def __init__(self, segments: str) -> None:
        self.segments = segments

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        if not getattr(layer, self.segments, None):
            return None
        views = layer._views(getattr(layer, self.segments), layer.packed_tokens)
        return views[0] if len(views) == 1 else torch.cat(views, dim=-2)

    def __set__(self, layer, records: None) -> None:
        if records is not None:
            raise TypeError("a PackedKVLayer stores records through update(); only None (empty) can be assigned")
        setattr(layer, self.segments, [])
        layer.packed_tokens = 0


class PackedKVLayer(DynamicLayer):
    """Packed records of the quantized tokens; the first `sink_tokens` of a sequence are kept unquantized in an
    inner `DynamicLayer` (`sinks`) and come first in what `update` returns."""

    keys, values = _Records("key_segments"), _Records("value_segments")

    def __init__(self, bits: int, group_size: int | None = None, sink_tokens: int = 0,
                 page_tokens: int = PAGE_TOKENS) -> None:
        if isinstance(page_tokens, bool) or not isinstance(page_tokens, int) or page_tokens < 1:
            raise ValueError(f"page_tokens must be a positive whole number of tokens, not {page_tokens!r}")
        super().__init__()
        self.bits, self.group_size, self.sink_tokens, self.page_tokens = bits, group_size, sink_tokens, page_tokens
        # one segment per attention chunk, in whole pages
        self.segment_tokens = page_tokens * max(1, packed_attention.CHUNK_TOKENS // page_tokens)
        self.sinks = DynamicLayer()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        self.n_groups = self.head_dim // (self.group_size or self.head_dim)
        self.code_bytes = packed_size(self.head_dim, self.bits)
        empty = key_states.new_empty(*key_states.shape[:2], 0, self.code_bytes + 4 * self.n_groups, dtype=torch.uint8)
        self.key_segments, self.value_segments = [empty], [empty.clone()]  # the first segment is never dropped
        self.is_initialized = True

    def _views(self, segments: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
        """Views of the first `tokens` records, one per segment (at least the first, possibly empty)."""
        size = self.segment_tokens
        return [segment[..., : min(size, tokens - start), :]
                for start, segment in zip(range(0, max(tokens, 1), size), segments)]

    def _resized(self, segment: torch.Tensor, kept: int, tokens: int) -> torch.Tensor:
        """`segment` with room for `tokens` records in whole pages, its first `kept` records kept."""
        capacity = -(-tokens // self.page_tokens) * self.page_tokens
        if segment.shape[-2] == capacity:
            return segment
        resized = segment.new_empty(*segment.shape[:2], capacity, segment.shape[-1])
        resized[..., :kept, :] = segment[..., :kept, :]
        return resized

    def _append(self, segments: list[torch.Tensor], records: torch.Tensor) -> None:
        """Append `records` after the `packed_tokens` stored in `segments`; only the last segment grows."""
        n, size = self.packed_tokens, self.segment_tokens
        while records.shape[-2]:
            fill = n - (len(segments) - 1) * size  # records in the last segment
            if fill == size:
                segments.append(records.new_empty(*records.shape[:2], 0, records.shape[-1]))
                fill = 0
            end = min(size, fill + records.shape[-2])
            if segments[-1].shape[-2] < end:
                segments[-1] = self._resized(segments[-1], fill, end)
            segments[-1][..., fill:end, :] = records[..., : end - fill, :]
            records, n = records[..., end - fill :, :], n + end - fill

    def _truncate(self, tokens: int) -> None:
        """Keep the first `tokens` records, in whole pages."""
        keep = max(1, -(-tokens // self.segment_tokens))
        fill = tokens - (keep - 1) * self.segment_tokens
        for segments in (self.key_segments, self.value_segments):
            del segments[keep:]
            segments[-1] = self._resized(segments[-1], fill, fill)
        self.packed_tokens = tokens

    def _segments(self, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(K, V) views of the first `tokens` records, one pair per segment."""
        return list(zip(self._views(self.key_segments, tokens), self._views(self.value_segments, tokens)))

    def _map_segments(self, function) -> None:
        if self.is_initialized:
            self.key_segments = [function(segment) for segment in self.key_segments]
            self.value_segments = [function(segment) for segment in self.value_segments]

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
            self._append(self.key_segments, self._encode(key_states[..., sink:, :]))
            self._append(self.value_segments, self._encode(value_states[..., sink:, :]))
            self.packed_tokens += key_states.shape[-2] - sink

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
        records = self._segments(self.packed_tokens - 1 if poq and not to_sinks else self.packed_tokens)
        if to_sinks:  # kept unquantized: its stored K/V are its own
            sinks = (sinks[0][..., :-1, :], sinks[1][..., :-1, :])
        own = (key_states if own_key is None else own_key, value_states) if to_sinks or poq else None
        return packed_decode_attention(query, sinks, records, own, self._decode, attention_mask, scaling,
                                       self.bits if self.n_groups == 1 else None, key_transform)

    def get_seq_length(self) -> int:
        return self.sinks.get_seq_length() + self.packed_tokens

    def reset(self) -> None:
        super().reset()
        self.sinks = DynamicLayer()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove >= 0 or not self.is_initialized:
            return super().crop(tokens_to_remove)  # nothing to remove, or transformers' error for a positive one
        packed_removed = min(-tokens_to_remove, self.packed_tokens)
        self._truncate(self.packed_tokens - packed_removed)
        if -tokens_to_remove > packed_removed:
            self.sinks.crop(tokens_to_remove + packed_removed)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_segments(lambda segment: segment.repeat_interleave(repeats, dim=0))
        self.sinks.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_segments(lambda segment: segment[indices, ...])
        self.sinks.batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_segments(lambda segment: segment.index_select(0, beam_idx.to(segment.device)))
        self.sinks.reorder_cache(beam_idx)

    def _sink_bytes(self, fp_bytes: int | None) -> int:
        if not self.sinks.get_seq_length():
            return 0
        keys = self.sinks.keys
        return 2 * keys.numel() * (fp_bytes or keys.element_size())

    def nbytes(self) -> int:
        """Bytes of the stored tokens: the records and the unquantized sink tokens."""
        records = self._segments(self.packed_tokens)
        return sum(k.nbytes + v.nbytes for k, v in records) + self._sink_bytes(None)

    def allocated_bytes(self, fp_bytes: int | None = None) -> int:
        """Bytes held: `nbytes()` and the room of the last page of records (less than a page of tokens); the sink
        tokens at `fp_bytes` per element if given."""
        held = sum(segment.nbytes for segment in self.key_segments + self.value_segments)
        return held + self._sink_bytes(fp_bytes)


class WKVQuantCache(Cache):
    """Packed KV cache for a WKVQuant model: `model.generate(ids, **with_cache(WKVQuantCache(model.config)))`.

    Bits, group size and sink tokens come from `config.quantization_config` (a loaded artifact) unless given;
    `page_tokens`: the allocation unit of every layer's records.
    """

    stores_packed = True  # WKVAttention passes full-precision K~/V~ to `update` and lets the cache quantize

    def __init__(self, config, kv_bits: int | None = None, kv_group_size: int | None = None,
                 sink_tokens: int | None = None, page_tokens: int = PAGE_TOKENS) -> None:
        quant = getattr(config, "quantization_config", None) or {}
        bits = kv_bits or quant.get("kv_bits")
        if not bits or bits >= 16:
            raise ValueError("WKVQuantCache needs kv_bits between 2 and 8 (from the argument or the model config)")
        group = kv_group_size or quant.get("kv_group_size")
        sinks = quant.get("kv_sink_tokens", 0) if sink_tokens is None else sink_tokens
        layers = [PackedKVLayer(bits, group, sinks, page_tokens) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes of the stored tokens."""
        return sum(layer.nbytes() for layer in self.layers if layer.is_initialized)

    def allocated_bytes(self) -> int:
        """Bytes held: `nbytes()` and, per layer, the room left in its last page of records."""
        return sum(layer.allocated_bytes() for layer in self.layers if layer.is_initialized)
