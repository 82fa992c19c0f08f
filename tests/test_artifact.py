import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from wkvq_core.artifact import MANIFEST, WEIGHTS, load_quantized, save_artifact, sha256_file
from wkvq_core.calib.checkpoint import decode_safetensors, encode_safetensors, save_safetensors_atomic
from wkvq_core.calib.data import calibration_samples, eval_windows
from wkvq_core.config import CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.errors import ArtifactError
from wkvq_core.evaluation.perplexity import EvalMode, greedy_without_cache, kv_bytes_per_token, perplexity
from wkvq_core.model import quant_state
from wkvq_core.pipeline import quantize_model_
from wkvq_core.quant.packing import pack_bits, packed_size, unpack_bits
from wkvq_core.quant.primitives import dequantize_weight, quantize_weight
from wkvq_core.runtime.cache_keyword import with_cache
from wkvq_core.runtime.kv_cache import WKVQuantCache
from wkvq_core.runtime.packed_linear import PackedLinear



@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 8, 64, 172])
def test_pack_unpack_roundtrip(bits, n):
    codes = torch.randint(0, 2**bits, (3, 4, n), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == packed_size(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_four_bit_packing_is_two_codes_per_byte_low_nibble_first():
    assert pack_bits(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x0F]]


@pytest.fixture(scope="module")
def calibrated(_tiny, calib_ids, tmp_path_factory):
    """The shipped model calibrated (W4 per-row, KV4) and its artifact, configured to keep the non-quantized
    tensors in fp32 (the checkpoint's own dtype) so that it can match the simulation token for token."""
    model, tokenizer = copy.deepcopy(_tiny[0]), _tiny[1]
    cfg = WKVQuantConfig(weight=WeightQuantConfig(group_size=-1), calib=CalibConfig(nsamples=8, seqlen=128, epochs=1))
    quantize_model_(model, cfg, calibration_samples(calib_ids, 8, 128, seed=0))
    out = save_artifact(tmp_path_factory.mktemp("art") / "tiny-w4kv4", model, tokenizer, cfg, fp_dtype=torch.float32)
    return model, out


def test_packed_weights_equal_the_simulated_ones(calibrated):
    sim, out = calibrated
    loaded = load_quantized(out)
    for sim_layer, layer in zip(sim.model.layers, loaded.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, name)
            assert isinstance(lin, PackedLinear)
            weight, _ = sim_layer.self_attn.projection(name)  # V smoothing folded into v_proj / o_proj
            expected = getattr(sim_layer.self_attn, name).fake_quant(weight)
            assert torch.equal(lin.dequantized_weight(), expected), name
        for name in ("gate_proj", "up_proj", "down_proj"):
            sim_lin = getattr(sim_layer.mlp, name)
            assert torch.equal(getattr(layer.mlp, name).dequantized_weight(), sim_lin.fake_quant(sim_lin.weight))


def test_greedy_generation_matches_the_cache_free_simulation(calibrated, tokenizer):
    """The loaded artifact decoding through its packed cache gives the tokens of the calibration-time simulation
    decoded without any cache (a full parallel POQ pass per step)."""
    sim, out = calibrated
    loaded = load_quantized(out)
    prompt = tokenizer("Once upon a time, Lily", return_tensors="pt")
    with quant_state(sim, weights=True, kv=True):
        expected, _ = greedy_without_cache(sim, prompt["input_ids"], 64)
        sim_logits = sim(expected, use_cache=False).logits
    got = loaded.generate(**prompt, max_new_tokens=64, do_sample=False, eos_token_id=None,
                          **with_cache(WKVQuantCache(loaded.config)))
    assert got.shape[1] == prompt["input_ids"].shape[1] + 64
    assert torch.equal(got, expected)
    assert (loaded(expected, use_cache=False).logits - sim_logits).abs().max() < 1e-4


@pytest.mark.parametrize("fp_dtype", [torch.float32, torch.float16])
def test_loaded_perplexity_within_half_a_percent(calibrated, tokenizer, eval_ids, tmp_path, fp_dtype):
    sim, _ = calibrated
    out = save_artifact(tmp_path / "a", sim, tokenizer, WKVQuantConfig(weight=WeightQuantConfig(group_size=-1)),
                        fp_dtype=fp_dtype)
    loaded = load_quantized(out)
    windows = eval_windows(eval_ids, 256)[:16]
    for mode in (EvalMode.W, EvalMode.WKV):
        assert perplexity(loaded, windows, mode).ppl == pytest.approx(perplexity(sim, windows, mode).ppl, rel=5e-3)


def test_cache_size_matches_the_format_formula(calibrated, tokenizer):
    _, out = calibrated
    loaded = load_quantized(out)
    cache = WKVQuantCache(loaded.config)
    ids = torch.randint(3, 500, (2, 100))
    loaded(ids, **with_cache(cache), use_cache=True)
    per_token = cache.nbytes() / ids.numel()
    formula = kv_bytes_per_token(loaded.config, KVQuantConfig(bits=4))
    assert abs(per_token - formula) / formula < 0.03
    # head_dim 8: 4 bytes of codes + 4 of fp16 scale/zero per head vs 16 bytes in fp16
    assert per_token == kv_bytes_per_token(loaded.config, KVQuantConfig(bits=16)) / 2


def test_sampling_and_padded_batches(calibrated, tokenizer):
    _, out = calibrated
    loaded = load_quantized(out)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    prompts = ["Tom had a big red ball.", "One day"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    greedy = loaded.generate(**batch, max_new_tokens=16, do_sample=False, **with_cache(WKVQuantCache(loaded.config)),
                             pad_token_id=tokenizer.pad_token_id)
    for row, prompt in zip(greedy, prompts):
        single = tokenizer(prompt, return_tensors="pt")
        alone = loaded.generate(**single, max_new_tokens=16, do_sample=False, **with_cache(WKVQuantCache(loaded.config)))
        assert row[-16:].tolist() == alone[0, -16:].tolist()
    torch.manual_seed(0)
    sampled = loaded.generate(**batch, max_new_tokens=16, do_sample=True, top_p=0.9, pad_token_id=tokenizer.pad_token_id,
                              **with_cache(WKVQuantCache(loaded.config)))
    assert sampled.shape == greedy.shape


def test_gqa_group128_model_roundtrip_and_storage_at_the_format_limit(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    wkv = WKVQuantConfig(weight=WeightQuantConfig(group_size=128), kv=KVQuantConfig(bits=4),
                         calib=CalibConfig(nsamples=2, seqlen=32, epochs=1))
    samples = torch.randint(0, 512, (2, 32))
    quantize_model_(model, wkv, samples)
    out = save_artifact(tmp_path / "gqa", model, tokenizer, wkv)
    loaded = load_quantized(out)
    ids = torch.randint(0, 512, (1, 24))
    with quant_state(model, weights=True, kv=True):
        expected = model(ids, use_cache=False).logits
    assert (loaded(ids, use_cache=False).logits - expected).abs().max() < 1e-2
    cache = WKVQuantCache(loaded.config)
    stepwise = torch.cat([loaded(ids[:, t : t + 1], **with_cache(cache), use_cache=True).logits for t in range(24)], 1)
    assert (stepwise - loaded(ids, use_cache=False).logits).abs().max() < 5e-4  # POQ: parallel == packed decode
    linears = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    params = sum(m.in_features * m.out_features for m in linears)
    bits_per_param = 8 * sum(m.storage_bytes() for m in linears) / params
    assert bits_per_param <= (4 + 32 / 128) * 1.01


def corrupted_copy(out, tmp_path, edit):
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    edit(broken)
    return broken


def refresh_manifest(directory):
    manifest = json.loads((directory / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        entry.update(sha256=sha256_file(directory / name), size=(directory / name).stat().st_size)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def drop_tensor(directory):
    tensors = load_file(directory / WEIGHTS)
    del tensors["model.layers.3.mlp.down_proj.scales"]
    save_file(tensors, directory / WEIGHTS)
    refresh_manifest(directory)


def bump_version(directory):
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (directory / "config.json").write_text(json.dumps(config))
    refresh_manifest(directory)


def truncate(directory):
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) // 2])
    refresh_manifest(directory)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-8] + b"\0" * 8), "does not match the manifest"),
        (lambda d: (d / MANIFEST).unlink(), "manifest.json: missing"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: listed in the manifest but missing"),
        (drop_tensor, "missing tensor model.layers.3.mlp.down_proj.scales"),
        (bump_version, "unknown format_version 99"),
        (truncate, "model.safetensors: unreadable safetensors file"),
    ],
)
def test_broken_artifacts_are_refused_with_the_file_named(calibrated, tmp_path, edit, message):
    _, out = calibrated
    with pytest.raises(ArtifactError, match=message):
        load_quantized(corrupted_copy(out, tmp_path, edit))


