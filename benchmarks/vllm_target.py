"""The vllm target (issue 27) under vLLM's emulated semantics: perplexity of SmolLM2-135M on held-out WikiText-2 as
vLLM serving each model in bf16 on a GPU computes it (`apply_semantics_(model, config, "vllm", kv)`: matmul inputs
rounded to bf16, K and V through the emulated `int4_per_token_head` cache or unquantized with `auto`), for

  - FP weights: KV `auto`, vLLM's own (uncalibrated) int4_per_token_head, and our vllm-target KV-only calibration
    (w_bits 16, KV4; smoothing started from calibration statistics, "range", and from the identity);
  - llm-compressor AWQ W4A16_ASYM and GPTQ W4A16 (benchmarks/peers.py's worker, its own venv; loaded with
    CompressedTensorsConfig(dequantize=True)), the same calibration tokens (seed 0);
  - our vllm-target W4 RTN, and W4 + KV4 calibrated (LWC + smoothing).

    python benchmarks/vllm_target.py                       # every row; prints the table
    python benchmarks/vllm_target.py --rows fp,rtn --write # those rows (others from the cache); appends RESULTS.md

Every row scores the same windows of `wiki.test.raw` (engines.py's); calibration on `wiki.valid.tokens`. Weight
bytes as peers.py accounts them: llm-compressor's checkpoints and our vllm exports (`wkvq export --format vllm`,
compressed-tensors, what vLLM loads) by `ct_weight_bytes`, the FP model at 2 bytes a parameter. Each row's result
is cached in --work (one json per row and seed, keyed by the settings), so processes with disjoint --rows run side
by side and an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fcntl
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from wkvq_core.artifact import save_artifact
from wkvq_core.calib.data import calibration_samples, eval_windows, load_text, tokenize
from wkvq_core.config import FP_BITS, METHODS, CalibConfig, EvalMode, WeightQuantConfig, WKVQuantConfig
from wkvq_core.evaluation.perplexity import perplexity
from wkvq_core.evaluation.semantics import VLLM, Semantics, apply_semantics_
from wkvq_core.export.vllm import export as export_vllm
from wkvq_core.model import load_model, prepare_model_
from wkvq_core.model_zoo import fetch_model
from wkvq_core.pipeline import quantize_model_
from wkvq_core.targets import check_config, kv_config
from wkvq_core.targets.vllm import AUTO, INT4

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import CALIB_TEXT, EVAL_TEXT, MODEL, ours_config, stat
from peers import LLMCOMPRESSOR_SPEC, PEER_VENV, Preparer, ct_weight_bytes, fp_weight_bytes
from provenance import ROOT, code_version, section, shown

KV_DTYPES = (AUTO, INT4)
SMOOTH_INITS = ("range", "identity")


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    seeded: bool  # calibrated per seed (mean ± sd over --seeds)
    kv_dtypes: tuple[str, ...] = KV_DTYPES  # the KV columns measured (a KV-only row's auto is the FP row's)


ROWS = [
    Row("fp", "FP (bf16 matmul inputs)", False),
    Row("kv-range", "FP + our KV4 calibration (smoothing from statistics)", True, (INT4,)),
    Row("kv-identity", "FP + our KV4 calibration (smoothing from the identity)", True, (INT4,)),
    Row("awq", "llm-compressor AWQ W4A16_ASYM", False),
    Row("gptq", "llm-compressor GPTQ W4A16 (symmetric)", False),
    Row("rtn", "ours W4 RTN (vllm target)", False),
    Row("ours", "**ours W4 + KV4 calibrated (vllm target; smoothing from statistics)**", True),
    Row("ours-identity", "ours W4 + KV4 calibrated (vllm target; smoothing from the identity)", True),
    Row("ours-nosmooth", "ours W4 calibrated for KV4 (vllm target; no KV smoothing)", True),
]
BY_KEY = {r.key: r for r in ROWS}


def fp_config() -> WKVQuantConfig:
    """An unquantized vllm-target model, its KV quantizable: what `wkvq eval --semantics vllm --w-bits 16` prepares."""
    return WKVQuantConfig(target=VLLM, weight=WeightQuantConfig(bits=FP_BITS),
                          kv=kv_config("paper", VLLM, bits=4, smoothing=False))


def row_config(args, row: Row, seed: int) -> WKVQuantConfig:
    if row.key == "rtn":
        return ours_config(args, 0, rtn=True, target=VLLM, cache_type=INT4)
    if row.key in ("ours", "ours-identity"):  # each row names its smoothing's start, whatever the method's default
        init = "identity" if row.key == "ours-identity" else "range"
        return ours_config(args, seed, rtn=False, target=VLLM, cache_type=INT4, smooth_init=init)
    if row.key == "ours-nosmooth":
        return ours_config(args, seed, rtn=False, target=VLLM, cache_type=INT4, smoothing=False)
    init = row.key.removeprefix("kv-")
    return ours_config(args, seed, rtn=False, kv_only=True, target=VLLM, cache_type=INT4, smooth_init=init)


# --- one row (and seed) ----------------------------------------------------------------------------------------

class Bench:
    """The run's model, windows and calibration tokens; builds and measures rows into --work."""

    def __init__(self, args) -> None:
        self.args, self.model_dir = args, fetch_model(MODEL)
        model, tokenizer = load_model(str(self.model_dir))
        self.model_config = model.config
        ids = tokenize(tokenizer, load_text(str(EVAL_TEXT)), max_tokens=args.windows * args.seqlen)
        self.windows = eval_windows(ids, args.seqlen)
        self.calib_ids = tokenize(tokenizer, load_text(str(CALIB_TEXT)))
        self.work = Path(args.work) / (f"n{args.nsamples}x{args.calib_seqlen}-e{args.epochs}-g{args.group_size}-"
                                       f"{args.method}-w{self.windows.shape[0]}x{args.seqlen}")
        self.work.mkdir(parents=True, exist_ok=True)

    def record_path(self, row: Row, seed: int | None) -> Path:
        return self.work / f"{row.key}{'' if seed is None else f'-s{seed}'}.json"

    def samples(self, seed: int) -> torch.Tensor:
        return calibration_samples(self.calib_ids, self.args.nsamples, self.args.calib_seqlen, seed)

    def record(self, row: Row, seed: int | None) -> None:
        """Measure the row (and seed) into its json unless it is there."""
        path = self.record_path(row, seed)
        with open(path.with_suffix(".lock"), "w") as lock:
            try:  # another process of this script may be measuring it
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"  {path.stem}: measured by another process", file=sys.stderr, flush=True)
                return
            if not path.exists():
                self.measure(row, seed, path)

    def measure(self, row: Row, seed: int | None, path: Path) -> None:
        started = time.time()
        model, config, weights, calib_seconds, notes = self.build(row, seed)
        ppl = {}
        for dtype in row.kv_dtypes:
            engine = copy.deepcopy(model)
            apply_semantics_(engine, config, VLLM, dtype)
            ppl[dtype] = perplexity(engine, self.windows, EvalMode.WKV).ppl
            print(f"  {row.key}{'' if seed is None else f' s{seed}'} {dtype}: ppl {ppl[dtype]:.3f}", file=sys.stderr,
                  flush=True)
        record = {"ppl": ppl, "calib_seconds": calib_seconds, "weight_bits": weights.bits_per_param,
                  "weight_bytes": weights.total, "notes": notes, "seconds": time.time() - started}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.rename(path)

    def build(self, row: Row, seed: int | None):
        """(prepared model, its config, weight bytes, calibration seconds, notes)."""
        if row.key == "fp":
            model, _ = load_model(str(self.model_dir))
            weights = fp_weight_bytes(model)
            return prepare_model_(model, fp_config()), fp_config(), weights, None, []
        if row.key in ("awq", "gptq"):
            return self.llmcompressor(row.key)
        config = row_config(self.args, row, seed or 0)
        check_config(config, self.model_config.to_dict())
        model, tokenizer = load_model(str(self.model_dir))
        fp_weights, seconds = fp_weight_bytes(model), None
        if row.key == "rtn":
            prepare_model_(model, config)
        else:
            report = quantize_model_(model, config, self.samples(config.calib.seed))
            seconds = report.seconds
            print(f"  {row.key} s{seed}: calibrated in {seconds:.0f} s", file=sys.stderr, flush=True)
        if config.weight.bits == FP_BITS:
            return model, config, fp_weights, seconds, []
        out = self.work / f"{row.key}{'' if seed is None else f'-s{seed}'}-export"
        save_artifact(out.with_name(out.name + "-artifact"), model, tokenizer, config)
        export_vllm(out.with_name(out.name + "-artifact"), out)
        return model, config, ct_weight_bytes(out), seconds, [f"vllm export `{shown(out)}`"]

    def llmcompressor(self, key: str):
        args = argparse.Namespace(
            peer_venv=self.args.peer_venv, llmcompressor_spec=self.args.llmcompressor_spec,
            model_dir=str(self.model_dir), threads=self.args.threads, group_size=self.args.group_size,
            calib_config=CalibConfig(nsamples=self.args.nsamples, seqlen=self.args.calib_seqlen, seed=0))
        prepared = Preparer(args, None, self.samples(0), self.work).get(key)
        if prepared.error:
            raise RuntimeError(f"{key}: {prepared.error}")
        config = fp_config()
        prepare_model_(prepared.model, config)  # WKVAttention over the dequantized weights, bf16 matmul inputs
        notes = prepared.notes + [f"llmcompressor {prepared.checkpoint_versions['llmcompressor']}"]
        return prepared.model, config, prepared.weights, prepared.seconds, notes


