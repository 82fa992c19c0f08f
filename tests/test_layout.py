"""wkvq_core's layering (scripts/import_graph.py) and the place where deployment targets and export formats plug in."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from wkvq_core.config import KVQuantConfig, WeightQuantConfig
from wkvq_core.errors import ConfigError
from wkvq_core.export import FORMATS, exporter
from wkvq_core.quant.kv_quant import KEY, VALUE, WKVAttention
from wkvq_core.runtime.kv_cache import WKVQuantCache
from wkvq_core.targets import RUNTIME, TARGETS, get_target

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "scripts" / "import_graph.py"


def import_graph(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_wkvq_core_has_no_cycle_and_no_upward_import():
    result = import_graph()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "ok: no cycle, no upward import"
    for unit in ("quant/", "targets/", "calib/", "runtime/", "evaluation/", "export/", "artifact", "pipeline", "cli"):
        assert any(line.split()[1] == unit for line in lines[:-1]), unit
    dot = import_graph("--dot")
    assert dot.returncode == 0 and dot.stdout.startswith("digraph") and '"pipeline" -> "calib";' in dot.stdout
    documented = (REPO / "docs" / "layout.md").read_text().split("<!-- import-graph -->\n```\n")[1].split("```")[0]
    assert documented == result.stdout, "docs/layout.md shows an old import graph: paste the script's output"


def test_a_cycle_and_an_upward_import_are_reported(tmp_path):
    root = tmp_path / "wkvq_core"
    (root / "quant").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "errors.py").write_text("from .config import X\n")  # errors is the lowest layer
    (root / "config.py").write_text("X = 1\n")
    (root / "quant" / "__init__.py").write_text("")
    (root / "quant" / "a.py").write_text("def f():\n    from . import b\n")  # a function-level import counts
    (root / "quant" / "b.py").write_text("from wkvq_core.quant.a import f\n")
    (root / "stray.py").write_text("")
    result = import_graph("--root", str(root))
    assert result.returncode == 1
    assert "module cycle: wkvq_core.quant.a <-> wkvq_core.quant.b" in result.stderr
    assert "upward import: wkvq_core.errors -> wkvq_core.config" in result.stderr
    assert "stray: not in LAYERS" in result.stderr


def test_every_target_is_found_and_writes_a_known_format():
    assert RUNTIME in TARGETS
    for name, target in TARGETS.items():
        assert target.name == name and target.summary
        assert target.export is None or target.export in FORMATS
    with pytest.raises(ConfigError, match="target must be one of llamacpp, runtime, vllm; got 'tensorrt'"):
        get_target("tensorrt")


def test_export_formats_are_the_modules_of_wkvq_core_export():
    assert FORMATS == {"compressed-tensors": "wkvq_core.export.compressed_tensors", "gguf": "wkvq_core.export.gguf",
                       "vllm": "wkvq_core.export.vllm"}
    for name in FORMATS:
        module = exporter(name)
        assert module.FORMAT == name and callable(module.export) and callable(module.describe)
    with pytest.raises(ConfigError, match="--format must be one of compressed-tensors, gguf, vllm; got 'onnx'"):
        exporter("onnx")


def test_the_runtime_targets_kv_quantizer_is_what_the_packed_cache_stores():
    """Calibration and evaluation quantize K~ / V~ with the target's quantizer; WKVQuantCache quantizes, packs and
    dequantizes them its own way (quantize_per_token, bit packing, fp16 scale and zero): both must agree."""
    kv = KVQuantConfig(bits=4, group_size=8, sink_tokens=3)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                         intermediate_size=96, vocab_size=64)
    torch.manual_seed(0)
    key, value = torch.randn(2, 1, 2, 10, 16).unbind(0)  # (B, H_kv, T, D)
    quantizer = get_target(RUNTIME).kv_quantizer(kv)
    cache = WKVQuantCache(config, kv_bits=kv.bits, kv_group_size=kv.group_size, sink_tokens=kv.sink_tokens)
    stored_key, stored_value = cache.update(key[..., :4, :], value[..., :4, :], 0)
    stored_key, stored_value = cache.update(key[..., 4:, :], value[..., 4:, :], 0)
    assert torch.equal(quantizer(key[..., :4, :], past=0, kind=KEY)[..., :3, :], key[..., :3, :])  # sink tokens kept
    for x, stored, kind in ((key, stored_key, KEY), (value, stored_value, VALUE)):
        expected = torch.cat([quantizer(x[..., :4, :], 0, kind), quantizer(x[..., 4:, :], 4, kind)], dim=-2)
        assert not torch.equal(expected[..., 3:, :], x[..., 3:, :])
        torch.testing.assert_close(stored.float(), expected, atol=2e-3, rtol=0)  # fp16 scale and zero


def _attention(kv_quantizer, engine_poq: bool, kv: KVQuantConfig) -> torch.Tensor:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                         intermediate_size=96, vocab_size=64)
    model = LlamaForCausalLM(config).eval()
    attn = WKVAttention(model.model.layers[0].self_attn, WeightQuantConfig(bits=16), kv, kv_quantizer, engine_poq)
    hidden = torch.randn(1, 12, 64)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(12)[None])
    with torch.no_grad():
        return attn(hidden, position_embeddings)[0]


def test_the_attention_computes_what_its_targets_quantizer_and_poq_say():
    kv = KVQuantConfig(bits=4, poq=True)
    runtime = get_target(RUNTIME)
    poq = _attention(runtime.kv_quantizer(kv), True, kv)
    no_poq = _attention(runtime.kv_quantizer(kv), False, kv)
    assert torch.equal(no_poq, _attention(runtime.kv_quantizer(kv), True, KVQuantConfig(bits=4, poq=False)))
    assert not torch.allclose(poq, no_poq)
    torch.testing.assert_close(_attention(lambda x, past, kind: x, True, kv), _attention(None, True, KVQuantConfig(bits=16)))
