"""llama.cpp (a GGUF model): the KV cache as llama.cpp stores it, in q4_0, q4_1 or q8_0 blocks (or f16).

What llama.cpp computes on one layer's K / V (src/llama-graph.cpp build_attn, src/llama-kv-cache.cpp):
- with a quantized cache type and head_dim % 64 == 0 (and LLAMA_ATTN_ROT_DISABLE unset), Q and K after RoPE are
  multiplied by a block-diagonal orthonormal Sylvester Hadamard matrix, blocks of the largest power of two >= 64
  that divides head_dim, and V by one of blocks of 64; the attention output is multiplied by V's matrix again
  (H @ H = I) before o_proj;
- the new tokens' K / V are written to the cache (ggml_set_rows: quantize_row_*_ref arithmetic, blocks of 32
  consecutive channels of one head per token), then every query attends to the cache's dequantized K / V,
  its own token's included: no POQ;
- the query is rounded to the quantized K type's vec_dot type (Q8_0 / Q8_1 blocks of 32; F16 for an f16 cache)
  for its dot products with K (ggml-cpu's flash attention: q_to_vec_dot; the mul_mat path converts it the same).
`LlamaCppKV` is that on the K~ / V~ the attention hands it: rotate, quantize-dequantize, rotate back. The rotation is
orthonormal, so attention over the unrotated dequantized K / V equals the engine's over rotated Q, K, V, with the
output rotated back (up to fp32 rounding of the rotations, whose summation order is the backend's).

Channel order: llama.cpp's llama graph uses interleaved rotary pairs, so its K rows come permuted (convert_hf_to_gguf's
`LlamaModel.permute`, `export.gguf.permute_rotary`): per head it stores [k_0, k_{D/2}, k_1, k_{D/2+1}, ...] where HF
has [k_0 .. k_{D/2-1} | k_{D/2} .. k_{D-1}]. Its blocks of 32 and its rotation run over that order; `LlamaCppKV` takes
K in HF's order, reorders, and orders the result back (V and Q's dot products are unaffected).

The attention must hand it what llama.cpp stores: K after RoPE (`k_pre_rope` off), no rotation of its own
(`rotate` off), no full-precision sink tokens or prefill; `kv_quantizer` rejects those options.

Bit-exactness: the block arithmetic on fp32 input equals ggml-quants.c's quantize_row_{q4_0,q4_1,q8_0}_ref with
dequantize_row_*; that is what the CPU backend writes for q4_0 / q4_1, and the CUDA one (cpy-utils.cuh) for all
three up to fused multiply-adds. The CPU backend's x86 quantize_row_q8_0 differs: id = 127 / amax and
round-half-to-even, so a q8_0 code can differ by one in rare ties. The query's rounding is that x86 one. Not
emulated: the rest of the attention's own arithmetic (fp16 accumulations, its softmax).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ..config import FP_BITS, KVQuantConfig, WKVQuantConfig, head_dim, linear_inputs
from ..errors import ConfigError
from ..quant.kv_quant import KEY, QUERY, VALUE
from ..quant.primitives import hadamard
from .base import RUNTIME_ONLY_KV_OPTIONS, Target, named_cache_type, refuse_kv_options

BLOCK = 32  # QK4_0 = QK4_1 = QK8_0
Q8_1_BLOCK = 32  # QK8_1
MIN_ROTATION = 64
QUANTIZED_TYPES = ("q4_0", "q4_1", "q8_0")
KV_TYPES = ("f16", *QUANTIZED_TYPES)
TYPE_FOR_BITS = {4: "q4_0", 8: "q8_0", FP_BITS: "f16"}


def trunc_ste(x: torch.Tensor) -> torch.Tensor:
    """C's float -> integer conversion (toward zero) in the forward pass, identity in the backward pass."""
    return (x.trunc() - x).detach() + x


