"""The llamacpp target's KV arithmetic against independent references: the gguf package's numpy Q4_0 / Q4_1 / Q8_0
(ggml-quants.c's reference arithmetic), a port of llama.cpp's ggml_gen_hadamard, and a hand-written attention."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from gguf import GGMLQuantizationType, quants
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import wkvq_core
from wkvq_core import targets
from wkvq_core.artifact import load_quantized
from wkvq_core.config import TARGET_NAMES, CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.errors import ConfigError
from wkvq_core.export import NOTES, exporter
from wkvq_core.export.gguf import export as export_gguf
from wkvq_core.export.gguf import permute_rotary
from wkvq_core.model import attentions, prepare_model_, quant_state
from wkvq_core.pipeline import QuantizeJob, quantize_model_, run_quantize_job
from wkvq_core.quant.kv_quant import KEY, QUERY, VALUE, WKVAttention
from wkvq_core.targets import RUNTIME, TARGETS, get_target, llamacpp

ASSETS = Path(wkvq_core.__file__).parent / "assets"


def gguf_fake_quant(x: np.ndarray, kv_type: str) -> np.ndarray:
    qtype = GGMLQuantizationType[kv_type.upper()]
    return quants.dequantize(quants.quantize(x.astype(np.float32), qtype), qtype)


def edge_blocks() -> np.ndarray:
    """Blocks of 32 at many scales, plus: all zero, constant, a huge outlier, |max| tied between signs, fp16-subnormal
    and fp16-underflowing scales, and q8_0 products landing on .5 (roundf rounds them away from zero)."""
    rng = np.random.default_rng(0)
    scales = [1e-9, 1e-6, 1e-3, 0.1, 1.0, 37.0, 1000.0]
    blocks = [rng.standard_normal((8, 32)) * s for s in scales]
    blocks.append(rng.uniform(-3.0, 7.0, (8, 32)))  # off-centre: q4_1's min matters
    special = np.zeros((7, 32))
    special[1] = 2.5
    special[2] = -0.3
    special[3] = rng.standard_normal(32)
    special[3, 5] = 3e4
    special[4] = rng.uniform(-1, 1, 32)
    special[4, :2] = (-3.0, 3.0)
    special[5] = rng.uniform(-1, 1, 32)
    special[5, :2] = (3.0, -3.0)
    special[6] = np.arange(32) - 15.5  # q8_0 with amax 127: d = 1, halves
    special[6, 0] = 127.0
    blocks.append(special)
    return np.concatenate(blocks).astype(np.float32)


@pytest.mark.parametrize("kv_type", llamacpp.QUANTIZED_TYPES)
def test_block_arithmetic_is_ggml_reference_bit_for_bit(kv_type):
    x = edge_blocks()
    ours = llamacpp.fake_quant_blocks(torch.from_numpy(x), kv_type).numpy()
    expected = gguf_fake_quant(x, kv_type)
    np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))
    assert ours.shape == x.shape and not np.array_equal(ours, x)


def test_codes_use_the_fp32_scale_and_values_the_fp16_one():
    """A q8_0 block whose fp32 d rounds in fp16: values are code * fp16(d), not code * d."""
    x = torch.linspace(-1.0, 1.0, 32)
    d = 1.0 / 127
    codes = torch.round(x / d)  # no halves here
    expected = codes * torch.tensor(d).half().float()
    assert torch.equal(llamacpp.fake_quant_blocks(x, "q8_0"), expected)
    assert not torch.equal(expected, codes * d)


def test_rounding_passes_gradients_straight_through():
    x = torch.randn(4, 64, dtype=torch.float64).float().requires_grad_()
    for kv_type in llamacpp.QUANTIZED_TYPES:
        x.grad = None
        llamacpp.fake_quant_blocks(x, kv_type).sum().backward()
        assert torch.isfinite(x.grad).all()
        median = x.grad.median().item()
        assert abs(median - 1) < 1e-2, (kv_type, median)  # d(code * d16)/dx = d16 / d for all but the extremes
    zeros = torch.zeros(2, 32, requires_grad=True)
    llamacpp.fake_quant_blocks(zeros, "q4_0").sum().backward()
    assert torch.isfinite(zeros.grad).all()


def ggml_gen_hadamard(n: int) -> np.ndarray:
    """llama.cpp src/llama-kv-cache.cpp ggml_gen_hadamard, row-major data[i*n + j]."""
    data = np.zeros((n, n), np.float32)
    data[0, 0] = np.float32(1.0 / float(np.sqrt(np.float32(n))))
    s = 1
    while s < n:
        top = data[:s, :s].copy()
        data[s : 2 * s, :s] = top
        data[:s, s : 2 * s] = top
        data[s : 2 * s, s : 2 * s] = -top
        s *= 2
    return data


def ggml_rotate(x: np.ndarray, n: int) -> np.ndarray:
    """ggml_mul_mat_aux(cur, rot): out[i] = sum_k rot[i*n + k] * x[k] over each block of n channels."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // n, n).astype(np.float64)
    return (blocks @ ggml_gen_hadamard(n).astype(np.float64).T).reshape(x.shape).astype(np.float32)


