"""An independent reference of vLLM 0.32.0's `kv_cache_dtype="int4_per_token_head"` attention, written from the
kernel source (vllm/v1/attention/ops/int4_per_token_head.py; line numbers below are that file's) and from Hadacore's
CUDA source (csrc/quantization/hadamard/hadacore/hadamard_transform_cuda.cu), in numpy, one token and one head at a
time. It shares no code with `wkvq_core.targets.vllm`, which the tests check against it.

Path: a bf16 model on CUDA sm80+ (tier 1 of fast_hadamard_transform: Hadacore), the 2D launch without sinks, ALiBi,
softcap, sliding window or FP8 output. One sequence, no paged blocks: token i's K / V are written to the cache,
then query i attends to the cached tokens 0..i (the engine writes before it attends: no POQ).

Write path, per token and KV head (`write_token`):
- 867-868 `single_rht(key.float()).to(key.dtype)`: the bf16 K rotated in fp32 and cast back to bf16;
- 1146-1167 `single_rht`: blocks of b = the largest power-of-two divisor of D, each `fast_hadamard_transform(x * s)`
  with one sign vector s of length b (1132-1143: CPU generator seeded 0x9E3779B9, 2 * bernoulli(0.5) - 1);
- 1094-1103 tier 1: x cast to bf16, `hadacore_transform` (bf16 out), cast to fp32, times fp32(sqrt(b));
- Hadacore (`hadacore`): a 16-point mma over each 16 consecutive channels, then an mma over the remaining
  log2(b) - 4 index bits; the +-entries of an n-point stage are bf16 constants (bf16_1p: 0.70703125, 0.5,
  0.353515625, 0.25 for n = 2, 4, 8, 16: 1/sqrt(n) rounded to bf16), products summed in fp32 and each stage's
  output rounded to bf16 (cvt.rn.bf16x2.f32); sizes up to 256 take one such pass;
- 117-170 (K; 186-244 V the same): fp32 min / max over the head; scale = max((max - min) / 15, 1e-6);
  zp = clamp(trunc(-min / scale +- 0.5), 0, 15); codes = clamp(trunc(x * (1 / scale) + zp +- 0.5), 0, 15)
  (`fma`: x * inv + zp fused, as Triton compiles it by default, enable_fp_fusion); the fp32 scale stored with its
  4 low mantissa bits replaced by zp (159-161);
- 48-51, 172: even channel in the low nibble, odd in the high one.
Read path, per query token and head (`attend`):
- 918-920: Q rotated like K (bf16), softmax_scale / b;
- 453: Q_sum = sum(Q_even) + sum(Q_odd) in fp32;
- 527-551: nibbles unpacked to fp32 codes; zp = bits & 0xF, scale = bits & -16 (as fp32);
- 572-575: S = (Q_even . K_even + Q_odd . K_odd - Q_sum * zp) * (softmax_scale / b * scale);
- 557, helpers' compute_kv_seq_mask: key j <= query i; 594 softmax_step: the softmax (here in one pass, fp64);
- 606-609: P_v = P * v_scale; acc = P_v . V_codes - sum(P_v * v_zp) per stream; 647: acc / L;
- 657-666: acc stored into `out`, a bf16 tensor (round to nearest even);
- 950-951: out = bf16(single_rht(out.float(), inverse=True) / b), inverse: `fast_hadamard_transform(x) * s`.
`exact_output=True` stops at acc / L and un-rotates it exactly (fp64, D H / b): the attention output before the
engine's bf16 roundings of it, which an emulation handing attention over unrotated K / V to the model leaves out.

Not reproduced: Triton's div.full.f32 (within 2 ulp of IEEE division; here IEEE), the tensor cores' fp32
accumulation order, tf32 rounding of P_v in `tl.dot(P_v, V)` and ex2.approx in the softmax (fp32-level effects).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

RHT_SEED = 0x9E3779B9
HADACORE_MAX = 256  # sizes Hadacore computes in one pass of at most two mma stages
HADACORE_STAGE = 16
# bf16 bits of the positive entry of Hadacore's n-point Hadamard stage (bf16_1p)
HADACORE_ENTRY_BITS = {2: 0x3F35, 4: 0x3F00, 8: 0x3EB5, 16: 0x3E80}
MAX_CODE = 15


def bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16, round to nearest even (torch's .to(torch.bfloat16), PTX cvt.rn), returned as fp32."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def rht_block(head_dim: int) -> int:
    """largest_power_of_2_divisor(head_dim): the RHT's block and norm b."""
    return head_dim & -head_dim