def roundf_ste(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero; exact: |x| + 0.5 would round) forward, identity backward."""
    magnitude = x.detach().abs()
    whole = magnitude.floor()
    rounded = torch.copysign(whole + (2 * (magnitude - whole)).floor(), x.detach())
    return (rounded - x).detach() + x


def q8_1_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded as ggml's x86 quantize_row_q8_1 rounds a Q4_1 matmul's input (ggml's vec_dot type for Q4_1) along
    its last dim: blocks of 32, codes round-half-even(x * 127 / amax), value code * fp16(amax / 127); in x's dtype,
    the gradient passed straight through. Left out: the fp16 rounding of the block sums that multiply Q4_1's m."""
    blocks = x.detach().float().reshape(*x.shape[:-1], -1, Q8_1_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax == 0, 0.0, 127 / torch.where(amax == 0, 1.0, amax))
    rounded = (torch.round(blocks * inverse) * (amax / 127).half().float()).reshape(x.shape).to(x.dtype)
    return (rounded - x).detach() + x


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """`d ? 1.0f/d : 0.0f`, with a finite gradient where d is 0."""
    zero = d == 0
    return torch.where(zero, 0.0, 1 / torch.where(zero, 1.0, d))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 then back to fp32 (round to nearest even); the gradient passes through."""
    return x.to(torch.float16).to(torch.float32)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    index = blocks.detach().abs().argmax(dim=-1, keepdim=True)  # the first of equal |v|, as the C loop keeps
    signed_max = blocks.gather(-1, index)
    d = signed_max / -8
    codes = trunc_ste(blocks * _inverse(d) + 8.5).clamp(max=15)
    return (codes - 8) * _fp16(d)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    low, high = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)
    d = (high - low) / 15
    codes = trunc_ste((blocks - low) * _inverse(d) + 0.5).clamp(max=15)
    return codes * _fp16(d) + _fp16(low)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    return roundf_ste(blocks * _inverse(d)) * _fp16(d)


BLOCK_FAKE_QUANT = {"q4_0": _q4_0, "q4_1": _q4_1, "q8_0": _q8_0}


def fake_quant_blocks(x: torch.Tensor, kv_type: str) -> torch.Tensor:
    """Quantize-dequantize x along its last dim in llama.cpp's blocks of 32, in fp32; returned in fp32."""
    if x.shape[-1] % BLOCK:
        raise ConfigError(f"llama.cpp's {kv_type} KV cache needs head_dim divisible by {BLOCK}; got {x.shape[-1]}")
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    return BLOCK_FAKE_QUANT[kv_type](blocks).reshape(x.shape)


def rotation_size(head_dim: int, kind: str) -> int | None:
    """The Hadamard block llama.cpp rotates K or V with for a quantized cache (build_input_k_rot / _v_rot); None: no
    rotation (head_dim % 64 != 0)."""
    if head_dim % MIN_ROTATION:
        return None
    if kind == VALUE:
        return MIN_ROTATION
    size = MIN_ROTATION
    while head_dim % (2 * size) == 0:
        size *= 2
    return size


@lru_cache(maxsize=None)
def rotation_matrix(size: int) -> torch.Tensor:
    """llama.cpp's fp32 Hadamard matrix of `size` (ggml_gen_hadamard: Sylvester, entries +-1 / sqrt(size))."""
    return hadamard(size, torch.float32)


