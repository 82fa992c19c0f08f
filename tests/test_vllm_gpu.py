"""benchmarks/vllm_gpu.py without a GPU: its perplexity from prompt logprobs, the engine settings, the table, the
dry run, and the one-line refusal where vllm is missing (the project's venv has no vllm)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
try:
    import vllm_gpu
finally:
    sys.path.remove(str(BENCHMARKS))


@pytest.fixture
def bundle(tmp_path) -> Path:
    (tmp_path / "models" / "fp").mkdir(parents=True)
    (tmp_path / "models" / "ours").mkdir()
    (tmp_path / "windows.json").write_text(json.dumps([[1, 2, 3, 4], [5, 6, 7, 8]]))
    (tmp_path / "emulated.json").write_text(json.dumps({name: {"auto": 30.0, "int4_per_token_head": 31.0}
                                                        for name in ("fp", "ours")}))
    return tmp_path


def test_perplexity_of_per_window_logprobs():
    ppl, tokens = vllm_gpu.perplexity([[-1.0, -2.0], [-3.0]])
    assert tokens == 3 and math.isclose(ppl, math.exp(2.0))


def test_engine_commands_score_then_time_each_cache(bundle):
    args = argparse.Namespace(new_tokens=32)
    commands = vllm_gpu.engine_commands(bundle, "ours", "int4_per_token_head", args)
    ppl, speed = commands["ppl"], commands["throughput"]
    assert ppl[1].endswith("engine_vllm.py") and ppl[2] == str(bundle / "models" / "ours")
    assert ppl[-4:] == ["--dtype", "bfloat16", "--kv-cache-dtype", "int4_per_token_head"]
    assert speed[3].endswith("prompts.json") and speed[-2:] == ["--throughput", "32"]


def test_table_compares_emulation_and_capacity():
    result = {"ppl": 31.0, "tokens_per_s": 100.0, "kv_cache_tokens": 1000}
    results = {"fp": {"auto": result, "int4_per_token_head": result | {"ppl": 32.0, "kv_cache_tokens": 3500}}}
    text = vllm_gpu.table(results, {"fp": {"auto": 31.0, "int4_per_token_head": 32.32}})
    assert "| +0.00% |" in text and "| +1.00% |" in text and "3.50×" in text and "3,500" in text


def test_dry_run_lists_every_engine_run(bundle, capsys):
    vllm_gpu.main(["run", str(bundle), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2 windows × 4 tokens")
    assert len(lines) == 1 + 2 * 2 * 2 and all("engine_vllm.py" in line for line in lines[1:])
    assert "fp int4_per_token_head ppl (emulated ppl 31.000)" in "\n".join(lines)


def test_run_without_vllm_fails_in_one_line(bundle):
    with pytest.raises(SystemExit, match="vllm is not importable"):
        vllm_gpu.main(["run", str(bundle)])
