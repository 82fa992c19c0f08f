"""How calibration scales: compute efficiency on CPU, host memory against depth, and LLaMA-2-7B-shaped blocks on a GPU.

    python benchmarks/scale.py cpu-flops   [--baseline-checkout DIR]   # achieved FLOP/s vs fp32 matmul peak
    python benchmarks/scale.py host-memory [--baseline-checkout DIR]   # peak RSS of `wkvq quantize`, 8 vs 32 layers
    python benchmarks/scale.py gpu         [--smoke]                   # 7B-shaped blocks, fp32 and bf16 (CUDA)
    python benchmarks/scale.py block-seconds --blocks 7 --threads 1 [--baseline-checkout DIR]  # seconds per block

block-seconds: the steady seconds per block (whole CRR windows) of calibrations of the first `--blocks` layers of
SmolLM2-135M, paper and recommended at k = 5 and recommended at k = 2 and 1 in float32, and recommended at k = 2
under bfloat16 autocast (`--compute-dtype bfloat16`; only on a CPU with native bf16 matmuls), each in its own
process, alternated `--repeats` times with --baseline-checkout's paper and recommended (float32, its default; 1
thread by `--threads 1`).

cpu-flops: the first `--blocks` decoder layers of SmolLM2-135M (`wkvq fetch-model smollm2-135m`) are calibrated
(W4 LWC + KV4, nsamples x seqlen, 1 epoch, k = 5) once timed and once under `torch.utils.flop_counter.FlopCounterMode`
(the same work, counted); achieved = counted FLOPs / wall time. The peak is torch's fp32 matmul on the same linear
shapes (tokens = batch x seqlen), measured in the same process and threads. Rows: this checkout with the eager and
the sdpa POQ attention in float32, and eager under bfloat16 autocast; with --baseline-checkout the same measurement
also runs in a subprocess on another checkout (e.g. `git worktree add /tmp/before <commit>`), as that checkout
calibrates by default, and the speed-up column is relative to it.

host-memory: random-weight checkpoints of SmolLM2-135M's width (hidden 576, GQA 9:3, vocab 49152) with 8 and 32
decoder layers are saved as safetensors; `wkvq quantize` runs on each in a subprocess and its peak RSS
(the child's VmHWM) is reported, with the ratio 32-layer / 8-layer. Goal: <= 1.2.

gpu: LLaMA-2-7B shapes (hidden 4096, 32 heads, intermediate 11008) with random weights, the paper's setting
(nsamples 128 x seqlen 2048, 5 epochs, k = 5); `--blocks` (default 6) layers are built so that blocks 0 and 1
have full windows, block 1's wall time is the steady state and the 32-block run is extrapolated as
sum_i min(5, 32 - i) / 5 x t(block 1) + the first window's extra propagation. Peak device memory is read from
torch.cuda. Then the shipped tiny model is calibrated on CUDA and on CPU and the perplexities compared.
`--smoke` runs every part on tiny shapes (CPU when no GPU), to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from provenance import ROOT, code_version

TINY_MODEL = ROOT / "wkvq_core" / "assets" / "stories260k"
CALIB_TEXT = ROOT / "wkvq_core" / "assets" / "tinystories" / "calib.txt"
EVAL_TEXT = ROOT / "wkvq_core" / "assets" / "tinystories" / "eval.txt"
SMOLLM2_WIDTH = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 head_dim=128, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
GIB = 2**30


def _config(nsamples: int, seqlen: int, epochs: int, k: int = 5, group: int = 64, **calib):
    from wkvq_core.config import CalibConfig, WeightQuantConfig, WKVQuantConfig, kv_config

    return WKVQuantConfig(weight=WeightQuantConfig(group_size=group), kv=kv_config("paper"),
                          calib=CalibConfig(nsamples=nsamples, seqlen=seqlen, epochs=epochs, crr_k=k, **calib))


def _truncated(model_dir: Path, layers: int, out: Path) -> Path:
    """The first `layers` decoder layers of a model, saved as a checkpoint of its own."""
    from wkvq_core.model import load_model

    model, tokenizer = load_model(model_dir)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------- cpu-flops


def _matmul_peak(shapes: list[tuple[int, int, int]], repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of fp32 F.linear per (tokens, in, out) shape, best of `repeats`."""
    result = {}
    for tokens, n_in, n_out in shapes:
        x, w = torch.randn(tokens, n_in), torch.randn(n_out, n_in)
        F.linear(x, w)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            F.linear(x, w)
            best = min(best, time.perf_counter() - started)
        result[f"{tokens}x{n_in}->{n_out}"] = 2 * tokens * n_in * n_out / best / 1e9
    return result


