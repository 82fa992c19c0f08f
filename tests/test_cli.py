"""The `wkvq` command line: a real quantize -> eval round trip, and bad input.

Bad input must end with exit code 2, one `error: ...` line on stderr naming the problem, no traceback, and (for
`quantize`) nothing written next to --out. Most cases run in-process through Typer's CliRunner; a few run
`python -m wkvq_core.cli` in a subprocess to see exactly what a user sees.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import wkvq_core
from wkvq_core.artifact import verify_manifest
from wkvq_core.cli import app
from wkvq_core.config import RECOMMENDED_CALIB

ASSETS = Path(wkvq_core.__file__).parent / "assets"
TINY_MODEL = ASSETS / "stories260k"  # LLaMA, 5 layers, hidden 64, intermediate 172: group 128 does not divide
CALIB_TEXT = ASSETS / "tinystories" / "calib.txt"
EVAL_TEXT = ASSETS / "tinystories" / "eval.txt"
N_BLOCKS = 5
SEQLEN = 64
EVAL_HEAD_CHARS = 6_000  # a prefix of eval.txt (~3k tokens) keeps each eval pass well under a second

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, *needles: str) -> str:
    """Exit code 2, one non-empty stderr line `error: ...` containing every needle, no traceback; returns it."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    # an uncaught exception would be stored here instead of the SystemExit raised by typer.Exit
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout.strip() == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# ----------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def eval_head(tmp_path_factory) -> Path:
    text = EVAL_TEXT.read_text(encoding="utf-8")
    cut = text.index("\n", EVAL_HEAD_CHARS)
    path = tmp_path_factory.mktemp("eval") / "eval-head.txt"
    path.write_text(text[:cut], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, eval_head):
    """One real `wkvq quantize` run (tiny settings) with a checkpoint directory."""
    root = tmp_path_factory.mktemp("quantized")
    out, ckpt = root / "out", root / "ckpt"
    result = invoke(
        "quantize", "--model", TINY_MODEL, "--calib", CALIB_TEXT, "--out", out, "--group-size", "-1",
        "--nsamples", "4", "--seqlen", SEQLEN, "--epochs", "1", "--eval", eval_head, "--json",
        "--checkpoint-dir", ckpt, "--device", "cpu",
    )
    assert result.exit_code == 0, (result.output, result.exception)
    return {"root": root, "out": out, "ckpt": ckpt, "stdout": result.stdout}


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    """Bad inputs on disk, by name."""
    root = tmp_path_factory.mktemp("bad")
    paths = {}

    gpt2 = paths["gpt2"] = root / "gpt2-model"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))

    paths["no_config"] = root / "no-config"
    paths["no_config"].mkdir()
    (paths["no_config"] / "model.safetensors").write_bytes(b"")

    not_object = paths["config_not_object"] = root / "config-not-object"
    not_object.mkdir()
    (not_object / "config.json").write_text("[]")

    not_utf8 = paths["config_not_utf8"] = root / "config-not-utf8"
    not_utf8.mkdir()
    (not_utf8 / "config.json").write_bytes(b'{"architectures": ["\xff"]}')

    # a LLaMA directory whose weights file is cut short
    truncated = paths["truncated_weights"] = root / "truncated-weights"
    shutil.copytree(TINY_MODEL, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])

    paths["missing_dir"] = root / "does-not-exist"
    paths["missing_txt"] = root / "does-not-exist.txt"

    paths["short_txt"] = root / "short.txt"
    paths["short_txt"].write_text("Once upon a time there was a cat.\n", encoding="utf-8")

    paths["latin1_txt"] = root / "latin1.txt"
    paths["latin1_txt"].write_bytes("Once upon a time, a caf\u00e9 \u00e0 Paris.\n".encode("latin-1") * 50)

    paths["no_txt_dir"] = root / "no-txt-dir"
    paths["no_txt_dir"].mkdir()
    (paths["no_txt_dir"] / "notes.md").write_text("not a .txt file")

    # a directory of texts whose entry x.txt is itself a directory: cannot be read as a file
    unreadable = paths["unreadable_entry_dir"] = root / "unreadable-entry"
    (unreadable / "x.txt").mkdir(parents=True)

    paths["a_file"] = root / "a-file"
    paths["a_file"].write_text("I am a file, not a directory")
    return paths


