"""Uniform asymmetric quantization primitives: tensors in, tensors out.

Granularity is expressed by the last dimension after a reshape:

| use            | input shape            | reshaped to                          | one (scale, zero) per     |
|----------------|------------------------|--------------------------------------|---------------------------|
| weight, group  | (out, in)              | (out, in // group, group)            | output row and group      |
| weight, row    | (out, in)              | (out, 1, in)  (group_size = -1)      | output row                |
| KV, per token  | (B, heads, T, D)       | (B, heads, T, D // group, group)     | token, KV head and group  |
| act, per token | (..., in)              | (..., 1, in)                         | token                     |

Scales and zero points are fp16-representable, as stored in artifacts and in the packed KV cache.
Rounding uses a straight-through estimator so clip factors and smoothing parameters receive gradients.
"""

from __future__ import annotations

import torch

__all__ = [
    "round_ste",
    "qmax",
    "fake_quant_weight",
    "quantize_weight",
    "dequantize_weight",
    "fake_quant_per_token",
    "quantize_per_token",
    "dequantize_per_token",
    "hadamard",
]


ZERO_LIMIT = 2048  # integer zero points up to here are exact in fp16


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


def qmax(bits: int) -> int:
    return 2**bits - 1


def round_significant_ste(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded to `bits` significant bits (halves to even) in the forward pass, identity in the backward pass."""
    mantissa, exponent = torch.frexp(x.detach())
    return (torch.ldexp(torch.round(mantissa * 2**bits), exponent - bits) - x).detach() + x


def _qparams(
    grouped: torch.Tensor, bits: int, clip_max: torch.Tensor | None = None, clip_min: torch.Tensor | None = None,
    scale_bits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per group (last dim); clip factors in (0, 1) shrink max/min (OmniQuant LWC);
    scale_bits: the scale's significant bits (None: fp16's)."""
    gmax = grouped.amax(dim=-1, keepdim=True)
    gmin = grouped.amin(dim=-1, keepdim=True)
    if clip_max is not None:
        gmax = gmax * clip_max
        gmin = gmin * clip_min
    # a near-constant group needs a scale large enough that its zero point stays within ZERO_LIMIT
    scale = torch.maximum((gmax - gmin) / qmax(bits), gmin.abs() / ZERO_LIMIT).clamp(min=1e-5)
    scale = scale.to(torch.float16).to(grouped.dtype)  # scales are stored in fp16: simulate exactly that
    if scale_bits is not None:
        scale = round_significant_ste(scale, scale_bits)
    zero = round_ste((-gmin / scale).clamp(-ZERO_LIMIT, ZERO_LIMIT))  # not clamped to the code range (as OmniQuant)
    return scale, zero


def _codes(grouped: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (round_ste(grouped / scale) + zero).clamp(0, qmax(bits))


class _FakeQuant(torch.autograd.Function):
    """(clamp(round_ste(x / scale) + zero, 0, qmax) - zero) * scale with its straight-through gradients written out:
    the same forward in fewer passes over x than autograd's graph of those ops (the weights' fake quantization is
    a large part of a CPU calibration step)."""

    @staticmethod
    def forward(ctx, grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, top: int) -> torch.Tensor:
        ratio = grouped / scale
        codes = ratio.round()
        slope = torch.sub(codes, ratio, out=ratio)
        codes.add_(zero)
        levels = codes.clamp(0, top)
        # 1 where the clamp passes the gradient (bounds included, as clamp's), else 0; float: bool ops are slow on CPU
        outside = codes.sub_(levels).abs_().clamp_(max=1)
        inside = 1 - outside
        levels.sub_(zero)
        # d out / d scale per element: the rounding error where the clamp passes, the clamped level elsewhere
        slope.mul_(inside).addcmul_(levels, outside)
        ctx.save_for_backward(scale, inside.to(torch.uint8), slope)  # 1 byte, as a bool mask
        return levels.mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scale, inside, slope = ctx.saved_tensors
        grad = grad.contiguous()  # a linear's weight gradient arrives transposed: one copy, not strided passes
        passed = grad * inside
        grad_scale = grad_zero = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * slope).sum(-1, keepdim=True)
        if ctx.needs_input_grad[2]:  # d out / d zero = -scale outside the clamp's range
            grad_zero = (passed.sum(-1, keepdim=True) - grad.sum(-1, keepdim=True)) * scale
        return passed if ctx.needs_input_grad[0] else None, grad_scale, grad_zero, None


def _fake_quant(grouped: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return _FakeQuant.apply(grouped, scale, zero, qmax(bits))


def _group(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    return w.reshape(out_features, in_features // size, size)


def fake_quant_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    clip_max: torch.Tensor | None = None,
    clip_min: torch.Tensor | None = None,
    scale_bits: int | None = None,
) -> torch.Tensor:
    """Quantize-dequantize a (out, in) weight group-wise along `in`.

    clip_max / clip_min: (out, in // group, 1) factors applied to the group max / min, or None for plain RTN.
    scale_bits: significant bits of the scales (None: fp16's 11).
    """
    grouped = _group(w, group_size)
    return _fake_quant(grouped, bits, *_qparams(grouped, bits, clip_max, clip_min, scale_bits)).reshape(w.shape)


@torch.no_grad()
def quantize_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    clip_max: torch.Tensor | None = None,
    clip_min: torch.Tensor | None = None,
    scale_bits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes (uint8, (out, in)), scale and zero ((out, in // group)) such that
    `dequantize_weight(codes, scale, zero, group_size)` equals `fake_quant_weight(...)`."""
    grouped = _group(w, group_size)
    scale, zero = _qparams(grouped, bits, clip_max, clip_min, scale_bits)
    codes = _codes(grouped, bits, scale, zero).to(torch.uint8)
    return codes.reshape(w.shape), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype=torch.float32
) -> torch.Tensor:
    grouped = _group(codes.to(dtype), group_size)
    return ((grouped - zero.to(dtype).unsqueeze(-1)) * scale.to(dtype).unsqueeze(-1)).reshape(codes.shape)


def _token_groups(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    size = x.shape[-1] if group_size is None else group_size
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def fake_quant_per_token(x: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Dynamic asymmetric quantize-dequantize along the last dim, in groups of `group_size` (None: whole dim)."""
    grouped = _token_groups(x, group_size)
    return _fake_quant(grouped, bits, *_qparams(grouped, bits)).reshape(x.shape)


@torch.no_grad()
def quantize_per_token(x: torch.Tensor, bits: int, group_size: int | None = None):
    """uint8 codes like x, and fp16 scale and zero (..., n_groups), matching `fake_quant_per_token`."""
    grouped = _token_groups(x, group_size)
    scale, zero = _qparams(grouped, bits)
    codes = _codes(grouped, bits, scale, zero).to(torch.uint8)
    return codes.reshape(x.shape), scale.squeeze(-1).half(), zero.squeeze(-1).half()


def dequantize_per_token(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.float32):
    grouped = codes.to(dtype).reshape(*scale.shape, -1)
    return ((grouped - zero.to(dtype).unsqueeze(-1)) * scale.to(dtype).unsqueeze(-1)).reshape(codes.shape)


def hadamard(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of size n (a power of two): H @ H.T = I, H symmetric."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size; got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype=dtype, device=device)