def measure_cpu_flops(model_dir: Path, blocks: int, nsamples: int, seqlen: int, attention: str = "auto",
                      compute: str = "auto") -> dict:
    from wkvq_core.calib.data import calibration_samples, load_text, tokenize
    from wkvq_core.model import load_model
    from wkvq_core.pipeline import quantize_model_

    with tempfile.TemporaryDirectory() as tmp:
        source = _truncated(model_dir, blocks, Path(tmp) / "model")
        config = _config(nsamples, seqlen, epochs=1, **({} if attention == "auto" else {"attention": attention}),
                         **({} if compute == "auto" else {"compute_dtype": compute}))
        _, tokenizer = load_model(source)
        samples = calibration_samples(tokenize(tokenizer, load_text(str(CALIB_TEXT))), nsamples, seqlen, 0)
        model, _ = load_model(source)
        started = time.perf_counter()
        quantize_model_(model, config, samples)
        seconds = time.perf_counter() - started
        model, _ = load_model(source)
        with FlopCounterMode(display=False) as counter:
            quantize_model_(model, config, samples)
        flops = counter.get_total_flops()
    c = model.config
    tokens = config.calib.batch_size * seqlen
    kv = c.num_key_value_heads * c.head_dim
    peaks = _matmul_peak([(tokens, c.hidden_size, c.hidden_size), (tokens, c.hidden_size, kv),
                          (tokens, c.hidden_size, c.intermediate_size), (tokens, c.intermediate_size, c.hidden_size)])
    return {"seconds": seconds, "flops": flops, "achieved_gflops": flops / seconds / 1e9,
            "peak_gflops": max(peaks.values()), "peaks": peaks, "threads": torch.get_num_threads()}