@pytest.mark.parametrize("n", [64, 128, 256])
def test_hadamard_is_the_engines_sylvester_matrix_and_orthonormal(n):
    ours = llamacpp.rotation_matrix(n)
    np.testing.assert_array_equal(ours.numpy(), ggml_gen_hadamard(n))
    assert torch.equal(ours, ours.T)
    torch.testing.assert_close(ours.double() @ ours.double().T, torch.eye(n, dtype=torch.float64), atol=1e-7, rtol=0)
    x = torch.randn(3, 2 * n)
    torch.testing.assert_close(llamacpp.block_rotate(x, n), torch.from_numpy(ggml_rotate(x.numpy(), n)))


def test_rotation_block_sizes_follow_build_input_k_rot_and_v_rot():
    for head_dim, key_size, value_size in ((64, 64, 64), (128, 128, 64), (192, 64, 64), (256, 256, 64),
                                           (32, None, None), (96, None, None), (80, None, None)):
        assert llamacpp.rotation_size(head_dim, KEY) == key_size, head_dim
        assert llamacpp.rotation_size(head_dim, VALUE) == value_size, head_dim


def gguf_key_order(x: np.ndarray) -> np.ndarray:
    """K channels (last dim, one head) as llama.cpp holds them: convert_hf_to_gguf's LlamaModel.permute of the k_proj
    rows, w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2), on one head."""
    return x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2).swapaxes(-1, -2).reshape(x.shape)


def test_key_order_is_the_gguf_exports():
    head_dim, heads = 64, 3
    rows = torch.arange(heads * head_dim)
    exported = permute_rotary(rows, heads).reshape(heads, head_dim) % head_dim
    assert all(np.array_equal(order.numpy(), gguf_key_order(np.arange(head_dim))) for order in exported)
    x = torch.randn(2, head_dim)
    assert torch.equal(llamacpp.interleave_pairs(x), x[:, exported[0]])
    assert torch.equal(llamacpp.deinterleave_pairs(llamacpp.interleave_pairs(x)), x)


