"""Bit packing of integer codes along the last dim: an LSB-first bitstream, `bits` per code, padded to bytes.

For 4 bits this is two codes per byte, low nibble first; for 8 bits the codes themselves.
"""

from __future__ import annotations

import torch


def packed_size(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., n), each < 2**bits -> uint8 (..., packed_size(n, bits))."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.clone()
    if bits == 4:
        if codes.shape[-1] % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        return codes[..., 0::2] | (codes[..., 1::2] << 4)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes[..., None] >> shifts) & 1).flatten(-2)
    stream = torch.nn.functional.pad(stream, (0, (-stream.shape[-1]) % 8))
    weights = (1 << torch.arange(8, device=codes.device)).to(torch.uint8)
    return (stream.unflatten(-1, (-1, 8)) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 (..., packed_size(n, bits)) -> uint8 codes (..., n)."""
    if bits == 8:
        return packed[..., :n]
    if bits == 4:
        return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)[..., :n]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed[..., None] >> shifts) & 1).flatten(-2)[..., : n * bits]
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.uint8)
    return (stream.unflatten(-1, (n, bits)) * weights).sum(-1, dtype=torch.uint8)