def _in_checkout(checkout: str | None, argv: list[str]) -> dict:
    """This script's measurement (JSON on stdout) run in a subprocess on `checkout`'s wkvq_core."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([checkout, str(ROOT / "benchmarks")]))
    done = subprocess.run([sys.executable, __file__, *argv, "--json"], env=env, capture_output=True, text=True,
                          cwd=checkout, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_flops(args) -> list[str]:
    from wkvq_core.model_zoo import fetch_model

    model_dir = fetch_model("smollm2-135m")
    measure = ["cpu-flops-measure", "--model-dir", str(model_dir), "--blocks", str(args.blocks),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    rows = [(f"this checkout, {attention} attention, {compute}",
             measure_cpu_flops(model_dir, args.blocks, args.nsamples, args.seqlen, attention, compute))
            for attention, compute in (("eager", "float32"), ("sdpa", "float32"), ("eager", "bfloat16"))]
    if args.baseline_checkout:
        rows.append((f"{args.baseline_checkout} ({_commit(args.baseline_checkout)}), its defaults",
                     _in_checkout(args.baseline_checkout, measure)))
    baseline = rows[-1][1]["seconds"]
    lines = [f"SmolLM2-135M, first {args.blocks} blocks, W4 g64 LWC + KV4 (paper), {args.nsamples} x {args.seqlen}, "
             f"1 epoch, k = 5, {torch.get_num_threads()} threads; bfloat16: autocast", "",
             "| code | wall s | speed-up vs the last row | counted TFLOP | achieved GFLOP/s | "
             "fp32 matmul peak GFLOP/s | achieved / fp32 peak |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['seconds']:.1f} | {baseline / r['seconds']:.2f}x | {r['flops'] / 1e12:.2f} | "
                     f"{r['achieved_gflops']:.1f} | {r['peak_gflops']:.1f} | "
                     f"{r['achieved_gflops'] / r['peak_gflops']:.0%} |")
    lines += ["", "matmul peak per shape (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in rows[0][1]["peaks"].items())]
    return lines


# ------------------------------------------------------------------------------------------- block-seconds

BLOCK_CONFIGS = (("paper", 5, "float32"), ("recommended", 5, "float32"), ("recommended", 2, "float32"),
                 ("recommended", 1, "float32"), ("recommended", 2, "bfloat16"))  # (method, CRR k, compute dtype)
BASELINE_CONFIGS = BLOCK_CONFIGS[:2]  # what an older checkout can run


def measure_block_seconds(model_dir: Path, blocks: int, nsamples: int, seqlen: int, epochs: int, method: str,
                          k: int, compute: str) -> dict:
    """Seconds of each block of a calibration of the first `blocks` layers (method's weight and KV options, W4 g64 +
    KV4, CRR k, compute dtype), with whichever wkvq_core is on the path (an older one may lack `weight_config`:
    paper weights)."""
    import wkvq_core.config as C
    from wkvq_core.calib.data import calibration_samples, load_text, tokenize
    from wkvq_core.calib.progress import CalibrationCallbacks
    from wkvq_core.model import load_model
    from wkvq_core.pipeline import quantize_model_

    with tempfile.TemporaryDirectory() as tmp:
        source = _truncated(model_dir, blocks, Path(tmp) / "model")
        model, tokenizer = load_model(source)
    weight = (C.weight_config(method, group_size=64) if hasattr(C, "weight_config")
              else C.WeightQuantConfig(group_size=64))
    config = C.WKVQuantConfig(weight=weight, kv=C.kv_config(method),
                              calib=C.CalibConfig(nsamples=nsamples, seqlen=seqlen, epochs=epochs, crr_k=k,
                                                    compute_dtype=compute))
    samples = calibration_samples(tokenize(tokenizer, load_text(str(ROOT / "benchmarks" / "data" / "wikitext2" /
                                                                    "wiki.valid.tokens"))), nsamples, seqlen, 0)
    seconds = {}
    on_event = lambda e: seconds.update({e.block: e.seconds}) if e.kind.value == "block_end" else None  # noqa: E731
    quantize_model_(model, config, samples, callbacks=CalibrationCallbacks(on_event=on_event))
    return {"blocks": [seconds[i] for i in sorted(seconds)]}


def block_seconds(args) -> list[str]:
    """Steady-state seconds per block (blocks 1..blocks-5: whole 5-block windows after the first block), each
    configuration in its own process, this checkout and --baseline-checkout alternated --repeats times."""
    from wkvq_core.calib.calibrate import native_cpu_bf16
    from wkvq_core.model_zoo import fetch_model

    model_dir = fetch_model("smollm2-135m")
    configs = [c for c in BLOCK_CONFIGS if c[2] == "float32" or native_cpu_bf16()]  # emulated bf16: 17x slower
    runs = [(ROOT, *config) for config in configs]
    if args.baseline_checkout:
        runs = [(Path(args.baseline_checkout), *config) for config in BASELINE_CONFIGS] + runs
    measured: dict[tuple, list[float]] = {}
    for _ in range(args.repeats):
        for checkout, method, k, compute in runs:
            argv = ["block-seconds-measure", "--model-dir", str(model_dir), "--blocks", str(args.blocks),
                    "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--epochs", str(args.epochs),
                    "--method", method, "--crr-k", str(k), "--compute-dtype", compute, "--threads", str(args.threads)]
            blocks = _in_checkout(str(checkout), argv)["blocks"]
            steady = blocks[1: max(2, args.blocks - 4)]
            measured.setdefault((str(checkout), method, k, compute), []).append(sum(steady) / len(steady))
    base = (str(args.baseline_checkout or ROOT), "recommended", 5, "float32")
    reference = sum(measured[base]) / len(measured[base])
    lines = [f"SmolLM2-135M, first {args.blocks} blocks, W4 g64 + KV4, {args.nsamples} x {args.seqlen} x "
             f"{args.epochs} epochs, {args.threads} thread(s); seconds of blocks 1-{max(1, args.blocks - 5)} "
             f"(whole windows), mean over {args.repeats} alternated runs", "",
             f"| code | method | CRR k | compute | s per block | runs | speed-up vs {_commit(base[0])} recommended, k = 5 |",
             "|---|---|---:|---|---:|---|---:|"]
    for (checkout, method, k, compute), values in measured.items():
        mean = sum(values) / len(values)
        lines.append(f"| {_commit(checkout)} | {method} | {k} | {compute} | {mean:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in values)} | {reference / mean:.2f}x |")
    return lines


def _commit(checkout: str) -> str:
    return subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"


# --------------------------------------------------------------------------------------------- host-memory


def synthetic_checkpoint(out: Path, layers: int, tokenizer_dir: Path, dtype=torch.bfloat16) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, **SMOLLM2_WIDTH)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


# The child reports its own high-water mark (VmHWM): ru_maxrss of a child also counts the pages of the parent it
# was forked from, which here holds the synthetic models.
REPORT_PEAK = "import atexit, sys; atexit.register(lambda: print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)); "


def peak_rss(code: str, args: list[str], env: dict | None = None, cwd: str | None = None) -> tuple[int, float]:
    """(peak RSS bytes, seconds) of `python -c code args` in a subprocess."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", REPORT_PEAK + code, *args], env=env, cwd=cwd, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} failed: {done.stderr[-2000:]}")
    return int(done.stderr.strip().splitlines()[-1].split()[1]) * 1024, time.perf_counter() - started


