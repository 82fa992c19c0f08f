"""W4 / KV4 measured in the real llama.cpp (issue 26): perplexity of SmolLM2-135M on held-out WikiText-2, computed
from llama.cpp's own logits (llama-cpp-python 0.3.36 on CPU, its own venv: `bash scripts/install-llamacpp.sh`), for

  a) the original weights as an F16 GGUF (our export of the unquantized model) with an f16 / q8_0 / q4_0 / q4_1 KV
     cache (llama.cpp's Hadamard rotation of a quantized cache on), and q4_0 with the rotation off;
  b) llama.cpp's own 4-bit recipes from that F16 GGUF (`llama_model_quantize`, what llama-quantize runs: Q4_0, Q4_1,
     Q4_K_M), without and with an importance matrix (see `IMATRIX`), with an f16 and a q4_0 cache;
  c) our `llamacpp`-target artifacts (calibrated, one per seed, and RTN), exported with the GGUF exporter, with each
     cache type, beside our prediction: the library's perplexity of the calibrated model under the llamacpp target
     on the same windows (the job's `metrics["eval"]["ppl"]["wkv"]`; with the f16 cache: weights only).

    python benchmarks/engines.py                         # all parts; prints the tables
    python benchmarks/engines.py --parts a,b --write     # and appends them to benchmarks/RESULTS.md

Perplexity: every row scores the same non-overlapping windows of the first tokens of `wiki.test.raw` (each window
from an empty cache, tokens 1..n-1 scored from the logits of the previous position, as `wkvq eval` does), not
llama-perplexity's second-half-of-the-context protocol. Calibration text: `wiki.valid.tokens` (as
benchmarks/quality.py).
Engine runs and calibrations are cached in --work (keyed by the GGUF's sha256, the cache type and the windows), so an
interrupted run resumes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import datetime
import fcntl
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers

from wkvq_core.artifact import save_artifact
from wkvq_core.calib.data import calibration_samples, eval_windows, load_text, tokenize
from wkvq_core.config import (FP_BITS, METHODS, EvalMode, KVQuantConfig, WeightQuantConfig, WKVQuantConfig,
                              calib_config)
from wkvq_core.evaluation.perplexity import layerwise_perplexities
from wkvq_core.export.gguf import GGUF_FILE
from wkvq_core.export.gguf import export as export_gguf
from wkvq_core.model import attentions, load_model, prepare_model_
from wkvq_core.model_zoo import fetch_model
from wkvq_core.pipeline import quantize_model_
from wkvq_core.targets import check_config, get_target, kv_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_agreement import ENGINE_VERSION, INSTALL_SCRIPT, engine_installed, engine_python
from provenance import ROOT, code_version, section

TOOLS = Path(__file__).resolve().parent / "engine_llamacpp_tools.py"
WIKITEXT2 = Path(__file__).resolve().parent / "data" / "wikitext2"
CALIB_TEXT, EVAL_TEXT = WIKITEXT2 / "wiki.valid.tokens", WIKITEXT2 / "wiki.test.raw"
MODEL = "smollm2-135m"
CACHE_TYPES = ("f16", "q8_0", "q4_0", "q4_1")
RECIPES = ("Q4_0", "Q4_1", "Q4_K_M")
LINEAR = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight")
IMATRIX = ("llama-cpp-python ships no llama-imatrix (nor llama-quantize) tool, but `llama_model_quantize` takes an "
           "importance matrix as an array of (tensor name, values): the imatrix rows compute what llama-imatrix "
           "accumulates -- per blk.* linear, the mean over tokens of each input column's squared activation -- with "
           "our FP32 model (torch) on calibration windows of `wiki.valid.tokens` (seed 0), and hand it to the "
           "engine's quantize")


# --- llama.cpp (its own venv, by subprocess) -------------------------------------------------------------------

def engine(*args: str, env: dict | None = None) -> None:
    run = subprocess.run([str(engine_python()), str(TOOLS), *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if run.returncode:
        raise RuntimeError(f"llama.cpp {' '.join(args[:2])} failed:\n{run.stderr[-3000:]}")


def engine_ppl(gguf_path: Path, windows: torch.Tensor, cache: str, rotate: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        ids, out = Path(tmp) / "windows.json", Path(tmp) / "nll.npy"
        ids.write_text(json.dumps(windows.tolist()))
        engine("nll", str(gguf_path), str(ids), str(out), "--type-k", cache, "--type-v", cache,
               env={"LLAMA_ATTN_ROT_DISABLE": "0" if rotate else "1"})
        return float(np.exp(np.load(out).mean()))


def engine_version() -> str:
    return subprocess.run([str(engine_python()), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          capture_output=True, text=True).stdout.strip()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Size:
    """Bits per weight of a GGUF, from its tensors' byte sizes: the 7 linears of each block, and the whole file's
    tensors (embeddings and norms too); the linears' and the embedding's tensor types."""

    linears: float
    file: float
    types: str

    @classmethod
    def of(cls, path: Path) -> Size:
        tensors = gguf.GGUFReader(path).tensors
        lin = [t for t in tensors if LINEAR.fullmatch(t.name)]
        kinds = sorted({t.tensor_type.name for t in lin})
        embd = next(t.tensor_type.name for t in tensors if t.name == "token_embd.weight")
        return cls(8 * sum(int(t.n_bytes) for t in lin) / sum(int(t.n_elements) for t in lin),
                   8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors),
                   f"{'+'.join(kinds)}, embd {embd}")


def kv_bytes_per_token(config, cache: str) -> float:
    """llama.cpp's K and V cache bytes per token over all layers for cache type `cache` (both K and V)."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[cache.upper()]]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * size / block


