"""Decode attention read straight from the packed records equals the eager POQ attention over the dequantized past."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from wkvq_core.config import KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.evaluation.perplexity import greedy_without_cache
from wkvq_core.model import prepare_model_, quant_state
from wkvq_core.quant.kv_quant import poq_attention
from wkvq_core.runtime import packed_attention
from wkvq_core.runtime.cache_keyword import with_cache
from wkvq_core.runtime.kv_cache import PackedKVLayer, WKVQuantCache

from test_kv_quant import randomize_smoothing_


@pytest.mark.parametrize("bits,group", [(4, None), (4, 16), (3, None), (8, None)])
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("poq", [True, False])
@pytest.mark.parametrize("past", [1, 2, 9, 21])
def test_packed_decode_attention_equals_eager_poq(monkeypatch, bits, group, sinks, poq, past):
    monkeypatch.setattr(packed_attention, "CHUNK_TOKENS", 4)  # several chunks, a partial last one
    torch.manual_seed(past)
    batch, n_kv, n_rep, dim = 2, 3, 3, 64
    fast, reference = PackedKVLayer(bits, group, sinks), PackedKVLayer(bits, group, sinks)
    keys, values = torch.randn(batch, n_kv, past, dim) * 3, torch.randn(batch, n_kv, past, dim)
    fast.update(keys, values)
    reference.update(keys, values)
    query = torch.randn(batch, n_kv * n_rep, 1, dim)
    key_new, value_new = torch.randn(batch, n_kv, 1, dim) * 3, torch.randn(batch, n_kv, 1, dim)
    mask = torch.zeros(batch, 1, 1, past + 1)
    mask[1, ..., :2] = torch.finfo(torch.float32).min  # the second sequence is left-padded by two tokens
    got = fast.update_and_attend(query, key_new, value_new, mask, 0.125, poq)
    key_stored, value_stored = reference.update(key_new, value_new)
    expected = poq_attention(query, key_stored, value_stored, key_new, value_new, mask, 0.125, n_rep, poq)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert fast.get_seq_length() == reference.get_seq_length() == past + 1
    assert torch.equal(fast.keys, reference.keys) and torch.equal(fast.values, reference.values)


def test_storage_grows_in_pages_and_survives_crop_and_reorder(monkeypatch):
    monkeypatch.setattr(packed_attention, "CHUNK_TOKENS", 32)  # segments of 32 tokens: two pages of 16
    layer = PackedKVLayer(4)
    x = torch.randn(2, 1, 1, 8)
    layer.update(x, x)
    first_page = layer.key_segments[0].data_ptr()
    for _ in range(15):
        layer.update(x, x)
    assert layer.key_segments[0].data_ptr() == first_page  # appends within a page copy nothing
    for _ in range(24):
        layer.update(x, x)
    full_segment = layer.key_segments[0].data_ptr()
    for _ in range(40):
        layer.update(x, x)
    assert layer.key_segments[0].data_ptr() == full_segment  # a full segment is never copied again
    assert [segment.shape[-2] for segment in layer.key_segments] == [32, 32, 16]  # 80 tokens
    assert layer.allocated_bytes() == layer.nbytes() == 2 * layer.keys.nbytes
    before = layer._decode(layer.keys).clone()
    layer.crop(-31)  # back to 49 tokens
    assert [segment.shape[-2] for segment in layer.key_segments] == [32, 32]  # the emptied page is freed
    layer.reorder_cache(torch.tensor([1, 0]))
    y = torch.randn(2, 1, 1, 8)
    keys, _ = layer.update(y, y)
    assert torch.equal(keys[:, :, :49], before[[1, 0], :, :49])
    assert layer.get_seq_length() == 50


def record_bytes(head_dim: int, bits: int, group_size: int | None) -> int:
    """One token's record per KV head, by the format: packed codes, then an fp16 scale and an fp16 zero point
    per group."""
    groups = head_dim // (group_size or head_dim)
    return math.ceil(head_dim * bits / 8) + groups * (2 + 2)


@pytest.mark.parametrize("bits,group,sinks,page_tokens", [(4, None, 0, None), (3, 4, 2, 5)])
def test_allocated_memory_stays_within_one_page_of_the_format(tiny_model, bits, group, sinks, page_tokens):
    """Token-by-token decode on the shipped model: every layer holds the format's bytes for its tokens, plus
    less than one page of room (16 tokens by default)."""
    page, batch, config = page_tokens or 16, 2, tiny_model.config
    n_kv, head_dim = config.num_key_value_heads, config.head_dim
    prepare_model_(tiny_model, WKVQuantConfig(weight=WeightQuantConfig(bits=16),
                                              kv=KVQuantConfig(bits=bits, group_size=group, sink_tokens=sinks)))
    cache = WKVQuantCache(config, kv_bits=bits, kv_group_size=group, sink_tokens=sinks,
                          **({"page_tokens": page_tokens} if page_tokens else {}))
    ids = torch.randint(3, config.vocab_size, (batch, 300))
    per_token = batch * 2 * n_kv * record_bytes(head_dim, bits, group)  # K and V
    per_sink = batch * 2 * n_kv * head_dim * 4  # unquantized, in the model's fp32
    checked = []
    with quant_state(tiny_model, weights=False, kv=True), torch.no_grad():
        for t in range(ids.shape[1]):
            tiny_model(ids[:, t : t + 1], **with_cache(cache), use_cache=True)
            if t + 1 in (1, 15, 16, 17, 127, 300):
                held_sinks = min(t + 1, sinks)
                formula = per_sink * held_sinks + per_token * (t + 1 - held_sinks)
                for layer in cache.layers:
                    assert layer.nbytes() == formula
                    assert formula <= layer.allocated_bytes() < formula + per_token * page, (t + 1, formula)
                checked.append(t + 1)
    assert len(checked) == 6
    assert cache.allocated_bytes() - cache.nbytes() < config.num_hidden_layers * per_token * page


@pytest.mark.parametrize("page_tokens", [0, -16, 2.5, True])
def test_page_size_must_be_a_positive_whole_number(page_tokens):
    with pytest.raises(ValueError, match="page_tokens must be a positive whole number"):
        WKVQuantCache(LlamaConfig(num_hidden_layers=1), kv_bits=4, page_tokens=page_tokens)


@pytest.mark.parametrize("kv", [KVQuantConfig(bits=4), KVQuantConfig(bits=4, k_pre_rope=True, sink_tokens=3, rotate=True),
                                KVQuantConfig(bits=4, group_size=16, poq=False)], ids=["paper", "pre-rope", "groups"])
def test_decode_takes_the_packed_path_and_equals_the_cache_free_reference(monkeypatch, kv):
    """SmolLM2's attention shapes (head_dim 64, GQA 3:1), random weights, 64 greedy tokens."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=9, head_dim=64, num_key_value_heads=3, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval().double()
    prepare_model_(model, WKVQuantConfig(weight=WeightQuantConfig(bits=16), kv=kv))
    randomize_smoothing_(model)
    calls = []
    original = packed_attention.packed_decode_attention
    monkeypatch.setattr(packed_attention, "CHUNK_TOKENS", 16)  # several chunks per step
    monkeypatch.setattr("wkvq_core.runtime.kv_cache.packed_decode_attention",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    prompt = torch.randint(0, 256, (2, 12))
    with quant_state(model, weights=False, kv=True), torch.no_grad():
        expected, logits = greedy_without_cache(model, prompt, 64)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                             **with_cache(WKVQuantCache(model.config, kv_bits=4, kv_group_size=kv.group_size,
                                                        sink_tokens=kv.sink_tokens)))
    assert torch.equal(out.sequences, expected)
    assert (torch.stack(out.logits, 1).float() - logits).abs().max() < 5e-3  # the cache dequantizes in fp32
    assert len(calls) == 63 * config.num_hidden_layers  # every step after the prefill