# --- the table -------------------------------------------------------------------------------------------------

def table(bench: Bench, records: dict[str, list[dict]]) -> str:
    kv_bytes = {d: Semantics(VLLM, d).kv_bytes_per_token(bench.model_config) for d in KV_DTYPES}
    fp_auto = records["fp"][0]["ppl"][AUTO] if "fp" in records else None
    lines = ["| weights | runs | weight bits/param (linears) | weights MB | "
             + " | ".join(f"ppl, KV {d} ({kv_bytes[d]:g} B/token) | Δ% vs FP auto" for d in KV_DTYPES)
             + " | calibration s |",
             "|---|---:|---:|---:|" + "---:|---:|" * len(KV_DTYPES) + "---:|"]
    for row in ROWS:
        if row.key not in records:
            continue
        recs = records[row.key]
        cells = []
        for dtype in KV_DTYPES:
            ppl = [r["ppl"][dtype] for r in recs if dtype in r["ppl"]]
            delta = [(p / fp_auto - 1) * 100 for p in ppl] if fp_auto and ppl else None
            cells += [stat(ppl), stat(delta, 1, True) + "%" if delta else "—"]
        calib = [r["calib_seconds"] for r in recs if r["calib_seconds"] is not None]
        lines.append(f"| {row.label} | {len(recs)} | {recs[0]['weight_bits']:.3f} | "
                     f"{recs[0]['weight_bytes'] / 1e6:.1f} | {' | '.join(cells)} | {stat(calib, 0)} |")
    return "\n".join(lines)


