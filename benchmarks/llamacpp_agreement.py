"""Our GGUF export run in real llama.cpp, against our model of it: logits of the same token ids from llama.cpp
(llama-cpp-python, CPU, its own venv: `bash scripts/install-llamacpp.sh`) and from our packed runtime
(`load_quantized`) with the KV cache as
- "runtime": the artifact's own per-token KV quantization with POQ (what our runtime computes), or none (f16 rows);
- "llamacpp": `evaluation.semantics.apply_semantics_` (what `wkvq eval --semantics llamacpp` computes): the
  llamacpp target's cache of that type, no POQ, no K smoothing (the export drops it; the V smoothing is folded into
  the weights of both), the 4-bit linears' inputs rounded to Q8_1 blocks as llama.cpp's CPU matmuls round them.

    python benchmarks/llamacpp_agreement.py            # prints a markdown table
    python benchmarks/llamacpp_agreement.py --write    # and appends it to benchmarks/RESULTS.md

The model: a random 2-layer LLaMA (hidden 128, 4 query / 2 KV heads of head_dim 64, intermediate 256,
initializer_range 0.1 for non-trivial logits) with the stories260k tokenizer, RTN-quantized (calibration epochs 0:
the V / K smoothing from calibration statistics, no training) to 4-bit weights in groups of 32; the first
`--tokens` token ids of the TinyStories eval text (BOS first).
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
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import wkvq_core
from wkvq_core.artifact import load_quantized
from wkvq_core.calib.data import load_text
from wkvq_core.config import CalibConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.export.gguf import GGUF_FILE
from wkvq_core.export.gguf import export as export_gguf
from wkvq_core.evaluation.semantics import LLAMACPP, apply_semantics_
from wkvq_core.model import quant_state
from wkvq_core.pipeline import QuantizeJob, run_quantize_job

from provenance import append_to_results

ASSETS = Path(wkvq_core.__file__).parent / "assets"
DRIVER = Path(__file__).resolve().parent / "engine_llamacpp.py"
INSTALL_SCRIPT = "scripts/install-llamacpp.sh"
ENGINE_VERSION = "0.3.36"


def engine_python(engine: str = f"llama-cpp-python-{ENGINE_VERSION}") -> Path:
    """An engine venv's python, where its install script puts it (scripts/install-llamacpp.sh by default); it may
    not exist."""
    cache = Path(os.environ.get("WKVQ_ENGINE_CACHE", Path.home() / ".cache" / "wkvq" / "engines"))
    return cache / engine / "venv" / "bin" / "python"


def engine_installed(engine: str = f"llama-cpp-python-{ENGINE_VERSION}") -> bool:
    return (engine_python(engine).parent.parent.parent / "complete").exists() and engine_python(engine).exists()


def rtn_config(group_size: int = 32) -> WKVQuantConfig:
    """RTN 4-bit weights in groups of `group_size` (calibration epochs 0: the V / K smoothing from calibration
    statistics, no training), the runtime target."""
    return WKVQuantConfig(weight=WeightQuantConfig(group_size=group_size),
                          calib=CalibConfig(nsamples=4, seqlen=64, epochs=0))


def build_artifact(root: Path, config: WKVQuantConfig | None = None, **job) -> Path:
    """The artifact (`config`, default `rtn_config()`) of a random GQA LLaMA with head_dim 64 and the stories260k
    tokenizer, calibrated on TinyStories (`job`: more `QuantizeJob` fields); returns its dir (root/artifact)."""
    base = root / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=512,
                                 rope_theta=10000.0, rms_norm_eps=1e-5, initializer_range=0.1)).save_pretrained(base)
    AutoTokenizer.from_pretrained(ASSETS / "stories260k").save_pretrained(base)
    run_quantize_job(QuantizeJob(model=str(base), calib=str(ASSETS / "tinystories" / "calib.txt"),
                                 out=root / "artifact", config=config or rtn_config(), device="cpu", **job))
    return root / "artifact"


def eval_ids(artifact: Path, tokens: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    text = load_text(str(ASSETS / "tinystories" / "eval.txt"))[: 4 * tokens]  # ~2 characters a token here
    ids = tokenizer(text)["input_ids"][:tokens]
    if len(ids) < tokens:
        raise ValueError(f"the eval text has {len(ids)} tokens, fewer than {tokens}")
    return ids


def engine_logits(gguf_path: Path, ids: list[int], kv_type: str, rotate: bool = True) -> np.ndarray:
    """llama.cpp's (tokens, vocab) logits of `ids`, K and V cache of `kv_type`, run by the engine's venv."""
    env = {**os.environ, "LLAMA_ATTN_ROT_DISABLE": "0" if rotate else "1"}
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, out = Path(tmp) / "ids.json", Path(tmp) / "logits.npy"
        ids_path.write_text(json.dumps(ids))
        run = subprocess.run([str(engine_python()), str(DRIVER), str(gguf_path), str(ids_path), str(out),
                              "--type-k", kv_type, "--type-v", kv_type], env=env, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"llama.cpp failed on {gguf_path} ({kv_type}):\n{run.stderr[-3000:]}")
        return np.load(out)


def our_logits(artifact: Path, ids: list[int], kv: str | None, rotate: bool = True,
               round_activations: bool = False) -> np.ndarray:
    """(tokens, vocab) logits of our packed runtime: kv None -> no KV quantization; "runtime" -> the artifact's own
    KV quantization (with POQ); a llama.cpp cache type -> `apply_semantics_` llamacpp (what `wkvq eval --semantics
    llamacpp` computes). round_activations (not with "runtime"): the inputs of the 4-bit linears rounded as
    llama.cpp's CPU matmuls round them (Q8_1); False leaves that out."""
    model = load_quantized(artifact)
    if kv is not None and kv != "runtime" or round_activations:
        if kv == "runtime":
            raise ValueError("the runtime's own KV quantization has no Q8_1 matmul rounding")
        config = WKVQuantConfig.from_dict(model.config.quantization_config["wkvquant_config"])
        apply_semantics_(model, config, LLAMACPP, kv or "f16", rotate, round_matmul_inputs=round_activations)
    with torch.no_grad(), quant_state(model, weights=True, kv=kv is not None):
        return model(torch.tensor([ids])).logits[0].float().numpy()


