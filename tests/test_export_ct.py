"""`wkvq export --format compressed-tensors`: the exported checkpoint, read back by the `compressed-tensors` package
itself, holds exactly our weights, and transformers runs it with our logits (full-precision KV cache).

Two artifacts: the shipped stories260k quantized per row (strategy "channel", through the CLI) and a random
2-layer LLaMA with GQA quantized in groups of 128 (strategy "group", through the Python API).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from transformers.utils.quantization_config import CompressedTensorsConfig  # noqa: E402

from wkvq_core.artifact import load_quantized, save_artifact  # noqa: E402
from wkvq_core.cli import app  # noqa: E402
from wkvq_core.config import CalibConfig, WeightQuantConfig, WKVQuantConfig  # noqa: E402
from wkvq_core.errors import ConfigError  # noqa: E402
from wkvq_core.export import NOTES  # noqa: E402
from wkvq_core.export.compressed_tensors import _export_linear, pack_int32  # noqa: E402
from wkvq_core.export.compressed_tensors import export as export_ct  # noqa: E402
from wkvq_core.model import prepare_model_, quant_state  # noqa: E402
from wkvq_core.pipeline import QuantizeJob, run_quantize_job  # noqa: E402
from wkvq_core.quant.packing import pack_bits  # noqa: E402
from wkvq_core.runtime.packed_linear import PackedLinear  # noqa: E402

import wkvq_core  # noqa: E402

ASSETS = Path(wkvq_core.__file__).parent / "assets"
TINY_MODEL = ASSETS / "stories260k"
CALIB_TEXT = ASSETS / "tinystories" / "calib.txt"

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{"row": (artifact, export), "g128": (artifact, export)}."""
    root = tmp_path_factory.mktemp("export-ct")
    row = root / "row"
    result = invoke("quantize", "--model", TINY_MODEL, "--calib", CALIB_TEXT, "--out", row, "--group-size", -1,
                    "--nsamples", 4, "--seqlen", 64, "--epochs", 1, "--json")
    assert result.exit_code == 0, result.output
    result = invoke("export", "--format", "compressed-tensors", row, root / "row-ct")
    assert result.exit_code == 0, result.output
    assert "not expressed: kv_cache_quantization, poq, k_smoothing" in result.stdout

    base = root / "base128"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                                 num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)).save_pretrained(base)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(base)
    g128 = root / "g128"
    config = WKVQuantConfig(weight=WeightQuantConfig(group_size=128), calib=CalibConfig(nsamples=4, seqlen=64, epochs=1))
    run_quantize_job(QuantizeJob(model=str(base), calib=str(CALIB_TEXT), out=g128, config=config, device="cpu"))
    export_ct(g128, root / "g128-ct")
    return {"row": (row, root / "row-ct"), "g128": (g128, root / "g128-ct")}


