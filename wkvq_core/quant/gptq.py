"""Error-compensating rounding (GPTQ, Frantar et al. 2022) on a fixed grid: the per-group scales and zero points are
given (the learned LWC clip ranges); GPTQ only chooses the integer codes, column by column, moving each column's
rounding error onto the columns not yet rounded as the inputs' second moments H = X^T X direct."""

from __future__ import annotations

import torch

from .primitives import qmax


@torch.no_grad()
def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, scale: torch.Tensor,
               zero: torch.Tensor, damp: float = 0.01, block: int = 128, act_order: bool = True) -> torch.Tensor:
    """uint8 codes (out, in) of `weight` (out, in) on the grid (codes - zero) * scale, scale and zero (out, in // group)
    per group of `group_size` input columns (-1: the whole row); hessian (in, in): sum of x x^T over inputs x.
    Columns no input reaches (H_ii = 0) are rounded to nearest. act_order: columns in decreasing H_ii (their inputs'
    energy), each on its own group's grid ("static groups": the groups stay contiguous). Lazy batch updates of `block`
    columns, in float32 (as GPTQ's reference)."""
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    w = weight.detach().to(torch.float32).T.clone()  # (in, out): each weight column a contiguous row
    h = hessian.detach().to(torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    scales = scale.to(torch.float32).T.repeat_interleave(group, dim=0)
    zeros = zero.to(torch.float32).T.repeat_interleave(group, dim=0)
    order = (torch.argsort(h.diagonal(), descending=True, stable=True) if act_order
             else torch.arange(in_features, device=w.device))
    w, h, scales, zeros = w[order], h.index_select(0, order).index_select(1, order), scales[order], zeros[order]
    # row i of the upper Cholesky factor of H^-1 over its diagonal: how column i's rounding error moves the later ones
    spread = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    spread.div_(spread.diagonal().clone()[:, None])
    codes, top = torch.empty_like(w), qmax(bits)
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        w_block, errors = w[start:stop].clone(), torch.empty_like(w[start:stop])
        for i in range(stop - start):
            col, s, z, err = w_block[i], scales[start + i], zeros[start + i], errors[i]
            q = torch.div(col, s, out=codes[start + i]).round_().add_(z).clamp_(0, top)
            torch.sub(col, torch.sub(q, z, out=err).mul_(s), out=err)
            w_block[i + 1:].addr_(spread[start + i, start + i + 1 : stop], err, alpha=-1)
        w[stop:].addmm_(spread[start:stop, stop:].T, errors, alpha=-1)
    return codes[torch.argsort(order)].to(torch.uint8).T.contiguous()
