"""Perplexity of WKVQuant against its baselines and ablations, all from one run on the same eval windows.

    python benchmarks/quality.py              # shipped stories260k (+ larger ../shared/fixtures models if any)
    python benchmarks/quality.py --quick --no-write

Rows: FP; W4 RTN; W4 LWC (OmniQuant: k=1, MSE); W4KV4 RTN; W4A4 RTN; W4KV4 WKVQuant (LWC, 2D smoothing, POQ,
CRR k=5 MAE) and WKVQuant without POQ / 2D smoothing / CRR. Each row is scored with the decode-exact perplexity
mode it quantizes (FP, W or WKV). Weights use one group per output row (-1): the shipped model's intermediate
size 172 has no useful divisor. Prints a markdown table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers

from wkvq_core.calibrate import CalibrationReport
from wkvq_core.config import CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.data import calibration_samples, eval_windows, load_text, tokenize
from wkvq_core.evaluate import EvalMode, kv_bytes_per_token, perplexity
from wkvq_core.model import attentions, load_model
from wkvq_core.pipeline import quantize_model_

from provenance import ROOT, code_version, shown

ASSETS = ROOT / "wkvq_core" / "assets"
SHIPPED_MODEL = ASSETS / "stories260k"
FIXTURES = ROOT.parent / "shared" / "fixtures"
FP = 16


@dataclass(frozen=True)
class Row:
    name: str
    config: WKVQuantConfig | None  # None: the original model
    mode: EvalMode
    poq_at_eval: bool | None = None  # override the calibrated model's POQ switch for evaluation


@dataclass(frozen=True)
class Result:
    row: Row
    ppl: float
    kv_bytes: float
    report: CalibrationReport | None


def default_models() -> list[str]:
    """The shipped model plus any other model directory under ../shared/fixtures/."""
    extra = sorted(p for p in FIXTURES.glob("*/config.json") if p.parent.name != SHIPPED_MODEL.name)
    return [str(SHIPPED_MODEL), *(str(p.parent) for p in extra)]


def benchmark_rows(calib: CalibConfig) -> list[Row]:
    def cfg(*, lwc=True, kv=4, smoothing=True, poq=True, act_bits=FP, **calib_changes) -> WKVQuantConfig:
        return WKVQuantConfig(
            weight=WeightQuantConfig(bits=4, group_size=-1, lwc=lwc),
            kv=KVQuantConfig(bits=kv, smoothing=smoothing, poq=poq),
            calib=replace(calib, **calib_changes),
            act_bits=act_bits,
        )

    rtn = dict(lwc=False, smoothing=False, epochs=0)
    omniquant = dict(crr_k=1, loss="mse")
    return [
        Row("FP", None, EvalMode.FP),
        Row("W4 RTN", cfg(kv=FP, **rtn), EvalMode.W),
        Row("W4 LWC (OmniQuant)", cfg(kv=FP, **omniquant), EvalMode.W),
        Row("W4KV4 RTN", cfg(**rtn), EvalMode.WKV),
        Row("W4A4 RTN", cfg(kv=FP, act_bits=4, **rtn), EvalMode.W),
        Row("W4KV4 WKVQuant", cfg(crr_k=5, loss="mae"), EvalMode.WKV),
        Row("WKVQuant w/o POQ", cfg(poq=False), EvalMode.WKV),
        Row("WKVQuant, POQ at eval only", cfg(poq=False), EvalMode.WKV, poq_at_eval=True),
        Row("WKVQuant w/o 2D smoothing", cfg(smoothing=False), EvalMode.WKV),
        Row("WKVQuant w/o CRR (k=1, MSE)", cfg(**omniquant), EvalMode.WKV),
    ]


def reset_peak_rss() -> bool:
    """On CPU `calibrate_` reports the process's max RSS; reset that high-water mark so it covers one row only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_row(fp_model, row: Row, samples: torch.Tensor, windows: torch.Tensor, device: str) -> Result:
    model, report = copy.deepcopy(fp_model), None
    if row.config is not None:
        if device == "cpu":
            reset_peak_rss()
        report = quantize_model_(model, row.config, samples, device=device)
    kv = row.config.kv if row.config else KVQuantConfig(bits=FP)
    if row.poq_at_eval is not None:
        for attn in attentions(model):
            attn.poq = row.poq_at_eval
    ppl = perplexity(model, windows, row.mode, device=device).ppl
    return Result(row, ppl, kv_bytes_per_token(model.config, kv), report)


def bits_label(config: WKVQuantConfig | None) -> str:
    w, a, kv = (FP, FP, FP) if config is None else (config.weight.bits, config.act_bits, config.kv.bits)
    return f"W{w}A{a}KV{kv}"


