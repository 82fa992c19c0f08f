"""Two-dimensional KV quantization with past-only quantization (POQ).

Per layer, static learnable per-channel smoothing (scale s, shift d; shapes (n_kv_heads, head_dim)):
    K~ = (K_rope - d_k) / s_k        scores use (q * s_k) . K~ : q . d_k is constant per query, softmax-invariant
    V~ = (V - d_v) / s_v             folded into v_proj:  W_v' = W_v / s_v,  b_v' = (b_v - d_v) / s_v
    out = (P V~) * s_v + d_v         folded into o_proj:  W_o' = W_o diag(s_v),  b_o' = b_o + W_o d_v
so with quantization off the model is unchanged. K~ and V~ are then quantized per token and KV head.

POQ in a parallel pass over T new tokens after `past` cached ones (prefill, teacher forcing, calibration):
    score(i, j <  i) = q_i . dequant(K~_j)      score(i, i) = q_i . K~_i   (full precision)
    out_i = sum_{j<i} P_ij dequant(V~_j) + P_ii V~_i
which equals token-by-token decoding with a quantized cache. `poq_attention_fused` computes it without a (T, S)
score tensor: SDPA kernels over j < i merged with the own term by log-sum-exp (`WKVAttention.attention_backend`).

Options beyond the paper (`KVQuantConfig`): K smoothed and quantized before RoPE, RoPE applied to the dequantized
keys (`k_pre_rope`); a Hadamard rotation H of the head dim after smoothing, q rotated with K and the attention
output rotated back (`rotate`: exact in full precision, H orthonormal); the first `sink_tokens` of a sequence kept
in full precision; full-precision attention among the tokens of one prefill (`fp_prefill`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv, rotate_half

from ..config import ATTENTION_KERNELS, FP_BITS, KVQuantConfig, WeightQuantConfig
from ..errors import ConfigError
from .primitives import fake_quant_per_token, hadamard
from .weight_clip import QuantLinear


def poq_attention(
    query: torch.Tensor,
    key_stored: torch.Tensor,
    value_stored: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    n_rep: int,
    poq: bool,
) -> torch.Tensor:
    """Causal attention over the stored (possibly quantized) keys/values of past and new tokens, with each new
    token's own key/value taken in full precision when `poq`.

    query (B, H, T, D); key_stored / value_stored (B, H_kv, S, D) whose last T entries are the new tokens;
    key_new / value_new (B, H_kv, T, D) full precision; attention_mask additive (B, 1, T, >=S) or None (causal).
    Returns (B, T, H, D).
    """
    t_new, s_len = query.shape[-2], key_stored.shape[-2]
    past = s_len - t_new
    keys, values = repeat_kv(key_stored, n_rep), repeat_kv(value_stored, n_rep)
    scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
    key_pos = torch.arange(s_len, device=query.device)
    query_pos = torch.arange(t_new, device=query.device)[:, None] + past
    own = key_pos[None, :] == query_pos
    if poq:
        own_score = (query * repeat_kv(key_new, n_rep)).sum(-1, keepdim=True) * scaling
        scores = torch.where(own, own_score, scores)
    if attention_mask is None:
        scores = scores.masked_fill(key_pos[None, :] > query_pos, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[..., :s_len]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, values)
    if poq:
        own_prob = (probs * own).sum(-1, keepdim=True)
        out = out + own_prob * (repeat_kv(value_new, n_rep) - values[..., past:, :])
    return out.transpose(1, 2).contiguous()


def _attention_kernel(query, key, value, causal: bool, scaling: float):
    """(out, lse, state) of one attention block without a score tensor: query (B, H, T, D), key / value
    (B, H, S, D); lse (B, H, >=T), at least fp32, in the kernel's layout; state: extra backward arguments."""
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, scale=scaling
        )
        return out, lse, ()
    if query.device.type == "cuda":  # memory-efficient kernel: fp32 and bf16; lse rows padded to a multiple of 32
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, True, 0.0, causal, scale=scaling
        )
        return out, lse, (seed, offset)
    raise ConfigError(f"the sdpa attention backend runs on cpu and cuda, not {query.device.type}")