@pytest.fixture
def runs(tmp_path) -> Path:
    """An empty directory to put --out in; a failed quantize must leave it empty."""
    path = tmp_path / "runs"
    path.mkdir()
    return path


# ---------------------------------------------------------------------------------------------- quantize -> eval


def test_quantize_writes_artifact_and_prints_metrics(quantized):
    out = quantized["out"]
    assert out.is_dir()
    for name in ("manifest.json", "metrics.json", "config.json", "generation_config.json", "model.safetensors",
                 "tokenizer.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in quantized["root"].iterdir()) == ["ckpt", "out"]  # no .out.tmp-* left over
    verify_manifest(out)

    printed = json.loads(quantized["stdout"])  # --json: stdout is exactly one JSON document
    run = printed.pop("run")
    assert printed == json.loads((out / "metrics.json").read_text())  # metrics.json: only what a rerun reproduces
    ppl = printed["eval"]["ppl"]
    assert set(ppl) == {"fp", "w", "wkv"}
    assert all(math.isfinite(v) and v > 1 for v in ppl.values()), ppl
    assert set(printed["eval"]["baselines"]["rtn"]) == {"w", "wkv"}  # values: tests/test_pipeline.py
    assert printed["eval"]["tokens"] > 0
    assert run["resumed_blocks"] == 0 and run["seconds"] > 0
    assert len(printed["calibration"]["block_losses"]) == N_BLOCKS

    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "wkvquant" and quant["format_version"] == 2
    assert quant["w_bits"] == 4 and quant["kv_bits"] == 4 and quant["group_size"] == -1 and quant["poq"] is True
    calib = quant["wkvquant_config"]["calib"]
    assert calib["nsamples"] == 4 and calib["seqlen"] == SEQLEN


def test_checkpoint_dir_has_one_file_per_block(quantized):
    names = sorted(p.name for p in quantized["ckpt"].iterdir())
    assert names == [f"block-{i:04d}.safetensors" for i in range(N_BLOCKS)]


def test_eval_of_artifact_reproduces_the_quantize_metrics(quantized, eval_head):
    result = invoke("eval", "--model", quantized["out"], "--data", eval_head, "--seqlen", SEQLEN, "--json",
                    "--device", "cpu")
    assert result.exit_code == 0, (result.output, result.exception)
    got = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    assert isinstance(got, dict)
    assert set(got["ppl"]) == {"w", "wkv"}  # the artifact has no full-precision weights
    assert got["seqlen"] == SEQLEN

    expected = json.loads((quantized["out"] / "metrics.json").read_text())["eval"]
    assert got["tokens"] == expected["tokens"] > 0
    assert got["kv_bytes_per_token"] == expected["kv_bytes_per_token"]
    config = json.loads((TINY_MODEL / "config.json").read_text())
    layers_heads = 2 * config["num_hidden_layers"] * config["num_key_value_heads"]
    head_dim = config["head_dim"]
    assert got["kv_bytes_per_token"] == layers_heads * (head_dim * 4 / 8 + 4)  # 4-bit codes + fp16 scale, min
    assert got["kv_bytes_per_token_fp16"] == layers_heads * head_dim * 2
    for mode in ("w", "wkv"):  # packed weights are exact; embeddings, norms and folded biases are stored in fp16
        assert got["ppl"][mode] == pytest.approx(expected["ppl"][mode], rel=5e-3), mode


def test_eval_plain_model_fp_only(quantized, eval_head):
    # bit options do not apply when nothing is quantized: the default group size 128 is not checked
    result = invoke("eval", "--model", TINY_MODEL, "--data", eval_head, "--seqlen", SEQLEN, "--mode", "fp", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    got = json.loads(result.stdout)
    assert list(got["ppl"]) == ["fp"]
    expected = json.loads((quantized["out"] / "metrics.json").read_text())["eval"]
    assert got["tokens"] == expected["tokens"]
    assert got["ppl"]["fp"] == pytest.approx(expected["ppl"]["fp"], rel=1e-9)


def test_quantize_human_output(tmp_path, eval_head):
    out = tmp_path / "odd [/name]:train:"  # rich markup / emoji syntax in a path must be printed verbatim
    result = invoke("quantize", "--model", TINY_MODEL, "--calib", CALIB_TEXT, "--out", out, "--group-size", "-1",
                    "--nsamples", "1", "--seqlen", SEQLEN, "--epochs", "0", "--eval", eval_head, "--device", "cpu")
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"wrote {out} in" in result.stdout
    assert "wkv" in result.stdout and "bytes/token" in result.stdout
    assert "RTN ppl" in result.stdout and "Δ vs RTN" in result.stdout
    evaluation = json.loads((out / "metrics.json").read_text())["eval"]
    rtn, ppl = evaluation["baselines"]["rtn"]["wkv"], evaluation["ppl"]["wkv"]
    [row] = [line for line in result.stdout.splitlines() if line.startswith("│ wkv ")]
    assert [cell.strip() for cell in row.split("│")[2:-1]] == [f"{ppl:.4f}", f"{rtn:.4f}", f"{ppl - rtn:+.4f}"]
    assert (out / "manifest.json").is_file()


def test_eval_table_output(quantized, eval_head):
    result = invoke("eval", "--model", quantized["out"], "--data", eval_head, "--seqlen", SEQLEN, "--mode", "wkv")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "wkv" in result.stdout and "bytes/token" in result.stdout
    assert "RTN" not in result.stdout  # baselines come with a quantize run only


# ------------------------------------------------------------------------------------------------------ bad input

# (id, option overrides, needles in the error line); "{name}" is replaced by the path bad[name]
MODEL_CASES = [
    ("model-missing", {"--model": "{missing_dir}"}, ["{missing_dir}", "no such model directory"]),
    ("model-not-llama", {"--model": "{gpt2}"}, ["{gpt2}", "GPT2LMHeadModel", "not supported", "LlamaForCausalLM"]),
    ("model-no-config", {"--model": "{no_config}"}, ["{no_config}", "no config.json"]),
    ("model-is-a-file", {"--model": "{short_txt}"}, ["{short_txt}", "no config.json"]),
    ("model-config-not-object", {"--model": "{config_not_object}"}, ["{config_not_object}", "JSON object"]),
    ("model-config-not-utf8", {"--model": "{config_not_utf8}"}, ["config.json", "not UTF-8"]),
    ("model-truncated-weights", {"--model": "{truncated_weights}"}, ["{truncated_weights}", "cannot load model files"]),
    ("model-hub-id-offline", {"--model": "someorg/some-model"}, ["someorg/some-model", "Hugging Face hub"]),
    ("w-bits-1", {"--w-bits": "1"}, ["w_bits", "between 2 and 8", "got 1"]),
    ("w-bits-9", {"--w-bits": "9"}, ["w_bits", "between 2 and 8", "got 9"]),
    ("kv-bits-17", {"--kv-bits": "17"}, ["kv_bits", "between 2 and 8", "got 17"]),
    ("group-size-128", {"--group-size": "128"}, ["group_size 128", "does not divide"]),
    ("group-size-0", {"--group-size": "0"}, ["group_size", "got 0"]),
    ("device-bogus", {"--device": "bogus"}, ["--device", "bogus"]),
]

QUANTIZE_CASES = MODEL_CASES + [
    ("calib-shorter-than-one-sample", {"--calib": "{short_txt}", "--seqlen": "256"},
     ["calibration text has", "seqlen=256"]),
    ("calib-not-utf8", {"--calib": "{latin1_txt}"}, ["{latin1_txt}", "not UTF-8"]),
    ("calib-missing", {"--calib": "{missing_txt}"}, ["{missing_txt}", "no such file or directory"]),
    ("calib-dir-without-txt", {"--calib": "{no_txt_dir}"}, ["{no_txt_dir}", "no .txt files"]),
    ("calib-unreadable-entry", {"--calib": "{unreadable_entry_dir}"}, ["x.txt", "cannot read"]),
    ("eval-shorter-than-one-sample", {"--eval": "{short_txt}"}, ["evaluation text has", f"seqlen={SEQLEN}"]),
    ("eval-missing", {"--eval": "{missing_txt}"}, ["{missing_txt}", "no such file or directory"]),
    ("seqlen-0", {"--seqlen": "0"}, ["seqlen", "got 0"]),
    ("seqlen-beyond-context", {"--seqlen": "1024"}, ["seqlen 1024 exceeds the model's max_position_embeddings 512"]),
    ("nsamples-0", {"--nsamples": "0"}, ["nsamples", "got 0"]),
    ("checkpoint-dir-is-a-file", {"--checkpoint-dir": "{a_file}"}, ["--checkpoint-dir", "not a directory"]),
    ("fp-dtype-int8", {"--fp-dtype": "int8"}, ["fp_dtype", "float16, bfloat16, float32", "int8"]),
]

EVAL_CASES = MODEL_CASES + [
    ("data-shorter-than-one-window", {"--data": "{short_txt}", "--seqlen": "256"},
     ["evaluation text has", "seqlen=256"]),
    ("data-not-utf8", {"--data": "{latin1_txt}"}, ["{latin1_txt}", "not UTF-8"]),
    ("data-missing", {"--data": "{missing_txt}"}, ["{missing_txt}", "no such file or directory"]),
    ("data-dir-without-txt", {"--data": "{no_txt_dir}"}, ["{no_txt_dir}", "no .txt files"]),
    ("data-unreadable-entry", {"--data": "{unreadable_entry_dir}"}, ["x.txt", "cannot read"]),
    ("mode-bogus", {"--mode": "bogus"}, ["--mode", "fp, w, wkv or all", "bogus"]),
    ("seqlen-0", {"--seqlen": "0"}, ["seqlen", "got 0"]),
    ("seqlen-1", {"--seqlen": "1"}, ["seqlen", "at least 2", "got 1"]),
    ("seqlen-beyond-context", {"--seqlen": "513"}, ["seqlen 513 exceeds the model's max_position_embeddings 512"]),
    ("semantics-bogus", {"--semantics": "tensorrt"}, ["--semantics must be one of runtime, llamacpp, vllm",
                                                      "'tensorrt'"]),
    ("kv-type-with-runtime-semantics", {"--kv-type": "q4_0"}, ["engine's semantics (llamacpp, vllm) only"]),
    ("vllm-head-dim", {"--semantics": "vllm"}, ["needs head_dim >= 32; this model has 8"]),
    ("no-rotation-with-runtime-semantics", {"--no-rotation": None}, ["llamacpp semantics only"]),
    ("kv-type-bogus", {"--semantics": "llamacpp", "--kv-type": "q5_0"},
     ["KV cache type must be one of f16, q4_0, q4_1, q8_0", "'q5_0'"]),
    ("llamacpp-weight-groups-not-32-blocks", {"--semantics": "llamacpp"},
     ["down_proj", "groups of 172 input channels", "Q4_1's 32-weight blocks"]),
    ("llamacpp-kv-bits-without-cache-type", {"--semantics": "llamacpp", "--kv-bits": "3"},
     ["llamacpp target stores the KV cache as q4_0 or q4_1 (kv_bits 4)", "got kv_bits 3"]),
]


def _fill(template: str, bad: dict[str, Path]) -> str:
    return template.format(**{k: str(v) for k, v in bad.items()})


def _options(defaults: dict[str, str], overrides: dict[str, str], bad: dict[str, Path]) -> list[str]:
    args = []
    for key, value in (defaults | overrides).items():
        args += [key] if value is None else [key, _fill(str(value), bad)]  # None: a flag
    return args


def _quantize_defaults(runs: Path) -> dict[str, str]:
    return {"--model": str(TINY_MODEL), "--calib": str(CALIB_TEXT), "--out": str(runs / "q"), "--group-size": "-1",
            "--nsamples": "2", "--seqlen": str(SEQLEN), "--epochs": "1", "--device": "cpu"}


def _eval_defaults(data: Path) -> dict[str, str]:
    return {"--model": str(TINY_MODEL), "--data": str(data), "--seqlen": str(SEQLEN), "--group-size": "-1",
            "--device": "cpu"}


@pytest.mark.parametrize("overrides, needles", [c[1:] for c in QUANTIZE_CASES], ids=[c[0] for c in QUANTIZE_CASES])
def test_quantize_bad_input(bad, runs, overrides, needles):
    result = invoke("quantize", *_options(_quantize_defaults(runs), overrides, bad))
    assert_clean_failure(result, *(_fill(n, bad) for n in needles))
    assert list(runs.iterdir()) == []  # neither --out nor a .q.tmp-* sibling


@pytest.mark.parametrize("overrides, needles", [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES])
def test_eval_bad_input(bad, eval_head, overrides, needles):
    result = invoke("eval", *_options(_eval_defaults(eval_head), overrides, bad))
    assert_clean_failure(result, *(_fill(n, bad) for n in needles))


def test_quantize_bad_input_with_json_is_still_one_error_line(bad, runs):
    result = invoke("quantize", *_options(_quantize_defaults(runs), {"--model": "{gpt2}"}, bad), "--json")
    assert_clean_failure(result, str(bad["gpt2"]), "GPT2LMHeadModel")
    assert list(runs.iterdir()) == []


@pytest.mark.parametrize("where", ["out-is-a-file", "out-under-a-file"])
def test_quantize_out_not_a_directory(runs, where):
    blocker = runs / "blocker"
    blocker.write_text("keep me")
    out = blocker if where == "out-is-a-file" else blocker / "q"
    result = invoke("quantize", *_options(_quantize_defaults(runs), {"--out": str(out)}, {}))
    assert_clean_failure(result, "--out", str(out), "not a directory")
    assert [p.name for p in runs.iterdir()] == ["blocker"]
    assert blocker.read_text() == "keep me"


def test_quantize_unreadable_calibration_file(runs, tmp_path, monkeypatch):
    """A file that exists but cannot be read (EACCES). Tests may run as root, where chmod 000 does not stop reads,
    so the read itself is made to fail."""
    calib = tmp_path / "secret.txt"
    calib.write_text(CALIB_TEXT.read_text())
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == calib:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    result = invoke("quantize", *_options(_quantize_defaults(runs), {"--calib": str(calib)}, {}))
    assert_clean_failure(result, str(calib), "cannot read", "Permission denied")
    assert list(runs.iterdir()) == []


@pytest.mark.parametrize("name", ["wkvq-data", "wkvq-data/store"])
def test_quantize_hf_spec_never_reads_a_local_directory(tmp_path, monkeypatch, name):
    """`hf:NAME` is a hub dataset, also where the working directory holds a directory NAME (the service's data
    directory, every team's uploads, in a worker's): the run stops at the hub instead of reading it."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wkvq-data" / "store").mkdir(parents=True)
    (tmp_path / "wkvq-data" / "store" / "train.txt").write_text(CALIB_TEXT.read_text())
    spec = f"hf:{name}:train"
    result = invoke("quantize", "--model", TINY_MODEL, "--calib", spec, "--out", tmp_path / "out", "--group-size", -1,
                    "--seqlen", SEQLEN, "--eval", spec, "--dry-run")
    assert_clean_failure(result, spec, "Hugging Face hub")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_eval_chmod_000_data_file(tmp_path, eval_head):
    data = tmp_path / "locked.txt"
    data.write_text(eval_head.read_text())
    data.chmod(0)
    try:
        result = invoke("eval", *_options(_eval_defaults(data), {}, {}))
    finally:
        data.chmod(0o644)
    assert_clean_failure(result, str(data), "cannot read")


def test_eval_artifact_seqlen_beyond_context(quantized, eval_head):
    result = invoke("eval", "--model", quantized["out"], "--data", eval_head, "--seqlen", "600", "--device", "cpu")
    assert_clean_failure(result, "seqlen 600 exceeds the model's max_position_embeddings 512")


def test_seqlen_beyond_context_is_the_api_message(bad, runs):
    """`wkvq quantize` and POST /v1/jobs refuse a too-long seqlen with the same words."""
    from api.core.errors import InvalidField
    from api.jobs.model_source import check_dims
    from api.jobs.schemas import QuantConfig

    spec = QuantConfig(group_size=-1, seqlen=1024)
    with pytest.raises(InvalidField) as refused:
        check_dims(json.loads((TINY_MODEL / "config.json").read_text()), spec)
    result = invoke("quantize", *_options(_quantize_defaults(runs), {"--seqlen": "1024"}, bad))
    assert assert_clean_failure(result) == f"error: {refused.value.message}"
    assert refused.value.loc == ["body", "config", "seqlen"]


def test_default_seqlen_is_the_context_of_a_shorter_model(tmp_path, eval_head):
    """Without --seqlen, a model with a context under 2048 (the shipped one: 512) uses its whole context; without
    --crr-k, the method's window (given, it is kept)."""
    crr_k = {}
    for method, extra in (("recommended", ()), ("paper", ()), ("recommended", ("--crr-k", "4"))):
        out = tmp_path / f"q-{method}-{len(extra)}"
        result = invoke("quantize", "--model", TINY_MODEL, "--calib", CALIB_TEXT, "--out", out, "--group-size", "-1",
                        "--nsamples", "1", "--epochs", "0", "--device", "cpu", "--json", "--method", method, *extra)
        assert result.exit_code == 0, (result.output, result.exception)
        calib = json.loads((out / "config.json").read_text())["quantization_config"]["wkvquant_config"]["calib"]
        assert calib["seqlen"] == 512
        crr_k[method, extra] = calib["crr_k"]
    assert crr_k == {("recommended", ()): RECOMMENDED_CALIB["crr_k"], ("paper", ()): 5,
                     ("recommended", ("--crr-k", "4")): 4}
    result = invoke("eval", "--model", TINY_MODEL, "--data", eval_head, "--mode", "fp", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout)["seqlen"] == 512


def test_generate_on_a_plain_model_directory(bad):
    result = invoke("generate", "--model", TINY_MODEL, "--prompt", "hi", "--device", "cpu")
    assert_clean_failure(result, str(TINY_MODEL), "not a WKVQuant artifact", "wkvq quantize")
    result = invoke("generate", "--model", bad["missing_dir"], "--prompt", "hi", "--device", "cpu")
    assert_clean_failure(result, str(bad["missing_dir"]), "no such directory")


def test_eval_corrupt_artifact(quantized, eval_head, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(quantized["out"], broken)
    state = broken / "model.safetensors"
    state.write_bytes(state.read_bytes()[:-16])
    result = invoke("eval", "--model", broken, "--data", eval_head, "--seqlen", SEQLEN)
    assert_clean_failure(result, str(state), "does not match the manifest")


def test_error_message_with_markup_characters_is_printed_verbatim(tmp_path, eval_head):
    # rich would read "[/x]" as a closing tag (MarkupError) and ":train:" as an emoji code
    model = tmp_path / "a[/x]:train:b"
    result = invoke("eval", *_options(_eval_defaults(eval_head), {"--model": str(model)}, {}))
    assert_clean_failure(result, str(model), "no such model directory")


# ----------------------------------------------------------------------------------------------- as a subprocess


def _run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(wkvq_core.__file__).parent.parent),
                                                    os.environ.get("PYTHONPATH")])),
        "COLUMNS": "80",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run([sys.executable, "-m", "wkvq_core.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_subprocess_generate_prints_text_without_special_tokens_or_warnings(quantized, tmp_path):
    prompt = "Once upon a time"
    proc = _run_module("generate", "--model", quantized["out"], "--prompt", prompt, "--max-new-tokens", "12",
                       "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "<s>" not in proc.stdout and "</s>" not in proc.stdout
    assert proc.stdout.startswith(prompt) and len(proc.stdout.strip()) > len(prompt), proc.stdout
    assert proc.stderr.strip() == "", proc.stderr  # no FutureWarning (cache keyword) or any other warning


def test_python_dash_m_help(tmp_path):
    proc = _run_module("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "quantize" in proc.stdout and "eval" in proc.stdout


def test_subprocess_hub_id_offline_fails_cleanly(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    proc = _run_module("quantize", "--model", "someorg/some-model", "--calib", CALIB_TEXT, "--out", runs / "q",
                       "--group-size", "-1", "--nsamples", "2", "--seqlen", SEQLEN, "--epochs", "1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: someorg/some-model:") and "Hugging Face hub" in lines[0]
    assert list(runs.iterdir()) == []



def test_subprocess_without_a_terminal_prints_progress_and_stops_evaluation_at_the_bound(tmp_path):
    """Issue 24 finding 12: without a terminal `quantize` printed nothing until it ended, and nothing bounded the
    evaluation text. Now each block and each 1 % of the evaluation is a line on stderr, and --eval-tokens stops the
    evaluation (saying so)."""
    eval_tokens = 4 * SEQLEN + 10  # 4 windows; eval.txt holds ~12k tokens
    proc = _run_module("quantize", "--model", TINY_MODEL, "--calib", CALIB_TEXT, "--eval", EVAL_TEXT,
                       "--eval-tokens", eval_tokens, "--out", tmp_path / "q", "--group-size", "-1", "--nsamples", "2",
                       "--seqlen", SEQLEN, "--epochs", "1", "--device", "cpu", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    for block in range(1, N_BLOCKS + 1):
        assert any(f"block {block}/{N_BLOCKS} done" in line and "left" in line for line in lines), proc.stderr
    passes = 5 * 4 * (N_BLOCKS + 1)  # streams fp, w, wkv, rtn w, rtn wkv x windows x (blocks + head)
    assert any(f"evaluation {passes}/{passes} window passes" in line for line in lines), proc.stderr
    assert f"evaluation stopped at --eval-tokens {eval_tokens}: the text holds more" in proc.stderr
    metrics = json.loads(proc.stdout)["eval"]
    assert metrics["tokens"] == 4 * (SEQLEN - 1) and metrics["truncated_at_tokens"] == eval_tokens

    proc = _run_module("eval", "--model", TINY_MODEL, "--data", EVAL_TEXT, "--seqlen", SEQLEN, "--mode", "fp",
                       "--eval-tokens", 2 * SEQLEN, "--device", "cpu", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"evaluation {2 * (N_BLOCKS + 1)}/{2 * (N_BLOCKS + 1)} window passes" in proc.stderr
    result = json.loads(proc.stdout)
    assert result["tokens"] == 2 * (SEQLEN - 1) and result["truncated_at_tokens"] == 2 * SEQLEN
