"""Equivalent scaling of a block before its calibration (`WeightQuantConfig.equalize`): per pair (input_layernorm ->
q/k/v, v_proj -> o_proj, post_attention_layernorm -> gate/up, up_proj -> down_proj) AWQ's search on the block's
inputs on the quantized path, run in full precision, then folded into the weights in place (exact)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import EQUALIZE_TOKENS
from ..model import attentions
from ..quant.equalize import search_scales


def _scale_columns_(lin: nn.Module, s: torch.Tensor) -> None:
    lin.weight.mul_(s.to(lin.weight)[None, :])


def _divide_rows_(lin: nn.Module, s: torch.Tensor) -> None:
    lin.weight.div_(s.to(lin.weight)[:, None])
    if lin.bias is not None:
        lin.bias.div_(s.to(lin.bias))


@torch.no_grad()
def equalize_block_(block: nn.Module, index: int, blocks, x_q: torch.Tensor) -> None:
    """Search and fold block `index`'s scales; `blocks` (calibrate._Blocks) runs it on the cached inputs x_q."""
    attn, mlp = attentions(block)[0], block.mlp
    first = {"qkv": attn.q_proj, "o": attn.o_proj, "gate_up": mlp.gate_proj, "down": mlp.down_proj}
    stride = max(1, math.ceil(x_q.shape[0] * x_q.shape[1] / EQUALIZE_TOKENS))
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in first}
    for name, lin in first.items():
        lin.input_observer = lambda x, name=name: inputs[name].append(
            x.detach().reshape(-1, x.shape[-1])[::stride].float())
    try:
        for s in range(0, x_q.shape[0], blocks.batch_size):
            blocks.callbacks.check(f"while equalizing block {index}, sample {s} of {x_q.shape[0]}")
            blocks.forward(blocks.batch(x_q[s : s + blocks.batch_size]), index, index + 1, quantize_first=False)
    finally:
        for lin in first.values():
            lin.input_observer = None
    x = {name: torch.cat(chunks) for name, chunks in inputs.items()}
    lin = attn.q_proj
    grid = dict(bits=lin.bits, group_size=lin.group_size, scale_bits=lin.scale_bits)
    expand, reduce = _shared_by_heads(attn)
    fold_scales_(block, {
        "qkv": search_scales(x["qkv"], [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], **grid),
        "o": search_scales(x["o"], [attn.o_proj.weight], **grid, expand=expand, reduce=reduce),
        "gate_up": search_scales(x["gate_up"], [mlp.gate_proj.weight, mlp.up_proj.weight], **grid),
        "down": search_scales(x["down"], [mlp.down_proj.weight], **grid),
    })


def _shared_by_heads(attn: nn.Module):
    """(expand, reduce) between V's channels (n_kv_heads x head_dim) and o_proj's inputs (every query head's)."""
    kv_heads, head_dim = attn.n_kv_heads, attn.head_dim
    n_rep = attn.config.num_attention_heads // kv_heads
    expand = lambda free: free.view(kv_heads, 1, head_dim).expand(kv_heads, n_rep, head_dim).reshape(-1)  # noqa: E731
    reduce = lambda m: m.view(kv_heads, n_rep, head_dim).mean(dim=1).reshape(-1)  # noqa: E731
    return expand, reduce


@torch.no_grad()
def unscale_(block: nn.Module) -> None:
    """Undo the scales `equalize_block_` folded into a block (a copy's original weights, up to rounding)."""
    scales = getattr(block, "equalization_scales", None)
    if scales is not None:
        fold_scales_(block, {name: 1 / s for name, s in scales.items()})
        block.equalization_scales = None


@torch.no_grad()
def fold_scales_(block: nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """Fold positive per-channel scales into a block, exactly: "qkv" (hidden) and "gate_up" (hidden) divide the
    RMSNorm before them, "o" (n_kv_heads * head_dim) v_proj's rows, "down" (intermediate) up_proj's rows; each
    multiplies the inputs' columns of the linears after it. The block keeps them as `equalization_scales`."""
    block.equalization_scales = scales
    attn, mlp = attentions(block)[0], block.mlp
    expand, _ = _shared_by_heads(attn)
    for norm, linears, s in ((block.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj), scales["qkv"]),
                             (block.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj), scales["gate_up"])):
        norm.weight.div_(s.to(norm.weight))
        for lin in linears:
            _scale_columns_(lin, s)
    _divide_rows_(attn.v_proj, scales["o"])
    _scale_columns_(attn.o_proj, expand(scales["o"]))
    _divide_rows_(mlp.up_proj, scales["down"])
    _scale_columns_(mlp.down_proj, scales["down"])
