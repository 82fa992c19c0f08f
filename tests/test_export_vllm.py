"""The vllm target's config checks and its export: a compressed-tensors checkpoint that runs our weights (K smoothing
folded, V smoothing in the biases, bf16-exact scales) with the serve command of the cache it was calibrated for.
The emulation of vLLM's int4_per_token_head arithmetic is tested against an independent re-implementation of the
kernel in tests/test_target_vllm.py; the export in real vLLM in tests/test_engine_vllm.py."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig
from typer.testing import CliRunner

from wkvq_core import targets
from wkvq_core.artifact import load_quantized
from wkvq_core.cli import app
from wkvq_core.config import CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.errors import ConfigError
from wkvq_core.export import NOTES
from wkvq_core.export.vllm import export as export_vllm
from wkvq_core.model import quant_state
from wkvq_core.runtime.packed_linear import PackedLinear
from wkvq_core.targets import vllm

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
try:
    import llamacpp_agreement as agreement
finally:
    sys.path.remove(str(BENCHMARKS))

MODEL = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 64}


def rtn(target: str, group_size: int = 32) -> WKVQuantConfig:
    """RTN weights with the smoothing from calibration statistics (epochs 0), for `target`."""
    return WKVQuantConfig(weight=WeightQuantConfig(group_size=group_size), kv=targets.kv_config("paper", target),
                          calib=CalibConfig(nsamples=4, seqlen=64, epochs=0), target=target)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """{"vllm": a vllm-target artifact, "runtime": a runtime-target one} of the same random head_dim-64 model."""
    root = tmp_path_factory.mktemp("vllm-export")
    return {target: agreement.build_artifact(root / target, rtn(target)) for target in ("vllm", "runtime")}


@pytest.mark.parametrize("config, model, message", [
    (WKVQuantConfig(weight=WeightQuantConfig(bits=3), target="vllm"), None, "W4A16 or W8A16 .* got w_bits 3"),
    (WKVQuantConfig(weight=WeightQuantConfig(group_size=256), target="vllm"), None, "group_size -1, 32, 64, 128; got 256"),
    (WKVQuantConfig(act_bits=8, target="vllm"), None, "weight-only"),
    (WKVQuantConfig(kv=KVQuantConfig(bits=8), target="vllm"), None, "int4_per_token_head .* got kv_bits 8"),
    (WKVQuantConfig(kv=KVQuantConfig(group_size=32), target="vllm"), None, "whole head: kv_group_size must be unset"),
    (WKVQuantConfig(kv=KVQuantConfig(sink_tokens=4), target="vllm"), None, "no sink_tokens"),
    (WKVQuantConfig(kv=KVQuantConfig(cache_type="q4_0"), target="vllm"), None, "must be one of auto, int4_per"),
    (WKVQuantConfig(kv=KVQuantConfig(bits=16, cache_type="int4_per_token_head"), target="vllm"), None,
     "holds 4-bit values; kv_bits is 16"),
    (WKVQuantConfig(target="vllm"), MODEL | {"head_dim": 8}, "head_dim >= 32; this model's is 8"),
    (WKVQuantConfig(weight=WeightQuantConfig(group_size=128), target="vllm"), MODEL | {"hidden_size": 576},
     "group_size 128 does not divide the model's hidden_size .576."),
])
def test_check_names_what_vllm_cannot_serve(config, model, message):
    with pytest.raises(ConfigError, match=message):
        targets.check_config(config, model)


def test_the_vllm_target_maps_kv_bits_to_cache_dtypes_and_drops_what_it_lacks():
    assert vllm.cache_dtype(KVQuantConfig(bits=4)) == "int4_per_token_head"
    assert vllm.cache_dtype(KVQuantConfig(bits=16)) == "auto"
    recommended = targets.kv_config("recommended", "vllm")
    assert not (recommended.k_pre_rope or recommended.sink_tokens or recommended.rotate or recommended.fp_prefill)
    assert recommended.smooth_init == "identity" and targets.kv_config("paper", "vllm").smooth_init == "range"
    targets.check_config(WKVQuantConfig(kv=recommended, target="vllm"), MODEL)


def test_a_vllm_artifact_has_bf16_exact_weight_scales(artifacts):
    """A bf16 vLLM multiplies by the scales in bf16: the vllm target keeps 8 significant bits (a runtime artifact,
    fp16's 11, does not)."""
    def bf16_exact(artifact):
        scales = torch.cat([m.scales.float().flatten() for m in load_quantized(artifact).modules()
                            if isinstance(m, PackedLinear)])
        return bool(torch.equal(scales.bfloat16().float(), scales))

    assert bf16_exact(artifacts["vllm"]) and not bf16_exact(artifacts["runtime"])


@torch.no_grad()
def test_the_export_runs_our_weights_with_the_k_smoothing_folded(artifacts, tmp_path):
    ours = load_quantized(artifacts["vllm"])
    for linear in ours.modules():
        if isinstance(linear, PackedLinear):
            assert linear.input_rounding is vllm.bf16_ste  # the target's; transformers in fp32 does not round
            linear.input_rounding = None
    out = export_vllm(artifacts["vllm"], tmp_path / "export")
    ids = torch.randint(0, ours.config.vocab_size, (2, 48))
    with quant_state(ours, weights=True, kv=False):
        expected = ours(ids, use_cache=False).logits
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    assert loaded.config.attention_bias  # the folded V shift
    logits = loaded(ids).logits
    assert (logits - expected).abs().max() < 2e-3 * expected.abs().max()  # fp16 rounding of the weights only


def test_the_export_names_the_serve_command_of_the_calibrated_cache(artifacts, tmp_path):
    out = export_vllm(artifacts["vllm"], tmp_path / "export")
    notes = json.loads((out / NOTES).read_text())
    assert notes["format"] == "vllm" and notes["kv_cache_dtype"] == "int4_per_token_head"
    assert notes["serve"] == ("vllm serve OUT --dtype bfloat16 --kv-cache-dtype int4_per_token_head "
                              "--attention-backend TRITON_ATTN")
    assert notes["not_expressed"] == [] and "kv_cache_note" not in notes
    assert sorted(notes["files"]) == sorted(path.name for path in out.iterdir())
    readme = (out / "README.md").read_text()
    assert "vllm serve THIS_DIR --dtype bfloat16 --kv-cache-dtype int4_per_token_head" in readme
    assert "CompressedTensorsConfig(dequantize=True)" in readme


def test_a_runtime_artifact_exported_for_vllm_says_its_cache_is_not_vllms(artifacts, tmp_path):
    out = export_vllm(artifacts["runtime"], tmp_path / "export")
    notes = json.loads((out / NOTES).read_text())
    assert [item["feature"] for item in notes["not_expressed"]] == ["kv_cache_quantization", "poq", "k_smoothing"]
    assert "uncalibrated" in notes["kv_cache_note"] and notes["kv_cache_note"] in (out / "README.md").read_text()


def test_cli_export_refuses_weight_groups_vllm_cannot_run(tmp_path):
    artifact = agreement.build_artifact(tmp_path / "g16", rtn("runtime", group_size=16))
    result = CliRunner().invoke(app, ["export", str(artifact), str(tmp_path / "out"), "--format", "vllm"])
    assert result.exit_code == 2 and "group_size -1, 32, 64, 128; got 16" in result.output
    assert not (tmp_path / "out").exists()


def test_eval_under_vllm_semantics_reports_the_engines_cache_bytes(artifacts):
    result = CliRunner().invoke(app, ["eval", "--model", str(artifacts["vllm"]), "--data",
                                      str(agreement.ASSETS / "tinystories" / "eval.txt"), "--seqlen", "64",
                                      "--eval-tokens", "128", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["semantics"] == {"target": "vllm", "kv_cache_type": "int4_per_token_head", "matmul_inputs": "bf16"}
    layers, kv_heads, dim = 2, 2, 64
    assert report["kv_bytes_per_token"] == 2 * layers * kv_heads * (dim / 2 + 4)


@torch.no_grad()
def test_a_kv_only_artifact_exports_as_a_plain_checkpoint_with_its_smoothing_folded(tmp_path):
    """FP weights with the calibrated KV cache: no quantization_config, loaded by transformers without flags."""
    config = WKVQuantConfig(weight=WeightQuantConfig(bits=16), kv=targets.kv_config("paper", "vllm"),
                            calib=CalibConfig(nsamples=4, seqlen=64, epochs=0), target="vllm")
    artifact = agreement.build_artifact(tmp_path / "kv-only", config)
    out = export_vllm(artifact, tmp_path / "export")
    notes = json.loads((out / NOTES).read_text())
    assert notes["scheme"] == "unquantized weights (W16A16)" and notes["not_expressed"] == []
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ours = load_quantized(artifact)
    ids = torch.randint(0, ours.config.vocab_size, (2, 48))
    with quant_state(ours, weights=True, kv=False):
        expected = ours(ids, use_cache=False).logits
    smoothed = [attn.v_proj.bias for attn in (layer.self_attn for layer in ours.model.layers)]
    assert all(bias is not None and bias.abs().max() > 0 for bias in smoothed)  # the folded V shift
    logits = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    assert (logits - expected).abs().max() < 2e-3 * expected.abs().max()  # fp16 storage of the weights only
