"""GPTQ rounding of a calibrated block (`WeightQuantConfig.gptq`): its linears in the order inputs flow (q/k/v, o,
gate/up, down), each group's Hessian from its inputs on the quantized path (the block's earlier linears already
rounded), the learned clip ranges kept as the grid."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..model import attentions, frozen_weights, quant_state
from ..quant.gptq import gptq_codes
from ..quant.kv_quant import ATTENTION_PROJECTIONS

SEQUENTIAL = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def add_second_moments_(hessian: torch.Tensor, x: torch.Tensor) -> None:
    """hessian += X^T X of the (..., in) inputs x, in float32 also under autocast (in bfloat16 it is not even
    positive semi-definite: GPTQ's Cholesky factorisation fails)."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    with torch.autocast(flat.device.type, enabled=False):
        hessian.add_(flat.T @ flat)


class _Observed(Exception):
    """Raised once a group's input is recorded: the rest of the block's forward is not needed."""


def _record_and_stop(hessian: torch.Tensor, x: torch.Tensor) -> None:
    add_second_moments_(hessian, x)
    raise _Observed


@torch.no_grad()
def gptq_block_(block: nn.Module, index: int, blocks, x_q: torch.Tensor) -> None:
    """Fix block `index`'s weights to GPTQ's codes; `blocks` (calibrate._Blocks) runs it on the cached inputs x_q."""
    attn = attentions(block)[0]
    for names in SEQUENTIAL:
        owner = attn if names[0] in ATTENTION_PROJECTIONS else block.mlp
        linears = [getattr(owner, name) for name in names]
        hessian = torch.zeros(linears[0].in_features, linears[0].in_features, device=blocks.device)
        linears[0].input_observer = partial(_record_and_stop, hessian)  # the group's linears share their input
        try:
            # the weights are fixed during a group's pass: fake-quantize them once (after the last group's rounding)
            with quant_state(block, weights=True, kv=True), frozen_weights(block, blocks.precision.autocast):
                for s in range(0, x_q.shape[0], blocks.batch_size):
                    blocks.callbacks.check(f"while rounding block {index} with GPTQ, sample {s} of {x_q.shape[0]}")
                    try:
                        blocks.forward(blocks.batch(x_q[s : s + blocks.batch_size]), index, index + 1,
                                       quantize_first=True)
                    except _Observed:
                        pass
        finally:
            linears[0].input_observer = None
        weights = [attn.projection(name)[0] if owner is attn else lin.weight for name, lin in zip(names, linears)]
        grids = [lin.quantize(weight)[1:] for lin, weight in zip(linears, weights)]
        # GPTQ rounds each output row on its own given H: the group's linears (one H) go through it stacked
        codes = gptq_codes(torch.cat(weights), hessian, linears[0].bits, linears[0].group_size,
                           torch.cat([scale for scale, _ in grids]), torch.cat([zero for _, zero in grids]))
        for lin, part, (scale, zero) in zip(linears, codes.to(hessian.device).split([w.shape[0] for w in weights]),
                                            grids):
            lin.fix_quantization_(part, scale, zero)
