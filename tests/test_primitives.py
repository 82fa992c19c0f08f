import pytest
import torch
from torch import nn

from wkvq_core.config import WeightQuantConfig
from wkvq_core.errors import ConfigError
from wkvq_core.quant.primitives import (
    _fake_quant,
    _group,
    _qparams,
    dequantize_weight,
    fake_quant_per_token,
    fake_quant_weight,
    quantize_weight,
)
from wkvq_core.quant.weight_clip import QuantLinear


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean())).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 64, -1])
def test_weight_grid_and_error_bound(bits, group_size):
    w = torch.randn(24, 64)
    dq = fake_quant_weight(w, bits, group_size)
    size = 64 if group_size == -1 else group_size
    for row_w, row_dq in zip(w.reshape(-1, size), dq.reshape(-1, size)):
        assert row_dq.unique().numel() <= 2**bits
        step = (row_w.max() - row_w.min()) / (2**bits - 1)
        # half a step; the fp16-stored scale is off by at most 2**-11 relative, over up to 2**bits codes
        assert (row_w - row_dq).abs().max() <= step * (0.5 + 2**bits * 2**-11) + 1e-6


def test_weight_sqnr_grows_with_bits():
    w = torch.randn(64, 256)
    sqnrs = [sqnr_db(w, fake_quant_weight(w, b, 128)) for b in (2, 3, 4, 8)]
    assert sqnrs == sorted(sqnrs)
    assert sqnrs[2] > 18  # 4-bit group-128 on Gaussian weights


def test_integer_codes_dequantize_to_fake_quant():
    w = torch.randn(32, 128)
    clip_max = torch.rand(32, 2, 1) * 0.3 + 0.7
    clip_min = torch.rand(32, 2, 1) * 0.3 + 0.7
    codes, scale, zero = quantize_weight(w, 4, 64, clip_max, clip_min)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scale.shape == zero.shape == (32, 2)
    assert torch.equal(dequantize_weight(codes, scale, zero, 64), fake_quant_weight(w, 4, 64, clip_max, clip_min))


def test_clip_factors_receive_gradients_through_rounding():
    lin = QuantLinear(nn.Linear(64, 16), WeightQuantConfig(bits=3, group_size=32))
    lin(torch.randn(4, 64)).pow(2).sum().backward()
    assert lin.clip.gamma.grad.abs().sum() > 0 and lin.clip.beta.grad.abs().sum() > 0
    assert torch.sigmoid(torch.tensor(4.0)).item() == pytest.approx(lin.clip.factors()[0].mean().item())


def test_group_size_must_divide_in_features():
    with pytest.raises(ConfigError, match="does not divide in_features 172"):
        QuantLinear(nn.Linear(172, 64), WeightQuantConfig(group_size=128))


@pytest.mark.parametrize("group_size", [None, 4])
def test_per_token_quantization(group_size):
    x = torch.randn(2, 4, 10, 8) * torch.linspace(0.1, 10, 8)
    dq = fake_quant_per_token(x, 4, group_size)
    size = group_size or 8
    xg, dg = x.reshape(-1, size), dq.reshape(-1, size)
    step = (xg.amax(1) - xg.amin(1)) / 15
    assert ((xg - dg).abs().amax(1) <= step + 1e-5).all()  # half a step, plus up to half for the rounded zero
    assert ((xg - dg).abs().mean(1) <= step / 2).all()
    assert all(row.unique().numel() <= 16 for row in dg)


def test_constant_and_single_value_groups_are_exact():
    x = torch.tensor([[0.5] * 8, [-3.0] * 8, [0.0] * 8, [1e-3] * 8])
    assert torch.allclose(fake_quant_per_token(x, 4), x, rtol=2e-3)  # fp16 scale
    assert torch.allclose(fake_quant_weight(x, 4, 8), x, rtol=2e-3)  # fp16 scale
    values = torch.tensor([[0.7, -1.3, 2.0, 0.05]])
    assert torch.allclose(fake_quant_per_token(values, 4, group_size=1), values, rtol=2e-3)  # fp16 scale


def _autograd_fake_quant(grouped, bits, scale, zero):
    """The fake quantization as a plain graph of torch ops (straight-through rounding), autograd's gradients."""
    ratio = grouped / scale
    codes = (ratio.round() - ratio).detach() + ratio + zero
    return (codes.clamp(0, 2**bits - 1) - zero) * scale


@pytest.mark.parametrize("group_size", [64, -1])
def test_written_out_gradients_equal_autograds_through_a_linear(group_size):
    """`_fake_quant`'s hand-written backward against autograd's on the same ops: the same forward bit for bit,
    the same gradients to the weight (clamped codes included: clip factors well below 1) and the clip logits,
    with the weight's gradient arriving transposed from F.linear as in calibration."""
    torch.manual_seed(0)
    w, x = torch.randn(96, 128) * 0.05, torch.randn(2, 16, 128)
    logits = torch.randn(96, 128 // (64 if group_size == 64 else 128), 1)
    results = []
    for fake_quant in (_fake_quant, _autograd_fake_quant):
        weight, gamma, beta = (t.clone().requires_grad_(True) for t in (w, logits, logits - 1))
        grouped = _group(weight, group_size)
        scale, zero = _qparams(grouped, 4, torch.sigmoid(gamma), torch.sigmoid(beta))
        quantized = fake_quant(grouped, 4, scale, zero).reshape(weight.shape)
        nn.functional.linear(x, quantized).pow(2).sum().backward()
        results.append((quantized.detach(), weight.grad, gamma.grad, beta.grad))
    (ours, *our_grads), (reference, *reference_grads) = results
    assert torch.equal(ours, reference)
    for got, want in zip(our_grads, reference_grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


def test_written_out_gradients_reach_per_token_inputs_and_their_scales():
    """Per token (the KV cache's quantizer): the input's gradient, through scale and zero too, is autograd's."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 10, 16)
    grads = []
    for fake_quant in (_fake_quant, _autograd_fake_quant):
        leaf = x.clone().requires_grad_(True)
        grouped = leaf.reshape(2, 3, 10, 1, 16)
        out = fake_quant(grouped, 4, *_qparams(grouped, 4))
        (out * torch.linspace(-1, 1, 16)).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
