"""vLLM serving a compressed-tensors W4A16 export (`export.vllm`) with `--kv-cache-dtype int4_per_token_head`.

What vLLM 0.32.0 computes on one layer's K / V in that mode (vllm/v1/attention/ops/int4_per_token_head.py; the
Triton backend, GPU only), for a bf16 model on CUDA sm80+ (Hadacore), the path emulated here:
- write (`reshape_and_cache_int4`), every new token before attention: K (after RoPE) and V per KV head rotated by a
  randomized Hadamard transform `single_rht`: y = H_b (x * s), s one global +-1 vector (torch.Generator("cpu")
  seeded 0x9E3779B9, 2 * bernoulli(0.5) - 1), H_b the unnormalized Sylvester matrix of b = the largest power-of-two
  divisor of head_dim, block-diagonal when b < head_dim; Hadacore (`hadacore`) rounds its input to bf16 and
  returns about x H_b / sqrt(b) in bf16, computed in stages that round to bf16, which is multiplied by sqrt(b) in
  fp32 and cast to the model dtype (bf16);
- then per (token, KV head), in fp32: scale = max((max - min) / 15, 1e-6), zp = clamp(round(-min / scale), 0, 15),
  codes = clamp(round(x * (1 / scale) + zp), 0, 15), rounding halves away from zero (C casts of v +- 0.5), the
  x * inv + zp fused (FMA); the fp32 scale is stored with its 4 low mantissa bits replaced by zp, so the reader's
  scale is `bits & -16`: value = (code - zp) * truncated scale;
- read (`unified_attention_int4`): Q rotated the same way (cast to the model dtype), scores q_r . k_r times
  softmax_scale / b, output accumulated in the rotated space, rotated back (s * H_b out) and divided by b.
Every token attends to its own quantized K / V (the cache is written first): no POQ. Checkpoint KV scales are
ignored in this mode.

`VllmKV` is that on the K~ / V~ the attention hands it: rotate, quantize-dequantize, rotate back and divide by b,
so attention over the unrotated values equals the engine's (M M^T = b I for M = diag(s) H_b); the query likewise
(its bf16 rounding in the rotated space). Not emulated: the attention output's bf16 roundings (stored in the
rotated space, in the inverse transform's Hadacore stages, cast after it) and that transform's gain (0.99989 for
b = 32, 128), the TF32 rounding of the probabilities times V scales in the kernel's second dot product, Triton's
fp32 division (div.full.f32, within 2 ulp; IEEE here: it decides the codes that fall exactly on a rounding tie,
~0.2 % of codes and ~1 % of zero points on random data), and the rest of a bf16 model (we compute in fp32 with
bf16-rounded linear inputs, `matmul_input`).

Weights: compressed-tensors W{4,8}A16, asymmetric, groups vLLM's WNA16 kernels take; a bf16 model multiplies by the
scales in bf16, so they are calibrated with 8 significant bits (bf16's), exact in the export's fp16 and in bf16.
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
from .llamacpp import trunc_ste

INT4 = "int4_per_token_head"
AUTO = "auto"  # the model dtype: an unquantized cache
KV_CACHE_DTYPES = (AUTO, INT4)
BITS_OF_DTYPE = {AUTO: FP_BITS, INT4: 4}
SIGN_SEED = 0x9E3779B9
LEVELS = 15  # 4-bit codes 0..15
MIN_SCALE = 1e-6
WEIGHT_BITS = (4, 8, FP_BITS)
WEIGHT_GROUPS = (-1, 32, 64, 128)  # what vLLM's compressed-tensors WNA16 kernels (Marlin, CPU) take
WEIGHT_SCALE_BITS = 8  # bf16's significant bits
MIN_HEAD_DIM = 32  # TritonAttentionBackend.supports_head_size
REFUSED_KV_OPTIONS = RUNTIME_ONLY_KV_OPTIONS


def bf16_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bfloat16 (nearest even) in x's dtype; the gradient passes through."""
    return (x.detach().to(torch.bfloat16).to(x.dtype) - x).detach() + x


def round_half_away_ste(x: torch.Tensor) -> torch.Tensor:
    """The kernel's `where(v >= 0, (v + 0.5).to(int32), (v - 0.5).to(int32))` in fp32; identity backward."""
    return trunc_ste(torch.where(x.detach() >= 0, x + 0.5, x - 0.5))


def rht_block(dim: int) -> int:
    """b: the largest power-of-two divisor of head_dim (vLLM's `largest_power_of_2_divisor`)."""
    return dim & -dim


