"""Real vLLM on a CUDA GPU (issue 27, Deliver 5): the original model and our vllm export, each served in bf16 with
`--kv-cache-dtype int4_per_token_head` and `auto`: perplexity from vLLM's prompt logprobs on
benchmarks/vllm_target.py's windows beside our emulation of the same run, generation tokens/s, and the KV cache's
capacity in tokens.

Two steps, on two machines:

    # here (the project's venv): a bundle with the windows, our emulated perplexities and the models' files
    python benchmarks/vllm_gpu.py prepare runs/vllm-gpu-bundle
    # on the GPU machine, with the python where `vllm` (CUDA) imports: json + table
    python benchmarks/vllm_gpu.py run runs/vllm-gpu-bundle --out runs/vllm-gpu.json [--dry-run]

`run` imports nothing from this project: per model and cache dtype it runs benchmarks/engine_vllm.py (same python)
twice, for the windows' prompt logprobs (tokens 1..n-1 of each window from an empty cache, as `wkvq eval` scores
them) and with --throughput (`--batch` prompts of `--prompt-tokens` tokens, the windows' first ones, `--new-tokens`
greedy tokens each: generated tokens / seconds, and the KV cache vLLM allotted, blocks × block size).
`--dry-run` prints those commands and needs neither vllm nor a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

KV_DTYPES = ("auto", "int4_per_token_head")
ENGINE = Path(__file__).resolve().parent / "engine_vllm.py"  # runs in vLLM's python, imports nothing of ours
MODELS = {"fp": "original (bf16)", "ours": "ours W4 + KV4 calibrated (vllm target, seed 0)"}


# --- prepare (here, the project's venv) --------------------------------------------------------------------------

def prepare(args) -> None:
    """The bundle: windows.json (token ids), emulated.json (model -> KV dtype -> our emulated ppl, from
    vllm_target.py's records) and models/<name>/ (the original model; our seed-0 vllm export)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vllm_target import BY_KEY, Bench, build_parser

    target_args = build_parser().parse_args(args.target_args)
    target_args.rows, target_args.seeds = [], [0]
    bench = Bench(target_args)
    bundle = Path(args.bundle)
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    (bundle / "windows.json").write_text(json.dumps(bench.windows.tolist()))
    sources = {"fp": bench.model_dir, "ours": bench.work / "ours-s0-export"}
    emulated = {}
    for name, source in sources.items():
        record = bench.record_path(BY_KEY[name], None if name == "fp" else 0)
        if not record.exists() or not source.exists():
            sys.exit(f"{name}: no {record.name} / {source.name} in {bench.work}: run benchmarks/vllm_target.py first")
        emulated[name] = json.loads(record.read_text())["ppl"]
        shutil.copytree(source, bundle / "models" / name, dirs_exist_ok=True)
    (bundle / "emulated.json").write_text(json.dumps(emulated, indent=1))
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    print(f"bundle {bundle}: {len(emulated)} models, {len(bench.windows)} windows, {size / 2**20:.0f} MiB")


# --- run (the GPU machine, vLLM's environment) --------------------------------------------------------------------

def engine_commands(bundle: Path, name: str, kv_dtype: str, args) -> dict[str, list[str]]:
    """benchmarks/engine_vllm.py's two runs of one model and cache dtype (bf16): the windows' prompt logprobs, and
    --throughput on the batch of prompts; each writes `<bundle>/out/<name>-<kv_dtype>-<run>.json`."""
    model, out = bundle / "models" / name, bundle / "out" / f"{name}-{kv_dtype}"
    common = ["--dtype", "bfloat16", "--kv-cache-dtype", kv_dtype]
    return {"ppl": [sys.executable, str(ENGINE), str(model), str(bundle / "windows.json"), f"{out}-ppl.json", *common],
            "throughput": [sys.executable, str(ENGINE), str(model), str(bundle / "prompts.json"),
                           f"{out}-throughput.json", *common, "--throughput", str(args.new_tokens)]}


def perplexity(logprobs: list[list[float]]) -> tuple[float, int]:
    """(perplexity, scored tokens) of engine_vllm.py's per-window logprobs."""
    scored = [lp for window in logprobs for lp in window]
    return math.exp(-sum(scored) / len(scored)), len(scored)


def check_engine() -> None:
    """One line and exit 1 when vLLM or CUDA is missing."""
    try:
        import torch
        import vllm
    except ImportError as exc:
        sys.exit(f"vllm is not importable here ({exc}): run this on a GPU machine with vllm (CUDA) installed")
    if not torch.cuda.is_available():
        sys.exit(f"no CUDA device: vllm {vllm.__version__} needs a GPU for int4_per_token_head (Triton backend)")


def table(results: dict, emulated: dict) -> str:
    lines = ["| model | KV cache | ppl (vLLM) | ppl (our emulation) | emulated / vLLM − 1 | tokens/s | KV capacity "
             "(tokens) | capacity vs auto |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, by_dtype in results.items():
        for dtype, r in by_dtype.items():
            emu, base = emulated.get(name, {}).get(dtype), by_dtype.get("auto", {}).get("kv_cache_tokens")
            ppl, capacity = r["ppl"], r["kv_cache_tokens"]
            lines.append(f"| {MODELS[name]} | {dtype} | {ppl:.3f} | {'—' if emu is None else f'{emu:.3f}'} | "
                         f"{'—' if emu is None else f'{(emu / ppl - 1) * 100:+.2f}%'} | {r['tokens_per_s']:.0f} | "
                         f"{capacity:,} | {'—' if not base else f'{capacity / base:.2f}×'} |")
    return "\n".join(lines)


def run(args) -> None:
    bundle = Path(args.bundle)
    missing = [p for p in ("windows.json", "emulated.json", "models") if not (bundle / p).exists()]
    if missing:
        sys.exit(f"{bundle}: no {', '.join(missing)}: make the bundle with `python benchmarks/vllm_gpu.py prepare`")
    windows, emulated = json.loads((bundle / "windows.json").read_text()), json.loads((bundle / "emulated.json").read_text())
    prompts = [windows[i % len(windows)][: args.prompt_tokens] for i in range(args.batch)]
    jobs = {(name, dtype): engine_commands(bundle, name, dtype, args) for name in emulated for dtype in KV_DTYPES}
    if args.dry_run:
        print(f"{len(windows)} windows × {len(windows[0])} tokens; throughput: {args.batch} prompts of "
              f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens each")
        for (name, dtype), commands in jobs.items():
            for what, command in commands.items():
                print(f"{name} {dtype} {what} (emulated ppl {emulated[name][dtype]:.3f}): {shlex.join(command)}")
        return
    check_engine()
    (bundle / "prompts.json").write_text(json.dumps(prompts))
    (bundle / "out").mkdir(exist_ok=True)
    results: dict = {}
    for (name, dtype), commands in jobs.items():
        measured = {}
        for what, command in commands.items():
            child = subprocess.run(command, capture_output=True, text=True)
            if child.returncode:
                sys.exit(f"{name} {dtype} {what}: vLLM failed:\n{child.stderr[-3000:]}")
            measured[what] = json.loads(Path(command[4]).read_text())
        ppl, tokens = perplexity(measured["ppl"]["logprobs"])
        results.setdefault(name, {})[dtype] = {"ppl": ppl, "scored_tokens": tokens} | {
            key: measured["throughput"][key] for key in ("tokens_per_s", "kv_cache_tokens", "kv_cache_size_tokens")}
        print(f"  {name} {dtype}: {results[name][dtype]}", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps({"versions": {k: measured["ppl"][k] for k in ("vllm", "torch", "device")},
                                          "args": vars(args), "results": results, "emulated": emulated}, indent=1))
    print(table(results, emulated))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    prep = steps.add_parser("prepare", help="write the bundle (here: the project's venv)")
    prep.add_argument("bundle")
    prep.add_argument("target_args", nargs=argparse.REMAINDER, help="vllm_target.py's settings of the rows")
    go = steps.add_parser("run", help="measure in vLLM (the GPU machine)")
    go.add_argument("bundle")
    go.add_argument("--out", default="vllm-gpu.json")
    go.add_argument("--batch", type=int, default=64, help="prompts generated at once (tokens/s)")
    go.add_argument("--prompt-tokens", type=int, default=128)
    go.add_argument("--new-tokens", type=int, default=256)
    go.add_argument("--dry-run", action="store_true", help="print the engine runs it would start; needs no vllm")
    args = parser.parse_args(argv)
    {"prepare": prepare, "run": run}[args.step](args)

if __name__ == "__main__":
    main()