def block_rotate(x: torch.Tensor, size: int) -> torch.Tensor:
    """x (..., D) times the block-diagonal Hadamard matrix of blocks `size` (symmetric: its own inverse)."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
    return (blocks @ rotation_matrix(size).to(x.device)).reshape(x.shape)


def interleave_pairs(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """HF's rotate_half channel order along `dim` (one head's channels) -> llama.cpp's interleaved rotary pairs."""
    dim %= x.dim()
    return x.unflatten(dim, (2, x.shape[dim] // 2)).transpose(dim, dim + 1).flatten(dim, dim + 1)


def deinterleave_pairs(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `interleave_pairs`."""
    return x.unflatten(-1, (x.shape[-1] // 2, 2)).transpose(-1, -2).flatten(-2)


@dataclass(frozen=True)
class LlamaCppKV:
    """K~ / V~ as llama.cpp stores them in a `kv_type` cache, with its Hadamard rotation (`rotate`) where it applies;
    computed in fp32 and returned in x's dtype. Differentiable: C's rounding passes gradients straight through."""

    kv_type: str
    rotate: bool = True

    def __call__(self, x: torch.Tensor, past: int, kind: str) -> torch.Tensor:
        if kind not in (KEY, VALUE, QUERY):
            raise ValueError(f"kind must be {KEY!r}, {VALUE!r} or {QUERY!r}; got {kind!r}")
        if self.kv_type == "f16":  # not a quantized type: llama.cpp does not rotate
            return x.float().to(torch.float16).to(x.dtype)
        if kind == QUERY:  # rounded to the K type's vec_dot type (Q8_0 / Q8_1: the same values), in K's layout
            return self._in_engine_layout(x, KEY, q8_1_round)
        return self._in_engine_layout(x, kind, lambda blocks: fake_quant_blocks(blocks, self.kv_type))

    def _in_engine_layout(self, x: torch.Tensor, kind: str, fn) -> torch.Tensor:
        """`fn` applied in fp32 where llama.cpp applies it: K in its interleaved rotary order, rotated by K's (or V's)
        Hadamard blocks when `rotate`; the result back in x's order and dtype."""
        size = rotation_size(x.shape[-1], kind) if self.rotate else None
        x32 = interleave_pairs(x.float()) if kind == KEY else x.float()
        out = fn(x32) if size is None else block_rotate(fn(block_rotate(x32, size)), size)
        return (deinterleave_pairs(out) if kind == KEY else out).to(x.dtype)


def kv_quantizer_for(kv_type: str, rotate: bool = True) -> LlamaCppKV:
    """llama.cpp's cache of `kv_type` (--cache-type-k / -v); rotate False: LLAMA_ATTN_ROT_DISABLE=1."""
    if kv_type not in KV_TYPES:
        raise ConfigError(f"llama.cpp KV cache type must be one of {', '.join(KV_TYPES)}; got {kv_type!r}")
    return LlamaCppKV(kv_type, rotate)


REFUSED_KV_OPTIONS = RUNTIME_ONLY_KV_OPTIONS
BITS_OF_TYPE = {"f16": FP_BITS, "q4_0": 4, "q4_1": 4, "q8_0": 8}
WEIGHT_BITS = (4, FP_BITS)  # Q4_1 blocks, or the weights unquantized
# Q4_1 stores d = scale and m = -(zero + k) * scale in fp16 (11 significant bits): with 7-bit scales and |zero + k|
# <= 15 (4 bits) every m is an fp16 number, so every block is exact (export.gguf)
WEIGHT_SCALE_BITS = 7


def cache_type(kv: KVQuantConfig) -> str:
    """The llama.cpp cache type (-ctk / -ctv) of a KV config: its cache_type, else q4_0, q8_0 or f16 by bits."""
    return named_cache_type(kv, BITS_OF_TYPE, TYPE_FOR_BITS, "llama.cpp", "llamacpp")


def kv_quantizer(kv: KVQuantConfig) -> LlamaCppKV:
    """The cache type of `cache_type(kv)` with the engine's default rotation; options llama.cpp does not compute
    are refused."""
    kv_type = cache_type(kv)
    if kv.group_size not in (None, BLOCK):
        raise ConfigError(f"llama.cpp quantizes the KV cache in blocks of {BLOCK}; got kv_group_size {kv.group_size}")
    refuse_kv_options(kv, REFUSED_KV_OPTIONS, "llama.cpp's KV cache", "llamacpp")
    return kv_quantizer_for(kv_type)


def check(config: WKVQuantConfig, model_config: dict[str, Any] | None = None) -> None:
    """What a GGUF for llama.cpp can hold: 4-bit weights in groups of whole 32-blocks (or unquantized weights),
    no activation quantization, a KV cache llama.cpp computes; and, given the model's config.json, a head_dim and
    linear inputs in whole blocks."""
    kv_quantizer(config.kv)
    if model_config is not None:
        dim = head_dim(model_config)
        if config.kv.enabled and dim % BLOCK:
            raise ConfigError(f"llama.cpp's {cache_type(config.kv)} KV cache needs head_dim divisible by {BLOCK}; "
                              f"this model's is {dim}")
        if config.weight.enabled and config.weight.group_size == -1:
            for name, size in linear_inputs(model_config).items():
                if size % BLOCK:
                    raise ConfigError(f"group_size -1 (one group per row) needs the model's {name} ({size}) to be "
                                      f"a multiple of {BLOCK} for Q4_1 blocks")
    weight = config.weight
    if weight.bits not in WEIGHT_BITS:
        raise ConfigError(f"the llamacpp target writes 4-bit weights as Q4_1 blocks (or keeps them unquantized, 16); "
                          f"got w_bits {weight.bits}")
    if weight.enabled and weight.group_size != -1 and weight.group_size % BLOCK:
        raise ConfigError(f"the llamacpp target needs group_size a multiple of {BLOCK} (Q4_1 blocks) or -1; "
                          f"got {weight.group_size}")
    if config.act_bits != FP_BITS:
        raise ConfigError(f"llama.cpp does not quantize activations to {config.act_bits} bits: use act_bits 16 with "
                          "the llamacpp target")


TARGET = Target(name="llamacpp", summary="llama.cpp (GGUF): q4_0 / q4_1 / q8_0 KV cache blocks, Hadamard-rotated, "
                                         "no POQ",
                kv_quantizer=kv_quantizer, poq=False, export="gguf", check=check,
                refused_kv_options=REFUSED_KV_OPTIONS, k_smoothing_folded=True, weight_scale_bits=WEIGHT_SCALE_BITS,
                matmul_input=q8_1_round, cache_type=cache_type,
                # smoothing from calibration statistics, then llama.cpp's rotation, quantizes worse than the rotation
                # alone; trained from the identity it beats it (SmolLM2, benchmarks/RESULTS.md)
                recommended_kv={"smooth_init": "identity"})
