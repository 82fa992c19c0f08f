"""Our 4-bit weights against llm-compressor's AWQ and GPTQ (issue 28): SmolLM2-135M, weights in groups of 64, the same
calibration windows of `wiki.valid.tokens` for every method and seed, held-out `wiki.test.raw` (engines.py's
windows), mean ± sd over seeds, calibration time and peak memory per row.

    python benchmarks/weights.py --seeds 0,1,2                      # every row; prints the table
    python benchmarks/weights.py --rows awq,gptq --seeds 0,1,2       # those rows (others from the cache)
    python benchmarks/weights.py --write                            # appends the section to RESULTS.md

Rows: FP; llm-compressor AWQ W4A16_ASYM, GPTQ W4A16_ASYM and GPTQ W4A16 (symmetric), each on the seed's calibration
windows (benchmarks/peers.py's worker, in its own venv); our W4 RTN; our W4 calibration (LWC + CRR, the paper's
weights) alone and with each option beyond the paper (`equalize`: activation-aware equivalent scaling as the
initialisation; `gptq`: error-compensating rounding with the learned clip ranges fixed), and both; W4KV4 with the
paper's method and with `recommended` (its weight side included), on our runtime and on the vllm and llamacpp
targets; the `-bf16` rows: the same calibration under bf16 autocast (`--compute-dtype bfloat16`, faster on CPUs with
AMX, much slower on CPUs without native bf16); the `-kN` rows: `recommended` with a CRR window of N blocks (its own: 2).
Columns: perplexity in our runtime with a full-precision KV cache (the weights alone) and with the row's KV4 cache
(the rows that calibrate one), and as vLLM computes it (emulated, `apply_semantics_`: bf16 matmul inputs and its
uncalibrated `int4_per_token_head` cache for the peers and FP; our vllm-target calibration's cache for ours), and
as llama.cpp computes it (emulated likewise: its q4_0 cache, Hadamard-rotated, uncalibrated for the peers and FP;
Q8_1-rounded inputs for our Q4_1 linears; the peers' linears are left unrounded, as an F16 GGUF of their dequantized
weights would run, which favours them slightly).
Each row and seed is cached as json in --work, so processes with disjoint --rows run side by side.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import transformers

from wkvq_core.config import FP_BITS, CalibConfig, EvalMode, WKVQuantConfig, calib_config, weight_config
from wkvq_core.evaluation.perplexity import perplexity
from wkvq_core.evaluation.semantics import LLAMACPP, VLLM, apply_semantics_
from wkvq_core.model import load_model, prepare_model_
from wkvq_core.pipeline import quantize_model_
from wkvq_core.targets.vllm import INT4

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import MODEL, ours_config, stat
from peers import Preparer
from provenance import ROOT, code_version, section
from quality import reset_peak_rss
from vllm_target import Bench, add_bench_arguments, fp_config, parse_bench_args

RUNTIME_W, RUNTIME_WKV, VLLM_INT4 = "runtime, FP cache", "runtime, KV4", "vLLM int4_per_token_head"
LLAMACPP_Q4 = "llama.cpp q4_0"
COLUMNS = (RUNTIME_W, RUNTIME_WKV, VLLM_INT4, LLAMACPP_Q4)
BF16 = {"compute_dtype": "bfloat16"}  # calibration under bf16 autocast (AMX / avx512_bf16 matmuls on the CPU)
PEERS = {"awq": "AWQ W4A16_ASYM", "gptq-asym": "GPTQ W4A16_ASYM", "gptq": "GPTQ W4A16 (symmetric)"}


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    seeded: bool
    columns: tuple[str, ...]
    weight_options: dict = field(default_factory=dict)  # WeightQuantConfig fields of ours
    calib_options: dict = field(default_factory=dict)  # CalibConfig fields of ours


ROWS = [
    Row("fp", "FP", False, (RUNTIME_W, VLLM_INT4, LLAMACPP_Q4)),
    *[Row(key, f"llm-compressor {label}", True, (RUNTIME_W, VLLM_INT4, LLAMACPP_Q4)) for key, label in PEERS.items()],
    Row("rtn", "ours W4 RTN", False, (RUNTIME_W,)),
    Row("lwc", "ours W4 LWC + CRR (the paper's weights)", True, (RUNTIME_W,)),
    Row("eq", "ours W4 + equalize", True, (RUNTIME_W,), {"equalize": True}),
    Row("lwc-gptq", "ours W4 + gptq", True, (RUNTIME_W,), {"gptq": True}),
    Row("eq-gptq", "ours W4 + equalize + gptq", True, (RUNTIME_W,), {"equalize": True, "gptq": True}),
    Row("w4kv4-paper", "ours W4KV4, method paper", True, (RUNTIME_W, RUNTIME_WKV)),
    Row("w4kv4-rec", "**ours W4KV4, method recommended**", True, (RUNTIME_W, RUNTIME_WKV)),
    Row("w4kv4-rec-eq", "ours W4KV4, method recommended + equalize", True, (RUNTIME_W, RUNTIME_WKV),
        {"equalize": True}),
    Row("vllm-rec-eq", "ours W4KV4, method recommended + equalize, target vllm", True, (RUNTIME_W, VLLM_INT4),
        {"equalize": True}),
    Row("vllm-rec", "**ours W4KV4, method recommended, target vllm**", True, (RUNTIME_W, VLLM_INT4)),
    Row("llamacpp-rec", "**ours W4KV4, method recommended, target llamacpp**", True, (RUNTIME_W, LLAMACPP_Q4)),
    Row("lwc-bf16", "ours W4 LWC + CRR, bf16 autocast", True, (RUNTIME_W,), calib_options=BF16),
    Row("w4kv4-rec-bf16", "ours W4KV4, method recommended, bf16 autocast", True, (RUNTIME_W, RUNTIME_WKV),
        calib_options=BF16),
    *[Row(f"w4kv4-rec-k{k}", f"ours W4KV4, method recommended, CRR k = {k}", True, (RUNTIME_W, RUNTIME_WKV),
          calib_options={"crr_k": k}) for k in (1, 3, 5)],
]
K_ROWS = [row.key for row in ROWS if "crr_k" in row.calib_options]
BY_KEY = {r.key: r for r in ROWS}


KV_ROWS = {"w4kv4-paper": ("paper", "runtime", None), "w4kv4-rec": ("recommended", "runtime", None),
           "w4kv4-rec-bf16": ("recommended", "runtime", None),
           **{f"w4kv4-rec-k{k}": ("recommended", "runtime", None) for k in (1, 3, 5)},
           "vllm-rec": ("recommended", "vllm", INT4), "w4kv4-rec-eq": ("recommended", "runtime", None),
           "vllm-rec-eq": ("recommended", "vllm", INT4),
           "llamacpp-rec": ("recommended", "llamacpp", "q4_0")}  # method, target, cache type


def row_config(args, row: Row, seed: int) -> WKVQuantConfig:
    """What `wkvq quantize` builds for the row (the KV rows: --method METHOD, its weight side included)."""
    if row.key in KV_ROWS:
        method, target, cache_type = KV_ROWS[row.key]
        config = ours_config(argparse.Namespace(**{**vars(args), "method": method}), seed, rtn=False, target=target,
                             cache_type=cache_type)
        config = replace(config, weight=weight_config(method, bits=4, group_size=args.group_size, **row.weight_options))
    else:
        config = ours_config(args, seed, rtn=row.key == "rtn", target="runtime", cache_type=None, smoothing=False)
        config = replace(config, kv=replace(config.kv, bits=FP_BITS),
                         weight=replace(config.weight, **row.weight_options))
    return replace(config, calib=replace(config.calib, **row.calib_options))


class WeightsBench(Bench):
    def __init__(self, args) -> None:
        super().__init__(args)
        self.work = self.work.with_name(self.work.name.removesuffix(f"-{args.method}"))
        self.work.mkdir(parents=True, exist_ok=True)

    def measure(self, row: Row, seed: int | None, path: Path) -> None:
        started = time.time()
        model, config, calib_seconds, peak, notes = self.build(row, seed)
        ppl = {}
        for column in row.columns:
            if column in (VLLM_INT4, LLAMACPP_Q4):
                engine = copy.deepcopy(model)
                apply_semantics_(engine, config, *((VLLM, INT4) if column == VLLM_INT4 else (LLAMACPP, "q4_0")))
                ppl[column] = perplexity(engine, self.windows, EvalMode.WKV).ppl
            else:
                ppl[column] = perplexity(model, self.windows, EvalMode.W if column == RUNTIME_W else EvalMode.WKV).ppl
            print(f"  {row.key}{'' if seed is None else f' s{seed}'} {column}: ppl {ppl[column]:.3f}",
                  file=sys.stderr, flush=True)
        record = {"ppl": ppl, "calib_seconds": calib_seconds, "peak_bytes": peak, "notes": notes,
                  "seconds": time.time() - started}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.rename(path)

    def build(self, row: Row, seed: int | None):
        """(prepared model, its config, calibration seconds, peak bytes, notes)."""
        if row.key == "fp":
            model, _ = load_model(str(self.model_dir))
            return prepare_model_(model, fp_config()), fp_config(), None, None, []
        if row.key in PEERS:
            return self.peer(row.key, seed)
        config = row_config(self.args, row, seed or 0)
        model, _ = load_model(str(self.model_dir))
        if row.key == "rtn":
            return prepare_model_(model, config), config, None, None, []
        reset_peak_rss()
        report = quantize_model_(model, config, self.samples(config.calib.seed))
        print(f"  {row.key} s{seed}: calibrated in {report.seconds:.0f} s", file=sys.stderr, flush=True)
        return model, config, report.seconds, report.peak_memory_bytes, []

    def peer(self, key: str, seed: int):
        workdir = self.work / f"peers-s{seed}"
        workdir.mkdir(exist_ok=True)
        args = argparse.Namespace(
            peer_venv=self.args.peer_venv, llmcompressor_spec=self.args.llmcompressor_spec,
            model_dir=str(self.model_dir), threads=self.args.threads, group_size=self.args.group_size,
            calib_config=CalibConfig(nsamples=self.args.nsamples, seqlen=self.args.calib_seqlen, seed=seed))
        prepared = Preparer(args, None, self.samples(seed), workdir).get(key)
        if prepared.error:
            raise RuntimeError(f"{key}: {prepared.error}")
        config = fp_config()
        prepare_model_(prepared.model, config)
        notes = prepared.notes + [f"llmcompressor {prepared.checkpoint_versions['llmcompressor']}"]
        return prepared.model, config, prepared.seconds, prepared.peak_bytes, notes


def table(records: dict[str, list[dict]]) -> str:
    fp = records["fp"][0]["ppl"][RUNTIME_W] if "fp" in records else None
    lines = ["| weights | runs | " + " | ".join(f"ppl, {c}" for c in COLUMNS) + " | Δ% vs FP (runtime, FP cache) | "
             "calibration s | peak RSS MB |", "|---|---:|" + "---:|" * (len(COLUMNS) + 3)]
    for row in ROWS:
        recs = records.get(row.key)
        if not recs:
            continue
        cells = [stat([r["ppl"][c] for r in recs if c in r["ppl"]]) for c in COLUMNS]
        delta = [(r["ppl"][RUNTIME_W] / fp - 1) * 100 for r in recs] if fp else None
        calib = [r["calib_seconds"] for r in recs if r["calib_seconds"] is not None]
        peak = [r["peak_bytes"] / 1e6 for r in recs if r["peak_bytes"]]
        lines.append(f"| {row.label} | {len(recs)} | {' | '.join(cells)} | "
                     f"{stat(delta, 1, True) + '%' if delta else '—'} | {stat(calib, 0)} | {stat(peak, 0)} |")
    return "\n".join(lines)


def goals(records: dict[str, list[dict]]) -> list[str]:
    def mean(key: str, column: str) -> float | None:
        values = [r["ppl"][column] for r in records.get(key, []) if column in r["ppl"]]
        return statistics.mean(values) if values else None

    def line(ok: bool, text: str) -> str:
        return f"- {'MET' if ok else 'NOT MET'}: {text}"

    lines = []
    best_peer = min((k for k in PEERS if mean(k, RUNTIME_W) is not None), key=lambda k: mean(k, RUNTIME_W),
                    default=None)
    for key in ("lwc", "eq", "lwc-gptq", "eq-gptq", "w4kv4-rec", "w4kv4-rec-bf16", *K_ROWS):
        ours = mean(key, RUNTIME_W)
        if ours is not None and best_peer is not None:
            peer = mean(best_peer, RUNTIME_W)
            lines.append(line(ours < peer, f"{BY_KEY[key].label.strip('*')}, weights alone {ours:.3f} vs "
                                           f"{PEERS[best_peer]} (the best peer) {peer:.3f}"))
    for key in ("w4kv4-rec", "w4kv4-rec-bf16", *K_ROWS):
        rec, awq = mean(key, RUNTIME_WKV), mean("awq", RUNTIME_W)
        if rec is not None and awq is not None:
            lines.append(line(rec < awq, f"{BY_KEY[key].label.strip('*')} (runtime, KV4) {rec:.3f} vs AWQ W4 with an "
                                         f"FP cache {awq:.3f}"))
    rec_vllm, awq_vllm = mean("vllm-rec", VLLM_INT4), mean("awq", VLLM_INT4)
    if rec_vllm is not None and awq_vllm is not None:
        lines.append(line(rec_vllm < awq_vllm, f"W4KV4 recommended on vLLM (emulated int4_per_token_head) "
                                               f"{rec_vllm:.3f} vs AWQ + vLLM's own int4 {awq_vllm:.3f}"))
    rec_cpp, awq_cpp = mean("llamacpp-rec", LLAMACPP_Q4), mean("awq", LLAMACPP_Q4)
    if rec_cpp is not None and awq_cpp is not None:
        lines.append(line(rec_cpp < awq_cpp, f"W4KV4 recommended on llama.cpp (emulated q4_0 cache) {rec_cpp:.3f} vs "
                                             f"AWQ + llama.cpp's own q4_0 {awq_cpp:.3f}"))
    for key in ("w4kv4-paper", "w4kv4-rec"):
        ours, lwc = mean(key, RUNTIME_W), mean("lwc", RUNTIME_W)
        if ours is not None and lwc is not None:
            lines.append(line(ours <= lwc, f"{BY_KEY[key].label.strip('*')}: its weights alone {ours:.3f} vs W4 "
                                           f"LWC's {lwc:.3f}"))
    return lines


def run(args) -> str:
    torch.set_num_threads(args.threads)
    bench = WeightsBench(args)
    for key in args.rows:
        row = BY_KEY[key]
        for seed in args.seeds if row.seeded else [None]:
            bench.record(row, seed)
    records = {}
    for row in ROWS:
        paths = [bench.record_path(row, s) for s in (args.seeds if row.seeded else [None])]
        if any(p.exists() for p in paths):
            records[row.key] = [json.loads(p.read_text()) for p in paths if p.exists()]
    cfg, windows = bench.model_config, bench.windows
    notes = [f"- {BY_KEY[k].label.strip('*')}: {'; '.join(dict.fromkeys(recs[0]['notes']))}"
             for k, recs in records.items() if recs[0]["notes"]]
    return "\n".join([
        f"- model `{MODEL}` ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}); eval: the first "
        f"{windows.shape[0]} windows × {args.seqlen} tokens of `wiki.test.raw`, the same for every row",
        f"- calibration: {args.nsamples} × {args.calib_seqlen} tokens of `wiki.valid.tokens`, epochs {args.epochs}, "
        f"the same windows for every method (seed = the windows, and our initialisation): seeds "
        f"{','.join(map(str, args.seeds))}; weights 4-bit in groups of {args.group_size} (asymmetric but GPTQ "
        f"W4A16); ours: CRR k = the method's (paper 5, recommended {calib_config('recommended').crr_k}; but where a "
        f"row names k), MAE; {args.threads} torch thread(s) per process; "
        "peak RSS: the process's high-water mark during the row's calibration (llm-compressor: its worker's)",
        f"- `{RUNTIME_W}`: decode-exact perplexity in our runtime (fp32), KV cache unquantized; `{RUNTIME_WKV}`: the "
        f"row's calibrated KV4 cache (POQ); `{VLLM_INT4}`: as vLLM computes it in bf16 (emulated); `{LLAMACPP_Q4}`: "
        "as llama.cpp computes it with a q4_0 cache (emulated; peers' linears unrounded)",
        *notes,
        "",
        table(records),
        "",
        *goals(records),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser, list(BY_KEY), ROOT / "runs" / "weights")
    args = parse_bench_args(parser, argv, list(BY_KEY))
    args.method = "paper"
    started, code = datetime.datetime.now(datetime.timezone.utc), code_version("wkvq_core", "benchmarks")
    section("Weights against AWQ and GPTQ (issue 28)", started, code,
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
            run(args), args.write)


if __name__ == "__main__":
    main()
