"""Perplexity that reads the quantized past, and KV-cache size accounting.

`perplexity` runs the parallel (teacher-forced) pass; with KV quantization on, every position attends to the
dequantized K/V of earlier positions and to its own K/V in full precision (POQ), which equals token-by-token
decoding through a quantized cache: `decode_perplexity` does exactly that, for verification.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import Cache, DynamicCache

from .cache_keyword import with_cache
from .config import FP_BITS, EvalMode, KVQuantConfig
from .model import frozen_weights, quant_state


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens


def _mode_flags(mode: EvalMode) -> dict[str, bool]:
    return {EvalMode.FP: dict(weights=False, kv=False), EvalMode.W: dict(weights=True, kv=False),
            EvalMode.WKV: dict(weights=True, kv=True)}[EvalMode(mode)]


def _summarise(nll_sum: float, tokens: int) -> Perplexity:
    return Perplexity(ppl=math.exp(nll_sum / tokens), nll=nll_sum / tokens, tokens=tokens)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, mode: EvalMode = EvalMode.WKV, device="cpu", batch_size: int = 1) -> Perplexity:
    """Teacher-forced perplexity over (n, seqlen) windows; each window predicts its tokens 1..seqlen-1."""
    nll_sum, tokens = 0.0, 0
    model.to(device)
    with quant_state(model, **_mode_flags(mode)), frozen_weights(model):
        for s in range(0, windows.shape[0], batch_size):
            ids = windows[s : s + batch_size].to(device)
            logits = model(ids, use_cache=False).logits[:, :-1].float()
            nll_sum += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            tokens += ids[:, 1:].numel()
    return _summarise(nll_sum, tokens)


@torch.no_grad()
def decode_perplexity(
    model,
    windows: torch.Tensor,
    mode: EvalMode = EvalMode.WKV,
    device="cpu",
    make_cache: Callable[[], Cache] | None = None,
) -> Perplexity:
    """Perplexity by incremental decoding, one token per step, through a cache holding the quantized K/V.

    make_cache: a new cache per window (default: a `DynamicCache`, into which a prepared model's attention stores
    fake-quantized K/V); e.g. `lambda: WKVQuantCache(model.config, kv_bits=4)` for the packed cache, or any
    transformers `Cache` (a `QuantizedCache`, a `KIVICache`) for a model whose attention leaves quantization to it.
    """
    nll_sum, tokens = 0.0, 0
    model.to(device)
    with quant_state(model, **_mode_flags(mode)), frozen_weights(model):
        for window in windows.to(device):
            cache = make_cache() if make_cache is not None else DynamicCache(config=model.config)
            for t in range(window.numel() - 1):
                logits = model(window[None, t : t + 1], **with_cache(cache), use_cache=True).logits[0, -1].float()
                nll_sum += F.cross_entropy(logits[None], window[t + 1 : t + 2], reduction="sum").item()
                tokens += 1
    return _summarise(nll_sum, tokens)


@torch.no_grad()
def greedy_without_cache(model, ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache-free greedy decoding, the reference that decoding through any cache must reproduce: at each step a
    full forward (`use_cache=False`: the parallel POQ pass of a prepared model) over the whole sequence so far.

    ids (B, T) with no padding. Returns the sequences (B, T + max_new_tokens) and each step's last-position logits
    (B, max_new_tokens, vocab) in fp32. Pass the model in the quantization state to check (`quant_state`).
    """
    steps = []
    for _ in range(max_new_tokens):
        steps.append(model(ids, use_cache=False).logits[:, -1].float())
        ids = torch.cat([ids, steps[-1].argmax(-1, keepdim=True)], dim=1)
    return ids, torch.stack(steps, dim=1)


def kv_bytes_per_token(model_config, kv: KVQuantConfig) -> float:
    """Bytes of K and V cache per token over all layers: packed codes + an fp16 (scale, zero point) pair per group
    and KV head; 2 bytes per element when unquantized."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    per_head = head_dim * 2.0
    if kv.bits != FP_BITS:
        groups = head_dim // (kv.group_size or head_dim)
        per_head = head_dim * kv.bits / 8 + groups * 4
    return 2 * model_config.num_hidden_layers * model_config.num_key_value_heads * per_head