def _host_estimate(source: Path, args, eval_chars: int) -> int:
    """`wkvq_core.calib.estimate`'s peak host memory for the job host-memory runs."""
    from wkvq_core.calib.estimate import estimate_resources, eval_windows_for_chars

    model_config = json.loads((source / "config.json").read_text())
    windows = eval_windows_for_chars(eval_chars, args.seqlen)
    return estimate_resources(model_config, _config(args.nsamples, args.seqlen, args.epochs), eval_windows=windows,
                              device="cpu").peak_host_bytes


def host_memory(args) -> list[str]:
    from wkvq_core.model_zoo import fetch_model

    checkouts = [("this checkout", str(ROOT))]
    if args.baseline_checkout:
        checkouts.append((f"{args.baseline_checkout} ({_commit(args.baseline_checkout)})", args.baseline_checkout))
    lines = [f"Random-weight bf16 checkpoints of SmolLM2-135M's width; `wkvq quantize` W4 g64 LWC + KV4 (paper), "
             f"{args.nsamples} x {args.seqlen}, {args.epochs} epoch(s), k = 5, eval on {args.eval_chars} chars, CPU", "",
             "| code | layers | checkpoint MB | peak RSS MiB | estimated peak host MiB | wall s |",
             "|---|---:|---:|---:|---:|---:|"]
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        eval_text = Path(tmp) / "eval.txt"
        eval_text.write_text(EVAL_TEXT.read_text(encoding="utf-8")[: args.eval_chars], encoding="utf-8")
        sources = {n: synthetic_checkpoint(Path(tmp) / f"l{n}", n, fetch_model("smollm2-135m")) for n in (8, 32)}
        for name, checkout in checkouts:
            peaks = {}
            for n, source in sources.items():
                command = ["quantize", "--model", str(source), "--calib", str(CALIB_TEXT), "--eval", str(eval_text),
                           "--out", str(Path(tmp) / f"out-{n}"), "--nsamples", str(args.nsamples),
                           "--seqlen", str(args.seqlen), "--epochs", str(args.epochs), "--group-size", "64",
                           "--method", "paper", "--device", "cpu", "--json"]
                env = dict(os.environ, PYTHONPATH=checkout, OMP_NUM_THREADS=str(torch.get_num_threads()))
                peaks[n], seconds = peak_rss("from wkvq_core.cli import main; main()", command, env=env, cwd=checkout)
                size = sum(p.stat().st_size for p in source.glob("*.safetensors")) / 1e6
                estimated = _host_estimate(source, args, len(eval_text.read_text(encoding="utf-8"))) if checkout == str(ROOT) else None
                lines.append(f"| {name} | {n} | {size:.0f} | {peaks[n] / 2**20:.0f} | "
                             f"{'-' if estimated is None else f'{estimated / 2**20:.0f}'} | {seconds:.0f} |")
            ratios.append((name, peaks[32] / peaks[8]))
    lines += [""] + [f"{name}: 32-layer / 8-layer peak RSS = {ratio:.2f} (goal <= 1.2)" for name, ratio in ratios]
    return lines