class Measurements:
    """Engine perplexities cached in a json file, keyed by the GGUF's sha256, the cache type, the rotation and the
    eval windows' digest; engine runs go to a thread pool (each is its own 1-thread process)."""

    def __init__(self, path: Path, windows: torch.Tensor, jobs: int):
        self.path, self.windows = path, windows
        self.digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
        self.cache = json.loads(path.read_text()) if path.exists() else {}
        self.pool, self.lock, self.sha = ThreadPoolExecutor(jobs), threading.Lock(), {}

    def submit(self, gguf_path: Path, cache: str, rotate: bool = True) -> Future:
        if gguf_path not in self.sha:
            self.sha[gguf_path] = sha256(gguf_path)
        key = f"{self.sha[gguf_path][:16]}|{cache}|{'rot' if rotate else 'norot'}|{self.digest}"

        def run() -> float:
            if key not in self.cache and self.path.exists():  # another run of this script may have measured it
                self.cache = json.loads(self.path.read_text()) | self.cache
            if key not in self.cache:
                started = time.time()
                ppl = engine_ppl(gguf_path, self.windows, cache, rotate)
                print(f"  llama.cpp {gguf_path.parent.name}/{gguf_path.name} {cache}{'' if rotate else ' no-rot'}: "
                      f"ppl {ppl:.3f} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
                with self.lock, open(self.path.with_suffix(".lock"), "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # another run of this script may share the file
                    stored = json.loads(self.path.read_text()) if self.path.exists() else {}
                    self.cache = stored | self.cache | {key: ppl}
                    tmp = self.path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(self.cache, indent=1))
                    tmp.rename(self.path)
            return self.cache[key]

        return self.pool.submit(run)


# --- rows ----------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    weights: str  # label of the GGUF's weights
    cache: str
    rotate: bool
    measured: list[Future]  # one per seed (one for unseeded rows)
    size: Size
    predicted: list[float] | None = None
    baseline: Row | None = None  # the same weights with an f16 cache

    def ppl(self) -> list[float]:
        return [f.result() for f in self.measured]

    def delta(self) -> list[float] | None:
        """ppl minus the same weights' f16-cache ppl, per seed."""
        if self.baseline is None:
            return None
        return [p - b for p, b in zip(self.ppl(), self.baseline.ppl())]


def add_rows(rows: list[Row], weights: str, ggufs: list[Path], caches, m: Measurements, config,
             predicted: dict[str, list[float]] | None = None) -> None:
    """Rows of one kind of weights (one GGUF per seed) for each cache type; the f16 row is every row's baseline."""
    size = Size.of(ggufs[0])
    base = None
    for cache, rotate in caches:
        row = Row(weights, cache, rotate, [m.submit(g, cache, rotate) for g in ggufs], size,
                  predicted and predicted.get(cache), base)
        if cache == "f16":
            base = row
        rows.append(row)


def original_gguf(model_dir: Path, work: Path) -> Path:
    """The unquantized model as an F16 GGUF: a w_bits-16 / kv_bits-16 artifact through the GGUF exporter."""
    out = work / "original-f16"
    if not (out / GGUF_FILE).exists():
        model, tokenizer = load_model(str(model_dir))
        config = WKVQuantConfig(weight=WeightQuantConfig(bits=FP_BITS), kv=KVQuantConfig(bits=FP_BITS))
        prepare_model_(model, config)
        save_artifact(work / "original-artifact", model, tokenizer, config)
        export_gguf(work / "original-artifact", out)
    return out / GGUF_FILE


def recipe_gguf(source: Path, ftype: str, work: Path, imatrix: Path | None = None) -> Path:
    out = work / f"llamacpp-{ftype}{f'-{imatrix.stem}' if imatrix else ''}.gguf"
    if not out.exists():
        engine("quantize", str(source), str(out.with_suffix(".tmp")), ftype, "--threads", "2",
               *(["--imatrix", str(imatrix)] if imatrix else []))
        out.with_suffix(".tmp").rename(out)
    return out


@torch.no_grad()
def importance_matrix(model_dir: Path, samples: torch.Tensor, out: Path) -> Path:
    """llama-imatrix's statistic from our FP32 model: GGUF weight name -> mean squared input activation per column
    of each decoder linear, over `samples` (.npz)."""
    if out.exists():
        return out
    model, _ = load_model(str(model_dir))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    sums, counts, hooks = {}, {}, []

    def accumulate(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for hf_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and hf_name.startswith("model.layers."):
            hooks.append(module.register_forward_pre_hook(accumulate(names.get_name(f"{hf_name}.weight",
                                                                                    try_suffixes=(".weight",)))))
    for sample in samples:
        model(sample[None], use_cache=False)
    for h in hooks:
        h.remove()
    np.savez(out.with_suffix(".tmp.npz"), **{n: (sums[n] / counts[n]).float().numpy() for n in sums})
    out.with_suffix(".tmp.npz").rename(out)
    return out


# --- ours (part c) -------------------------------------------------------------------------------------------------

def predictions(model, windows: torch.Tensor, kv: KVQuantConfig) -> dict[str, float]:
    """Our perplexity of a prepared llamacpp-target model with each llama.cpp cache type: the target's KV quantizer
    for that type (f16: weights only, the cache unquantized)."""
    target = get_target("llamacpp")
    out = {"f16": layerwise_perplexities(model, windows, [EvalMode.W])[EvalMode.W.value].ppl}
    saved = [a.kv_quantizer for a in attentions(model)]
    try:
        for cache in CACHE_TYPES[1:]:
            bits = 8 if cache == "q8_0" else 4
            quantizer = target.kv_quantizer(replace(kv, bits=bits, cache_type=cache))
            for a in attentions(model):
                a.kv_quantizer = quantizer
            out[cache] = layerwise_perplexities(model, windows, [EvalMode.WKV])[EvalMode.WKV.value].ppl
    finally:
        for a, q in zip(attentions(model), saved):
            a.kv_quantizer = q
    return out


def ours_config(args, seed: int, rtn: bool, kv_only: bool = False, target: str = "llamacpp",
                cache_type: str = "q4_0", **kv_fields) -> WKVQuantConfig:
    """What `wkvq quantize --target TARGET --kv-cache-type CACHE_TYPE --method METHOD [--lwc --smoothing]` builds
    (kv_only: --w-bits 16); `kv_fields`: further KV options (smooth_init, smoothing)."""
    calib = calib_config(args.method, nsamples=args.nsamples, seqlen=args.calib_seqlen,
                         epochs=0 if rtn else args.epochs, seed=seed)
    weight = WeightQuantConfig(bits=FP_BITS) if kv_only else WeightQuantConfig(bits=4, group_size=args.group_size,
                                                                                 lwc=not rtn)
    config = WKVQuantConfig(target=target, weight=weight,
                            kv=kv_config(args.method, target, bits=4, cache_type=cache_type,
                                         **({"smoothing": not rtn} | kv_fields)),
                            calib=calib)
    check_config(config)
    return config


def ours_gguf(name: str, config: WKVQuantConfig, model_dir: Path, calib_ids: torch.Tensor, windows: torch.Tensor,
              work: Path) -> tuple[Path, dict]:
    """Calibrate (or reuse) our llamacpp-target artifact `name`, export it; returns the GGUF and its record
    (calibration seconds, predictions)."""
    record_path, out = work / name / "record.json", work / name / "gguf"
    if record_path.exists() and (out / GGUF_FILE).exists():
        return out / GGUF_FILE, json.loads(record_path.read_text())
    model, tokenizer = load_model(str(model_dir))
    samples = calibration_samples(calib_ids, config.calib.nsamples, config.calib.seqlen, config.calib.seed)
    report = quantize_model_(model, config, samples)
    print(f"  {name}: calibrated in {report.seconds:.0f} s", file=sys.stderr, flush=True)
    started = time.time()
    predicted = predictions(model, windows, config.kv)
    print(f"  {name}: predictions {predicted} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    save_artifact(work / name / "artifact", model, tokenizer, config)
    export_gguf(work / name / "artifact", out)
    record = {"calib_seconds": report.seconds, "predicted": predicted, "config": config.to_dict()}
    record_path.write_text(json.dumps(record, indent=1))
    return out / GGUF_FILE, record


# --- tables --------------------------------------------------------------------------------------------------------

def stat(values: list[float] | None, digits: int = 3, sign: bool = False) -> str:
    if not values:
        return "—"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {statistics.stdev(values):.{digits}f}"


def table(rows: list[Row], model_config) -> str:
    lines = ["| weights | KV cache | rotation | runs | ppl | Δppl vs f16 KV | predicted ppl | predicted / measured − 1 "
             "| bits/weight linears | bits/weight file | GGUF types | KV bytes/token |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        ppl, delta = r.ppl(), r.delta()
        delta_pct = delta and [d / b * 100 for d, b in zip(delta, r.baseline.ppl())]
        error = r.predicted and [(p / m - 1) * 100 for p, m in zip(r.predicted, ppl)]
        lines.append(
            f"| {r.weights} | {r.cache} | {'on' if r.rotate else 'off'} | {len(ppl)} | {stat(ppl)} | "
            f"{stat(delta, sign=True)}{f' ({stat(delta_pct, 1, True)}%)' if delta else ''} | {stat(r.predicted)} | "
            f"{stat(error, 2, True) + '%' if error else '—'} | {r.size.linears:.3f} | {r.size.file:.3f} | "
            f"{r.size.types} | {kv_bytes_per_token(model_config, r.cache):g} |")
    return "\n".join(lines)


def goals(rows: list[Row]) -> list[str]:
    """The issue's goals against the rows this run has."""
    def find(weights: str, cache: str, rotate: bool = True) -> Row | None:
        return next((r for r in rows if r.weights == weights and r.cache == cache and r.rotate == rotate), None)

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    lines, ours = [], find(OURS, "q4_0")
    # the calibrated smoothing against llama.cpp's own cache on the same weights: the original ones, and RTN's
    for mine, theirs in ((find(KV_ONLY, "q4_0"), find(ORIGINAL, "q4_0")), (ours, find(RTN, "q4_0"))):
        if mine is None or theirs is None:
            continue
        cost, own = statistics.mean(mine.delta()), theirs.delta()[0]
        lines.append(f"- {verdict(cost <= own / 2)}: {mine.weights}: calibrated KV4 cost (q4_0, Δppl vs f16 KV on "
                     f"its weights) {cost:+.3f} ≤ half of llama.cpp's own q4_0 cost on {theirs.weights} "
                     f"({own:+.3f})")
    if ours is not None:
        ppl, size = statistics.mean(ours.ppl()), ours.size.linears
        rivals = [r for r in rows if r.weights.startswith("llama.cpp ") and r.cache == "q4_0"
                  and r.size.linears <= size + 1e-9]
        if rivals:
            best = min(rivals, key=lambda r: r.ppl()[0])
            lines.append(f"- {verdict(ppl < best.ppl()[0])}: ours W4KV4 (q4_0) ppl {ppl:.3f} < the best llama.cpp "
                         f"recipe of ≤ {size:.2f} bits/weight in the linears with a q4_0 cache: {best.weights} "
                         f"{best.ppl()[0]:.3f} ({best.size.linears:.2f} bits/weight)")
    for r in rows:
        if r.predicted:
            worst = max(abs(p / m - 1) for p, m in zip(r.predicted, r.ppl()))
            lines.append(f"- {verdict(worst <= 0.01)}: {r.weights}, {r.cache} cache: predicted within "
                         f"{worst:.2%} of measured (worst of {len(r.ppl())} run(s)) ≤ 1%")
    return lines


ORIGINAL, RTN, OURS, KV_ONLY = "original (F16)", "ours RTN", "ours calibrated", "ours KV-only (F16 weights)"


def run(args) -> str:
    torch.set_num_threads(args.threads)
    model_dir = fetch_model(MODEL)
    model, tokenizer = load_model(str(model_dir))
    model_config = model.config
    del model
    ids = tokenize(tokenizer, load_text(str(EVAL_TEXT)), max_tokens=args.windows * args.seqlen)
    windows = eval_windows(ids, args.seqlen)
    calib_ids = tokenize(tokenizer, load_text(str(CALIB_TEXT)))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    m = Measurements(work / "measured.json", windows, args.jobs)
    rows: list[Row] = []
    quantized = [(c, True) for c in CACHE_TYPES]

    original = original_gguf(model_dir, work)
    if "a" in args.parts:
        add_rows(rows, ORIGINAL, [original], [*quantized, ("q4_0", False)], m, model_config)
    if "b" in args.parts:
        for ftype in RECIPES:
            add_rows(rows, f"llama.cpp {ftype}", [recipe_gguf(original, ftype, work)], [("f16", True), ("q4_0", True)],
                     m, model_config)
        samples = calibration_samples(calib_ids, args.imatrix_nsamples, args.imatrix_seqlen, 0)
        imatrix = importance_matrix(model_dir, samples, work / f"imatrix-{samples.shape[0]}x{samples.shape[1]}.npz")
        for ftype in RECIPES:
            add_rows(rows, f"llama.cpp {ftype} + imatrix", [recipe_gguf(original, ftype, work, imatrix)],
                     [("f16", True), ("q4_0", True)], m, model_config)
    records = {}
    if "c" in args.parts and not args.no_rtn:
        path, record = ours_gguf(f"ours-rtn-g{args.group_size}", ours_config(args, 0, rtn=True), model_dir, calib_ids,
                                 windows, work)
        records[RTN] = [record]
        add_rows(rows, RTN, [path], [("f16", True), ("q4_0", True)], m, model_config,
                 {k: [v] for k, v in record["predicted"].items()})
    tag = "" if args.method == "recommended" else f"-{args.method}"
    if "c" in args.parts and args.kv_only_seeds:
        built = [ours_gguf(f"ours-kv-only{tag}-s{seed}", ours_config(args, seed, rtn=False, kv_only=True), model_dir,
                           calib_ids, windows, work) for seed in args.kv_only_seeds]
        records[KV_ONLY] = [r for _, r in built]
        add_rows(rows, KV_ONLY, [p for p, _ in built], [("f16", True), ("q4_0", True)], m, model_config,
                 {c: [r["predicted"][c] for _, r in built] for c in CACHE_TYPES})
    if "c" in args.parts and args.seeds:
        built = [ours_gguf(f"ours-g{args.group_size}{tag}-s{seed}", ours_config(args, seed, rtn=False), model_dir,
                           calib_ids, windows, work) for seed in args.seeds]
        records[OURS] = [r for _, r in built]
        add_rows(rows, OURS, [p for p, _ in built], [(c, True) for c in args.c_caches], m, model_config,
                 {c: [r["predicted"][c] for _, r in built] for c in CACHE_TYPES})

    calib, kv = records.get(OURS), kv_config(args.method, "llamacpp")
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return "\n".join([
        f"- model `{MODEL}` ({model_config.num_hidden_layers} layers, hidden {model_config.hidden_size}, "
        f"{model_config.num_key_value_heads} KV heads × head_dim {head_dim}); eval: the first "
        f"{windows.shape[0]} windows × {args.seqlen} tokens of `wiki.test.raw` "
        f"({windows.shape[0] * (args.seqlen - 1):,} scored tokens), the same for every row; perplexity from "
        "llama.cpp's logits of each window (own empty cache)",
        "- llama.cpp: CPU, 1 thread per run, flash attention, `-ctk = -ctv` = the KV cache column; rotation = its "
        "Hadamard rotation of a quantized cache (`LLAMA_ATTN_ROT_DISABLE=1` for off)",
        f"- (b) `llama_model_quantize` of the F16 GGUF, default parameters; {IMATRIX}: {args.imatrix_nsamples} × "
        f"{args.imatrix_seqlen} tokens",
        *([f"- (c) `WKVQuantConfig(target='llamacpp')`, W4 asymmetric group {args.group_size}, KV cache_type q4_0, "
           f"method {args.method} (smoothing {kv.smooth_param}, lr {kv.lr}); "
           f"calibrated: LWC + smoothing, {args.nsamples} × {args.calib_seqlen} tokens of `wiki.valid.tokens`, "
           f"epochs {args.epochs}, seeds {','.join(map(str, args.seeds))} (calibration "
           f"{stat([r['calib_seconds'] for r in calib], 0)} s each, {args.threads} torch thread(s)); RTN: no LWC, "
           "no smoothing, epochs 0; exported with `wkvq_core.export.gguf`; predicted = our perplexity of the "
           "calibrated model (llamacpp target's KV quantizer for each cache type; f16: weights only) on the same "
           "windows"] if calib else []),
        "",
        table(rows, model_config),
        "",
        *goals(rows),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="a,b,c", help="comma-separated parts: a, b, c")
    parser.add_argument("--windows", type=int, default=24, help="eval windows")
    parser.add_argument("--seqlen", type=int, default=512, help="eval window length (tokens)")
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds (part c)")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--imatrix-nsamples", type=int, default=32, help="calibration windows of the imatrix")
    parser.add_argument("--imatrix-seqlen", type=int, default=512)
    parser.add_argument("--c-caches", default=",".join(CACHE_TYPES), help="cache types of part c's calibrated rows")
    parser.add_argument("--kv-only-seeds", default="", help="part c: seeds of a KV-only calibration (F16 weights)")
    parser.add_argument("--method", default="recommended", choices=METHODS, help="part c's KV method")
    parser.add_argument("--no-rtn", action="store_true", help="part c without the RTN rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (calibration, predictions)")
    parser.add_argument("--jobs", type=int, default=1, help="llama.cpp runs at once (1 thread each)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "engines"), help="GGUFs, artifacts and cached runs")
    parser.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    args.parts, args.seeds = args.parts.split(","), [int(s) for s in args.seeds.split(",") if s]
    args.kv_only_seeds = [int(s) for s in args.kv_only_seeds.split(",") if s]
    args.c_caches = args.c_caches.split(",")
    if "f16" not in args.c_caches or not set(args.c_caches) <= set(CACHE_TYPES):
        parser.error(f"--c-caches: cache types among {', '.join(CACHE_TYPES)}, f16 (the baseline) included")
    if not engine_installed():
        sys.exit(f"no llama.cpp engine at {engine_python()}: run `bash {INSTALL_SCRIPT}` first")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started, code = datetime.datetime.now(datetime.timezone.utc), code_version("wkvq_core", "benchmarks")
    section("llama.cpp engine benchmark", started, code,
            f"llama-cpp-python {engine_version()} (pinned {ENGINE_VERSION}); torch {torch.__version__}, "
            f"transformers {transformers.__version__}, gguf {importlib.metadata.version('gguf')}, "
            f"Python {platform.python_version()}", run(args), args.write)


if __name__ == "__main__":
    main()