def packed_linears(model) -> dict[str, PackedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


@pytest.mark.parametrize("which, strategy, group", [("row", "channel", None), ("g128", "group", 128)])
def test_compressed_tensors_decompresses_to_our_weights(exported, which, strategy, group):
    artifact, out = exported[which]
    ours = load_quantized(artifact)
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] is True and "wkvquant" not in json.dumps(config["quantization_config"])
    qconfig = QuantizationConfig.model_validate(config["quantization_config"])  # the package's own parser
    scheme = qconfig.config_groups["group_0"]
    assert (qconfig.format, qconfig.quantization_status, qconfig.kv_cache_scheme) == ("pack-quantized", "compressed", None)
    assert (scheme.weights.num_bits, scheme.weights.symmetric, scheme.weights.strategy, scheme.weights.group_size) == (
        4, False, strategy, group)
    compressor = BaseCompressor.get_value_from_registry(qconfig.format)
    state = load_file(out / "model.safetensors")
    assert not [k for k in state if k.endswith(("k_scale", "k_shift", ".qweight", ".zeros"))]
    linears = packed_linears(ours)
    assert len(linears) == 7 * len(ours.model.layers)
    for name, lin in linears.items():
        local = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.weight_")}
        assert set(local) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}, name
        reference = lin.dequantized_weight()  # float32: (code - zero) * scale is exact
        # scales are fp16 (as stored by us): the package dequantizes in fp16, i.e. the exact product rounded to fp16,
        # bit for bit what our own fp16 dequantization gives
        w16 = compressor.decompress(local, scheme)["weight"]
        assert w16.dtype == torch.float16
        assert torch.equal(w16, reference.half()) and torch.equal(w16, lin.dequantized_weight(torch.float16)), name
        # with the scales upcast it dequantizes in fp32: exactly our weights
        w32 = compressor.decompress(local | {"weight_scale": local["weight_scale"].float()}, scheme)["weight"]
        assert torch.equal(w32, reference), name
        bias = state.get(f"{name}.bias")
        if ".self_attn." in name:
            expected = torch.zeros(lin.out_features) if lin.bias is None else lin.bias
            assert bias is not None and torch.equal(bias.float(), expected), name
        else:
            assert bias is None and lin.bias is None, name
    assert any(lin.bias is not None and lin.bias.abs().max() > 0 for lin in linears.values())  # the V smoothing
    notes = json.loads((out / NOTES).read_text())
    # "row" comes from the CLI, whose default method (recommended) keeps sink tokens unquantized in the cache;
    # "g128" from the library's WKVQuantConfig, the paper's method
    sinks = ["sink_tokens"] if which == "row" else []
    assert [item["feature"] for item in notes["not_expressed"]] == ["kv_cache_quantization", "poq", "k_smoothing",
                                                                    *sinks]
    assert notes["zero_points_reexpressed"] == {}


@torch.no_grad()
def our_logits(model, ids):
    with quant_state(model, weights=True, kv=False):  # packed weights, full-precision KV cache (no POQ)
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("which", ["row", "g128"])
@torch.no_grad()
def test_transformers_runs_the_export_with_our_logits(exported, which):
    artifact, out = exported[which]
    ours = load_quantized(artifact)
    ids = torch.randint(0, ours.config.vocab_size, (2, 48))
    expected = our_logits(ours, ids)
    linears = packed_linears(ours)

    # a plain LlamaForCausalLM from the exported config, weights decompressed by compressed-tensors (fp32 scales)
    config = LlamaConfig.from_pretrained(out)
    del config.quantization_config
    plain = LlamaForCausalLM(config).eval()
    state = load_file(out / "model.safetensors")
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    scheme = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"]
                                               ).config_groups["group_0"]
    dense = {}
    for key, value in state.items():
        if key.endswith(".weight_packed"):
            prefix = key.removesuffix("_packed")
            local = {k.removeprefix(prefix.removesuffix("weight")): v for k, v in state.items() if k.startswith(prefix + "_")}
            dense[prefix] = compressor.decompress(local | {"weight_scale": local["weight_scale"].float()}, scheme)["weight"]
        elif not key.endswith(("_scale", "_zero_point", "_shape")):
            dense[key] = value.float()
    missing, unexpected = plain.load_state_dict(dense, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    plain.tie_weights()
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-4, rtol=1e-4)

    # transformers' own compressed-tensors loader; it dequantizes with the fp16 scales as stored: fp16 weights
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    for name, lin in linears.items():
        assert torch.equal(loaded.get_submodule(name).weight, lin.dequantized_weight().half().float()), name
    logits = loaded(ids).logits
    assert (logits - expected).abs().max() < 2e-3 * expected.abs().max()  # fp16 rounding of the weights only


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("packed_dim", [0, 1])
def test_packing_is_compressed_tensors_pack_to_int32(bits, packed_dim):
    values = torch.randint(0, 2**bits, (24, 43), dtype=torch.uint8)
    signed = (values.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_int32(values, bits, packed_dim), pack_to_int32(signed, bits, packed_dim=packed_dim))


