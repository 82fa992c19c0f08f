"""Layer-by-layer jobs: decoder layers read from a (sharded) checkpoint when their block needs them, evaluated and
written to the artifact as they finish. Checked against the whole-model path: the model loaded at once,
calibrated, evaluated by whole-model forwards and serialized by the safetensors library itself."""

import json
import math
import shutil
import time

import pytest
import torch
from safetensors.torch import save
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from wkvq_core.artifact import QUANT_METHOD, WEIGHTS, packed_state_dict
from wkvq_core.calib.checkpoint import SafetensorsStream, _metadata
from wkvq_core.calib.data import calibration_samples, eval_windows, load_text, tokenize
from wkvq_core.calib.loader import INDEX_FILE, StreamedLayers
from wkvq_core.calib.progress import CalibrationCallbacks, EventKind
from wkvq_core.config import CalibConfig, EvalMode, WeightQuantConfig, WKVQuantConfig, kv_config
from wkvq_core.errors import CalibrationCancelled
from wkvq_core.evaluation.perplexity import _mode_flags
from wkvq_core.model import frozen_weights, load_model, quant_state
from wkvq_core.pipeline import QuantizeJob, quantize_model_, run_quantize_job

from conftest import CALIB_TEXT, EVAL_TEXT, TINY_MODEL, wkvq_peak_rss

SEQLEN = 64


def _config(group_size=-1, **calib) -> WKVQuantConfig:
    return WKVQuantConfig(weight=WeightQuantConfig(group_size=group_size), kv=kv_config("recommended"),
                          calib=CalibConfig(nsamples=4, seqlen=SEQLEN, epochs=1, crr_k=2, **calib))


