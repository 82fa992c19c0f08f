"""KV options beyond the paper: each is exact in full precision, decodes through a cache exactly as the cache-free
parallel pass computes, and survives the artifact round trip; relative smoothing trains other parameters and leaves
plain ones."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parametrize
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from wkvq_core.artifact import load_quantized, save_artifact
from wkvq_core.calib.calibrate import calibrate_, calibration_state
from wkvq_core.calib.data import calibration_samples, eval_windows
from wkvq_core.config import CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.errors import ConfigError
from wkvq_core.evaluation.perplexity import EvalMode, perplexity
from wkvq_core.export.compressed_tensors import export as export_ct
from wkvq_core.model import attentions, prepare_model_, quant_state
from wkvq_core.quant.kv_quant import ChannelRange
from wkvq_core.quant.primitives import fake_quant_per_token, hadamard
from wkvq_core.runtime.cache_keyword import with_cache
from wkvq_core.runtime.kv_cache import WKVQuantCache

from test_kv_quant import randomize_smoothing_

OPTIONS = {
    "pre-rope": dict(k_pre_rope=True),
    "rotate": dict(rotate=True),
    "pre-rope+rotate": dict(k_pre_rope=True, rotate=True),
    "sinks": dict(sink_tokens=3),
}
LENGTH = 40


def gqa_llama(head_dim: int = 16) -> LlamaForCausalLM:
    torch.manual_seed(3)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=8 * head_dim, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256)).eval()


def kv4(model, weight_bits: int = 16, **options) -> LlamaForCausalLM:
    prepare_model_(model, WKVQuantConfig(weight=WeightQuantConfig(bits=weight_bits, group_size=64, lwc=False),
                                         kv=KVQuantConfig(bits=4, **options)))
    randomize_smoothing_(model)
    return model


def decode(model, ids: torch.Tensor, cache, chunks: list[int] | None = None) -> torch.Tensor:
    """Logits of feeding ids through `cache` in the given chunk lengths (default: one token at a time)."""
    chunks, logits, t = chunks or [1] * ids.shape[1], [], 0
    for n in chunks:
        logits.append(model(ids[:, t : t + n], **with_cache(cache), use_cache=True).logits)
        t += n
    return torch.cat(logits, dim=1)


def test_hadamard_is_orthonormal_and_refuses_other_sizes():
    h = hadamard(64, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(64, dtype=torch.float64))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)
    with pytest.raises(ConfigError, match="power-of-two head_dim"):
        kv4(gqa_llama(head_dim=12), rotate=True)


@pytest.mark.parametrize("name", list(OPTIONS))
@torch.no_grad()
def test_each_option_is_exact_without_quantization(name):
    model = gqa_llama()
    ids = torch.randint(0, 256, (2, LENGTH))
    reference = model(ids, use_cache=False).logits
    kv4(model, **OPTIONS[name])
    with quant_state(model, weights=False, kv=False, smoothing=True):
        assert (model(ids, use_cache=False).logits - reference).abs().max() < 1e-4
    with quant_state(model, weights=False, kv=True):
        assert (model(ids, use_cache=False).logits - reference).abs().max() > 1e-2


CACHES = {"DynamicCache": lambda m: DynamicCache(config=m.config),
          "WKVQuantCache": lambda m: WKVQuantCache(m.config, 4, sink_tokens=attentions(m)[0].sink_tokens)}


@pytest.mark.parametrize("cache_name", list(CACHES))
@pytest.mark.parametrize("name", list(OPTIONS))
@torch.no_grad()
def test_decode_through_the_cache_equals_the_cache_free_pass(name, cache_name):
    model = kv4(gqa_llama(), weight_bits=4, **OPTIONS[name])
    ids = torch.randint(0, 256, (2, LENGTH))
    with quant_state(model, weights=True, kv=True):
        cache = CACHES[cache_name](model)
        decoded = decode(model, ids, cache, chunks=[5] + [1] * (LENGTH - 5))  # a prefill, then one token a step
        expected = model(ids, use_cache=False).logits
    assert (decoded - expected).abs().max() < 2e-3


@torch.no_grad()
def test_sink_tokens_are_read_in_full_precision():
    model = kv4(gqa_llama(), sink_tokens=4)
    ids = torch.randint(0, 256, (1, LENGTH))
    with quant_state(model, weights=False, kv=True):
        quantized = model(ids, use_cache=False).logits
    with quant_state(model, weights=False, kv=False, smoothing=True):
        exact = model(ids, use_cache=False).logits
    assert (quantized[:, :5] - exact[:, :5]).abs().max() < 1e-4  # positions 0..4 see only sinks and themselves
    assert (quantized[:, 5:] - exact[:, 5:]).abs().max() > 1e-2


@torch.no_grad()
def test_fp_prefill_attends_in_full_precision_and_stores_the_prompt_quantized():
    model = kv4(gqa_llama(), fp_prefill=True)
    ids = torch.randint(0, 256, (2, LENGTH))
    prefill, rest = 12, [1] * (LENGTH - 12)
    with quant_state(model, weights=False, kv=True):
        decoded = decode(model, ids, DynamicCache(config=model.config), chunks=[prefill] + rest)
    # reference: the prompt run with KV quantization off, its cached K~/V~ then quantized, the rest decoded
    reference = DynamicCache(config=model.config)
    with quant_state(model, weights=False, kv=False, smoothing=True):
        exact = decode(model, ids[:, :prefill], reference, chunks=[prefill])
    for layer in reference.layers:
        layer.keys, layer.values = fake_quant_per_token(layer.keys, 4), fake_quant_per_token(layer.values, 4)
    with quant_state(model, weights=False, kv=True):
        expected = torch.cat([exact, decode(model, ids[:, prefill:], reference)], dim=1)
    assert (decoded - expected).abs().max() < 2e-3
    with quant_state(model, weights=False, kv=True):
        assert (decoded - model(ids, use_cache=False).logits).abs().max() > 1e-2  # not the one-pass POQ result


@pytest.mark.parametrize("options", [dict(k_pre_rope=True, rotate=True, sink_tokens=4), dict(rotate=True)])
def test_artifact_round_trip_keeps_the_options(tiny_model, tokenizer, calib_ids, eval_ids, tmp_path, options):
    config = WKVQuantConfig(weight=WeightQuantConfig(bits=4, group_size=-1, lwc=False), kv=KVQuantConfig(**options),
                            calib=CalibConfig(nsamples=4, seqlen=64, epochs=0))
    prepare_model_(tiny_model, config)
    calibrate_(tiny_model, config, calibration_samples(calib_ids, 4, 64, seed=0))
    windows = eval_windows(eval_ids, 128)[:4]
    simulated = perplexity(tiny_model, windows, EvalMode.WKV).ppl
    loaded = load_quantized(save_artifact(tmp_path / "a", tiny_model, tokenizer, config, fp_dtype=torch.float32))
    assert attentions(loaded)[0].k_pre_rope == options.get("k_pre_rope", False)
    assert abs(perplexity(loaded, windows, EvalMode.WKV).ppl / simulated - 1) < 1e-3
    with torch.no_grad():
        ids = windows[:1, :48]
        decoded = decode(loaded, ids, WKVQuantCache(loaded.config))
        assert (decoded - loaded(ids, use_cache=False).logits).abs().max() < 2e-2
    with pytest.raises(ConfigError, match="rotated .* cannot express"):
        export_ct(tmp_path / "a", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_relative_smoothing_trains_log_scale_and_leaves_plain_parameters(tiny_model, calib_ids):
    samples = calibration_samples(calib_ids, 4, 64, seed=0)

    def calibrated(epochs: int, **kv) -> LlamaForCausalLM:
        model = copy.deepcopy(tiny_model)
        config = WKVQuantConfig(weight=WeightQuantConfig(bits=16), kv=KVQuantConfig(bits=4, lr=1e-2, **kv),
                                calib=CalibConfig(nsamples=4, seqlen=64, epochs=epochs))
        prepare_model_(model, config)
        calibrate_(model, config, samples)
        return model

    init, direct, relative = calibrated(0), calibrated(2), calibrated(2, smooth_param="relative")
    assert not any(parametrize.is_parametrized(a) for a in attentions(relative))
    assert set(calibration_state(relative)) == set(calibration_state(direct))
    assert all(not p.requires_grad for p in relative.parameters())
    for a0, ad, ar in zip(attentions(init), attentions(direct), attentions(relative)):
        assert (ar.k_scale > 0).all() and (ar.v_scale > 0).all()
        moved_direct = ((ad.k_scale / a0.k_scale).log().abs().mean())
        moved_relative = ((ar.k_scale / a0.k_scale).log().abs().mean())
        assert moved_relative != moved_direct  # another parametrization really was trained
    with pytest.raises(ConfigError, match="smooth_param"):
        KVQuantConfig(smooth_param="log")


@torch.no_grad()
def test_packed_sinks_survive_crop_and_beam_reorder():
    model = kv4(gqa_llama(), sink_tokens=3)
    ids = torch.randint(0, 256, (2, 12))
    with quant_state(model, weights=False, kv=True):
        cache = WKVQuantCache(model.config, 4, sink_tokens=3)
        decode(model, ids[:, :10], cache)
        layer = cache.layers[0]
        assert (layer.sinks.get_seq_length(), layer.get_seq_length()) == (3, 10)
        fp_bytes = 2 * layer.sinks.keys.nbytes
        assert layer.nbytes() == fp_bytes + 2 * layer.keys.nbytes  # 3 unquantized tokens + 7 packed records
        cache.crop(-8)  # 10 -> 2 tokens: into the sinks
        assert (layer.sinks.get_seq_length(), layer.get_seq_length()) == (2, 2)
        cache.reorder_cache(torch.tensor([1, 0]))
        resumed = decode(model, ids.flip(0)[:, 2:], cache)
        fresh = decode(model, ids.flip(0), WKVQuantCache(model.config, 4, sink_tokens=3))[:, 2:]
    assert (resumed - fresh).abs().max() < 1e-4
    with pytest.raises(ConfigError, match="keeps 0 sink tokens unquantized, the model 3"):
        decode(model, ids, WKVQuantCache(model.config, 4))


@torch.no_grad()
def test_sink_tokens_are_left_out_of_the_smoothing_statistics():
    model = kv4(gqa_llama(), k_pre_rope=True, sink_tokens=2)  # layer 0, pre-RoPE: K depends on the token alone
    ids = torch.randint(0, 256, (1, 12))
    first = attentions(model)[0]
    seen = {}
    for sinks, tokens in ((2, ids), (0, ids[:, 2:])):
        first.sink_tokens, first.observer = sinks, ChannelRange()
        model(tokens, use_cache=False)
        seen[sinks], first.observer = first.observer, None
    for name in ("kmin", "kmax", "vmin", "vmax"):
        assert torch.allclose(getattr(seen[2], name), getattr(seen[0], name), atol=1e-5)


@pytest.mark.parametrize("smooth_param", ["direct", "relative"])
def test_v_smoothing_shift_only_keeps_o_proj_weights_and_trains_the_rest(tiny_model, calib_ids, smooth_param):
    """smooth_v_scale=False: V's scale stays 1 (o_proj's weights are its own), its shift and K's smoothing train."""
    samples = calibration_samples(calib_ids, 4, 64, seed=0)
    config = WKVQuantConfig(weight=WeightQuantConfig(bits=4, group_size=-1),
                            kv=KVQuantConfig(bits=4, lr=1e-2, smooth_param=smooth_param, smooth_v_scale=False),
                            calib=CalibConfig(nsamples=4, seqlen=64, epochs=1))
    model = prepare_model_(copy.deepcopy(tiny_model), config)
    calibrate_(model, config, samples)
    for attn in attentions(model):
        assert torch.equal(attn.v_scale, torch.ones_like(attn.v_scale))
        assert torch.equal(attn.projection("o_proj")[0], attn.o_proj.weight)
        assert attn.v_shift.abs().sum() > 0 and not torch.equal(attn.k_scale, torch.ones_like(attn.k_scale))
    assert "smooth_v_scale" not in WKVQuantConfig().to_dict()["kv"]
    assert WKVQuantConfig.from_dict(config.to_dict()) == config