def x86_q8_round(x: np.ndarray) -> np.ndarray:
    """ggml-cpu's x86 quantize_row_q8_0 / q8_1 values: blocks of 32, id = 127 / amax in fp32, codes rounded half to
    even, times fp16(amax / 127)."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inverse = np.where(amax == 0, np.float32(0), np.float32(127) / np.where(amax == 0, np.float32(1), amax))
    return (np.rint(blocks * inverse) * (amax / np.float32(127)).astype(np.float16).astype(np.float32)).reshape(x.shape)


def engine_reference(x: np.ndarray, kv_type: str, rotation: int | None, kind: str) -> np.ndarray:
    """K (and the query multiplied with it) reordered as llama.cpp holds it; rotate as ggml, quantize-dequantize as
    gguf (the query: round as ggml-cpu's x86 q8), rotate back (H is its own inverse); back in HF's order."""
    order = np.arange(x.shape[-1])
    if kind in (KEY, QUERY):
        order = gguf_key_order(order)
    x = x[..., order]
    fake_quant = x86_q8_round if kind == QUERY else lambda y: gguf_fake_quant(y, kv_type)
    if rotation is not None:
        x = ggml_rotate(fake_quant(ggml_rotate(x, rotation)), rotation)
    else:
        x = fake_quant(x)
    return x[..., np.argsort(order)]


@pytest.mark.parametrize("head_dim", [64, 128, 96])
@pytest.mark.parametrize("kv_type", ["q4_0", "q8_0"])
def test_quantizer_rotates_quantizes_and_rotates_back(head_dim, kv_type):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, head_dim)
    x[..., 7] += 6.0  # an outlier channel, which the rotation spreads
    quantizer = llamacpp.kv_quantizer_for(kv_type)
    for kind in (KEY, VALUE):
        expected = engine_reference(x.numpy(), kv_type, llamacpp.rotation_size(head_dim, kind), kind)
        torch.testing.assert_close(quantizer(x, 0, kind), torch.from_numpy(expected), atol=1e-5, rtol=0)
    unrotated = llamacpp.kv_quantizer_for(kv_type, rotate=False)
    for kind in (KEY, VALUE):
        plain = torch.from_numpy(engine_reference(x.numpy(), kv_type, None, kind))
        assert torch.equal(unrotated(x, 0, kind), plain)
        assert torch.equal(quantizer(x, 0, kind), plain) == (head_dim % 64 != 0)
    hf_order_blocks = torch.from_numpy(gguf_fake_quant(x.numpy(), kv_type))  # blocks over HF's channel order
    assert torch.equal(unrotated(x, 0, VALUE), hf_order_blocks)
    assert not torch.equal(unrotated(x, 0, KEY), hf_order_blocks)
    if head_dim == 128:  # K rotated in one block of 128, V in blocks of 64
        assert not torch.allclose(quantizer(x, 0, KEY), quantizer(x, 0, VALUE))


@pytest.mark.parametrize(("head_dim", "kv_type", "rotate"), [(64, "q4_0", True), (128, "q4_1", True),
                                                          (96, "q8_0", True), (64, "q4_0", False)])
def test_the_query_is_rounded_as_llamacpp_multiplies_it_with_quantized_k(head_dim, kv_type, rotate):
    x = (torch.randn(2, 4, 5, head_dim) * torch.logspace(-2, 1, head_dim)).float()
    ours = llamacpp.kv_quantizer_for(kv_type, rotate)(x, 3, QUERY)
    rotation = llamacpp.rotation_size(head_dim, KEY) if rotate else None
    np.testing.assert_allclose(ours.numpy(), engine_reference(x.numpy(), kv_type, rotation, QUERY), atol=1e-5,
                               rtol=1e-5)
    assert not torch.allclose(ours, x, atol=1e-4)
    assert torch.equal(get_target(RUNTIME).kv_quantizer(KVQuantConfig())(x, 3, QUERY), x)


def test_quantizer_keeps_the_dtype_and_f16_is_a_rounding():
    x = torch.randn(1, 2, 3, 64)
    assert llamacpp.kv_quantizer_for("q4_1")(x.bfloat16(), 0, KEY).dtype == torch.bfloat16
    assert torch.equal(llamacpp.kv_quantizer_for("f16")(x, 0, VALUE), x.half().float())
    with pytest.raises(ConfigError, match="head_dim divisible by 32; got 48"):
        llamacpp.kv_quantizer_for("q4_0")(torch.randn(1, 1, 2, 48), 0, KEY)


def test_the_target_maps_kv_bits_to_cache_types_and_refuses_what_llamacpp_lacks():
    assert llamacpp.kv_quantizer(KVQuantConfig(bits=4)) == llamacpp.LlamaCppKV("q4_0", rotate=True)
    assert llamacpp.kv_quantizer(KVQuantConfig(bits=8, group_size=32)) == llamacpp.LlamaCppKV("q8_0", rotate=True)
    assert llamacpp.kv_quantizer(KVQuantConfig(bits=4, cache_type="q4_1")) == llamacpp.LlamaCppKV("q4_1")
    with pytest.raises(ConfigError, match="q4_0 or q4_1 \\(kv_bits 4\\), q8_0 \\(kv_bits 8\\), f16 \\(kv_bits 16\\); got kv_bits 3"):
        llamacpp.kv_quantizer(KVQuantConfig(bits=3))
    with pytest.raises(ConfigError, match="cache_type q8_0 holds 8-bit values; kv_bits is 4"):
        llamacpp.kv_quantizer(KVQuantConfig(bits=4, cache_type="q8_0"))
    with pytest.raises(ConfigError, match="must be one of f16, q4_0, q4_1, q8_0; got 'q5_0'"):
        llamacpp.kv_quantizer(KVQuantConfig(bits=4, cache_type="q5_0"))
    with pytest.raises(ConfigError, match="blocks of 32; got kv_group_size 64"):
        llamacpp.kv_quantizer(KVQuantConfig(bits=4, group_size=64))
    with pytest.raises(ConfigError, match="has no k_pre_rope, sink_tokens: turn them off"):
        llamacpp.kv_quantizer(KVQuantConfig(bits=4, k_pre_rope=True, sink_tokens=4))
    with pytest.raises(ConfigError, match="must be one of f16, q4_0, q4_1, q8_0; got 'q5_0'"):
        llamacpp.kv_quantizer_for("q5_0")


def test_the_target_is_found_by_discovery():
    target = get_target("llamacpp")
    assert TARGETS["llamacpp"] is target is llamacpp.TARGET
    assert target.poq is False and target.export == "gguf" and target.kv_quantizer is llamacpp.kv_quantizer
    assert "llamacpp" not in Path(targets.__file__).read_text()  # no registry: the module is found


def test_attention_with_the_target_is_eager_attention_over_its_quantized_kv():
    """WKVAttention with the llamacpp target: every query, its own token's included, sees K / V as llama.cpp stores
    them (rotated, q4_0 blocks, rotated back)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         num_hidden_layers=1, intermediate_size=96, vocab_size=64)
    model = LlamaForCausalLM(config).eval()
    layer = model.model.layers[0].self_attn
    with torch.no_grad():  # scores of a few units, so that the rounding of the query shows
        layer.q_proj.weight.mul_(30)
        layer.k_proj.weight.mul_(30)
    t_new, n_rep = 9, 2
    hidden = torch.randn(1, t_new, 64)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(t_new)[None])

    def attention(target_name: str, kv: KVQuantConfig) -> torch.Tensor:
        target = get_target(target_name)
        attn = WKVAttention(layer, WeightQuantConfig(bits=16), kv, target.kv_quantizer(kv), target.poq)
        with torch.no_grad():
            return attn(hidden, (cos, sin))[0]

    kv = KVQuantConfig(bits=4)
    ours = attention("llamacpp", kv)

    with torch.no_grad():
        shape = (1, t_new, -1, 64)
        query = layer.q_proj(hidden).view(shape).transpose(1, 2)
        key = layer.k_proj(hidden).view(shape).transpose(1, 2)
        value = layer.v_proj(hidden).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        query = torch.from_numpy(engine_reference(query.numpy(), "q4_0", 64, QUERY))
        key = torch.from_numpy(engine_reference(key.numpy(), "q4_0", 64, KEY)).repeat_interleave(n_rep, dim=1)
        value = torch.from_numpy(engine_reference(value.numpy(), "q4_0", 64, VALUE)).repeat_interleave(n_rep, dim=1)
        scores = query @ key.transpose(-1, -2) / 8.0
        scores = scores.masked_fill(torch.ones(t_new, t_new).triu(1).bool(), float("-inf"))
        out = (torch.softmax(scores, dim=-1) @ value).transpose(1, 2).reshape(1, t_new, -1)
        expected = layer.o_proj(out)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours, attention(RUNTIME, kv), atol=1e-3)
    assert not torch.allclose(ours, attention("llamacpp", KVQuantConfig(bits=16)), atol=1e-3)


