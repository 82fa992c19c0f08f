"""Real vLLM on a CUDA GPU (issue 27, Deliver 5): the original model and our vllm export, each served with
`--kv-cache-dtype int4_per_token_head` (Triton attention backend) and `auto`, in bf16: perplexity from vLLM's prompt
logprobs on benchmarks/vllm_target.py's windows beside our emulation of the same run, generation tokens/s, and the
KV cache's capacity in tokens.

Two steps, on two machines:

    # here (the project's venv): a bundle with the windows, our emulated perplexities and the models' files
    python benchmarks/vllm_gpu.py prepare runs/vllm-gpu-bundle
    # on the GPU machine, where `vllm` (CUDA) imports: one process per model and cache dtype; json + table
    python benchmarks/vllm_gpu.py run runs/vllm-gpu-bundle --out runs/vllm-gpu.json [--dry-run]

`run` imports nothing from this project (vLLM pins its own transformers and compressed-tensors): only vllm and the
bundle. `--dry-run` prints what it would run and needs neither vllm nor a GPU. Perplexity: each window one prompt,
tokens 1..n-1 scored (`SamplingParams(max_tokens=1, prompt_logprobs=0)`), as `wkvq eval` scores them. Tokens/s:
`--batch` prompts of `--prompt-tokens` tokens (the windows' first ones), `--new-tokens` greedy tokens each with EOS
ignored, generated tokens / wall seconds of `generate` after one warm-up. Capacity: the engine's
`cache_config.kv_cache_size_tokens` at `--gpu-memory-utilization`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

KV_DTYPES = ("auto", "int4_per_token_head")
ATTENTION_BACKEND = "TRITON_ATTN"  # the backend that holds int4_per_token_head
ENGINE_OPTIONS = ("--gpu-memory-utilization", "--max-model-len", "--batch", "--prompt-tokens", "--new-tokens")
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

def engine_kwargs(model_dir: Path, kv_dtype: str, args) -> dict:
    """`LLM(**kwargs)`: what `vllm serve MODEL --dtype bfloat16 --kv-cache-dtype KV [--attention-backend
    TRITON_ATTN]` sets, with the context the windows need."""
    kwargs = dict(model=str(model_dir), dtype="bfloat16", kv_cache_dtype=kv_dtype, max_model_len=args.max_model_len,
                  gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager, seed=0)
    if kv_dtype != "auto":
        kwargs["attention_backend"] = ATTENTION_BACKEND
    return kwargs


def window_nll(prompt_logprobs: list, window: list[int]) -> tuple[float, int]:
    """(sum of -logprob of tokens 1..n-1, n-1) from one prompt's `prompt_logprobs` (entry 0 is None)."""
    return -sum(step[token].logprob for step, token in zip(prompt_logprobs[1:], window[1:])), len(window) - 1


def measure(model_dir: Path, kv_dtype: str, windows: list[list[int]], args) -> dict:
    """One engine: perplexity, tokens/s and KV capacity (run in its own process: vLLM frees GPU memory on exit)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**engine_kwargs(model_dir, kv_dtype, args))
    cache = llm.llm_engine.vllm_config.cache_config
    scored = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows],
                          SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll, tokens = map(sum, zip(*(window_nll(out.prompt_logprobs, w) for out, w in zip(scored, windows))))
    prompts = [TokensPrompt(prompt_token_ids=windows[i % len(windows)][: args.prompt_tokens])
               for i in range(args.batch)]
    greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], greedy, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    seconds = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"ppl": math.exp(nll / tokens), "scored_tokens": tokens, "tokens_per_s": generated / seconds,
            "kv_cache_tokens": cache.kv_cache_size_tokens, "num_gpu_blocks": cache.num_gpu_blocks,
            "block_size": cache.block_size}


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
    jobs = [(name, dtype) for name in emulated for dtype in KV_DTYPES]
    if args.dry_run:
        for name, dtype in jobs:
            kwargs = engine_kwargs(bundle / "models" / name, dtype, args)
            print(f"{name} {dtype}: LLM({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}); ppl over "
                  f"{len(windows)} windows × {len(windows[0])} tokens (emulated {emulated[name][dtype]:.3f}); "
                  f"{args.batch} × {args.new_tokens} new tokens")
        return
    check_engine()
    results: dict = {}
    for name, dtype in jobs:
        child = subprocess.run([sys.executable, __file__, "one", str(bundle), name, dtype, *args.engine_argv],
                               capture_output=True, text=True, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
        if child.returncode:
            sys.exit(f"{name} {dtype}: vLLM failed:\n{child.stderr[-3000:]}")
        results.setdefault(name, {})[dtype] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"  {name} {dtype}: {results[name][dtype]}", file=sys.stderr, flush=True)
    import vllm

    Path(args.out).write_text(json.dumps({"vllm": vllm.__version__, "args": vars(args), "results": results,
                                          "emulated": emulated}, indent=1, default=str))
    print(table(results, emulated))


def one(args) -> None:
    windows = json.loads((Path(args.bundle) / "windows.json").read_text())
    print(json.dumps(measure(Path(args.bundle) / "models" / args.name, args.kv_dtype, windows, args)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    prep = steps.add_parser("prepare", help="write the bundle (here: the project's venv)")
    prep.add_argument("bundle")
    prep.add_argument("target_args", nargs=argparse.REMAINDER, help="vllm_target.py's settings of the rows")
    engine = argparse.ArgumentParser(add_help=False)
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    engine.add_argument("--max-model-len", type=int, default=2048)
    engine.add_argument("--batch", type=int, default=64, help="prompts generated at once (tokens/s)")
    engine.add_argument("--prompt-tokens", type=int, default=128)
    engine.add_argument("--new-tokens", type=int, default=256)
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compilation (vLLM CPU: needed)")
    go = steps.add_parser("run", parents=[engine], help="measure in vLLM (the GPU machine)")
    go.add_argument("bundle")
    go.add_argument("--out", default="vllm-gpu.json")
    go.add_argument("--dry-run", action="store_true", help="print the engines it would start; needs no vllm")
    single = steps.add_parser("one", parents=[engine], help="(internal) one engine, json on stdout")
    for name in ("bundle", "name", "kv_dtype"):
        single.add_argument(name)
    args = parser.parse_args(argv)
    if args.step == "run":  # the engine options, passed on to each engine's process
        args.engine_argv = [a for opt in ENGINE_OPTIONS for a in (opt, str(getattr(args, opt[2:].replace("-", "_"))))]
        args.engine_argv += ["--enforce-eager"] if args.enforce_eager else []
    {"prepare": prepare, "run": run, "one": one}[args.step](args)


if __name__ == "__main__":
    main()