def _attention_kernel_backward(grad_out, query, key, value, out, lse, state, causal: bool, scaling: float):
    """(grad_query, grad_key, grad_value) of `_attention_kernel`; the kernel recomputes P_ij = exp(s_ij - lse_i)
    and uses D_i = grad_out_i . out_i, so `out` and `lse` may be those of a merged attention."""
    if query.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, query, key, value, out, lse, 0.0, causal, scale=scaling
        )
    grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad_out, query, key, value, None, out, lse, *state, 0.0, (True, True, True, False), causal, scale=scaling
    )
    return grads[:3]


def _strictly_causal_blocks(past: int, t_new: int) -> list[tuple[slice, slice, bool]]:
    """(query rows, key columns, causal) blocks covering "new query i sees stored key j < past + i": all queries
    over the past keys, and queries 1.. over the new keys but the last, causal and square."""
    blocks = [(slice(0, t_new), slice(0, past), False)] if past else []
    if t_new > 1:
        blocks.append((slice(1, t_new), slice(past, past + t_new - 1), True))
    return blocks


class _MergedAttention(torch.autograd.Function):
    """Softmax attention of query i over the stored keys j < past + i plus its own key (key_own_i, value_own_i):
    kernel blocks merged with the own term by log-sum-exp, in at least fp32. Backward runs each block's kernel
    backward with the merged out and lse (as ring attention does): exact, with no gradient through a kernel's lse."""

    @staticmethod
    def forward(ctx, query, key_stored, value_stored, key_own, value_own, scaling: float):
        t_new = query.shape[-2]
        past = key_stored.shape[-2] - t_new
        acc = torch.promote_types(query.dtype, torch.float32)
        own_score = (query.to(acc) * key_own.to(acc)).sum(-1) * scaling  # (B, H, T)
        lse = own_score.clone()
        blocks = []
        for rows, cols, causal in _strictly_causal_blocks(past, t_new):
            block_out, block_lse, state = _attention_kernel(
                query[..., rows, :].contiguous(), key_stored[..., cols, :].contiguous(),
                value_stored[..., cols, :].contiguous(), causal, scaling,
            )
            blocks.append((rows, cols, causal, block_out, block_lse, state))
            lse[..., rows] = torch.logaddexp(lse[..., rows], block_lse[..., : rows.stop - rows.start])
        own_prob = torch.exp(own_score - lse)
        out = own_prob[..., None] * value_own.to(acc)
        for rows, _, _, block_out, block_lse, _ in blocks:
            weight = torch.exp(block_lse[..., : rows.stop - rows.start] - lse[..., rows])
            out[..., rows, :] += weight[..., None] * block_out.to(acc)
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key_stored, value_stored, key_own, value_own, out, lse, own_prob)
        ctx.blocks = [(rows, cols, causal, block_lse, state) for rows, cols, causal, _, block_lse, state in blocks]
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key_stored, value_stored, key_own, value_own, out, lse, own_prob = ctx.saved_tensors
        scaling, acc = ctx.scaling, lse.dtype
        grad_out = grad_out.contiguous()
        grad_own_score = own_prob * (grad_out.to(acc) * (value_own.to(acc) - out.to(acc))).sum(-1)
        grad_query = scaling * grad_own_score[..., None] * key_own.to(acc)
        grad_key_own = scaling * grad_own_score[..., None] * query.to(acc)
        grad_value_own = own_prob[..., None] * grad_out.to(acc)
        grad_key = torch.zeros_like(key_stored, dtype=acc)
        grad_value = torch.zeros_like(value_stored, dtype=acc)
        for rows, cols, causal, block_lse, state in ctx.blocks:
            merged_lse = block_lse.clone()  # the kernel's layout, its rows replaced by the merged lse
            merged_lse[..., : rows.stop - rows.start] = lse[..., rows]
            grads = _attention_kernel_backward(
                grad_out[..., rows, :].contiguous(), query[..., rows, :].contiguous(),
                key_stored[..., cols, :].contiguous(), value_stored[..., cols, :].contiguous(),
                out[..., rows, :].contiguous(), merged_lse, state, causal, scaling,
            )
            grad_query[..., rows, :] += grads[0]
            grad_key[..., cols, :] += grads[1]
            grad_value[..., cols, :] += grads[2]
        return (
            grad_query.to(query.dtype), grad_key.to(key_stored.dtype), grad_value.to(value_stored.dtype),
            grad_key_own.to(key_own.dtype), grad_value_own.to(value_own.dtype), None,
        )


