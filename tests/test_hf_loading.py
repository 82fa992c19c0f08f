"""Artifacts load through plain `AutoModelForCausalLM.from_pretrained` after `import wkvq_core`, and refuse to
load without it (never random linears)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import wkvq_core
from wkvq_core.artifact import FORMAT_VERSION, MANIFEST, save_artifact, sha256_file
from wkvq_core.calib.data import calibration_samples, eval_windows, load_text, tokenize
from wkvq_core.cli import app
from wkvq_core.config import CalibConfig, WeightQuantConfig, WKVQuantConfig, kv_config
from wkvq_core.evaluation.perplexity import EvalMode, greedy_without_cache, perplexity
from wkvq_core.model import quant_state
from wkvq_core.pipeline import quantize_model_
from wkvq_core.runtime.kv_cache import WKVQuantCache
from wkvq_core.runtime.packed_linear import PackedLinear

SEQLEN = 64


@pytest.fixture(scope="module", params=["paper", "recommended"])
def artifact(request, _tiny, calib_ids, tmp_path_factory):
    """The shipped model calibrated (W4 per row, KV4; smoothing trained one epoch), kept in fp32 so that the
    loaded model can be compared with the calibration-time simulation; `recommended` adds pre-RoPE K and sinks."""
    model, tokenizer = copy.deepcopy(_tiny[0]), _tiny[1]
    cfg = WKVQuantConfig(weight=WeightQuantConfig(group_size=-1), kv=kv_config(request.param),
                         calib=CalibConfig(nsamples=4, seqlen=SEQLEN, epochs=1))
    quantize_model_(model, cfg, calibration_samples(calib_ids, 4, SEQLEN, seed=0))
    out = save_artifact(tmp_path_factory.mktemp(request.param) / "art", model, tokenizer, cfg,
                        fp_dtype=torch.float32)
    return model, out


def test_automodel_builds_the_packed_model_of_load_quantized(artifact):
    _, out = artifact
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "wkvquant_llama" and config["quantization_config"]["format_version"] == FORMAT_VERSION
    auto = AutoModelForCausalLM.from_pretrained(out)
    reference = wkvq_core.load_quantized(out)
    assert type(auto.model.layers[0].mlp.up_proj) is PackedLinear
    assert type(auto.model.layers[0].self_attn).__name__ == "WKVAttention" and auto.model.layers[0].self_attn.smoothing_folded
    auto_state, reference_state = auto.state_dict(), reference.state_dict()
    assert auto_state.keys() == reference_state.keys()
    for key, value in reference_state.items():
        assert auto_state[key].dtype == value.dtype and torch.equal(auto_state[key], value), key
    ids = torch.arange(3, 40)[None]
    assert torch.equal(auto(ids).logits, reference(ids).logits)


def test_generate_uses_the_packed_cache_and_equals_the_cache_free_simulation(artifact, tokenizer):
    sim, out = artifact
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer("Once upon a time, Lily", return_tensors="pt")
    got = model.generate(**prompt, max_new_tokens=48, do_sample=False, eos_token_id=None,
                         return_dict_in_generate=True)
    assert isinstance(got.cache, WKVQuantCache)
    with quant_state(sim, weights=True, kv=True):
        expected, _ = greedy_without_cache(sim, prompt["input_ids"], 48)
    assert torch.equal(got.sequences, expected)
    explicit = model.generate(**prompt, max_new_tokens=48, do_sample=False, eos_token_id=None,
                              **wkvq_core.with_cache(WKVQuantCache(model.config)))
    assert torch.equal(explicit, expected)


def test_save_pretrained_round_trips(artifact, tmp_path):
    _, out = artifact
    model = AutoModelForCausalLM.from_pretrained(out)
    model.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again" / MANIFEST).exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    state, again_state = model.state_dict(), again.state_dict()
    assert state.keys() == again_state.keys()
    assert all(torch.equal(state[k], again_state[k]) and state[k].dtype == again_state[k].dtype for k in state)
    ids = torch.arange(5, 50)[None]
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_automodel_perplexity_equals_wkvq_eval(artifact, tmp_path):
    _, out = artifact
    text = tmp_path / "eval.txt"
    text.write_text(load_text("wkvq_core/assets/tinystories/eval.txt")[:4000])
    result = CliRunner().invoke(app, ["eval", "--model", str(out), "--data", str(text), "--seqlen", str(SEQLEN),
                                      "--mode", "wkv", "--json"])
    assert result.exit_code == 0, result.output
    cli_ppl = json.loads(result.output.strip().splitlines()[-1])["ppl"]["wkv"]
    model = AutoModelForCausalLM.from_pretrained(out)
    windows = eval_windows(tokenize(AutoTokenizer.from_pretrained(out), load_text(str(text))), SEQLEN)
    ppl = perplexity(model, windows, EvalMode.WKV).ppl
    assert ppl == pytest.approx(cli_ppl, rel=1e-6)
    assert perplexity(model, windows, EvalMode.W).ppl != pytest.approx(ppl, rel=1e-4)  # the KV cache is quantized


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=300)


def test_plain_transformers_refuses_the_artifact_and_says_what_to_do(artifact):
    _, out = artifact
    result = _run("""
        import sys
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        print("LOADED", type(model).__name__)
    """, str(out))
    assert result.returncode != 0 and "LOADED" not in result.stdout
    assert "trust_remote_code=True" in result.stderr
    assert "wkvq_core" not in result.stderr.split("Traceback")[0]  # nothing imported it behind our back


def test_trust_remote_code_loads_it_and_names_the_package_when_missing(artifact):
    _, out = artifact
    loaded = _run("""
        import sys
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
        print(type(model).__name__, type(model.model.layers[0].mlp.up_proj).__name__)
    """, str(out))
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["WKVQuantLlamaForCausalLM", "PackedLinear"]
    missing = _run("""
        import sys

        class NoWKVQ:  # as on a machine without the package
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "wkvq_core":
                    raise ImportError("No module named 'wkvq_core'")

        sys.meta_path.insert(0, NoWKVQ())
        from transformers import AutoModelForCausalLM, AutoTokenizer
        AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    """, str(out))
    assert missing.returncode != 0
    assert "install the wkvquant project" in missing.stderr and "import wkvq_core" in missing.stderr


@pytest.mark.parametrize("order", ["wkvq_core first", "transformers first", "inside a wkvq_core module"])
def test_registration_in_every_import_order(order):
    imports = {"wkvq_core first": "import wkvq_core\nimport transformers",
               "transformers first": "import transformers\nimport wkvq_core",
               "inside a wkvq_core module": "import wkvq_core.quant.kv_quant"}[order]
    result = _run(imports + """
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers import CONFIG_MAPPING
print("wkvquant" in AUTO_QUANTIZER_MAPPING, "wkvquant_llama" in CONFIG_MAPPING)
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


def test_import_wkvq_core_alone_imports_neither_torch_nor_transformers():
    result = _run("import sys, wkvq_core, wkvq_core.config; print('torch' in sys.modules, 'transformers' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_format_1_artifacts_still_load(artifact, tmp_path):
    """Artifacts written before the transformers integration declared the base model type."""
    _, out = artifact
    old = tmp_path / "v1"
    shutil.copytree(out, old)
    config = json.loads((old / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    config["quantization_config"]["format_version"] = 1
    del config["auto_map"]
    (old / "config.json").write_text(json.dumps(config))
    (old / "wkvquant_hf.py").unlink()
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["files"]["wkvquant_hf.py"]
    manifest["files"]["config.json"] = {"sha256": sha256_file(old / "config.json"),
                                        "size": (old / "config.json").stat().st_size}
    (old / MANIFEST).write_text(json.dumps(manifest))
    ids = torch.arange(3, 40)[None]
    assert torch.equal(wkvq_core.load_quantized(old)(ids).logits, wkvq_core.load_quantized(out)(ids).logits)