@lru_cache(maxsize=None)
def rht_signs(size: int) -> torch.Tensor:
    """vLLM's `_get_rht_signs(size, 0)`: the +-1 vector of one RHT block."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(SIGN_SEED)
    return 2.0 * torch.bernoulli(torch.full((size,), 0.5), generator=generator) - 1.0


def sylvester(size: int) -> torch.Tensor:
    """The unnormalized Sylvester Hadamard matrix of `size` (entries +-1), float64."""
    return (hadamard(size, torch.float64) * size**0.5).round()


@lru_cache(maxsize=None)
def rht_matrix(size: int) -> torch.Tensor:
    """M = diag(s) H_b (H_b unnormalized): a row vector x rotates to x @ M = H_b (x * s); M M^T = b I."""
    return rht_signs(size)[:, None] * sylvester(size).float()


def _blockwise(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    size = matrix.shape[0]
    return (x.reshape(*x.shape[:-1], x.shape[-1] // size, size) @ matrix.to(x.device)).reshape(x.shape)


# Hadacore (csrc/quantization/hadamard/hadacore/hadamard_transform_cuda.cu): one mma per 4 index bits of the row,
# lowest first (16 consecutive channels, then the next 4 bits, ...), products summed in fp32 and each stage's output
# rounded to bf16 (cvt.rn.bf16x2.f32); an n-point stage's +-entries are bf16 constants (bf16_1p), 1/sqrt(n) rounded:
# 1.1e-4 low for n = 2 and 8, so the transform's gain is 0.99989 for b = 32, 128, 512 ...
HADACORE_STAGE = 16
HADACORE_ENTRY = {2: 0.70703125, 4: 0.5, 8: 0.353515625, 16: 0.25}


@lru_cache(maxsize=None)
def hadacore_stages(n: int) -> tuple[torch.Tensor, ...]:
    """Hadacore's stages for rows of n as (n, n) matrices (x @ stage): the Sylvester matrix of the stage's size with
    bf16 entries +-1/sqrt(size), over the index bits above those the stages before it transformed."""
    stages, done = [], 1  # channels already transformed together
    while done < n:
        size = min(HADACORE_STAGE, n // done)
        stage = sylvester(size) * HADACORE_ENTRY[size]
        stages.append(torch.kron(torch.eye(n // (done * size), dtype=torch.float64),
                                 torch.kron(stage, torch.eye(done, dtype=torch.float64))).float())
        done *= size
    return tuple(stages)


def hadacore(x: torch.Tensor) -> torch.Tensor:
    """`hadacore_transform` of bf16 rows x (..., n), n a power of two: about x H_n / sqrt(n), in bf16 stages."""
    for stage in hadacore_stages(x.shape[-1]):
        x = bf16_ste(x @ stage.to(x.device))
    return x


def rotate(x: torch.Tensor) -> torch.Tensor:
    """`single_rht(x)` of a bf16 model on sm80+, in fp32: x rounded to bf16, times the signs, `hadacore` per block,
    rescaled by sqrt(b) in fp32 and cast to bf16."""
    size = rht_block(x.shape[-1])
    blocks = bf16_ste(x.float()).reshape(*x.shape[:-1], x.shape[-1] // size, size) * rht_signs(size).to(x.device)
    return bf16_ste(hadacore(blocks) * size**0.5).reshape(x.shape)


def rotate_back(y: torch.Tensor) -> torch.Tensor:
    """The inverse of the (unrounded) rotation: s * H_b y / b, in fp32."""
    size = rht_block(y.shape[-1])
    return _blockwise(y, rht_matrix(size).T) / size


def truncated_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as the reader takes it: its fp32 bits with the 4 low mantissa bits (the stored zp) cleared."""
    return (scale.detach().float().view(torch.int32) & -16).view(torch.float32)


def fake_quant_token_head(x: torch.Tensor) -> torch.Tensor:
    """The write kernel's asymmetric 4-bit quantization of each row (one token's head) of fp32 `x`, dequantized as
    the reader computes it; differentiable (straight-through roundings, the scale's truncation passed through)."""
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = torch.clamp((high - low) / LEVELS, min=MIN_SCALE)
    zp = round_half_away_ste(-low / scale).clamp(0, LEVELS)
    inverse = 1.0 / scale
    fused = x * inverse + zp  # the kernel's x * inv + zp is one FMA: a single rounding, emulated in fp64
    fused = fused + ((x.detach().double() * inverse.detach().double() + zp.detach().double()).float()
                     - fused.detach())
    codes = round_half_away_ste(fused).clamp(0, LEVELS)
    read_scale = scale + (truncated_scale(scale) - scale.detach())
    return (codes - zp) * read_scale


