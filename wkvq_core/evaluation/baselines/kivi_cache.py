"""`KIVICache`: a KIVI-style quantized KV cache (Liu et al. 2024, arXiv 2402.02750) as a transformers 5.x cache.

A baseline for the peer benchmark, following the KIVI reference implementation's algorithm:

* Keys are quantized **per channel**: each group is `group_size` consecutive tokens of one channel of one KV head.
  New keys stay in a full-precision residual; whenever the residual holds `residual_length` tokens (a multiple of
  `group_size`) they are quantized and appended to the quantized store, and the residual is emptied.
* Values are quantized **per token**, in groups of `group_size` channels (the whole head_dim when it is smaller).
  The last `residual_length` values stay in full precision (a sliding window); older ones are quantized one by one
  as they leave it.
* Asymmetric min-max quantization with KIVI's parameters: fp16 `scale = (max - min) / (2**bits - 1)` and fp16
  `min` per group; codes are packed `bits` per code along the group (`packing.pack_bits`).
* Attention at each step reads the dequantized store and the full-precision residual, which includes the new
  tokens; the residual is compacted only after that (as KIVI does after computing the attention), so `update`
  returns exactly what KIVI's attention reads.

`nbytes()` counts every tensor the cache holds: packed codes, fp16 scales and minima, and the full-precision
residual (at its own dtype, or at `fp_bytes` bytes per element to account an fp16 deployment of a model that
computes in fp32). `kivi_bytes` is the same count from the shapes alone.
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicLayer

from ...quant.packing import pack_bits, packed_size, unpack_bits

KIVI_GROUP = 32  # KIVI's group size G
KIVI_RESIDUAL = 128  # KIVI's residual length R


def quantize_groups(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KIVI's asymmetric quantization along the last dim (one group): packed uint8 codes, fp16 scale and minimum
    (..., 1 dropped). Dequantization with the stored fp16 values reproduces what is computed here."""
    x = x.float()
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    mn = lo.half()
    scale = ((hi - mn.float()) / (2**bits - 1)).clamp(min=1e-6).half()
    codes = ((x - mn.float()) / scale.float()).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return pack_bits(codes, bits), scale.squeeze(-1), mn.squeeze(-1)


def dequantize_groups(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int, n: int,
                      dtype: torch.dtype) -> torch.Tensor:
    codes = unpack_bits(packed, bits, n).float()
    return (codes * scale.float().unsqueeze(-1) + mn.float().unsqueeze(-1)).to(dtype)