def poq_attention_fused(
    query: torch.Tensor,
    key_stored: torch.Tensor,
    value_stored: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    n_rep: int,
    poq: bool,
) -> torch.Tensor:
    """`poq_attention` for attention_mask None (causal) without a (B, H, T, S) score tensor: SDPA kernels
    (flash on CPU, memory-efficient on CUDA) over the stored keys j < past + i, merged with the own key's term.
    Under autocast the inputs are cast to the autocast dtype, as the eager matmuls are. Returns (B, T, H, D)."""
    if attention_mask is not None:
        raise ValueError("poq_attention_fused supports causal attention only (attention_mask None)")
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    past = key_stored.shape[-2] - query.shape[-2]
    keys, values = repeat_kv(key_stored.to(dtype), n_rep), repeat_kv(value_stored.to(dtype), n_rep)
    if poq:
        key_own, value_own = repeat_kv(key_new.to(dtype), n_rep), repeat_kv(value_new.to(dtype), n_rep)
    else:
        key_own, value_own = keys[..., past:, :], values[..., past:, :]
    out = _MergedAttention.apply(query.to(dtype), keys, values, key_own, value_own, scaling)
    return out.transpose(1, 2).contiguous()


KEY, VALUE = "key", "value"  # which of K~ / V~ a KVQuantizer is given (engines may treat them differently)
QUERY = "query"  # the query, as the engine rounds it for its dot products with the stored K~
SMOOTHING_PARAMETERS = ("k_scale", "k_shift", "v_scale", "v_shift")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class KVQuantizer(Protocol):
    """What an engine computes on the smoothed K~ or V~ (`kind` KEY or VALUE; (B, H_kv, T, D)) of the tokens at
    positions past.. as it stores them: their fake-quantized values; and (`kind` QUERY; (B, H, T, D)) on the query
    it multiplies with them. A target (`wkvq_core.targets`) supplies one."""

    def __call__(self, x: torch.Tensor, past: int, kind: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class PerTokenKV:
    """Asymmetric per token and KV head, in groups of `group_size` channels (None: the head), the first
    `sink_tokens` of a sequence kept in full precision: what `WKVQuantCache` stores."""

    bits: int
    group_size: int | None
    sink_tokens: int = 0

    def __call__(self, x: torch.Tensor, past: int, kind: str) -> torch.Tensor:
        if kind == QUERY:
            return x
        keep = min(max(self.sink_tokens - past, 0), x.shape[-2])
        quantized = fake_quant_per_token(x[..., keep:, :], self.bits, self.group_size)
        return torch.cat([x[..., :keep, :], quantized], dim=-2) if keep else quantized


class ChannelRange:
    """Running per-channel min/max of K~/V~ over calibration tokens, per KV head: (n_kv_heads, head_dim)."""

    def __init__(self) -> None:
        self.kmin = self.kmax = self.vmin = self.vmax = None

    @staticmethod
    def _update(lo, hi, x: torch.Tensor):
        x = x.detach().transpose(0, 1).flatten(1, 2)  # (H_kv, B*T, D)
        xl, xh = x.amin(dim=1), x.amax(dim=1)
        return (xl, xh) if lo is None else (torch.minimum(lo, xl), torch.maximum(hi, xh))

    def observe(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.kmin, self.kmax = self._update(self.kmin, self.kmax, key)
        self.vmin, self.vmax = self._update(self.vmin, self.vmax, value)


class WKVAttention(nn.Module):
    """Drop-in replacement for a LLaMA/Mistral attention module: fake-quantized projections, 2D KV smoothing,
    per-token KV quantization and POQ. Works with and without a transformers `Cache` (which then stores the
    quantized K~/V~). Switches: `kv_quant`, `poq`, `smoothing`, and `weight_quant` on each projection;
    `attention_backend` "sdpa" runs `poq_attention_fused` where it applies (no mask, no cache), "eager" never.
    rotary: the model's rotary embedding, needed with `k_pre_rope` to rotate cached keys. kv_quantizer: what the
    engine that runs the KV cache computes; POQ only where that engine does it (`engine_poq`).
    k_folded: the K smoothing is one scale per rotary pair (channels i and i + D/2, which RoPE mixes), with no
    shift, folded into q_proj (times s) and k_proj (divided by s) before their weights are quantized, as an engine
    without per-channel K scales runs it; otherwise a scale and shift per channel on K after RoPE (q times s)."""

    def __init__(
        self, attn: nn.Module, weight_cfg: WeightQuantConfig, kv_cfg: KVQuantConfig, kv_quantizer: KVQuantizer,
        engine_poq: bool, act_bits: int = FP_BITS, rotary: nn.Module | None = None, k_folded: bool = False,
    ) -> None:
        super().__init__()
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.n_rep = attn.num_key_value_groups
        self.n_kv_heads = attn.k_proj.out_features // self.head_dim
        group = kv_cfg.group_size or self.head_dim
        if self.head_dim % group:
            raise ConfigError(f"kv_group_size {kv_cfg.group_size} does not divide head_dim {self.head_dim}")
        if kv_cfg.rotate and self.head_dim & (self.head_dim - 1):
            raise ConfigError(f"kv rotate needs a power-of-two head_dim; this model has {self.head_dim}")
        if kv_cfg.k_pre_rope and rotary is None:
            raise ConfigError("k_pre_rope needs the model's rotary embedding")
        if k_folded and kv_cfg.k_pre_rope:
            raise ConfigError("a K smoothing folded into q_proj / k_proj applies before RoPE already: no k_pre_rope")
        for name in ATTENTION_PROJECTIONS:
            setattr(self, name, QuantLinear(getattr(attn, name), weight_cfg, act_bits))
        shape = (self.n_kv_heads, self.head_dim)
        dtype = attn.k_proj.weight.dtype
        self.k_scale = nn.Parameter(torch.ones(shape, dtype=dtype))
        self.k_shift = nn.Parameter(torch.zeros(shape, dtype=dtype))
        self.v_scale = nn.Parameter(torch.ones(shape, dtype=dtype))
        self.v_shift = nn.Parameter(torch.zeros(shape, dtype=dtype))
        self.kv_bits = kv_cfg.bits
        self.smoothing = self.smoothing_configured = kv_cfg.smoothing
        self.poq = kv_cfg.poq and engine_poq
        self.kv_quantizer = kv_quantizer
        self.k_pre_rope, self.sink_tokens, self.fp_prefill = kv_cfg.k_pre_rope, kv_cfg.sink_tokens, kv_cfg.fp_prefill
        self.register_buffer("rotation", hadamard(self.head_dim, dtype) if kv_cfg.rotate else None, persistent=False)
        self._rotary = [rotary]  # a list: a reference, not a submodule of this layer
        self.k_folded = k_folded
        self.v_scaled = kv_cfg.smooth_v_scale
        self.smoothing_folded = False  # True when the projections already hold the smoothing (a loaded artifact)
        self.kv_quant = kv_cfg.enabled
        self.attention_backend = "eager"
        self.observer: ChannelRange | None = None

    def smoothing_parameter_names(self) -> tuple[str, ...]:
        fixed = ("k_shift",) * self.k_folded + ("v_scale",) * (not self.v_scaled)
        return tuple(name for name in SMOOTHING_PARAMETERS if name not in fixed)

    def smoothing_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in self.smoothing_parameter_names()]

    @torch.no_grad()
    def init_smoothing_(self, stats: ChannelRange, alpha: float) -> None:
        """shift = channel mid-range; scale = half-range ** alpha, normalised to geometric mean 1. With `k_folded`,
        K's scale is its rotary pair's larger half-range ** alpha, and no shift."""
        for scale, shift, lo, hi in (
            (self.k_scale, self.k_shift, stats.kmin, stats.kmax),
            (self.v_scale, self.v_shift, stats.vmin, stats.vmax),
        ):
            half = ((hi - lo) / 2).clamp(min=1e-5)
            if scale is self.k_scale and self.k_folded:
                pair = torch.maximum(*half.chunk(2, dim=-1))
                half = torch.cat([pair, pair], dim=-1)
            else:
                shift.copy_((hi + lo) / 2)
            if scale is self.v_scale and not self.v_scaled:
                continue
            half = half**alpha
            scale.copy_(half / half.log().mean().exp())

    def key_scale(self) -> torch.Tensor:
        """K's smoothing scale (n_kv_heads, head_dim); with `k_folded`, tied per rotary pair: the mean of the two
        channels' parameters, so both get the same gradient and, initialised equal, stay equal."""
        if not self.k_folded:
            return self.k_scale
        pair = sum(self.k_scale.chunk(2, dim=-1)) / 2
        return torch.cat([pair, pair], dim=-1)

    def projection(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of a projection with the smoothing folded in (when on): V's into v_proj / o_proj, and with
        `k_folded` K's into k_proj / q_proj."""
        proj = getattr(self, name)
        if not self.folds(name):
            return proj.weight, proj.bias
        if name in ("q_proj", "k_proj"):
            scale = self.key_scale()
            scale = (scale.repeat_interleave(self.n_rep, dim=0) if name == "q_proj" else 1 / scale).reshape(-1)
            return proj.weight * scale[:, None], None if proj.bias is None else proj.bias * scale
        if name == "v_proj":
            scale, shift = self.v_scale.reshape(-1), self.v_shift.reshape(-1)
            bias = -shift if proj.bias is None else proj.bias - shift
            return proj.weight / scale[:, None], bias / scale
        scale = self.v_scale.repeat_interleave(self.n_rep, dim=0).reshape(-1)
        shift = self.v_shift.repeat_interleave(self.n_rep, dim=0).reshape(-1)
        bias = proj.weight @ shift
        return proj.weight * scale[None, :], bias if proj.bias is None else proj.bias + bias

    def folds(self, name: str) -> bool:
        """Whether `name`'s weights get the smoothing folded in on the fly."""
        folded = ATTENTION_PROJECTIONS if self.k_folded else ("v_proj", "o_proj")
        return self.smoothing and not self.smoothing_folded and name in folded

    def _project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        proj = getattr(self, name)
        if self.folds(name) and proj.frozen_weight is None:
            return proj.linear(x, *self.projection(name))
        return proj(x)

    def _quant(self, x: torch.Tensor, past: int, kind: str) -> torch.Tensor:
        """K~ or V~ (`kind`; (B, H_kv, T, D)) of the tokens at positions past.. as the KV cache's engine stores them,
        or the query as it multiplies it with K~."""
        return self.kv_quantizer(x, past, kind) if self.kv_quant else x

    def _rotate(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if self.rotation is None:
            return x
        rotation = self.rotation.to(x)
        return x @ (rotation.T if inverse else rotation)

    def _stored_positions(self, position_ids: torch.Tensor | None, past: int, start: int, stored: torch.Tensor):
        """cos / sin of the stored tokens start.. (as many as `stored` holds), the new ones ending at
        `position_ids` (the `past` stored tokens before them directly precede them)."""
        first = 0 if position_ids is None else position_ids[:, :1] - past
        positions = first + torch.arange(start, start + stored.shape[-2], device=stored.device)[None]
        return self._rotary[0](stored, positions)

    def _pre_rope_keys(self, stored: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Stored (dequantized) K~ of `k_pre_rope` as the attention uses it: unrotated, unsmoothed, RoPE-rotated."""
        key = self._rotate(stored, inverse=True)
        if self.smoothing:
            key = key * self.k_scale[:, None] + self.k_shift[:, None]
        return key * cos.unsqueeze(1) + rotate_half(key) * sin.unsqueeze(1)

    def _stored_key_transform(self, position_ids: torch.Tensor | None, past: int):
        """For `k_pre_rope`: stored K~ (B, H_kv, n, D) from stored position `start` -> `_pre_rope_keys`, one chunk
        at a time (`packed_decode_attention`)."""
        def transform(stored: torch.Tensor, start: int) -> torch.Tensor:
            return self._pre_rope_keys(stored, *self._stored_positions(position_ids, past, start, stored))

        return transform

    def _keys_for_attention(self, stored: torch.Tensor, position_embeddings, position_ids, past: int):
        """Keys as the attention uses them, from the stored (dequantized) K~: with `k_pre_rope`, `_pre_rope_keys`
        at their positions; otherwise K~ itself (scores use q * s_k)."""
        if not self.k_pre_rope:
            return stored
        cos, sin = position_embeddings if past == 0 else self._stored_positions(position_ids, past, 0, stored)
        return self._pre_rope_keys(stored, cos, sin)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values  # transformers 5.24 passes `cache=`, 5.23 the old name
        bsz, t_new, _ = hidden_states.shape
        shape = (bsz, t_new, -1, self.head_dim)
        query = self._project("q_proj", hidden_states).view(shape).transpose(1, 2)
        key = self._project("k_proj", hidden_states).view(shape).transpose(1, 2)
        value = self._project("v_proj", hidden_states).view(shape).transpose(1, 2)
        roped_query, roped_key = apply_rotary_pos_emb(query, key, *position_embeddings)
        query, key = (roped_query, key) if self.k_pre_rope else (roped_query, roped_key)
        if self.smoothing and not self.k_folded:
            key = (key - self.k_shift[:, None]) / self.k_scale[:, None]
            if not self.k_pre_rope:
                query = query * self.k_scale.repeat_interleave(self.n_rep, dim=0)[:, None]
        if self.observer is not None:  # sink tokens stay unquantized: their outliers must not set the smoothing
            self.observer.observe(key[..., self.sink_tokens :, :], value[..., self.sink_tokens :, :])
        key, value = self._rotate(key), self._rotate(value)
        if not self.k_pre_rope:
            query = self._rotate(query)
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        query = self._quant(query, past, QUERY)
        if getattr(cache, "stores_packed", False):  # the cache quantizes and packs
            if cache.layers[self.layer_idx].sink_tokens != self.sink_tokens:
                raise ConfigError(f"the cache keeps {cache.layers[self.layer_idx].sink_tokens} sink tokens unquantized, "
                                  f"the model {self.sink_tokens}: WKVQuantCache(config, sink_tokens={self.sink_tokens})")
            if t_new == 1:  # a decode step: attention straight from the packed records
                transform = self._stored_key_transform(position_ids, past) if self.k_pre_rope else None
                out = cache.layers[self.layer_idx].update_and_attend(
                    query, key, value, attention_mask, self.scaling, poq=self.poq and self.kv_quant,
                    key_transform=transform, own_key=roped_key if self.k_pre_rope else None)
                return self._project("o_proj", self._rotate(out, inverse=True).reshape(bsz, t_new, -1)), None
            key_stored, value_stored = cache.update(key, value, self.layer_idx)
        else:
            key_stored, value_stored = self._quant(key, past, KEY), self._quant(value, past, VALUE)
            if cache is not None:
                key_stored, value_stored = cache.update(key_stored, value_stored, self.layer_idx)
        key_stored = self._keys_for_attention(key_stored, position_embeddings, position_ids, past)
        key_new = roped_key if self.k_pre_rope else key
        poq = self.poq and self.kv_quant
        if self.fp_prefill and cache is not None and t_new > 1:  # the prefill's tokens see each other unquantized
            key_stored = torch.cat([key_stored[..., :past, :], key_new], dim=-2)
            value_stored = torch.cat([value_stored[..., :past, :], value], dim=-2)
            poq = False
        fused = self.attention_backend == "sdpa" and attention_mask is None and cache is None
        out = (poq_attention_fused if fused else poq_attention)(
            query, key_stored, value_stored, key_new, value, attention_mask, self.scaling, self.n_rep, poq=poq,
        )
        out = self._rotate(out, inverse=True)
        return self._project("o_proj", out.reshape(bsz, t_new, -1)), None


def set_attention_backend(module: nn.Module, backend: str) -> None:
    """Set `attention_backend` ("eager" | "sdpa") on every `WKVAttention` under `module`."""
    if backend not in ATTENTION_KERNELS:
        raise ConfigError(f"attention backend must be one of {', '.join(ATTENTION_KERNELS)}; got {backend!r}")
    for attn in module.modules():
        if isinstance(attn, WKVAttention):
            attn.attention_backend = backend
