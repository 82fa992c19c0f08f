"""GPTQ rounding on the learned grid (WeightQuantConfig.gptq): against round-to-nearest on the same scales, against
an independent plain column-by-column implementation, and through calibration into the artifact."""

import copy
import json

import numpy as np
import pytest
import torch

from wkvq_core.artifact import load_quantized, save_artifact
from wkvq_core.calib.data import calibration_samples, eval_windows
from wkvq_core.calib.gptq import add_second_moments_
from wkvq_core.config import CalibConfig, EvalMode, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.evaluation.perplexity import perplexity
from wkvq_core.model import quant_linears
from wkvq_core.pipeline import quantize_model_
from wkvq_core.quant.gptq import gptq_codes
from wkvq_core.quant.primitives import dequantize_weight, quantize_weight


def example(out_features=24, in_features=64, tokens=400, seed=0):
    """A weight with outlier input columns and correlated inputs (a few shared directions plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    weight[:, :3] *= 6
    mixing = torch.randn(8, in_features, generator=gen)
    x = torch.randn(tokens, 8, generator=gen) @ mixing + 0.3 * torch.randn(tokens, in_features, generator=gen)
    return weight, x


def reference_codes(weight, hessian, scale, zero, group, bits=4, damp=0.01):
    """GPTQ one column at a time (no lazy batches), numpy float64: each column rounded on its group's grid, its error
    spread over the later columns by the upper Cholesky factor of the damped inverse Hessian."""
    w, h = weight.numpy().astype(np.float64).copy(), hessian.numpy().astype(np.float64).copy()
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros_like(w)
    for i in range(w.shape[1]):
        s, z = scale[:, i // group].numpy().astype(np.float64), zero[:, i // group].numpy().astype(np.float64)
        q = np.clip(np.round(w[:, i] / s) + z, 0, 2**bits - 1)
        codes[:, i] = q
        err = (w[:, i] - (q - z) * s) / u[i, i]
        w[:, i:] -= np.outer(err, u[i, i:])
    return codes


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("group", [16, -1])
def test_gptq_beats_round_to_nearest_on_the_same_grid(group, act_order):
    weight, x = example()
    _, scale, zero = quantize_weight(weight, 4, group)
    hessian = x.T @ x
    rtn = dequantize_weight(*quantize_weight(weight, 4, group), group)
    codes = gptq_codes(weight, hessian, 4, group, scale, zero, act_order=act_order)
    gptq = dequantize_weight(codes, scale, zero, group)
    error = lambda w: (x @ (weight - w).T).pow(2).sum().item()  # noqa: E731
    assert error(gptq) < 0.8 * error(rtn)


def test_lazy_batches_equal_the_plain_column_by_column_reference():
    weight, x = example(in_features=64)
    _, scale, zero = quantize_weight(weight, 4, 16)
    hessian = x.T @ x
    codes = gptq_codes(weight, hessian, 4, 16, scale, zero, block=24, act_order=False)  # blocks across groups
    expected = reference_codes(weight, hessian, scale, zero, 16)
    assert (codes.numpy() != expected).mean() < 0.002  # rounding ties apart
    order = torch.argsort(hessian.diagonal(), descending=True)
    permuted = reference_codes(weight[:, order], hessian[order][:, order], scale.repeat_interleave(16, 1)[:, order],
                               zero.repeat_interleave(16, 1)[:, order], 1)
    in_order = gptq_codes(weight, hessian, 4, 16, scale, zero, block=24, act_order=True).numpy()
    assert (in_order[:, order.numpy()] != permuted).mean() < 0.002


@pytest.mark.slow
def test_gptq_calibration_writes_its_codes_into_the_artifact(tiny_model, tokenizer, calib_ids, eval_ids, tmp_path):
    def calibrated(gptq: bool):
        model = copy.deepcopy(tiny_model)
        cfg = WKVQuantConfig(weight=WeightQuantConfig(group_size=-1, gptq=gptq), kv=KVQuantConfig(bits=4),
                             calib=CalibConfig(nsamples=4, seqlen=64, epochs=1))
        quantize_model_(model, cfg, calibration_samples(calib_ids, 4, 64, seed=0))
        return model, cfg

    (plain, _), (rounded, cfg) = calibrated(False), calibrated(True)
    changed = 0
    for lin, lin_plain in zip(quant_linears(rounded), quant_linears(plain)):
        assert lin.fixed_codes is not None
        assert torch.equal(lin.fake_quant(lin.weight),
                           dequantize_weight(lin.fixed_codes, lin.fixed_scale, lin.fixed_zero, lin.group_size))
        changed += (lin.fixed_codes != lin_plain.quantize(lin_plain.weight)[0]).sum().item()
    assert changed > 0
    windows = eval_windows(eval_ids, 128)[:8]
    loaded = load_quantized(save_artifact(tmp_path / "a", rounded, tokenizer, cfg, fp_dtype=torch.float32))
    stored = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]["wkvquant_config"]
    assert stored["weight"]["gptq"] is True
    for mode in (EvalMode.W, EvalMode.WKV):
        assert perplexity(loaded, windows, mode).ppl == pytest.approx(perplexity(rounded, windows, mode).ppl, rel=1e-4)



def test_second_moments_stay_float32_under_bfloat16_autocast():
    """Calibration's bf16 autocast must not reach the Hessian's X^T X (in bf16 it lost positive definiteness on
    SmolLM2 at 32 x 512 tokens): the accumulation matches float64 to float32's precision."""
    x = torch.randn(2, 300, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    hessian = torch.zeros(64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        add_second_moments_(hessian, x)
        add_second_moments_(hessian, x[:, :100])
    flat = torch.cat([x.reshape(-1, 64), x[:, :100].reshape(-1, 64)]).double()
    torch.testing.assert_close(hessian.double(), flat.T @ flat, rtol=1e-6, atol=1e-4)