class KIVILayer(DynamicLayer):
    """One layer: `keys` / `values` hold the full-precision residuals (B, H, r, D); the quantized stores are
    `k_codes` (B, H, n_groups, D, packed(G)) with `k_scale` / `k_min` (B, H, n_groups, D), and `v_codes`
    (B, H, T_q, D // Gv, packed(Gv)) with `v_scale` / `v_min` (B, H, T_q, D // Gv)."""

    is_croppable = False

    def __init__(self, bits: int = 4, group_size: int = KIVI_GROUP, residual_length: int = KIVI_RESIDUAL) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be between 1 and 8; got {bits}")
        if residual_length < group_size or residual_length % group_size:
            raise ValueError(
                f"residual_length {residual_length} must be a positive multiple of group_size {group_size} (KIVI "
                "quantizes keys per channel over whole groups of tokens taken from the residual)"
            )
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype  # DynamicLayer set it up to transformers 5.23, no longer from 5.24
        b, h, _, d = key_states.shape
        self.head_dim = d
        self.v_group = min(self.group_size, d)
        if d % self.v_group:
            raise ValueError(f"value group {self.v_group} does not divide head_dim {d}")
        u8 = dict(dtype=torch.uint8, device=self.device)
        f16 = dict(dtype=torch.float16, device=self.device)
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, d)
        self.k_codes = torch.empty(b, h, 0, d, packed_size(self.group_size, self.bits), **u8)
        self.k_scale, self.k_min = torch.empty(b, h, 0, d, **f16), torch.empty(b, h, 0, d, **f16)
        n_vg = d // self.v_group
        self.v_codes = torch.empty(b, h, 0, n_vg, packed_size(self.v_group, self.bits), **u8)
        self.v_scale, self.v_min = torch.empty(b, h, 0, n_vg, **f16), torch.empty(b, h, 0, n_vg, **f16)

    # ------------------------------------------------------------------ stores

    def _dequantized_keys(self) -> torch.Tensor:
        b, h, n, d, _ = self.k_codes.shape
        x = dequantize_groups(self.k_codes, self.k_scale, self.k_min, self.bits, self.group_size, self.dtype)
        return x.permute(0, 1, 2, 4, 3).reshape(b, h, n * self.group_size, d)  # (B, H, n, D, G) -> (B, H, n*G, D)

    def _dequantized_values(self) -> torch.Tensor:
        b, h, t = self.v_codes.shape[:3]
        x = dequantize_groups(self.v_codes, self.v_scale, self.v_min, self.bits, self.v_group, self.dtype)
        return x.reshape(b, h, t, self.head_dim)

    def _quantize_keys(self, keys: torch.Tensor) -> None:
        """Append (B, H, k*G, D) keys to the store, per channel in groups of G tokens."""
        b, h, t, d = keys.shape
        grouped = keys.reshape(b, h, t // self.group_size, self.group_size, d).transpose(-1, -2)  # (B,H,n,D,G)
        codes, scale, mn = quantize_groups(grouped, self.bits)
        self.k_codes = torch.cat([self.k_codes, codes], dim=2)
        self.k_scale, self.k_min = torch.cat([self.k_scale, scale], dim=2), torch.cat([self.k_min, mn], dim=2)

    def _quantize_values(self, values: torch.Tensor) -> None:
        """Append (B, H, t, D) values to the store, per token in groups of Gv channels."""
        b, h, t, d = values.shape
        codes, scale, mn = quantize_groups(values.reshape(b, h, t, d // self.v_group, self.v_group), self.bits)
        self.v_codes = torch.cat([self.v_codes, codes], dim=2)
        self.v_scale, self.v_min = torch.cat([self.v_scale, scale], dim=2), torch.cat([self.v_min, mn], dim=2)

    # ------------------------------------------------------------------ Cache API

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys = torch.cat([self._dequantized_keys(), self.keys], dim=-2)
        values = torch.cat([self._dequantized_values(), self.values], dim=-2)
        # compact after the attention's view is taken (KIVI quantizes after computing the attention)
        full = self.keys.shape[-2] // self.residual_length * self.residual_length
        if full:
            self._quantize_keys(self.keys[:, :, :full])
            self.keys = self.keys[:, :, full:]
        spill = self.values.shape[-2] - self.residual_length
        if spill > 0:
            self._quantize_values(self.values[:, :, :spill])
            self.values = self.values[:, :, spill:]
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def _select(self, fn) -> None:
        for name in ("keys", "values", "k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min"):
            setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KIVICache cannot be cropped: quantized key groups span several tokens")

    def nbytes(self, fp_bytes: int | None = None) -> int:
        if not self.is_initialized:
            return 0
        quantized = sum(t.nbytes for t in (self.k_codes, self.k_scale, self.k_min,
                                           self.v_codes, self.v_scale, self.v_min))
        residual = self.keys.numel() + self.values.numel()
        return quantized + residual * (fp_bytes or self.keys.element_size())


class KIVICache(Cache):
    """KIVI-style quantized cache: `model(ids, **with_cache(KIVICache(model.config)), use_cache=True)`.

    bits: code width (KIVI-4: 4, KIVI-2: 2); group_size: KIVI's G (tokens per key group, channels per value
    group); residual_length: KIVI's R, a multiple of G.
    """

    def __init__(self, config, bits: int = 4, group_size: int = KIVI_GROUP,
                 residual_length: int = KIVI_RESIDUAL) -> None:
        config = config.get_text_config(decoder=True)
        super().__init__(layers=[KIVILayer(bits, group_size, residual_length)
                                 for _ in range(config.num_hidden_layers)])

    def nbytes(self, fp_bytes: int | None = None) -> int:
        """Bytes held: packed codes + fp16 scales and minima + the full-precision residual (counted at `fp_bytes`
        per element when given, else at its dtype's size)."""
        return sum(layer.nbytes(fp_bytes) for layer in self.layers)


def kivi_bytes(n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int, bits: int = 4,
               group_size: int = KIVI_GROUP, residual_length: int = KIVI_RESIDUAL, fp_bytes: int = 2) -> int:
    """What a `KIVICache` holds for `seq_len` tokens at batch 1, from the shapes alone."""
    k_quant = seq_len // residual_length * residual_length
    v_quant = max(seq_len - residual_length, 0)
    v_group = min(group_size, head_dim)
    k_bytes = (k_quant // group_size) * head_dim * (packed_size(group_size, bits) + 4)
    v_bytes = v_quant * (head_dim // v_group) * (packed_size(v_group, bits) + 4)
    residual = (seq_len - k_quant + seq_len - v_quant) * head_dim * fp_bytes
    return n_layers * n_kv_heads * (k_bytes + v_bytes + residual)
