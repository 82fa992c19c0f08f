"""`run_quantize_job`'s round-to-nearest baselines: measured at the job's own bits on uncalibrated copies of its blocks."""

import json

import pytest

from wkvq_core.calib.data import eval_windows, load_text, tokenize
from wkvq_core.config import CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.evaluation.perplexity import EvalMode, perplexity
from wkvq_core.model import load_model, prepare_model_
from wkvq_core.pipeline import QuantizeJob, rtn_modes, run_quantize_job

from conftest import CALIB_TEXT, EVAL_TEXT, TINY_MODEL

SEQLEN = 64
EVAL_HEAD_CHARS = 3_000  # ~1.5k tokens: 23 windows of 64


@pytest.fixture(scope="module")
def eval_head(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval-head.txt"
    path.write_text(EVAL_TEXT.read_text(encoding="utf-8")[:EVAL_HEAD_CHARS], encoding="utf-8")
    return path


@pytest.fixture
def windows(tokenizer, eval_head):
    return eval_windows(tokenize(tokenizer, load_text(str(eval_head))), SEQLEN)


def test_job_baselines_equal_an_independent_rtn_run(tmp_path, eval_head, windows):
    config = WKVQuantConfig(weight=WeightQuantConfig(bits=4, group_size=-1), kv=KVQuantConfig(bits=4),
                            calib=CalibConfig(nsamples=4, seqlen=SEQLEN, epochs=1, crr_k=2))
    job = QuantizeJob(model=str(TINY_MODEL), calib=str(CALIB_TEXT), out=tmp_path / "out", config=config,
                      eval=str(eval_head), device="cpu")
    evaluation = run_quantize_job(job)["eval"]

    rtn_model, _ = load_model(TINY_MODEL)
    prepare_model_(rtn_model, WKVQuantConfig(weight=WeightQuantConfig(bits=4, group_size=-1, lwc=False),
                                             kv=KVQuantConfig(bits=4, smoothing=False)))
    expected = {mode.value: perplexity(rtn_model, windows, mode).ppl for mode in (EvalMode.W, EvalMode.WKV)}
    assert evaluation["baselines"] == {"rtn": expected}
    assert evaluation["ppl"]["wkv"] < expected["wkv"]  # smoothing and clipping bought something
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["eval"]["baselines"] == {"rtn": expected}


@pytest.mark.parametrize("w_bits, kv_bits, act_bits, modes", [
    (4, 16, 16, ["w"]), (16, 4, 16, ["wkv"]), (16, 16, 8, ["w"]), (16, 16, 16, []),
])
def test_baselines_only_for_the_quantized_parts(tmp_path, eval_head, w_bits, kv_bits, act_bits, modes):
    config = WKVQuantConfig(weight=WeightQuantConfig(bits=w_bits, group_size=-1), kv=KVQuantConfig(bits=kv_bits),
                            calib=CalibConfig(nsamples=2, seqlen=SEQLEN, epochs=0), act_bits=act_bits)
    job = QuantizeJob(model=str(TINY_MODEL), calib=str(CALIB_TEXT), out=tmp_path / "out", config=config,
                      eval=str(eval_head), device="cpu")
    assert [mode.value for mode in rtn_modes(config)] == modes
    assert list(run_quantize_job(job)["eval"]["baselines"]["rtn"]) == modes