# ------------------------------------------------------------------------------------------------------ gpu


def _random_model(shape: dict, layers: int, device: str):
    from accelerate import init_empty_weights

    config = LlamaConfig(num_hidden_layers=layers, **shape)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # to_empty wiped its buffers
    return model.eval()


def gpu_blocks(shape: dict, layers: int, nsamples: int, seqlen: int, epochs: int, compute: str, device: str) -> dict:
    from wkvq_core.calib.calibrate import calibrate_
    from wkvq_core.calib.progress import CalibrationCallbacks, EventKind
    from wkvq_core.errors import CalibrationCancelled
    from wkvq_core.model import prepare_model_

    config = _config(nsamples, seqlen, epochs, group=128, compute_dtype=compute, cache_dtype="bfloat16")
    model = _random_model(shape, layers, device)
    prepare_model_(model, config)
    samples = torch.randint(0, shape["vocab_size"], (nsamples, seqlen))
    times, started, stop = {}, {}, []

    def on_event(event):
        if event.kind == EventKind.BLOCK_START:
            started[event.block] = time.perf_counter()
        if event.kind == EventKind.BLOCK_END:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[event.block] = time.perf_counter() - started[event.block]
            stop.append(event.block >= 1)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        calibrate_(model, config, samples, device=device, callbacks=CalibrationCallbacks(
            on_event=on_event, should_cancel=lambda: bool(stop) and stop[-1]))
    except CalibrationCancelled:
        pass
    n, k = 32, config.calib.crr_k
    factor = sum(min(k, n - i) for i in range(n)) / k
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    from wkvq_core.calib.estimate import estimate_resources

    full = LlamaConfig(num_hidden_layers=n, **shape).to_dict()
    estimate = estimate_resources(full, config, device="h200" if device.startswith("cuda") else "cpu")
    return {"block_seconds": times, "extrapolated_32_blocks_s": factor * times[1] + (times[0] - times[1]),
            "peak_device_bytes": peak, "estimated_device_bytes": estimate.peak_device_bytes,
            "estimated_seconds": estimate.seconds}