def test_a_method_under_a_target_keeps_only_what_its_engine_computes():
    recommended = targets.kv_config("recommended", "llamacpp", bits=4)
    assert (recommended.k_pre_rope, recommended.sink_tokens, recommended.smooth_param, recommended.lr) == (
        False, 0, "relative", 1e-2)
    assert targets.kv_config("recommended", RUNTIME, bits=4).k_pre_rope is True
    assert recommended.smooth_init == "identity" and targets.kv_config("paper", "llamacpp").smooth_init == "range"
    assert targets.kv_config("recommended", RUNTIME).smooth_init == "range"
    assert targets.kv_config("recommended", "llamacpp", smooth_init="range").smooth_init == "range"
    assert set(TARGET_NAMES) == set(TARGETS)
    with pytest.raises(ConfigError, match="target must be one of runtime, llamacpp, vllm; got 'tensorrt'"):
        WKVQuantConfig(target="tensorrt")


@pytest.mark.parametrize(("config", "message"), [
    (WKVQuantConfig(weight=WeightQuantConfig(bits=3), target="llamacpp"), "Q4_1 blocks .*got w_bits 3"),
    (WKVQuantConfig(weight=WeightQuantConfig(group_size=48), target="llamacpp"), "multiple of 32 .*got 48"),
    (WKVQuantConfig(act_bits=8, target="llamacpp"), "act_bits 16 with the llamacpp target"),
    (WKVQuantConfig(kv=KVQuantConfig(group_size=64), target="llamacpp"), "blocks of 32; got kv_group_size 64"),
    (WKVQuantConfig(kv=KVQuantConfig(sink_tokens=4), target="llamacpp"), "has no sink_tokens"),
    (WKVQuantConfig(kv=KVQuantConfig(cache_type="q4_1")), "the runtime target has one per bit width"),
])
def test_check_config_names_what_the_engine_cannot_run(config, message):
    with pytest.raises(ConfigError, match=message):
        targets.check_config(config)


