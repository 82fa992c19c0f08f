"""The vllm target's KV arithmetic (`targets.vllm.VllmKV`, `apply_semantics_(..., "vllm")`) against
`tests/vllm_int4_reference.py`, an independent numpy re-implementation of vLLM 0.32.0's int4_per_token_head kernels
(bf16 model, CUDA sm80+, Hadacore): the codes and scales written, one layer's attention, a small model's logits.

Tolerances come from what the emulation leaves to the model: the engine rounds the attention output to bf16 (in the
rotated space, in Hadacore's stages and after the inverse rotation); `exact_output=True` switches that off in the
reference, which then differs from the emulation only by fp32 summation order."""

import copy
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from tests import vllm_int4_reference as reference
from wkvq_core.config import KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.evaluation.semantics import apply_semantics_
from wkvq_core.model import prepare_model_, quant_state
from wkvq_core.quant.kv_quant import KEY, QUERY, VALUE, poq_attention
from wkvq_core.targets import vllm
from wkvq_core.targets.vllm import VllmKV

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
try:
    import vllm_agreement as agreement
finally:
    sys.path.remove(str(BENCHMARKS))

HEAD_DIMS = [64, 128, 96, 80]  # 96: blocks of 32 (Hadacore's 16- then 2-point stages); 80: blocks of 16, one stage
FP32_ORDER = 1e-5  # relative: fp32 sums in another order, with the same codes and scales


def bf16_inputs(*shape: int, scale: float = 1.0) -> torch.Tensor:
    """Random fp32 values a bf16 model hands the attention (bf16-representable), with an outlier channel."""
    x = torch.randn(*shape) * scale
    x[..., 3] += 3 * scale
    return x.bfloat16().float()