def goals(records: dict[str, list[dict]]) -> list[str]:
    """The issue's goals against this run's rows."""
    def mean(key: str, dtype: str) -> float | None:
        values = [r["ppl"][dtype] for r in records.get(key, []) if dtype in r["ppl"]]
        return statistics.mean(values) if values else None

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    lines, fp_auto, fp_int4 = [], mean("fp", AUTO), mean("fp", INT4)
    if fp_auto and fp_int4:
        own = fp_int4 - fp_auto
        for key in ("kv-range", "kv-identity"):
            ours = mean(key, INT4)
            if ours is not None:
                cost = ours - fp_auto
                lines.append(f"- {verdict(cost <= own / 2)}: {BY_KEY[key].label}: KV4 cost {cost:+.3f} ppl "
                             f"= {cost / own:.2f} × vLLM's uncalibrated int4_per_token_head cost ({own:+.3f}) on FP "
                             "weights (goal ≤ 0.5)")
    awq = mean("awq", INT4)
    for key in ("ours", "ours-identity", "ours-nosmooth"):
        ours = mean(key, INT4)
        if ours is None or awq is None:
            continue
        ours_bytes, awq_bytes = records[key][0]["weight_bytes"], records["awq"][0]["weight_bytes"]
        lines.append(f"- {verdict(ours < awq and ours_bytes <= awq_bytes)}: {BY_KEY[key].label.strip('*')}: ppl "
                     f"{ours:.3f} {'<' if ours < awq else '≥'} AWQ + int4_per_token_head {awq:.3f}, weights "
                     f"{ours_bytes / 1e6:.2f} MB {'≤' if ours_bytes <= awq_bytes else '>'} AWQ's "
                     f"{awq_bytes / 1e6:.2f} MB (the same KV bytes)")
    return lines


