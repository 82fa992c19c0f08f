"""The quick mode of benchmarks/peers.py keeps its KIVI-style and transformers QuantizedCache rows working: they
decode the tiny model token by token through the real caches and account the bytes those caches hold."""

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import pytest

from wkvq_core.evaluation.baselines.kivi_cache import kivi_bytes

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SEQLEN = 256
# stories260k: 5 layers x (K, V) x 4 KV heads; per token and head: head_dim 8 elements
FP16_PER_TOKEN = 5 * 2 * 4 * 8 * 2  # 640
KV4_PER_TOKEN = 5 * 2 * 4 * (8 // 2 + 2 + 2)  # 4-bit codes + fp16 scale + fp16 zero per token and head: 320
BACKENDS = {"quanto": "optimum.quanto", "hqq": "hqq"}


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("peers")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def results(peers):
    out = peers.main(["--quick", "--rows", "fp,kivi4,qc", "--windows", "1", "--no-write", "--no-plot"])
    return {r.row.key: r for r in out}


def installed(backend: str) -> bool:
    return importlib.util.find_spec(BACKENDS[backend]) is not None


def test_rows_present(results):
    assert set(results) == {"fp", "kivi4", "qc-quanto", "qc-quanto-r0", "qc-hqq", "qc-hqq-r0"}
    fp = results["fp"]
    assert fp.error is None and fp.kv_per_token == FP16_PER_TOKEN and 3 < fp.ppl < 8


def test_kivi_row_decodes_and_counts_its_residual(results):
    row = results["kivi4"]
    assert row.error is None and row.scored == "decode"
    assert math.isfinite(row.ppl) and row.ppl != results["fp"].ppl  # the quantized past was read
    assert abs(row.ppl / results["fp"].ppl - 1) < 0.1  # KV4 with a 128-token FP residual stays close to FP
    peak = max(kivi_bytes(5, 4, 8, t, 4, fp_bytes=2) for t in range(1, SEQLEN + 1))
    assert row.kv_per_token == peak / SEQLEN  # peaks at 255 tokens: 127 FP keys + 128 FP values
    assert FP16_PER_TOKEN > row.kv_per_token > kivi_bytes(5, 4, 8, SEQLEN, 4) / SEQLEN


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_cache_rows(results, backend):
    default, r0 = results[f"qc-{backend}"], results[f"qc-{backend}-r0"]
    if not installed(backend):  # the rows must say why they did not run
        for row in (default, r0):
            assert row.ppl is None and "install" in row.error.lower(), row.error
        pytest.skip(f"{BACKENDS[backend]} is not installed in this environment (the rows report: {default.error})")
    fp = results["fp"].ppl
    for row in (default, r0):
        assert row.error is None and row.scored == "decode" and math.isfinite(row.ppl)
        assert any("q_group_size 64 rejected" in n for n in row.notes)  # the default group is impossible here
    # residual 0: every token quantized, 4-bit codes + scale and zero point per token and KV head
    assert r0.kv_per_token == KV4_PER_TOKEN and r0.ppl > 1.05 * fp
    # default residual 128: at 256 tokens 129 quantized, 127 still in full precision
    assert default.kv_per_token == (129 * KV4_PER_TOKEN + 127 * FP16_PER_TOKEN) / SEQLEN
    assert abs(default.ppl / fp - 1) < 0.05