def reference_dequantized(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows x (N, D) written as the kernel writes them: (dequantized rotated values, truncated scales (N,), each
    channel's distance to a rounding tie)."""
    rotated = reference.bf16(reference.single_rht(x))
    written = [reference.quantize_head(row) for row in rotated]
    values = np.stack([reference.dequantize(*head) for head in written])
    scales = np.array([reference.unpack(*head)[3] for head in written])
    return values, scales, np.stack([reference.tie_distance(row) for row in rotated])


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("kind", [KEY, VALUE])
def test_codes_and_scales_are_the_write_kernels(head_dim, kind):
    """The emulation's K / V, rotated back into the cache's space (exactly, fp64), are the reference's
    scale * (code - zp): no code differs where no rounding tie is near, and the truncated scales agree."""
    x = bf16_inputs(2000, head_dim, scale=3.0)
    degenerate = 3  # rows rotated to constant ones: the scale's 1e-6 floor, zp clamped
    x[:degenerate] = torch.tensor([0.0, 0.5, -2.0])[:, None] * torch.eye(head_dim)[0]
    emulated = reference.exact_rotate(VllmKV()(x[None, None], 0, kind)[0, 0].numpy())
    expected, scales, tie = reference_dequantized(x.numpy())
    steps = np.abs(emulated - expected) / scales[:, None]
    differs = steps > 0.5
    assert differs[tie > 1e-3].sum() == 0, f"{differs.sum()} of {differs.size} codes differ"
    codes = np.round(expected / scales[:, None])  # code - zp
    fitted = (emulated * codes).sum(-1) / np.maximum((codes * codes).sum(-1), 1)
    same = ~differs.any(-1)
    # truncated scales are 16 ulp apart: the fitted ones lie within half of that of the reference's (not for the
    # degenerate rows, unrotated onto one channel, whose fp32 rotation back errs by more)
    assert (np.abs(fitted - scales) < 8 * np.spacing(scales))[degenerate:][same[degenerate:]].all()


def reference_attention(query, key, value, exact_output: bool) -> torch.Tensor:
    """reference.attention over each sequence of (B, H, T, D) tensors; returns (B, T, H, D)."""
    sequences = [reference.attention(*(reference.bf16(t[b].transpose(0, 1).numpy()) for t in (query, key, value)),
                                     query.shape[-1] ** -0.5, exact_output=exact_output)
                 for b in range(query.shape[0])]
    return torch.from_numpy(np.stack(sequences))


def emulated_attention(query, key, value) -> torch.Tensor:
    quantizer = VllmKV()
    n_rep = query.shape[1] // key.shape[1]
    return poq_attention(quantizer(query, 0, QUERY), quantizer(key, 0, KEY), quantizer(value, 0, VALUE), key, value,
                         None, query.shape[-1] ** -0.5, n_rep, poq=False)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_attention_is_the_engines(head_dim):
    """GQA attention over a quantized cache written before it is read: equal to the reference's up to fp32 order
    before the engine's bf16 roundings of the output, and within those roundings after them."""
    batch, heads, kv_heads, tokens = 2, 4, 2, 12
    query = bf16_inputs(batch, heads, tokens, head_dim, scale=2.0)
    key = bf16_inputs(batch, kv_heads, tokens, head_dim, scale=2.0)
    value = bf16_inputs(batch, kv_heads, tokens, head_dim)
    ours = emulated_attention(query, key, value)
    exact, engine = (reference_attention(query, key, value, exact_output) for exact_output in (True, False))
    size = exact.abs().max()
    assert (ours - exact).abs().max() <= FP32_ORDER * size
    output_rounding = (engine - exact).abs().max()
    assert output_rounding > FP32_ORDER * size  # the engine's output rounding is measurable here
    assert (ours - engine).abs().max() <= output_rounding + FP32_ORDER * size
    unquantized = poq_attention(query, key, value, key, value, None, head_dim**-0.5, heads // kv_heads, poq=False)
    assert (unquantized - engine).abs().max() > 10 * output_rounding  # the 4-bit cache is what is being checked


@pytest.mark.parametrize("head_dim", [64, 96])
def test_signs_are_a_fresh_generator_draw_and_the_rotation_orthogonal_up_to_b(head_dim):
    block = reference.rht_block(head_dim)
    generator = torch.Generator(device="cpu").manual_seed(0x9E3779B9)
    draw = 2 * torch.bernoulli(torch.full((block,), 0.5), generator=generator) - 1
    assert torch.equal(vllm.rht_signs(block).float(), draw)
    assert np.array_equal(reference.rht_signs(block), draw.numpy())
    rotation = vllm.rht_matrix(block).double()
    assert torch.equal(rotation @ rotation.T, block * torch.eye(block, dtype=torch.float64))
    expected = reference.rht_signs(block)[:, None] * reference.sylvester(block)
    assert np.array_equal(rotation.numpy(), expected)
    x = bf16_inputs(3, head_dim)  # one sign vector of length b for every block of a row
    np.testing.assert_allclose(reference.exact_rotate(x.numpy()),
                               (x.reshape(3, -1, block).double() @ rotation).reshape(3, head_dim).numpy(), rtol=1e-12)


ENGINE_RHT = """
import sys
import numpy as np
import torch
from vllm.v1.attention.ops import int4_per_token_head as kernel

assert not kernel._hadacore_available()  # CPU: the PyTorch butterfly, exact up to fp32 sums
rows = dict(np.load(sys.argv[1]))
out = {}
for name, x in rows.items():
    x = torch.from_numpy(x)
    out[name] = kernel.single_rht(x).numpy()
    out["signs_" + name] = kernel._get_rht_signs(kernel.largest_power_of_2_divisor(x.shape[-1]), 0, x.device).numpy()
np.savez(sys.argv[2], **out)
"""


def test_rht_is_vllms_own(tmp_path):
    """vLLM 0.32.0's own single_rht and sign vector (its CPU path, in the engine's venv) against the reference's exact
    RHT and our rotation: signs, Sylvester order, blocks of b for head_dim 96."""
    if not agreement.engine_installed():
        pytest.fail(f"the vLLM engine is not installed (no {agreement.engine_python()}): run "
                    f"`bash {agreement.INSTALL_SCRIPT}`", pytrace=False)
    rows = {str(dim): bf16_inputs(8, dim).numpy() for dim in (64, 96, 128)}
    np.savez(tmp_path / "rows.npz", **rows)
    script = tmp_path / "engine_rht.py"
    script.write_text(ENGINE_RHT)
    subprocess.run([str(agreement.engine_python()), str(script), str(tmp_path / "rows.npz"), str(tmp_path / "rht.npz")],
                   check=True, capture_output=True, cwd=tmp_path)
    engine = np.load(tmp_path / "rht.npz")
    for name, x in rows.items():
        rotated = engine[name]
        np.testing.assert_allclose(reference.exact_rotate(x), rotated, rtol=0, atol=1e-6 * np.abs(rotated).max())
        block = reference.rht_block(x.shape[-1])
        assert np.array_equal(engine["signs_" + name], reference.rht_signs(block))
        assert np.array_equal(engine["signs_" + name], vllm.rht_signs(block).numpy())
        ours = vllm.rotate(torch.from_numpy(x)).numpy()  # Hadacore's bf16 path: within a few bf16 steps
        assert np.abs(ours - rotated).max() <= 2.0**-6 * np.abs(rotated).max()


REFERENCE, REFERENCE_EXACT_OUTPUT = "vllm_int4_reference", "vllm_int4_reference_exact_output"


def _reference_attention_interface(module, query, key, value, attention_mask, scaling, exact_output: bool,
                                   **kwargs):
    """A transformers attention function: the reference on the (B, H, T, D) q / k / v after RoPE, rounded to bf16
    as a bf16 model hands them. transformers builds no mask for a registered function: the kernel's causal order
    over the cache is the mask (one unpadded sequence per row)."""
    assert attention_mask is None and scaling == module.head_dim**-0.5
    return reference_attention(query, key, value, exact_output).to(query.dtype), None


AttentionInterface.register(REFERENCE, partial(_reference_attention_interface, exact_output=False))
AttentionInterface.register(REFERENCE_EXACT_OUTPUT, partial(_reference_attention_interface, exact_output=True))


def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float()
    return -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


def test_model_computes_what_vllm_computes():
    """A random 2-layer GQA Llama (head_dim 64) in plain transformers with the reference attention, against our
    model under the vllm semantics (KV-only: weights unquantized, so the linears are plain fp32 in both)."""
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64,
                         initializer_range=0.05)
    base = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.copy_(parameter.bfloat16().float())
    ids = torch.randint(0, config.vocab_size, (2, 24))
    plain = {}
    for name in (REFERENCE, REFERENCE_EXACT_OUTPUT):
        model = copy.deepcopy(base)
        model.set_attn_implementation(name)
        plain[name] = token_nll(model, ids)
    wkvq_config = WKVQuantConfig(target="vllm", weight=WeightQuantConfig(bits=16),
                                 kv=KVQuantConfig(bits=4, smoothing=False))
    ours = prepare_model_(copy.deepcopy(base), wkvq_config)
    apply_semantics_(ours, wkvq_config, "vllm", cache_type="int4_per_token_head")
    emulated = token_nll(ours, ids)
    exact, engine = plain[REFERENCE_EXACT_OUTPUT], plain[REFERENCE]
    tolerance = FP32_ORDER * exact.abs().max()
    assert (emulated - exact).abs().max() <= tolerance
    # per token, the engine's bf16 output roundings move the NLL by up to a few 1e-2 in this small random model
    output_rounding = (engine - exact).abs().mean()
    assert (emulated - engine).abs().mean() <= output_rounding + tolerance
    with quant_state(ours, weights=False, kv=False):
        unquantized = token_nll(ours, ids)
    assert (unquantized - exact).abs().max() > 1000 * tolerance  # the test can fail
    assert (unquantized - engine).abs().mean() > 4 * output_rounding
