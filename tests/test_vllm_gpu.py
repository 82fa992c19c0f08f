"""benchmarks/vllm_gpu.py without a GPU: its perplexity from prompt logprobs, the engine settings, the table, the
dry run, and the one-line refusal where vllm is missing (the project's venv has no vllm)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
try:
    import vllm_gpu
finally:
    sys.path.remove(str(BENCHMARKS))


@dataclass
class Logprob:  # vllm.logprobs.Logprob's field that the script reads
    logprob: float


@pytest.fixture
def bundle(tmp_path) -> Path:
    (tmp_path / "models" / "fp").mkdir(parents=True)
    (tmp_path / "models" / "ours").mkdir()
    (tmp_path / "windows.json").write_text(json.dumps([[1, 2, 3, 4], [5, 6, 7, 8]]))
    (tmp_path / "emulated.json").write_text(json.dumps({name: {"auto": 30.0, "int4_per_token_head": 31.0}
                                                        for name in ("fp", "ours")}))
    return tmp_path


def test_window_nll_scores_tokens_after_the_first():
    window = [7, 3, 9]
    steps = [None, {3: Logprob(-1.5), 4: Logprob(-0.1)}, {9: Logprob(-0.25)}]
    assert vllm_gpu.window_nll(steps, window) == (1.75, 2)


def test_engine_kwargs_name_the_triton_backend_for_the_int4_cache(bundle):
    args = argparse.Namespace(max_model_len=1024, gpu_memory_utilization=0.4, enforce_eager=False)
    int4 = vllm_gpu.engine_kwargs(bundle, "int4_per_token_head", args)
    assert int4["kv_cache_dtype"] == "int4_per_token_head" and int4["attention_backend"] == "TRITON_ATTN"
    assert int4["dtype"] == "bfloat16"
    assert "attention_backend" not in vllm_gpu.engine_kwargs(bundle, "auto", args)


def test_table_compares_emulation_and_capacity():
    result = {"ppl": 31.0, "tokens_per_s": 100.0, "kv_cache_tokens": 1000}
    results = {"fp": {"auto": result, "int4_per_token_head": result | {"ppl": 32.0, "kv_cache_tokens": 3500}}}
    text = vllm_gpu.table(results, {"fp": {"auto": 31.0, "int4_per_token_head": 32.32}})
    assert "| +0.00% |" in text and "| +1.00% |" in text and "3.50×" in text and "3,500" in text


def test_dry_run_lists_every_engine(bundle, capsys):
    vllm_gpu.main(["run", str(bundle), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("LLM(" in line for line in lines)
    assert math.isclose(float(lines[1].split("emulated ")[1].split(")")[0]), 31.0)


def test_run_without_vllm_fails_in_one_line(bundle):
    with pytest.raises(SystemExit, match="vllm is not importable"):
        vllm_gpu.main(["run", str(bundle)])
