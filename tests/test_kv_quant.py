import copy
import dataclasses

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from wkvq_core.calib.calibrate import calibrate_
from wkvq_core.calib.data import calibration_samples, eval_windows
from wkvq_core.config import TARGET_NAMES, CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.evaluation.perplexity import EvalMode, decode_perplexity, kv_bytes_per_token, perplexity
from wkvq_core.model import attentions, frozen_weights, prepare_model_, quant_linears, quant_state
from wkvq_core.quant.kv_quant import poq_attention
from wkvq_core.quant.primitives import fake_quant_per_token
from wkvq_core.runtime.cache_keyword import with_cache


def w4kv4(poq=True, smoothing=True, group_size=-1):
    return WKVQuantConfig(
        weight=WeightQuantConfig(bits=4, group_size=group_size, lwc=False),
        kv=KVQuantConfig(bits=4, smoothing=smoothing, poq=poq),
        calib=CalibConfig(nsamples=4, seqlen=64, epochs=0),
    )


def random_model(arch: str, n_heads: int, n_kv_heads: int, **extra):
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=256, **extra)
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**kw)) if arch == "llama" else MistralForCausalLM(MistralConfig(**kw))
    return model.eval()


MODELS = {
    "llama-gqa": lambda: random_model("llama", 8, 2),
    "llama-mha": lambda: random_model("llama", 4, 4),
    "mistral-gqa": lambda: random_model("mistral", 8, 4),
    "llama3-rope-gqa": lambda: random_model("llama", 8, 2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, rope_theta=500000.0),
}


def randomize_smoothing_(model):
    with torch.no_grad():
        for attn in attentions(model):
            attn.k_scale.uniform_(0.3, 3.0)
            attn.k_shift.normal_(0, 2.0)
            attn.v_scale.uniform_(0.3, 3.0)
            attn.v_shift.normal_(0, 2.0)