def token_nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """Per-token negative log-likelihood of ids[1:] under logits[:-1], in float64."""
    x = logits[:-1].astype(np.float64)
    log_z = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    return log_z - x[np.arange(len(ids) - 1), ids[1:]]


@dataclass
class Agreement:
    """llama.cpp's logits against ours: max |logit diff|, mean |per-token NLL diff|, perplexities, and, for a
    quantized cache, the part of llama.cpp's KV-quantization effect (its logits minus its f16-cache logits) that
    ours (our logits minus our unquantized-cache logits) misses, as a fraction of it (L2 norm over all logits)."""

    max_abs_logit: float
    mean_abs_nll: float
    ppl_engine: float
    ppl_ours: float
    kv_effect_missed: float | None

    @classmethod
    def of(cls, engine: np.ndarray, ours: np.ndarray, ids: list[int],
           baselines: tuple[np.ndarray, np.ndarray] | None = None) -> Agreement:
        nll_engine, nll_ours = token_nll(engine, ids), token_nll(ours, ids)
        missed = None
        if baselines is not None:
            engine_effect, our_effect = engine - baselines[0], ours - baselines[1]
            missed = float(np.linalg.norm(engine_effect - our_effect) / np.linalg.norm(engine_effect))
        return cls(float(np.abs(engine - ours).max()), float(np.abs(nll_engine - nll_ours).mean()),
                   math.exp(nll_engine.mean()), math.exp(nll_ours.mean()), missed)


CASES = (("q8_0", True), ("q4_1", True), ("q4_0", True), ("q8_0", False), ("q4_1", False), ("q4_0", False))