def test_checkpoint_bytes_are_the_file_bytes_and_decode_back(tmp_path):
    tensors = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(), "q": torch.tensor([1, 2], dtype=torch.uint8)}
    meta = {"block": "3", "loss": "0.25"}
    save_safetensors_atomic(tmp_path / "c.safetensors", tensors, meta)
    data = encode_safetensors(tensors, meta)
    assert data == (tmp_path / "c.safetensors").read_bytes()
    decoded, decoded_meta = decode_safetensors(data)
    assert decoded_meta == meta and decoded.keys() == tensors.keys()
    assert all(torch.equal(decoded[k], tensors[k]) for k in tensors)
    for garbage in (b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}", data[:-3]):
        with pytest.raises(ArtifactError, match="unreadable safetensors"):
            decode_safetensors(garbage)


def test_artifact_write_is_atomic(calibrated, tokenizer, tmp_path, monkeypatch):
    sim, _ = calibrated
    import wkvq_core.artifact as artifact

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact.SafetensorsStream, "finish", fail)
    with pytest.raises(OSError):
        save_artifact(tmp_path / "out", sim, tokenizer, WKVQuantConfig(weight=WeightQuantConfig(group_size=-1)))
    assert list(tmp_path.iterdir()) == []


def test_cli_generate_streams_the_greedy_continuation(calibrated, tokenizer):
    from typer.testing import CliRunner

    from wkvq_core.cli import app

    _, out = calibrated
    result = CliRunner().invoke(app, ["generate", "--model", str(out), "--prompt", "Once upon a time",
                                      "--max-new-tokens", "20", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    loaded = load_quantized(out)
    ids = tokenizer("Once upon a time", return_tensors="pt")
    expected = loaded.generate(**ids, max_new_tokens=20, do_sample=False, **with_cache(WKVQuantCache(loaded.config)))
    assert tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() in result.stdout


def test_cli_refuses_fp_mode_on_an_artifact(calibrated, tmp_path):
    from typer.testing import CliRunner

    from wkvq_core.cli import app

    _, out = calibrated
    (tmp_path / "e.txt").write_text("Once upon a time there was a cat. " * 40)
    result = CliRunner().invoke(app, ["eval", "--model", str(out), "--data", str(tmp_path / "e.txt"), "--seqlen", "64",
                                      "--mode", "fp"])
    assert result.exit_code == 2 and "no full-precision weights" in result.output


def test_packed_linear_follows_in_place_edits_of_its_packed_tensors():
    """The kept dequantized weight is dropped when the packed tensors change (load_state_dict copies in place)."""
    torch.manual_seed(0)
    first, second = (quantize_weight(torch.randn(6, 16), 4, 8) for _ in range(2))
    lin = PackedLinear(pack_bits(first[0], 4), first[1].half(), first[2].half(), None, 16, 4, 8)
    x = torch.randn(3, 16)
    assert torch.equal(lin(x), x @ lin.dequantized_weight().t())
    lin.load_state_dict({"qweight": pack_bits(second[0], 4), "scales": second[1].half(), "zeros": second[2].half()})
    assert torch.equal(lin(x), x @ lin.dequantized_weight().t())
    assert not torch.equal(lin.dequantized_weight(), dequantize_weight(first[0], first[1], first[2], 8))