def tiny_cuda_vs_cpu(device: str) -> dict:
    from wkvq_core.pipeline import QuantizeJob, run_quantize_job

    ppl = {}
    with tempfile.TemporaryDirectory() as tmp:
        eval_text = Path(tmp) / "eval.txt"
        eval_text.write_text(EVAL_TEXT.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
        for dev in ("cpu", device):
            config = _config(16, 256, 2, group=-1, compute_dtype="float32", cache_dtype="float32", attention="eager")
            job = QuantizeJob(model=str(TINY_MODEL), calib=str(CALIB_TEXT), out=Path(tmp) / dev, config=config,
                              eval=str(eval_text), device=dev)
            ppl[dev] = run_quantize_job(job)["eval"]["ppl"]
    return ppl


def gpu(args) -> list[str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        return ["not run: no CUDA device on this machine (use --smoke to check the script on CPU)"]
    shape = dict(LLAMA2_7B)
    nsamples, seqlen, epochs = args.nsamples, args.seqlen, args.epochs
    if args.smoke:
        shape.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                     head_dim=64, vocab_size=1024)
        nsamples, seqlen, epochs = 4, 128, 1
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    lines = [f"LLaMA-2-7B-shaped blocks{' (smoke: tiny shapes)' if args.smoke else ''}, random weights, W4 g128 "
             f"LWC + KV4 (paper), {nsamples} x {seqlen}, {epochs} epochs, k = 5, on {name}", "",
             "| compute | block 0 s | block 1 s | extrapolated 32 blocks | estimated | peak device GiB | estimated GiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for compute in args.compute.split(","):
        r = gpu_blocks(shape, args.blocks, nsamples, seqlen, epochs, compute, device)
        lines.append(f"| {compute} | {r['block_seconds'][0]:.1f} | {r['block_seconds'][1]:.1f} | "
                     f"{r['extrapolated_32_blocks_s'] / 60:.1f} min | {r['estimated_seconds'] / 60:.1f} min | "
                     f"{r['peak_device_bytes'] / GIB:.1f} | {r['estimated_device_bytes'] / GIB:.1f} |")
        if device == "cuda":
            torch.cuda.empty_cache()
    if device == "cuda":
        ppl = tiny_cuda_vs_cpu(device)
        lines += ["", "stories260k, fp32, eager, 16 x 256, 2 epochs: "
                  + ", ".join(f"{m}: cpu {ppl['cpu'][m]:.4f} cuda {ppl['cuda'][m]:.4f}" for m in ppl["cpu"])]
    return lines


# ----------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["cpu-flops", "host-memory", "gpu", "block-seconds", "cpu-flops-measure",
                                         "block-seconds-measure"])
    parser.add_argument("--baseline-checkout", help="another checkout to measure side by side (cpu-flops, host-memory)")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--nsamples", type=int)
    parser.add_argument("--seqlen", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--eval-chars", type=int, default=4_000)
    parser.add_argument("--compute", default="float32,bfloat16", help="gpu: compute dtypes to time")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--model-dir")
    parser.add_argument("--repeats", type=int, default=2, help="block-seconds: alternated runs per configuration")
    parser.add_argument("--method", default="paper", help="block-seconds-measure")
    parser.add_argument("--crr-k", type=int, default=5, help="block-seconds-measure")
    parser.add_argument("--compute-dtype", default="float32", help="block-seconds-measure")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-write", dest="results", action="store_const", const=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    defaults = {"cpu-flops": (8, 256, 1), "cpu-flops-measure": (8, 256, 1), "host-memory": (8, 256, 1),
                "block-seconds": (8, 256, 2), "block-seconds-measure": (8, 256, 2), "gpu": (128, 2048, 5)}[args.part]
    args.nsamples, args.seqlen, args.epochs = (v if v is not None else d for v, d in
                                               zip((args.nsamples, args.seqlen, args.epochs), defaults))
    if args.part == "cpu-flops-measure":
        print(json.dumps(measure_cpu_flops(Path(args.model_dir), args.blocks, args.nsamples, args.seqlen)))  # as checked out
        return
    if args.part == "block-seconds-measure":
        print(json.dumps(measure_block_seconds(Path(args.model_dir), args.blocks, args.nsamples, args.seqlen,
                                               args.epochs, args.method, args.crr_k, args.compute_dtype)))
        return
    lines = {"cpu-flops": cpu_flops, "host-memory": host_memory, "gpu": gpu,
             "block-seconds": block_seconds}[args.part](args)
    header = [f"### scale.py {args.part} ({datetime.date.today().isoformat()})", "",
              f"`python {shlex.join(['benchmarks/scale.py', *sys.argv[1:]])}` on {platform.machine()}, "
              f"torch {torch.__version__}, transformers {transformers.__version__}, code "
              f"{code_version('wkvq_core', 'benchmarks/scale.py')}", ""]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if args.results and not args.smoke:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
