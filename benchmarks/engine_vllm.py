"""Run a compressed-tensors export in vLLM and save every prompt token's logprob as json.

Runs in the engine's own venv (`bash scripts/install-vllm.sh` prints its python), not the project's; it imports
nothing from the project:

    $ENGINE_PY benchmarks/engine_vllm.py EXPORT_DIR ids.json out.json --dtype bfloat16 [--kv-cache-dtype auto]
    $ENGINE_PY benchmarks/engine_vllm.py EXPORT_DIR ids.json out.json --throughput 128   # GPU: decode speed
    $ENGINE_PY benchmarks/engine_vllm.py EXPORT_DIR ids.json out.json --transformers     # plain transformers, fp32

ids.json: a json list of windows (lists of token ids), each evaluated from an empty cache (the ids are used as
given: no BOS is added). out.json: {"logprobs": per window, the logprob of tokens 1..n-1, token i scored from
position i-1}, with the engine's versions, dtype, KV cache dtype and device. vLLM's int4_per_token_head KV cache
exists only in its GPU (Triton) attention: on CPU it runs without error and computes wrong numbers, so it is refused
here without CUDA. --throughput N instead generates N tokens greedily after each window (one batch) and reports the
generated tokens per second and the KV cache vLLM allotted, in blocks and tokens. --transformers instead loads the
export with `AutoModelForCausalLM.from_pretrained` and no other argument than the fp32 dtype (the loading the
export's README promises with these versions) and scores the windows with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

# vLLM's engine core in this process (no worker process to spawn), and a small CPU KV cache (GiB) unless set
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

KV_CACHE_DTYPES = ("auto", "int4_per_token_head")
GPU_ONLY_KV = {"int4_per_token_head"}


def vllm_logprobs(llm, windows: list[list[int]]) -> list[list[float]]:
    """Per window, the logprob vLLM gives each prompt token after the first."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    return [[out.prompt_logprobs[i][token].logprob for i, token in enumerate(w) if i > 0]
            for w, out in zip(windows, outputs)]


def throughput(llm, windows: list[list[int]], new_tokens: int) -> dict:
    """Greedy generation of `new_tokens` after each window, one batch (after a short warm-up): generated tokens per
    second, and the KV cache vLLM allotted (blocks x block size)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0)
    llm.generate([{"prompt_token_ids": w} for w in windows[:1]], SamplingParams(max_tokens=2), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = sum(len(out.outputs[0].token_ids) for out in outputs)
    cache = llm.llm_engine.vllm_config.cache_config
    return {"generated_tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds,
            "kv_cache_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
            "kv_cache_tokens": cache.num_gpu_blocks * cache.block_size,
            # vLLM's own figure (its log's "KV cache size"): whole blocks per request x max_model_len, so a bit less
            "kv_cache_size_tokens": cache.kv_cache_size_tokens}


def load_vllm(export: str, dtype: str, kv_cache_dtype: str, max_len: int):
    from vllm import LLM

    backend = {"attention_backend": "TRITON_ATTN"} if kv_cache_dtype in GPU_ONLY_KV else {}  # holds int4 KV
    return LLM(model=export, dtype=dtype, kv_cache_dtype=kv_cache_dtype, max_model_len=max_len, enforce_eager=True,
               enable_prefix_caching=False, seed=0, **backend)


@torch.no_grad()
def transformers_logprobs(export: str, windows: list[list[int]]) -> list[list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    result = []
    for w in windows:
        ids = torch.tensor([w])
        logprobs = model(ids).logits[0, :-1].double().log_softmax(-1)
        result.append(logprobs.gather(-1, ids[0, 1:, None])[:, 0].tolist())
    return result


def versions() -> dict:
    import compressed_tensors
    import transformers
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "compressed_tensors": compressed_tensors.__version__, "machine": platform.machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", help="the compressed-tensors export directory")
    parser.add_argument("ids", help="json file: a list of windows, each a list of token ids")
    parser.add_argument("out", help="where to write the json result")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                        help="vLLM's model dtype (its CPU 4-bit kernel has no float32)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--throughput", type=int, metavar="N", help="generate N tokens after each window instead")
    mode.add_argument("--transformers", action="store_true", help="score with plain transformers (fp32) instead")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.kv_cache_dtype in GPU_ONLY_KV and device != "cuda":
        parser.error(f"--kv-cache-dtype {args.kv_cache_dtype} needs CUDA: vLLM implements it only in its GPU "
                     "(Triton) attention, and on CPU it silently computes wrong results; use auto on CPU")
    if args.throughput is not None and args.throughput < 1:
        parser.error("--throughput must be at least 1")
    with open(args.ids) as f:
        windows = json.load(f)
    if not (isinstance(windows, list) and windows and all(
            isinstance(w, list) and len(w) > 1 and all(isinstance(i, int) for i in w) for w in windows)):
        parser.error(f"{args.ids}: expected a non-empty json list of windows, each a list of at least 2 token ids")
    result = {**versions(), "device": device, "windows": len(windows)}
    if args.transformers:
        result |= {"engine": "transformers", "dtype": "float32", "kv_cache_dtype": None,
                   "logprobs": transformers_logprobs(args.export, windows)}
    else:
        max_len = max(map(len, windows)) + (args.throughput or 1)
        llm = load_vllm(args.export, args.dtype, args.kv_cache_dtype, max_len)
        result |= {"engine": "vllm", "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype}
        if args.throughput:
            result |= throughput(llm, windows, args.throughput)
        else:
            result["logprobs"] = vllm_logprobs(llm, windows)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