def synthetic_linear(codes: torch.Tensor, zeros: torch.Tensor, group: int) -> PackedLinear:
    scales = torch.rand(zeros.shape).half() / 10 + 0.01
    return PackedLinear(pack_bits(codes, 4), scales, zeros.half(), None, codes.shape[1], 4, group)


def decompress_linear(tensors: dict, name: str, group: int) -> torch.Tensor:
    local = {k.removeprefix(f"{name}."): v for k, v in tensors.items()}
    local["weight_scale"] = local["weight_scale"].float()
    scheme = QuantizationConfig.model_validate(
        {"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "symmetric": False,
                                                                     "strategy": "group", "group_size": group}}}}
    ).config_groups["g"]
    return BaseCompressor.get_value_from_registry("pack-quantized").decompress(local, scheme)["weight"]


def test_zero_points_outside_the_code_range_are_reexpressed_or_refused():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    zeros = torch.randint(0, 16, (8, 2)).float()
    codes[2, :32] = torch.randint(0, 15, (32,), dtype=torch.uint8)  # code 15 unused: zero -1 still fits
    zeros[2, 0] = -1
    codes[5, 32:] = torch.randint(1, 16, (32,), dtype=torch.uint8)  # code 0 unused: zero 16 still fits
    zeros[5, 1] = 16
    lin = synthetic_linear(codes, zeros, 32)
    tensors, remapped = _export_linear("layer", lin)
    assert remapped == 2
    assert torch.equal(decompress_linear(tensors, "layer", 32), lin.dequantized_weight())

    zeros[6, 1] = -1000  # a near-constant group: (code - zero) ~ 1000 has no signed 4-bit (q, zp)
    with pytest.raises(ConfigError, match=r"model\.layers\.3\.mlp\.up_proj: zero point -1000 \(row 6, group 1\)"):
        _export_linear("model.layers.3.mlp.up_proj", synthetic_linear(codes, zeros, 32))


def test_cli_refuses_what_cannot_be_exported(tmp_path, tiny_model, tokenizer):
    model = tiny_model
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3] = 0.01  # a constant row: its zero point is about -1000
    config = WKVQuantConfig(weight=WeightQuantConfig(group_size=-1, lwc=False))
    prepare_model_(model, config)
    artifact = save_artifact(tmp_path / "art", model, tokenizer, config)
    out = tmp_path / "out"
    assert_clean_failure(invoke("export", "--format", "compressed-tensors", artifact, out),
                         "model.layers.1.mlp.up_proj: zero point", "row 3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # nothing written, no temporary directory left
    assert_clean_failure(invoke("export", "--format", "onnx", artifact, out), "--format must be one of compressed-tensors, gguf, vllm")
    assert_clean_failure(invoke("export", TINY_MODEL, out), "not a WKVQuant artifact")
    assert_clean_failure(invoke("export", tmp_path / "missing", out), "no such directory")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    assert_clean_failure(invoke("export", artifact, tmp_path / "busy"), "not a previous export")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"


def test_export_replaces_a_previous_export_atomically(exported, tmp_path):
    artifact, first = exported["row"]
    out = tmp_path / "ct"
    shutil.copytree(first, out)
    (out / "stale.txt").write_text("old")
    export_ct(artifact, out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in first.iterdir())
    assert (out / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


@pytest.mark.parametrize("which", ["row", "g128"])
def test_export_is_a_plain_model_that_transformers_loads_without_wkvq_core(exported, which):
    """The artifact's wkvquant model type, auto_map and wkvquant_hf.py do not travel into the export."""
    artifact, out = exported[which]
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert "auto_map" not in config and not (out / "wkvquant_hf.py").exists()
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "from transformers.utils.quantization_config import CompressedTensorsConfig\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=CompressedTensorsConfig("
            "dequantize=True))\nprint(type(m).__name__, 'wkvq_core' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LlamaForCausalLM", "False"]
