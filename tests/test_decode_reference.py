"""Decoding through every KV cache equals a cache-free reference.

The reference never touches a cache: at each step it runs a full forward over the whole sequence so far
(`use_cache=False`, the parallel POQ pass of a prepared model) and reads the last position. The caches, all under
our attention (`WKVAttention`):

- `DynamicCache`: the attention stores fake-quantized K~/V~ (mode wkv);
- `WKVQuantCache`: the cache packs K~/V~ itself (mode wkv);
- `KIVICache`: the cache quantizes (mode w: weights quantized, the attention's own KV quantization off); its
  reference is the parallel pass in which each query reads the past as KIVI's schedule has quantized it by then.

A cache that is ignored (transformers 5.24 renamed the keyword that carries it), mis-positioned or read wrongly
gives a model that sees another past, and these tests fail.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from unittest import mock

import pytest
import torch
from torch.nn import functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import repeat_kv

from wkvq_core.calib.calibrate import calibrate_
from wkvq_core.calib.data import calibration_samples, eval_windows
from wkvq_core.config import CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.evaluation.baselines.kivi_cache import KIVICache, kivi_bytes
from wkvq_core.evaluation.perplexity import EvalMode, _mode_flags, greedy_without_cache, kv_bytes_per_token
from wkvq_core.model import prepare_model_, quant_state
from wkvq_core.quant import kv_quant
from wkvq_core.runtime.cache_keyword import with_cache
from wkvq_core.runtime.kv_cache import WKVQuantCache

from test_kivi_cache import fake_quant_group
from test_kv_quant import randomize_smoothing_

KV_BITS = 4
KIVI_G, KIVI_R = 8, 16  # small, so that both of KIVI's quantized stores fill within a window
DECODE_LEN = 96
NEW_TOKENS = 64
LOGIT_TOLERANCE = 2e-2
pytestmark = pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")


def w4kv4(group_size: int) -> WKVQuantConfig:
    return WKVQuantConfig(weight=WeightQuantConfig(bits=4, group_size=group_size, lwc=False),
                          kv=KVQuantConfig(bits=KV_BITS), calib=CalibConfig(nsamples=4, seqlen=64, epochs=0))


def shipped_model(tiny_model, calib_ids, eval_ids):
    """stories260k (5 layers, GQA 8/4, head_dim 8), W4 per row, KV4 with the smoothing initialised from text."""
    config = w4kv4(group_size=-1)
    prepare_model_(tiny_model, config)
    calibrate_(tiny_model, config, calibration_samples(calib_ids, 4, 64, seed=0))  # epochs 0: smoothing init
    return tiny_model, eval_windows(eval_ids, DECODE_LEN)[:2]


def gqa_model(*_):
    """A random LlamaConfig model: 3 layers, GQA 8/2 (4 queries per KV head), head_dim 16, W4 g64, KV4, random
    smoothing."""
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    prepare_model_(model, w4kv4(group_size=64))
    randomize_smoothing_(model)
    return model, torch.randint(0, 256, (2, DECODE_LEN))


MODELS = {"stories260k": shipped_model, "llama-gqa": gqa_model}


@pytest.fixture(params=list(MODELS))
def model_and_windows(request, tiny_model, calib_ids, eval_ids):
    return MODELS[request.param](tiny_model, calib_ids, eval_ids)


# --------------------------------------------------------------------------- KIVI's schedule without a cache

def kivi_keys(keys: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Keys quantized per channel over aligned groups of `group` tokens (a last incomplete group kept as is)."""
    b, h, t, d = keys.shape
    full = t // group * group
    grouped = keys[:, :, :full].reshape(b, h, full // group, group, d).transpose(-1, -2)
    quantized = fake_quant_group(grouped, bits).transpose(-1, -2).reshape(b, h, full, d)
    return torch.cat([quantized.to(keys.dtype), keys[:, :, full:]], dim=2)


def kivi_values(values: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Values quantized per token over groups of min(group, head_dim) channels."""
    b, h, t, d = values.shape
    v_group = min(group, d)
    return fake_quant_group(values.reshape(b, h, t, d // v_group, v_group), bits).reshape(b, h, t, d).to(values.dtype)


@contextmanager
def kivi_schedule(bits: int, group: int, residual: int, prefill: int):
    """The attention's parallel pass replaced by KIVI's schedule: query i (a decode step after a prefill of
    `prefill` tokens) reads the keys of the first (i // R) * R tokens quantized, the values of the first
    max(i - R, 0) tokens quantized, everything else exactly; the prefill's own queries read everything exactly."""

    def attention(query, key_stored, value_stored, key_new, value_new, attention_mask, scaling, n_rep, poq):
        t = query.shape[-2]
        assert key_stored.shape[-2] == t and not poq  # cache-free, whole sequence; the cache does the quantizing
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        decoded = i >= prefill
        key_quantized = decoded & (j < i // residual * residual)
        value_quantized = decoded & (j < (i - residual).clamp(min=0))
        keys_q, keys = repeat_kv(kivi_keys(key_stored, bits, group), n_rep), repeat_kv(key_stored, n_rep)
        scores = torch.where(key_quantized, query @ keys_q.transpose(2, 3), query @ keys.transpose(2, 3)) * scaling
        if attention_mask is None:
            scores = scores.masked_fill(j > i, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., :t]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        values_q = repeat_kv(kivi_values(value_stored, bits, group), n_rep)
        out = (probs * value_quantized) @ values_q + (probs * ~value_quantized) @ repeat_kv(value_stored, n_rep)
        return out.transpose(1, 2).contiguous()

    with mock.patch.object(kv_quant, "poq_attention", attention):
        yield


# --------------------------------------------------------------------------- the caches

def packed_bytes(model, batch: int, tokens: int) -> float:
    return kv_bytes_per_token(model.config, KVQuantConfig(bits=KV_BITS)) * batch * tokens


def kivi_held(model, batch: int, tokens: int) -> int:
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return batch * kivi_bytes(c.num_hidden_layers, c.num_key_value_heads, head_dim, tokens, KV_BITS, KIVI_G, KIVI_R,
                              fp_bytes=4)


CACHES = {
    # name: (mode, new cache, reference after a prefill of n tokens, nbytes formula or None)
    "DynamicCache": (EvalMode.WKV, lambda m: DynamicCache(config=m.config), lambda n: nullcontext(), None),
    "WKVQuantCache": (EvalMode.WKV, lambda m: WKVQuantCache(m.config, kv_bits=KV_BITS), lambda n: nullcontext(),
                      packed_bytes),
    "KIVICache": (EvalMode.W, lambda m: KIVICache(m.config, KV_BITS, KIVI_G, KIVI_R),
                  lambda n: kivi_schedule(KV_BITS, KIVI_G, KIVI_R, prefill=n), kivi_held),
}


def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()


@pytest.mark.parametrize("cache_name", list(CACHES))
@torch.no_grad()
def test_token_by_token_decode_equals_the_cache_free_reference(model_and_windows, cache_name):
    model, windows = model_and_windows
    mode, make_cache, reference, formula = CACHES[cache_name]
    batch, length = windows.shape
    with quant_state(model, **_mode_flags(mode)):
        cache, decoded = make_cache(model), []
        for t in range(length):
            decoded.append(model(windows[:, t : t + 1], **with_cache(cache), use_cache=True).logits[:, -1])
            assert cache.get_seq_length() == t + 1  # grows by exactly the tokens fed
        if formula is not None:
            assert cache.nbytes() == formula(model, batch, length)
        with reference(1):
            expected = [model(windows[:, : t + 1], use_cache=False).logits[:, -1] for t in range(length)]
    decoded, expected = torch.stack(decoded, 1), torch.stack(expected, 1)
    # the two paths sum in other orders; a K/V element that lands on a rounding boundary can take the other code
    # and move later logits by ~1e-3 (a cache ignored or misplaced moves them by whole units)
    assert (decoded - expected).abs().max() < LOGIT_TOLERANCE
    ppl_decoded = math.exp(nll(decoded[:, :-1], windows[:, 1:]))
    ppl_expected = math.exp(nll(expected[:, :-1], windows[:, 1:]))
    assert abs(ppl_decoded - ppl_expected) / ppl_expected < 1e-3
    with quant_state(model, weights=True, kv=False):
        unquantized_past = model(windows, use_cache=False).logits
    assert (decoded - unquantized_past).abs().max() > 1e-2  # the quantized past is what was read


@pytest.mark.parametrize("cache_name", list(CACHES))
@torch.no_grad()
def test_generate_equals_cache_free_greedy(model_and_windows, cache_name):
    model, windows = model_and_windows
    mode, make_cache, reference, _ = CACHES[cache_name]
    prompt = windows[:1, :8]
    with quant_state(model, **_mode_flags(mode)):
        cache = make_cache(model)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True, **with_cache(cache))
        with reference(prompt.shape[1]):
            expected, expected_logits = greedy_without_cache(model, prompt, NEW_TOKENS)
    assert out.sequences.shape == expected.shape
    assert torch.equal(out.sequences, expected)
    assert (torch.stack(out.logits, 1) - expected_logits).abs().max() < LOGIT_TOLERANCE
    assert cache.get_seq_length() == prompt.shape[1] + NEW_TOKENS - 1  # the last new token is never fed back