@lru_cache(maxsize=None)
def rht_signs(block: int) -> np.ndarray:
    """_get_rht_signs(block, 0): +-1 from a fresh CPU generator seeded 0x9E3779B9 (read-only)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(RHT_SEED)
    draw = torch.bernoulli(torch.full((block,), 0.5), generator=generator)
    signs = (2.0 * draw - 1.0).numpy().astype(np.float32)
    signs.flags.writeable = False
    return signs


@lru_cache(maxsize=None)
def sylvester(n: int) -> np.ndarray:
    """The unnormalised Sylvester Hadamard matrix of order n (a power of two), fp64 (read-only)."""
    matrix = np.ones((1, 1))
    while matrix.shape[0] < n:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    matrix.flags.writeable = False
    return matrix


def _entry(n: int) -> float:
    return float(np.array([HADACORE_ENTRY_BITS[n] << 16], np.uint32).view(np.float32)[0])


def _stage(x: np.ndarray, n: int, axis: int) -> np.ndarray:
    """One Hadacore mma stage along `axis` (length n): bf16 products with the stage's entries, fp32 sum, bf16."""
    product = np.moveaxis(np.moveaxis(x.astype(np.float64), axis, -1) @ (sylvester(n) * _entry(n)), -1, axis)
    return bf16(product.astype(np.float32))