def run(args) -> str:
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    for key in args.rows:
        row = BY_KEY[key]
        for seed in args.seeds if row.seeded else [None]:
            bench.record(row, seed)
    records = {}  # the rows measured so far (by any process), with the seeds they have
    for row in ROWS:
        paths = [bench.record_path(row, s) for s in (args.seeds if row.seeded else [None])]
        if any(p.exists() for p in paths):
            records[row.key] = [json.loads(p.read_text()) for p in paths if p.exists()]
    cfg, windows = bench.model_config, bench.windows
    notes = [f"- {BY_KEY[k].label.strip('*')}: {'; '.join(dict.fromkeys(recs[0]['notes']))}"
             for k, recs in records.items() if recs[0]["notes"]]
    kv = kv_config(args.method, VLLM)
    return "\n".join([
        f"- model `{MODEL}` ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_key_value_heads} KV "
        f"heads × head_dim {cfg.head_dim}); eval: the first {windows.shape[0]} windows × {args.seqlen} tokens of "
        f"`wiki.test.raw` ({windows.shape[0] * (args.seqlen - 1):,} scored tokens), the same for every row, each "
        "from an empty cache",
        "- every row computed as vLLM computes it (emulated: `apply_semantics_(model, config, 'vllm', kv)`, bf16 "
        "on sm80+): linear inputs rounded to bf16; KV `int4_per_token_head`: randomized Hadamard rotation, 4-bit "
        "asymmetric per token and KV head, the kernel's rounding and scale truncation, no POQ; `auto`: unquantized",
        f"- calibration: {args.nsamples} × {args.calib_seqlen} tokens of `wiki.valid.tokens`, epochs {args.epochs}, "
        f"weights in groups of {args.group_size} (asymmetric for ours and AWQ); ours: `WKVQuantConfig(target="
        f"'vllm')`, method {args.method} (smoothing {kv.smooth_param}, lr {kv.lr}), seeds "
        f"{','.join(map(str, args.seeds))} (seed = calibration windows and initialisation; llm-compressor: seed 0's "
        f"windows), {args.threads} torch thread(s) per process",
        *notes,
        "",
        table(bench, records),
        "",
        *goals(records),
    ])


def add_bench_arguments(parser: argparse.ArgumentParser, rows: list[str], work: Path) -> None:
    """The options this script and benchmarks/weights.py share: rows, eval windows, calibration, llm-compressor."""
    parser.add_argument("--rows", default=",".join(rows), help=f"rows to measure: {', '.join(rows)}")
    parser.add_argument("--windows", type=int, default=8, help="eval windows")
    parser.add_argument("--seqlen", type=int, default=512, help="eval window length (tokens)")
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds of the calibrated rows")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--peer-venv", default=str(PEER_VENV), help="virtual environment for llm-compressor")
    parser.add_argument("--llmcompressor-spec", default=LLMCOMPRESSOR_SPEC)
    parser.add_argument("--work", default=str(work), help="cached rows (and exports)")
    parser.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")


def parse_bench_args(parser: argparse.ArgumentParser, argv: list[str] | None, rows: list[str]) -> argparse.Namespace:
    """Parsed options, --rows and --seeds as lists; an unknown row is a usage error."""
    args = parser.parse_args(argv)
    args.rows, args.seeds = [r for r in args.rows.split(",") if r], [int(s) for s in args.seeds.split(",") if s]
    unknown = [r for r in args.rows if r not in rows]
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)}; rows: {', '.join(rows)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser, list(BY_KEY), ROOT / "runs" / "vllm-target")
    parser.add_argument("--method", default="recommended", choices=METHODS, help="our KV method")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parse_bench_args(build_parser(), argv, list(BY_KEY))
    started, code = datetime.datetime.now(datetime.timezone.utc), code_version("wkvq_core", "benchmarks")
    section("vllm target, emulated vLLM semantics", started, code,
            f"torch {torch.__version__}, transformers {transformers.__version__}, compressed-tensors "
            f"{importlib.metadata.version('compressed-tensors')}, Python {platform.python_version()}", run(args),
            args.write)

if __name__ == "__main__":
    main()