def _sharded(model, tokenizer_dir, out, shard_size="60KB"):
    model.save_pretrained(out, max_shard_size=shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    assert (out / INDEX_FILE).is_file() and len(list(out.glob("*.safetensors"))) > 2
    return out


@pytest.fixture(scope="module")
def eval_head(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval-head.txt"
    path.write_text(EVAL_TEXT.read_text(encoding="utf-8")[:2_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory):
    """A random LlamaConfig model (GQA 4:1, head_dim 16, untied head, 3 layers) with the toy model's tokenizer."""
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return _sharded(LlamaForCausalLM(config).eval(), TINY_MODEL, tmp_path_factory.mktemp("gqa") / "ckpt")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model, _ = load_model(TINY_MODEL)
    return _sharded(model, TINY_MODEL, tmp_path_factory.mktemp("tiny") / "ckpt")


def _whole_model_reference(source, config, eval_path):
    """Today's path: the whole model in memory, perplexity by whole-model forwards, bytes by safetensors."""
    model, tokenizer = load_model(source)
    samples = calibration_samples(tokenize(tokenizer, load_text(str(CALIB_TEXT))), 4, SEQLEN, config.calib.seed)
    quantize_model_(model, config, samples)
    windows = eval_windows(tokenize(tokenizer, load_text(str(eval_path))), SEQLEN)
    ppl = {}
    for mode in EvalMode:
        nll = 0.0
        with quant_state(model, **_mode_flags(mode)), frozen_weights(model), torch.no_grad():
            for ids in windows.split(1):
                logits = model(ids, use_cache=False).logits[:, :-1].float()
                nll += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        ppl[mode.value] = math.exp(nll / (windows.shape[0] * (SEQLEN - 1)))
    weights = save(packed_state_dict(model), metadata=_metadata({"format": QUANT_METHOD}))
    return weights, ppl


@pytest.mark.parametrize("checkpoint, group_size", [("tiny_checkpoint", -1), ("gqa_checkpoint", 32)])
def test_layered_job_writes_the_bytes_of_the_whole_model_path(checkpoint, group_size, request, tmp_path, eval_head):
    source = request.getfixturevalue(checkpoint)
    config = _config(group_size)
    expected_weights, expected_ppl = _whole_model_reference(source, config, eval_head)
    metrics = run_quantize_job(QuantizeJob(model=str(source), calib=str(CALIB_TEXT), out=tmp_path / "out",
                                           config=config, eval=str(eval_head), device="cpu"))
    assert (tmp_path / "out" / WEIGHTS).read_bytes() == expected_weights
    assert metrics["eval"]["ppl"] == expected_ppl
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["eval"]["ppl"] == expected_ppl


def test_at_most_k_layers_are_materialised(tiny_checkpoint, tmp_path, eval_head, monkeypatch):
    loaded_counts = []
    acquire = StreamedLayers.acquire

    def counting_acquire(self, index, device):
        layer = acquire(self, index, device)
        loaded_counts.append(len(self.loaded))
        assert not any(p.is_meta for p in layer.parameters())
        return layer

    monkeypatch.setattr(StreamedLayers, "acquire", counting_acquire)
    config = _config()
    run_quantize_job(QuantizeJob(model=str(tiny_checkpoint), calib=str(CALIB_TEXT), out=tmp_path / "out",
                                 config=config, eval=str(eval_head), device="cpu"))
    assert max(loaded_counts) == config.calib.crr_k  # the window, never the whole 5-layer model


@pytest.mark.parametrize("trigger, message", [
    ((EventKind.STAGE, "calibrating"), "while embedding sample 0"),
    ((EventKind.BLOCK_START, None), "while propagating block 0 \\(full-precision\\)"),
    ((EventKind.STAGE, "evaluating"), "while evaluating"),
    ((EventKind.STAGE, "writing"), "while writing the artifact"),
])
def test_cancel_is_honoured_in_every_stage(tiny_checkpoint, tmp_path, eval_head, trigger, message):
    asked = []
    callbacks = CalibrationCallbacks(on_event=lambda e: asked.append(True) if (e.kind, e.stage) == trigger else None,
                                     should_cancel=lambda: bool(asked))
    job = QuantizeJob(model=str(tiny_checkpoint), calib=str(CALIB_TEXT), out=tmp_path / "out", config=_config(),
                      eval=str(eval_head), device="cpu")
    started = time.perf_counter()
    with pytest.raises(CalibrationCancelled, match=message):
        run_quantize_job(job, callbacks)
    assert time.perf_counter() - started < 30
    assert list(tmp_path.iterdir()) == []  # no artifact, no temporary directory


def test_bfloat16_caches_stay_close_to_float32(tiny_checkpoint, tmp_path, eval_head):
    ppl = {}
    for dtype in ("float32", "bfloat16"):
        job = QuantizeJob(model=str(tiny_checkpoint), calib=str(CALIB_TEXT), out=tmp_path / dtype,
                          config=_config(cache_dtype=dtype), eval=str(eval_head), device="cpu")
        ppl[dtype] = run_quantize_job(job)["eval"]["ppl"]
    assert ppl["float32"] != ppl["bfloat16"]  # the caches really were bfloat16
    for mode in ("fp", "w", "wkv"):
        assert ppl["bfloat16"][mode] == pytest.approx(ppl["float32"][mode], rel=0.02)


def test_streamed_safetensors_equal_the_library_bytes(tmp_path):
    tensors = {"b.x": torch.randn(3, 5).half(), "a": torch.randint(0, 255, (7, 3), dtype=torch.uint8),
               "c": torch.randn(1), "a2": torch.randn(5).half(), "z": torch.randn(2, 2).bfloat16(),
               "scalar": torch.tensor(3.0), "empty": torch.zeros(0, 4)}
    stream = SafetensorsStream(tmp_path / "x.safetensors", {"format": "wkvquant"})
    for name, value in tensors.items():
        stream.add(name, value)
    stream.finish()
    assert (tmp_path / "x.safetensors").read_bytes() == save(tensors, metadata=_metadata({"format": "wkvquant"}))
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # the spool is gone


def test_resumed_layered_job_writes_the_same_artifact(tiny_checkpoint, tmp_path, eval_head):
    from wkvq_core.calib.checkpoint import DirectoryCheckpoints

    def job(out):
        return QuantizeJob(model=str(tiny_checkpoint), calib=str(CALIB_TEXT), out=tmp_path / out, config=_config(),
                           eval=str(eval_head), device="cpu")

    uninterrupted = run_quantize_job(job("whole"))
    done = []
    stop_after_two = CalibrationCallbacks(
        on_event=lambda e: done.append(e.block) if e.kind == EventKind.BLOCK_END else None,
        should_cancel=lambda: len(done) >= 2, checkpoints=DirectoryCheckpoints(tmp_path / "ckpt"))
    with pytest.raises(CalibrationCancelled):
        run_quantize_job(job("resumed"), stop_after_two)
    resumed = run_quantize_job(job("resumed"), CalibrationCallbacks(checkpoints=DirectoryCheckpoints(tmp_path / "ckpt")))
    assert resumed["run"]["resumed_blocks"] == 2
    assert resumed["eval"] == uninterrupted["eval"]
    for name in (WEIGHTS, "metrics.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def _peak_rss_of_quantize(source, tmp_path) -> int:
    return wkvq_peak_rss("quantize", "--model", str(source), "--calib", str(CALIB_TEXT), "--out",
                         str(tmp_path / f"out-{source.name}"), "--nsamples", "2", "--seqlen", "64", "--epochs", "0",
                         "--crr-k", "2", "--group-size", "64", "--device", "cpu", "--json", OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_peak_host_memory_does_not_grow_with_depth(tmp_path):
    """8 and 32 layers of 13 MB (fp32) each: a whole-model load would add ~600 MB for the deeper model."""
    peaks = {}
    for layers in (8, 32):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
        source = _sharded(LlamaForCausalLM(config).to(torch.bfloat16), TINY_MODEL, tmp_path / f"l{layers}", "20MB")
        # the lower of two runs: the allocator's retention only adds to a peak, by up to ~70 MiB between runs here
        peaks[layers] = min(_peak_rss_of_quantize(source, tmp_path) for _ in range(2))
    assert peaks[32] <= 1.2 * peaks[8], {n: f"{p / 2**20:.0f} MiB" for n, p in peaks.items()}


def test_the_cuda_precision_defaults_run_end_to_end(tiny_checkpoint, tmp_path, eval_head):
    """bf16 caches, bf16 autocast and the fused POQ attention (what `auto` picks on CUDA), run here on the CPU:
    the same job within a few percent of fp32 and eager."""
    results = {}
    for name, calib in (("fp32", {}), ("cuda-like", dict(cache_dtype="bfloat16", compute_dtype="bfloat16",
                                                         attention="sdpa"))):
        job = QuantizeJob(model=str(tiny_checkpoint), calib=str(CALIB_TEXT), out=tmp_path / name,
                          config=_config(**calib), eval=str(eval_head), device="cpu")
        results[name] = run_quantize_job(job)["eval"]
    for mode in ("fp", "w", "wkv"):
        assert results["cuda-like"]["ppl"][mode] == pytest.approx(results["fp32"]["ppl"][mode], rel=0.03)
    assert results["cuda-like"]["ppl"] != results["fp32"]["ppl"]  # bf16 really was used