def table(results: list[Result]) -> str:
    fp = results[0].ppl
    lines = [
        "| method | bits | eval mode | ppl | Δppl vs FP | KV bytes/token | calib time (s) | calib peak mem (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rep = r.report
        calib = ("—", "—") if rep is None else (f"{rep.seconds:.1f}", f"{rep.peak_memory_bytes / 2**20:.0f}")
        delta = f"{r.ppl - fp:+.3f} ({(r.ppl / fp - 1) * 100:+.1f}%)"
        lines.append(
            f"| {r.row.name} | {bits_label(r.row.config)} | {r.row.mode.value} | {r.ppl:.3f} | {delta} "
            f"| {r.kv_bytes:g} | {calib[0]} | {calib[1]} |"
        )
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def target_checks(results: list[Result]) -> list[str]:
    ppl = {r.row.name: r.ppl for r in results}
    rep = {r.row.name: r.report for r in results}
    fp, lwc, wkvq = ppl["FP"], ppl["W4 LWC (OmniQuant)"], ppl["W4KV4 WKVQuant"]
    rtn_kv, w4a4 = ppl["W4KV4 RTN"], ppl["W4A4 RTN"]
    k5, k1 = rep["W4KV4 WKVQuant"], rep["WKVQuant w/o CRR (k=1, MSE)"]
    return [
        f"- {verdict(wkvq - fp <= 1.15 * (lwc - fp))}: Δppl W4KV4 WKVQuant {wkvq - fp:+.3f} ≤ 1.15 × Δppl W4 LWC "
        f"(1.15 × {lwc - fp:+.3f} = {1.15 * (lwc - fp):+.3f})",
        f"- {verdict(wkvq < rtn_kv and wkvq < w4a4)}: ppl W4KV4 WKVQuant {wkvq:.3f} < W4KV4 RTN {rtn_kv:.3f} "
        f"and < W4A4 RTN {w4a4:.3f}",
        f"- CRR k=5 vs k=1 (WKVQuant vs w/o CRR): calibration {k5.seconds:.1f} s vs {k1.seconds:.1f} s "
        f"(×{k5.seconds / k1.seconds:.2f}), peak memory {k5.peak_memory_bytes / 2**20:.0f} MiB vs "
        f"{k1.peak_memory_bytes / 2**20:.0f} MiB (×{k5.peak_memory_bytes / k1.peak_memory_bytes:.2f})",
    ]


def benchmark_model(source: str, args: argparse.Namespace, calib: CalibConfig) -> str:
    fp_model, tokenizer = load_model(source)
    samples = calibration_samples(tokenize(tokenizer, load_text(args.calib)), calib.nsamples, calib.seqlen, calib.seed)
    windows = eval_windows(tokenize(tokenizer, load_text(args.eval)), calib.seqlen)
    results = []
    for row in benchmark_rows(calib):
        results.append(run_row(fp_model, row, samples, windows, args.device))
        print(f"  {row.name}: ppl {results[-1].ppl:.3f}", file=sys.stderr, flush=True)
    cfg = fp_model.config
    n_params = sum(p.numel() for p in fp_model.parameters())
    return "\n".join([
        f"### `{shown(source)}`: {n_params / 1e6:.2f}M params, {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}, {windows.shape[0]} eval windows × {calib.seqlen} tokens",
        "",
        table(results),
        "",
        *target_checks(results),
    ])


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """Texts, calibration size and seed; peers.py takes the same, so that its rows are comparable to these."""
    parser.add_argument("--calib", default=str(ASSETS / "tinystories" / "calib.txt"))
    parser.add_argument("--eval", default=str(ASSETS / "tinystories" / "eval.txt"))
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="model directory (repeatable); default: shipped + fixtures")
    add_calibration_args(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")
    parser.add_argument("--quick", action="store_true", help="smoke test: nsamples 16, epochs 1")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-write", dest="results", action="store_const", const=None, help="do not append results")
    args = parser.parse_args(argv)
    if args.quick:
        args.nsamples, args.epochs = 16, 1
    args.model = args.model or default_models()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    calib = CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen, epochs=args.epochs, seed=args.seed)
    started, code = datetime.datetime.now(datetime.timezone.utc), code_version("wkvq_core")
    per_row_rss = args.device == "cpu" and reset_peak_rss()
    sections = []
    for source in args.model:
        print(f"benchmarking {source}", file=sys.stderr, flush=True)
        sections.append(benchmark_model(source, args, calib))
    minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
    memory_note = (
        "max RSS of the process during that row's calibration (high-water mark reset before each row)"
        if per_row_rss
        else "as reported by calibrate_ (on CPU: the process's max RSS so far)"
    )
    settings = "\n".join([
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- date (UTC): {started:%Y-%m-%d %H:%M}; total runtime {minutes:.1f} min; code {code}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
        f"device {args.device}, torch threads {torch.get_num_threads()}",
        f"- settings: nsamples {calib.nsamples}, seqlen {calib.seqlen}, epochs {calib.epochs}, seed {calib.seed}, "
        f"batch 1; W4 asymmetric, one group per output row; KV4 per token and KV head (head_dim group)",
        "- rows: RTN = no LWC, no smoothing, epochs 0 (W4KV4 RTN keeps POQ); OmniQuant and w/o CRR = CRR k 1, MSE; "
        "WKVQuant = LWC + 2D smoothing + POQ + CRR k 5, MAE; \"POQ at eval only\" = the w/o POQ calibration, "
        "evaluated with POQ",
        f"- calibration text `{shown(args.calib)}`, eval text `{shown(args.eval)}`",
        f"- peak memory: {memory_note}",
    ])
    body = "\n\n".join([settings, *sections])
    section = f"## Quality run {started:%Y-%m-%d %H:%M} UTC{' (quick)' if args.quick else ''}\n\n{body}\n"
    print(section)
    if args.results:
        path = Path(args.results)
        header = "" if path.exists() else "# Quality benchmarks (`benchmarks/quality.py`)\n\n"
        with path.open("a", encoding="utf-8") as fh:
            fh.write(header + section + "\n")


if __name__ == "__main__":
    main()
