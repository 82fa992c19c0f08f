"""Equivalent scaling (WeightQuantConfig.equalize): exact in full precision, better on its own search objective."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from wkvq_core.calib.data import calibration_samples
from wkvq_core.calib.equalize import fold_scales_
from wkvq_core.config import CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.model import decoder_layers, prepare_model_, quant_linears, quant_state
from wkvq_core.pipeline import quantize_model_, rtn_layer
from wkvq_core.quant.equalize import search_scales
from wkvq_core.quant.primitives import fake_quant_weight


def gqa_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()


@pytest.mark.parametrize("target", ["runtime", "vllm"])
def test_folded_scales_leave_the_model_unchanged_in_full_precision(target):
    original = gqa_llama()
    config = WKVQuantConfig(weight=WeightQuantConfig(group_size=32), kv=KVQuantConfig(bits=4), target=target)
    model = prepare_model_(copy.deepcopy(original), config)
    gen = torch.Generator().manual_seed(1)
    sizes = {"qkv": 64, "o": 2 * 16, "gate_up": 64, "down": 96}
    for block in decoder_layers(model):
        fold_scales_(block, {name: torch.empty(n).uniform_(0.2, 5.0, generator=gen) for name, n in sizes.items()})
    ids = torch.randint(0, 128, (2, 24), generator=gen)
    with quant_state(model, weights=False, kv=False), torch.no_grad():
        changed = model(ids).logits
    reference = original(ids).logits.detach()
    assert (changed - reference).abs().max() < 1e-4
    assert not torch.equal(decoder_layers(model)[0].input_layernorm.weight, decoder_layers(original)[0].input_layernorm.weight)


def test_the_search_lowers_the_quantized_output_error_of_an_outlier_channel():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen)
    x[:, 5] *= 30  # a salient channel
    weight = torch.randn(48, 64, generator=gen)
    error = lambda s: (((x / s) @ fake_quant_weight(weight * s, 4, 32).T) - x @ weight.T).pow(2).sum()  # noqa: E731
    s = search_scales(x, [weight], 4, 32)
    assert s[5] > s.median() and error(s) < 0.9 * error(torch.ones(64))


@pytest.mark.slow
def test_an_equalized_calibration_changes_the_weights_and_keeps_full_precision(tiny_model, calib_ids):
    """... and the job's round-to-nearest baseline is of the original weights (the scaling undone, no GPTQ codes)."""
    config = WKVQuantConfig(weight=WeightQuantConfig(group_size=-1, equalize=True, gptq=True), kv=KVQuantConfig(bits=4),
                            calib=CalibConfig(nsamples=2, seqlen=32, epochs=1))
    original = copy.deepcopy(tiny_model)
    quantize_model_(tiny_model, config, calibration_samples(calib_ids, 2, 32, seed=0))
    ids = calib_ids[:64][None]
    with quant_state(tiny_model, weights=False, kv=False), torch.no_grad():
        assert torch.allclose(tiny_model(ids).logits, original(ids).logits, atol=1e-4, rtol=1e-4)
    assert not torch.equal(decoder_layers(tiny_model)[0].mlp.down_proj.weight,
                           decoder_layers(original)[0].mlp.down_proj.weight)
    for layer, reference in zip(decoder_layers(tiny_model), decoder_layers(original)):
        rtn = rtn_layer(layer)
        for lin in quant_linears(rtn):
            assert lin.fixed_codes is None and lin.clip is None
        for name, value in reference.named_parameters():
            assert torch.allclose(rtn.get_parameter(name), value, rtol=1e-5, atol=1e-7), name