def test_poq_attention_matches_per_query_reference():
    """score(i, j<i) uses dequantized K_j, score(i, i) FP K_i; out = sum_{j<i} P_ij V^_j + P_ii V_i."""
    torch.manual_seed(0)
    b, h, h_kv, t, d = 2, 4, 2, 7, 8
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, h_kv, t, d), torch.randn(b, h_kv, t, d)
    kq, vq = fake_quant_per_token(k, 4), fake_quant_per_token(v, 4)
    out = poq_attention(q, kq, vq, k, v, None, 0.5, h // h_kv, poq=True)
    for i in range(t):
        keys = torch.cat([kq[:, :, :i], k[:, :, i : i + 1]], 2).repeat_interleave(h // h_kv, 1)
        vals = torch.cat([vq[:, :, :i], v[:, :, i : i + 1]], 2).repeat_interleave(h // h_kv, 1)
        probs = torch.softmax(q[:, :, i : i + 1] @ keys.transpose(2, 3) * 0.5, -1)
        torch.testing.assert_close(out[:, i], (probs @ vals)[:, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_smoothing_is_exact_without_quantization(name):
    model = MODELS[name]()
    ids = torch.randint(0, 128, (2, 40))
    reference = model(ids, use_cache=False).logits
    prepare_model_(model, w4kv4())
    randomize_smoothing_(model)
    with quant_state(model, weights=False, kv=False, smoothing=True):
        smoothed = model(ids, use_cache=False).logits
    assert (smoothed - reference).abs().max() < 1e-4
    with quant_state(model, weights=False, kv=True, smoothing=True):
        assert (model(ids, use_cache=False).logits - reference).abs().max() > 1e-2  # KV4 really changes the output


def test_smoothing_is_exact_on_the_shipped_model(tiny_model, eval_ids):
    ids = eval_windows(eval_ids, 128)[:2]
    reference = tiny_model(ids, use_cache=False).logits
    prepare_model_(tiny_model, w4kv4())
    randomize_smoothing_(tiny_model)
    with quant_state(tiny_model, weights=False, kv=False, smoothing=True):
        assert (tiny_model(ids, use_cache=False).logits - reference).abs().max() < 1e-4


def incremental_logits(model, ids):
    """Token-by-token decoding through a transformers cache holding the quantized K/V."""
    cache = DynamicCache(config=model.config)
    steps = [model(ids[:, t : t + 1], **with_cache(cache), use_cache=True).logits for t in range(ids.shape[1])]
    return torch.cat(steps, 1)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("poq", [True, False])
def test_parallel_pass_equals_incremental_decode(name, poq):
    model = MODELS[name]()
    prepare_model_(model, w4kv4(poq=poq))
    randomize_smoothing_(model)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad(), quant_state(model, weights=True, kv=True):
        parallel = model(ids, use_cache=False).logits
        decoded = incremental_logits(model, ids)
    # float summation order differs between the paths and can move a value across a rounding boundary
    assert (parallel - decoded).abs().max() < 5e-4


def smoothed_tiny(model, calib_ids, **kw):
    cfg = w4kv4(**kw)
    prepare_model_(model, cfg)
    calibrate_(model, cfg, calibration_samples(calib_ids, 4, 64, seed=0))  # epochs=0: smoothing init only
    return model


def test_poq_perplexity_equals_token_by_token_decode(tiny_model, calib_ids, eval_ids):
    model = smoothed_tiny(tiny_model, calib_ids)
    windows = eval_windows(eval_ids, 128)[:2]
    parallel = perplexity(model, windows, EvalMode.WKV)
    decoded = decode_perplexity(model, windows, EvalMode.WKV)
    assert parallel.tokens == decoded.tokens == 2 * 127
    assert abs(parallel.ppl - decoded.ppl) / decoded.ppl < 1e-3
    weights_only = perplexity(model, windows, EvalMode.W)
    assert parallel.ppl > weights_only.ppl  # the quantized past is read (magnitude: test_rtn_kv4_costs_what_it_should)


def test_rtn_kv4_costs_what_it_should(tiny_model, eval_ids):
    """Per-token RTN KV4 with POQ on stories260k costs roughly +40-50 % perplexity: the past is read."""
    cfg = WKVQuantConfig(weight=WeightQuantConfig(bits=16), kv=KVQuantConfig(bits=4, smoothing=False))
    prepare_model_(tiny_model, cfg)
    windows = eval_windows(eval_ids, 256)[:32]
    fp = perplexity(tiny_model, windows, EvalMode.FP).ppl
    kv4 = perplexity(tiny_model, windows, EvalMode.WKV).ppl
    assert perplexity(tiny_model, windows, EvalMode.W).ppl == pytest.approx(fp)
    assert 1.3 < kv4 / fp < 1.6


def test_poq_helps_over_quantizing_the_current_token(tiny_model, calib_ids, eval_ids):
    windows = eval_windows(eval_ids, 256)[:8]
    with_poq = perplexity(smoothed_tiny(copy.deepcopy(tiny_model), calib_ids, smoothing=False), windows).ppl
    without = perplexity(smoothed_tiny(tiny_model, calib_ids, smoothing=False, poq=False), windows).ppl
    assert with_poq < without


def test_smoothing_init_reduces_kv4_error(tiny_model, calib_ids, eval_ids):
    windows = eval_windows(eval_ids, 256)[:8]
    plain = perplexity(smoothed_tiny(copy.deepcopy(tiny_model), calib_ids, smoothing=False), windows).ppl
    smoothed = perplexity(smoothed_tiny(tiny_model, calib_ids), windows).ppl
    assert smoothed < plain


def test_kv_bytes_per_token_formula(tiny_model):
    cfg = tiny_model.config  # 5 layers, 4 KV heads, head_dim 8
    assert kv_bytes_per_token(cfg, KVQuantConfig(bits=16)) == 5 * 4 * 2 * 8 * 2
    assert kv_bytes_per_token(cfg, KVQuantConfig(bits=4)) == 5 * 4 * 2 * (8 * 4 / 8 + 4)
    assert kv_bytes_per_token(cfg, KVQuantConfig(bits=4, group_size=4)) == 5 * 4 * 2 * (8 * 4 / 8 + 2 * 4)


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_frozen_weights_hold_the_folded_smoothing(target):
    """`frozen_weights` fake-quantizes the projections once with the smoothing folded in: the same logits as folding
    and quantizing on every forward, and exact with quantization off (head_dim 32: the engines' KV blocks)."""
    model = random_model("llama", 2, 1)
    ids = torch.randint(0, 128, (2, 40))
    reference = model(ids, use_cache=False).logits
    prepare_model_(model, dataclasses.replace(w4kv4(group_size=32), target=target))
    randomize_smoothing_(model)
    with torch.no_grad(), quant_state(model, weights=False, kv=False, smoothing=True), frozen_weights(model):
        assert (model(ids, use_cache=False).logits - reference).abs().max() < 1e-4
    with torch.no_grad(), quant_state(model, weights=True, kv=True):
        per_forward = model(ids, use_cache=False).logits
        with frozen_weights(model):
            assert all(lin.frozen_weight is not None for lin in quant_linears(model))
            frozen = model(ids, use_cache=False).logits
    assert (per_forward - reference).abs().max() > 1e-2  # W4KV4 really changes the output
    torch.testing.assert_close(frozen, per_forward, rtol=1e-5, atol=1e-5)