def test_the_target_is_stored_only_when_it_is_not_the_runtime():
    assert "target" not in WKVQuantConfig().to_dict()
    assert not {"cache_type", "smooth_init"} & set(WKVQuantConfig().to_dict()["kv"])
    assert WKVQuantConfig(kv=KVQuantConfig(smooth_init="identity")).to_dict()["kv"]["smooth_init"] == "identity"
    config = WKVQuantConfig(kv=KVQuantConfig(cache_type="q4_1"), target="llamacpp")
    assert config.to_dict()["target"] == "llamacpp" and config.to_dict()["kv"]["cache_type"] == "q4_1"
    assert WKVQuantConfig.from_dict(config.to_dict()) == config
    assert WKVQuantConfig.from_dict(WKVQuantConfig().to_dict()).target == RUNTIME


def random_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512,
                                        initializer_range=0.1)).eval()


def test_folded_k_smoothing_is_exact_with_quantization_off():
    """K scales per rotary pair folded into q_proj / k_proj and the V smoothing into v_proj / o_proj leave the model
    unchanged (the original, unprepared model is the reference), even when the pair's two parameters differ."""
    original = random_llama()
    model = prepare_model_(copy.deepcopy(original), WKVQuantConfig(target="llamacpp"))
    torch.manual_seed(1)
    with torch.no_grad():
        for attn in attentions(model):
            assert attn.k_folded
            for param in (attn.k_scale, attn.v_scale):
                param.uniform_(0.2, 5.0)
            attn.v_shift.normal_()
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad(), quant_state(model, weights=False, kv=False, smoothing=True):
        smoothed = model(ids).logits
        key = model.model.layers[0].self_attn.projection("k_proj")[0]
    torch.testing.assert_close(smoothed, original(ids).logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(key, original.model.layers[0].self_attn.k_proj.weight, atol=1e-3)


def quantize_random(root: Path, target: str, epochs: int = 1) -> tuple[Path, dict]:
    base = root / f"base-{target}"
    random_llama().save_pretrained(base)
    AutoTokenizer.from_pretrained(ASSETS / "stories260k").save_pretrained(base)
    config = WKVQuantConfig(weight=WeightQuantConfig(group_size=32),
                            kv=targets.kv_config("recommended", target, bits=4),
                            calib=CalibConfig(nsamples=2, seqlen=32, epochs=epochs), target=target)
    metrics = run_quantize_job(QuantizeJob(model=str(base), calib=str(ASSETS / "tinystories" / "calib.txt"),
                                           out=root / target, config=config, device="cpu",
                                           eval=str(ASSETS / "tinystories" / "eval.txt"), eval_tokens=128))
    return root / target, metrics


def test_a_llamacpp_artifact_keeps_its_k_pairs_tied_and_exports_every_q4_1_block_exactly(tmp_path):
    artifact, metrics = quantize_random(tmp_path, "llamacpp")
    model = load_quantized(artifact)
    assert all(torch.equal(a.k_scale, torch.ones_like(a.k_scale)) and a.smoothing_folded for a in attentions(model))
    state = safetensors.torch.load_file(artifact / "model.safetensors")
    assert not [name for name in state if name.endswith(("k_scale", "k_shift"))]
    scales = torch.cat([v.float().flatten() for k, v in state.items() if k.endswith(".scales")])
    mantissa = torch.frexp(scales).mantissa * 2**7
    assert torch.equal(mantissa, mantissa.round())  # 7 significant bits
    exported = export_gguf(artifact, tmp_path / "gguf")
    notes = json.loads((exported / NOTES).read_text())
    assert notes["q4_1"]["inexact_blocks"] == 0 and notes["q4_1"]["max_abs_deviation"] == 0.0
    assert "k_smoothing" not in {item["feature"] for item in notes["not_expressed"]}
    ids = torch.tensor([list(range(1, 40))])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and metrics["eval"]["ppl"]["wkv"] > 0

    runtime, _ = quantize_random(tmp_path, RUNTIME, epochs=0)
    runtime_notes = json.loads((export_gguf(runtime, tmp_path / "gguf-runtime") / NOTES).read_text())
    assert runtime_notes["q4_1"]["inexact_blocks"] > 0  # fp16 scales of 11 bits: some m are not fp16 numbers


def test_calibration_moves_the_tied_k_scales_together(tmp_path):
    model = random_llama()
    config = WKVQuantConfig(weight=WeightQuantConfig(group_size=32), kv=targets.kv_config("paper", "llamacpp", bits=4,
                                                                                          lr=1e-2),
                            calib=CalibConfig(nsamples=2, seqlen=32, epochs=2), target="llamacpp")
    samples = torch.randint(0, 96, (2, 32))
    quantize_model_(model, config, samples)
    for attn in attentions(model):
        low, high = attn.k_scale.chunk(2, dim=-1)
        assert torch.equal(low, high) and not torch.equal(low, torch.ones_like(low))
        assert torch.equal(attn.k_shift, torch.zeros_like(attn.k_shift))


def test_a_job_for_a_model_llamacpp_cannot_run_fails_before_calibrating(tmp_path):
    """stories260k has head_dim 8 and an intermediate_size of 172: no whole 32-blocks for llama.cpp."""
    job = QuantizeJob(model=str(ASSETS / "stories260k"), calib=str(ASSETS / "tinystories" / "calib.txt"),
                      out=tmp_path / "out", config=WKVQuantConfig(weight=WeightQuantConfig(group_size=-1),
                                                                  target="llamacpp"))
    with pytest.raises(ConfigError, match="head_dim divisible by 32; this model's is 8"):
        run_quantize_job(job)
    job.config = WKVQuantConfig(weight=WeightQuantConfig(group_size=-1), kv=KVQuantConfig(bits=16), target="llamacpp")
    with pytest.raises(ConfigError, match="intermediate_size \\(172\\) to be a multiple of 32"):
        run_quantize_job(job)
    assert not (tmp_path / "out").exists()


def test_exports_of_a_llamacpp_artifact_say_the_k_smoothing_is_kept(tmp_path):
    """Folded into q_proj / k_proj, the K smoothing is in every export's weights, and POQ was never part of it."""
    artifact, _ = quantize_random(tmp_path, "llamacpp", epochs=0)
    notes = json.loads((exporter("compressed-tensors").export(artifact, tmp_path / "ct") / NOTES).read_text())
    assert {item["feature"] for item in notes["not_expressed"]} == {"kv_cache_quantization"}


@pytest.mark.parametrize("init", ["identity", "range"])
def test_the_smoothing_starts_from_the_identity_or_from_calibration_statistics(init):
    model = random_llama()
    config = WKVQuantConfig(weight=WeightQuantConfig(group_size=32),
                            kv=targets.kv_config("recommended", "llamacpp", smooth_init=init),
                            calib=CalibConfig(nsamples=2, seqlen=32, epochs=0), target="llamacpp")
    quantize_model_(model, config, torch.randint(0, 96, (2, 32)))
    untouched = [torch.equal(attn.k_scale, torch.ones_like(attn.k_scale))
                 and torch.equal(attn.v_shift, torch.zeros_like(attn.v_shift)) for attn in attentions(model)]
    assert all(untouched) == (init == "identity")
