"""One decode step's attention read straight from packed KV records (`PackedKVLayer`), chunk by chunk with an
online softmax (flash-decoding), so the past is never materialised in full precision.

For 4-bit records with one (scale s, zero z) per token and KV head, a chunk's scores and values come from the codes
c themselves, split into the low (even channels) and high (odd channels) nibbles of each byte:
    q . k^_j = s_j (q . c_j - z_j sum(q))             sum_j p_j v^_j = sum_j (p_j s_j) c_j - sum_j p_j s_j z_j
Other widths and group sizes, and keys stored before RoPE (`k_pre_rope`: unsmoothed and rotated at their positions
after dequantization), dequantize one chunk at a time. The key blocks in position order: unquantized sink
tokens, the packed past, and the token's own full-precision K/V (POQ), which the additive mask's columns follow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK_TOKENS = 1024  # measured on SmolLM2 shapes (B 8, 8192 tokens): 256 and 4096 are slower


def _nibble_planes(records: torch.Tensor, head_dim: int, acc: torch.dtype):
    """(even-channel codes, odd-channel codes, scale, zero) of 4-bit one-group records, in `acc`."""
    code_bytes = head_dim // 2
    codes = records[..., :code_bytes]
    scale = records[..., code_bytes : code_bytes + 2].contiguous().view(torch.float16).to(acc)
    zero = records[..., code_bytes + 2 : code_bytes + 4].contiguous().view(torch.float16).to(acc)
    return (codes & 0xF).to(acc), (codes >> 4).to(acc), scale, zero


class _OnlineSoftmax:
    """Running max, normaliser and weighted value sum of one query row per (B, H_kv, n_rep)."""

    def __init__(self, shape: tuple[int, ...], head_dim: int, acc: torch.dtype, device) -> None:
        self.max = torch.full((*shape, 1), -torch.inf, dtype=acc, device=device)
        self.norm = torch.zeros((*shape, 1), dtype=acc, device=device)
        self.out = torch.zeros((*shape, head_dim), dtype=acc, device=device)

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        """exp(scores - running max), rescaling what was accumulated when the max grows."""
        new_max = torch.maximum(self.max, scores.amax(-1, keepdim=True))
        rescale = torch.exp(self.max - new_max)
        probs = torch.exp(scores - new_max)
        self.norm = self.norm * rescale + probs.sum(-1, keepdim=True)
        self.out = self.out * rescale
        self.max = new_max
        return probs

    def result(self) -> torch.Tensor:
        return self.out / self.norm


def packed_decode_attention(
    query: torch.Tensor,
    sinks: tuple[torch.Tensor, torch.Tensor] | None,
    records: list[tuple[torch.Tensor, torch.Tensor]],
    own: tuple[torch.Tensor, torch.Tensor] | None,
    decode: Callable[[torch.Tensor], torch.Tensor],
    attention_mask: torch.Tensor | None,
    scaling: float,
    nibble_bits: int | None,
    key_transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence. query (B, H, 1, D); sinks: unquantized (B, H_kv, S0, D) K/V or None;
    records: packed K/V records in position order, as (B, H_kv, S_i, R) segment pairs (at least one), read with
    `decode` (records -> (B, H_kv, n, D)) unless `nibble_bits` is 4 (one group per head: the codes algebra); own:
    the token's full-precision K/V (B, H_kv, 1, D) or None; attention_mask additive (B, 1, 1, >= S0 + sum S_i [+ 1])
    or None; key_transform: what turns stored keys (B, H_kv, n, D) starting at stored position p into the
    attention's keys (K before RoPE: unsmoothing and RoPE), applied chunk by chunk. Returns (B, 1, H, D)."""
    bsz, n_heads, _, head_dim = query.shape
    n_kv = records[0][0].shape[1]
    acc = torch.promote_types(query.dtype, torch.float32)
    q = query.to(acc).view(bsz, n_kv, n_heads // n_kv, head_dim) * scaling
    state = _OnlineSoftmax(q.shape[:-1], head_dim, acc, q.device)
    column = 0

    def masked(scores: torch.Tensor) -> torch.Tensor:
        nonlocal column
        width = scores.shape[-1]
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, column : column + width].to(acc)  # (B, 1, 1, w) broadcasts
        column += width
        return scores

    def dense(keys: torch.Tensor, values: torch.Tensor, stored: bool = True) -> None:
        if keys.shape[-2]:
            if stored and key_transform is not None:
                keys = key_transform(keys, column)
            probs = state.weights(masked(q @ keys.to(acc).transpose(-1, -2)))
            state.out = state.out + probs @ values.to(acc)

    if sinks is not None:
        dense(*sinks)
    if nibble_bits == 4:
        q_even, q_odd, q_sum = q[..., 0::2], q[..., 1::2], q.sum(-1, keepdim=True)
    chunks = ((keys[..., start : start + CHUNK_TOKENS, :], values[..., start : start + CHUNK_TOKENS, :])
              for keys, values in records for start in range(0, keys.shape[-2], CHUNK_TOKENS))
    for key_chunk, value_chunk in chunks:
        if nibble_bits != 4:
            dense(decode(key_chunk), decode(value_chunk))
            continue
        if key_transform is not None:
            keys = key_transform(decode(key_chunk), column).to(acc)
            probs = state.weights(masked(q @ keys.transpose(-1, -2)))
        else:
            low, high, scale, zero = _nibble_planes(key_chunk, head_dim, acc)
            scores = (q_even @ low.transpose(-1, -2) + q_odd @ high.transpose(-1, -2)
                      - q_sum * zero.transpose(-1, -2))
            probs = state.weights(masked(scores * scale.transpose(-1, -2)))
        low, high, scale, zero = _nibble_planes(value_chunk, head_dim, acc)
        weighted = probs * scale.transpose(-1, -2)
        offset = weighted @ zero
        state.out = state.out + torch.stack([weighted @ low - offset, weighted @ high - offset], -1).flatten(-2)
    if own is not None:
        dense(*own, stored=False)
    out = state.result().to(query.dtype)
    return out.view(bsz, n_heads, 1, head_dim).transpose(1, 2)