def hadacore(x: np.ndarray) -> np.ndarray:
    """hadacore_transform of bf16 rows x (..., n): about x @ H_n / sqrt(n), in bf16 stages."""
    n = x.shape[-1]
    if n > HADACORE_MAX or n & (n - 1):
        raise ValueError(f"this reference computes Hadacore's power-of-two sizes up to {HADACORE_MAX}; got {n}")
    first = min(n, HADACORE_STAGE)
    blocks = _stage(x.reshape(*x.shape[:-1], n // first, first), first, -1)
    if n > HADACORE_STAGE:
        blocks = _stage(blocks, n // HADACORE_STAGE, -2)
    return blocks.reshape(x.shape)


def fast_hadamard_transform(x: np.ndarray) -> np.ndarray:
    """Tier 1 on fp32 input: bf16(x), Hadacore, back to fp32, times fp32(sqrt(n))."""
    return hadacore(bf16(x)) * np.float32(x.shape[-1] ** 0.5)


def single_rht(x: np.ndarray, inverse: bool = False) -> np.ndarray:
    """H (x * s) per block of b channels (inverse: (H x) * s), in fp32."""
    d = x.shape[-1]
    block = rht_block(d)
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], d // block, block)
    signs = rht_signs(block)
    out = fast_hadamard_transform(blocks) * signs if inverse else fast_hadamard_transform(blocks * signs)
    return out.reshape(x.shape)


def exact_rotate(x: np.ndarray) -> np.ndarray:
    """The RHT without roundings, H (x * s) per block, in fp64."""
    d = x.shape[-1]
    block = rht_block(d)
    blocks = x.astype(np.float64).reshape(*x.shape[:-1], d // block, block)
    return ((blocks * rht_signs(block)) @ sylvester(block)).reshape(x.shape)


def exact_unrotate(x: np.ndarray) -> np.ndarray:
    """The exact inverse of the RHT's orthogonal part, s * (H x) / b per block, in fp64."""
    d = x.shape[-1]
    block = rht_block(d)
    blocks = x.astype(np.float64).reshape(*x.shape[:-1], d // block, block)
    return ((blocks @ sylvester(block)) * rht_signs(block) / block).reshape(x.shape)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """`tl.where(x >= 0, (x + 0.5).to(int32), (x - 0.5).to(int32))`: fp32 add, truncation toward zero."""
    half = np.float32(0.5)
    return np.trunc(np.where(x >= 0, x + half, x - half)).astype(np.float32)


def _scaled(x: np.ndarray, fma: bool) -> tuple[np.ndarray, np.float32, np.float32]:
    """(x / scale + zp before rounding, scale, zp) of one rotated bf16 head x (D,) fp32."""
    low, high = np.float32(x.min()), np.float32(x.max())
    scale = np.maximum(np.float32(high - low) / np.float32(15.0), np.float32(1e-6))
    zero_point = np.clip(_round_half_away(np.float32(-low / scale)), 0, MAX_CODE)
    inverse = np.float32(1.0) / scale
    if fma:
        scaled = (x.astype(np.float64) * np.float64(inverse) + np.float64(zero_point)).astype(np.float32)
    else:
        scaled = (x * inverse).astype(np.float32) + zero_point
    return scaled, scale, zero_point


def tie_distance(x: np.ndarray, fma: bool = True) -> np.ndarray:
    """How far (in code steps) each channel of one rotated bf16 head x (D,) lies from a rounding boundary of its
    code: 0 at a tie, where any other arithmetic may round the other way."""
    scaled = _scaled(x, fma)[0].astype(np.float64)
    return np.abs(scaled - np.floor(scaled) - 0.5)


def quantize_head(x: np.ndarray, fma: bool = True) -> tuple[np.ndarray, np.float32]:
    """The write kernel on one rotated bf16 head x (D,) fp32: (packed nibbles (D/2,) uint8, packed fp32 scale)."""
    scaled, scale, zero_point = _scaled(x, fma)
    codes = np.clip(_round_half_away(scaled), 0, MAX_CODE).astype(np.uint8)
    scale_bits = np.array([scale], np.float32).view(np.int32)[0]
    packed_scale = np.array([(scale_bits & -16) | (int(zero_point) & 0xF)], np.int32).view(np.float32)[0]
    return (codes[0::2] & 0xF) | ((codes[1::2] & 0xF) << 4), packed_scale


def unpack(nibbles: np.ndarray, packed_scale: np.float32) -> tuple[np.ndarray, np.ndarray, np.float32, np.float32]:
    """The read kernel's view of one cached head: (even codes, odd codes) as fp32, zero point, truncated scale."""
    bits = np.array([packed_scale], np.float32).view(np.int32)[0]
    zero_point = np.float32(bits & 0xF)
    scale = np.array([bits & -16], np.int32).view(np.float32)[0]
    return (nibbles & 0xF).astype(np.float32), ((nibbles >> 4) & 0xF).astype(np.float32), zero_point, scale


def dequantize(nibbles: np.ndarray, packed_scale: np.float32) -> np.ndarray:
    """scale * (code - zp) of one cached head (D,), in the rotated space (what the split dot computes with)."""
    even, odd, zero_point, scale = unpack(nibbles, packed_scale)
    codes = np.stack([even, odd], axis=-1).reshape(-1)
    return scale * (codes - zero_point)


def write_token(x: np.ndarray, fma: bool = True) -> list[tuple[np.ndarray, np.float32]]:
    """reshape_and_cache_int4 of one token's K or V, x (H_kv, D) bf16 values: per head (nibbles, packed scale)."""
    rotated = bf16(single_rht(x))
    return [quantize_head(head, fma) for head in rotated]


def attend(query: np.ndarray, keys: list, values: list, softmax_scale: float, exact_output: bool) -> np.ndarray:
    """The read kernel for one query token and head: query (D,) rotated bf16 values; keys / values: the cached
    (nibbles, packed scale) of this head's KV head for tokens 0..i. Returns the output (D,) fp32."""
    scale = np.float32(softmax_scale / rht_block(query.shape[-1]))
    q_even, q_odd = query[0::2].astype(np.float32), query[1::2].astype(np.float32)
    q_sum = np.float32(q_even.sum(dtype=np.float32) + q_odd.sum(dtype=np.float32))
    scores = []
    for nibbles, packed_scale in keys:
        k_even, k_odd, k_zero, k_scale = unpack(nibbles, packed_scale)
        raw_dot = np.float32(q_even.astype(np.float64) @ k_even + q_odd.astype(np.float64) @ k_odd)
        scores.append(np.float32(raw_dot - q_sum * k_zero) * np.float32(scale * k_scale))
    scores = np.array(scores, np.float64)
    probs = np.exp(scores - scores.max())
    acc_even, acc_odd, zero_sum = 0.0, 0.0, 0.0
    for prob, (nibbles, packed_scale) in zip(probs, values):
        v_even, v_odd, v_zero, v_scale = unpack(nibbles, packed_scale)
        prob_v = prob * np.float64(v_scale)
        acc_even, acc_odd, zero_sum = acc_even + prob_v * v_even, acc_odd + prob_v * v_odd, zero_sum + prob_v * v_zero
    out = (np.stack([acc_even - zero_sum, acc_odd - zero_sum], axis=-1).reshape(-1) / probs.sum()).astype(np.float32)
    if exact_output:
        return exact_unrotate(out).astype(np.float32)
    out = bf16(out)  # stored into the bf16 output tensor
    return bf16(single_rht(out, inverse=True) / np.float32(rht_block(out.shape[-1])))


def attention(query: np.ndarray, key: np.ndarray, value: np.ndarray, softmax_scale: float, exact_output: bool = False,
              fma: bool = True) -> np.ndarray:
    """One layer's attention over one sequence as vLLM computes it: query (T, H, D), key / value (T, H_kv, D), the
    bf16 values a bf16 model hands the attention (fp32 arrays); GQA with query heads grouped per KV head
    (h // (H / H_kv)). Token by token: write K / V, then attend over the cache. Returns (T, H, D) fp32."""
    tokens, heads, _ = query.shape
    group = heads // key.shape[1]
    rotated_query = bf16(single_rht(query))
    keys, values, out = [], [], np.zeros(query.shape, np.float32)
    for i in range(tokens):
        keys.append(write_token(key[i], fma))
        values.append(write_token(value[i], fma))
        for head in range(heads):
            kv_head = head // group
            out[i, head] = attend(rotated_query[i, head], [token[kv_head] for token in keys],
                                  [token[kv_head] for token in values], softmax_scale, exact_output)
    return out