def measure(root: Path, tokens: int, cases=CASES) -> dict:
    """Against llama.cpp: with an f16 cache, our runtime without KV quantization and the llamacpp semantics (its
    Q8_1-rounded matmul inputs); per quantized cache type and rotation, the llamacpp semantics' prediction, the same
    with the other rotation, and the runtime's own KV quantization; and the noise floor: the prediction against
    itself without the Q8_1 rounding, i.e. how far that rounding alone moves the logits and the KV effect (a K / V
    value near a 4-bit rounding boundary flips code with it); the engine's own rounding is the same size but not the
    same (ggml's arithmetic differs in ways not emulated)."""
    artifact = build_artifact(root)
    export_gguf(artifact, root / "gguf")
    gguf_path = root / "gguf" / GGUF_FILE
    ids = eval_ids(artifact, tokens)
    unquantized, runtime_kv = our_logits(artifact, ids, None), our_logits(artifact, ids, "runtime")
    predicted_f16 = our_logits(artifact, ids, "f16", round_activations=True)
    engine_f16 = engine_logits(gguf_path, ids, "f16")
    result = dict(f16=dict(no_kv_quant=Agreement.of(engine_f16, unquantized, ids),
                           prediction=Agreement.of(engine_f16, predicted_f16, ids),
                           noise_floor=Agreement.of(predicted_f16, unquantized, ids)), rows=[])
    for kv_type, rotate in cases:
        engine = engine_logits(gguf_path, ids, kv_type, rotate)
        prediction = our_logits(artifact, ids, kv_type, rotate, round_activations=True)
        exact_matmuls = our_logits(artifact, ids, kv_type, rotate)
        other = our_logits(artifact, ids, kv_type, not rotate, round_activations=True)
        result["rows"].append(dict(
            kv_type=kv_type, rotate=rotate,
            prediction=Agreement.of(engine, prediction, ids, (engine_f16, predicted_f16)),
            other_rotation=Agreement.of(engine, other, ids, (engine_f16, predicted_f16)),
            runtime_kv4=Agreement.of(engine, runtime_kv, ids, (engine_f16, unquantized)),
            noise_floor=Agreement.of(prediction, exact_matmuls, ids, (predicted_f16, unquantized))))
    return result


def table(result: dict) -> str:
    f16, pred, floor = (result["f16"][key] for key in ("no_kv_quant", "prediction", "noise_floor"))
    lines = ["f16 cache: PPL llama.cpp {:.3f}, ours without KV quantization {:.3f} (max |Δlogit| {:.3f}, mean |ΔNLL| "
             "{:.4f}), the llamacpp semantics {:.3f} ({:.3f}, {:.4f}); noise floor, the Q8_1 rounding of the matmul "
             "inputs alone: {:.3f}, {:.4f}.".format(
                 f16.ppl_engine, f16.ppl_ours, f16.max_abs_logit, f16.mean_abs_nll, pred.ppl_ours, pred.max_abs_logit,
                 pred.mean_abs_nll, floor.max_abs_logit, floor.mean_abs_nll), "",
             "| cache (-ctk = -ctv) | rotation | PPL llama.cpp | PPL prediction | PPL runtime KV4 | "
             "mean \\|ΔNLL\\| prediction / runtime KV4 | max \\|Δlogit\\| prediction / runtime KV4 | "
             "KV effect missed: prediction / other rotation / runtime KV4 | noise floor: mean \\|ΔNLL\\|, "
             "max \\|Δlogit\\|, KV effect missed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p, o, n, f = r["prediction"], r["other_rotation"], r["runtime_kv4"], r["noise_floor"]
        rotation = "on" if r["rotate"] else "off (LLAMA_ATTN_ROT_DISABLE=1)"
        lines.append(f"| {r['kv_type']} | {rotation} | {p.ppl_engine:.3f} | {p.ppl_ours:.3f} | {n.ppl_ours:.3f} | "
                     f"{p.mean_abs_nll:.4f} / {n.mean_abs_nll:.4f} | {p.max_abs_logit:.3f} / {n.max_abs_logit:.3f} | "
                     f"{p.kv_effect_missed:.0%} / {o.kv_effect_missed:.0%} / {n.kv_effect_missed:.0%} | "
                     f"{f.mean_abs_nll:.4f}, {f.max_abs_logit:.3f}, {f.kv_effect_missed:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if not engine_installed():
        sys.exit(f"no llama.cpp engine at {engine_python()}: run `bash {INSTALL_SCRIPT}` first")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.tokens)
    versions = subprocess.run([str(engine_python()), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                              capture_output=True, text=True).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"## llama.cpp agreement {now}\n\n`python benchmarks/llamacpp_agreement.py --tokens {args.tokens}`; "
            f"llama-cpp-python {versions} (llama.cpp 0c1e57098, CPU, 1 thread, flash attention), torch "
            f"{torch.__version__}.\n\n{table(result)}\n")
    print(text)
    if args.write:
        append_to_results(text)


if __name__ == "__main__":
    main()