@dataclass(frozen=True)
class VllmKV:
    """K~ / V~ as vLLM's int4_per_token_head cache stores them, and the query as it multiplies them, returned in the
    unrotated space divided by b (see the module docstring) and in x's dtype. Differentiable."""

    def __call__(self, x: torch.Tensor, past: int, kind: str) -> torch.Tensor:
        if kind not in (KEY, VALUE, QUERY):
            raise ValueError(f"kind must be {KEY!r}, {VALUE!r} or {QUERY!r}; got {kind!r}")
        rotated = rotate(x)
        if kind != QUERY:
            rotated = fake_quant_token_head(rotated)
        return rotate_back(rotated).to(x.dtype)


def cache_dtype(kv: KVQuantConfig) -> str:
    """vLLM's --kv-cache-dtype for a KV config: its cache_type, else int4_per_token_head (kv_bits 4) or auto (16)."""
    return named_cache_type(kv, BITS_OF_DTYPE, {bits: name for name, bits in BITS_OF_DTYPE.items()}, "vLLM", "vllm")


def bytes_per_head(kv_dtype: str, dim: int) -> float:
    """Cache bytes of one token's K (or V) of one KV head: int4, two codes a byte and an fp32 scale (the zp in its
    low bits); auto, the bf16 model dtype."""
    return dim / 2 + 4 if kv_dtype == INT4 else 2 * dim


def kv_quantizer(kv: KVQuantConfig) -> VllmKV:
    """vLLM's int4_per_token_head cache; options it does not compute are refused."""
    cache_dtype(kv)
    if kv.group_size is not None:
        raise ConfigError(f"vLLM's {INT4} cache quantizes each token's whole head: kv_group_size must be unset; got "
                          f"{kv.group_size}")
    refuse_kv_options(kv, REFUSED_KV_OPTIONS, f"vLLM's {INT4} cache", "vllm")
    return VllmKV()


def check(config: WKVQuantConfig, model_config: dict[str, Any] | None = None) -> None:
    """What vLLM serves from a compressed-tensors export: W4A16 / W8A16 asymmetric in groups its kernels take (or
    unquantized weights), no activation quantization, its int4_per_token_head (or unquantized) KV cache; given the
    model's config.json, a head_dim that cache packs and linear inputs in whole groups."""
    kv_quantizer(config.kv)
    weight = config.weight
    if weight.bits not in WEIGHT_BITS:
        raise ConfigError(f"the vllm target writes compressed-tensors W4A16 or W8A16 weights (or keeps them "
                          f"unquantized, 16); got w_bits {weight.bits}")
    if weight.enabled and weight.group_size not in WEIGHT_GROUPS:
        raise ConfigError(f"vLLM's compressed-tensors WNA16 kernels take group_size "
                          f"{', '.join(map(str, WEIGHT_GROUPS))}; got {weight.group_size}")
    if config.act_bits != FP_BITS:
        raise ConfigError(f"the vllm target's export is weight-only (A16): use act_bits 16, not {config.act_bits}")
    if model_config is None:
        return
    dim = head_dim(model_config)
    if dim < MIN_HEAD_DIM:
        raise ConfigError(f"vLLM's Triton attention backend (which holds its {INT4} cache) needs head_dim >= "
                          f"{MIN_HEAD_DIM}; this model's is {dim}")
    if config.kv.enabled and dim % 2:
        raise ConfigError(f"vLLM's {INT4} cache packs two 4-bit values per byte: head_dim must be even; this model's "
                          f"is {dim}")
    if weight.enabled and weight.group_size != -1:
        for name, size in linear_inputs(model_config).items():
            if size % weight.group_size:
                raise ConfigError(f"group_size {weight.group_size} does not divide the model's {name} ({size})")


TARGET = Target(name="vllm", summary=f"vLLM (compressed-tensors W4A16): its {INT4} KV cache, randomized-Hadamard "
                                     "rotated, per token and head, no POQ",
                kv_quantizer=kv_quantizer, poq=False, export="vllm", check=check,
                refused_kv_options=REFUSED_KV_OPTIONS, k_smoothing_folded=True, weight_scale_bits=WEIGHT_SCALE_BITS,
                matmul_input=bf16_ste, cache_type=cache_dtype,
                # as under llama.cpp's rotation, a smoothing started from calibration statistics quantizes worse
                # than the rotation alone, one trained from the identity better (SmolLM2, benchmarks/RESULTS.md)
                recommended_kv={"smooth_init": "identity"})
