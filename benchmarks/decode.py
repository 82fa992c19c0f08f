"""CPU decode speed of SmolLM2-135M: our packed W4 + KV4 model and cache against transformers' DynamicCache with the
plain model in float16 and in float32.

    python benchmarks/decode.py                                  # contexts 512 2048 8192, batch 1 and 8
    python benchmarks/decode.py --contexts 512 --batches 1 --steps 2 --repeats 1   # smoke

Variants, all greedy, one token per sequence per step, no padding:
- `fp16`: the checkpoint's model in float16 (weights, activations and its DynamicCache), loaded the way a user
  loads it (`AutoModelForCausalLM.from_pretrained`: transformers' default attention, SDPA);
- `fp32`: the same in float32;
- `wkv4`: a W4 (groups of 64) KV4 artifact of it (round to nearest, the smoothing initialised from 8 WikiText
  windows; method `paper`, K after RoPE) loaded with `AutoModelForCausalLM.from_pretrained` (fp32 activations,
  `PackedLinear`) and its `WKVQuantCache`: every decode step reads the packed past directly.
The speed of a decode step depends on how many tokens each cache holds, not on what they are, so each cache is
filled with `context` tokens of random K/V through `Cache.update` (a real prefill of 8 x 8192 tokens takes tens of
minutes on two cores). Each measurement block runs `--steps` decode steps from that state and crops the cache back;
blocks of the variants alternate, `--repeats` times, in one process, and tokens/s is the median block. Correctness
is checked separately on real text: 32 greedy tokens of each variant's cache against its own model decoded without
any cache (a full forward per step). `cache` is what the cache holds at `context` tokens (the packed cache's
allocated bytes in brackets where the room of its last pages makes them differ); `RSS +` is the growth of this
process's resident memory when the variant's cache was filled (the process also holds the other variants).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import wkvq_core
from wkvq_core.calib.data import calibration_samples, load_text, tokenize
from wkvq_core.config import CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.evaluation.perplexity import greedy_without_cache
from wkvq_core.model import load_model, quant_state
from wkvq_core.model_zoo import fetch_model
from wkvq_core.pipeline import quantize_model_
from wkvq_core.runtime.cache_keyword import with_cache
from wkvq_core.runtime.kv_cache import WKVQuantCache

from provenance import ROOT, code_version

WIKITEXT = ROOT / "benchmarks" / "data" / "wikitext2"


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def packed_model(source: Path, tokenizer, workdir: str):
    model, _ = load_model(source)
    config = WKVQuantConfig(weight=WeightQuantConfig(bits=4, group_size=64, lwc=False), kv=KVQuantConfig(bits=4),
                            calib=CalibConfig(nsamples=8, seqlen=256, epochs=0))
    ids = tokenize(tokenizer, load_text(str(WIKITEXT / "wiki.valid.tokens"))[:200_000])
    quantize_model_(model, config, calibration_samples(ids, 8, 256, seed=0))
    wkvq_core.save_artifact(Path(workdir) / "w4kv4", model, tokenizer, config)
    return AutoModelForCausalLM.from_pretrained(Path(workdir) / "w4kv4", dtype=torch.float32).eval()


def filled_cache(model, batch: int, context: int):
    """A cache of `model`'s kind holding `context` tokens of random K/V per sequence and layer."""
    config = model.config
    n_kv, head_dim = config.num_key_value_heads, config.head_dim
    packed = getattr(config, "quantization_config", None)
    cache = WKVQuantCache(config) if packed else DynamicCache(config=config)
    generator = torch.Generator().manual_seed(0)
    for layer in range(config.num_hidden_layers):
        for start in range(0, context, 1024):  # bounded temporaries
            n = min(1024, context - start)
            k, v = (torch.randn(batch, n_kv, n, head_dim, generator=generator).to(model.dtype) for _ in range(2))
            cache.update(k, v, layer) if not packed else cache.layers[layer].update(k, v)
    return cache


def cache_bytes(cache) -> tuple[int, int]:
    if isinstance(cache, WKVQuantCache):
        return cache.nbytes(), cache.allocated_bytes()
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return held, held


@torch.no_grad()
def decode_block(model, cache, tokens: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` greedy decode steps from the cache's state; the cache is cropped back after."""
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(tokens, **with_cache(cache), use_cache=True).logits[:, -1]
        tokens = logits.argmax(-1, keepdim=True)
    elapsed = time.perf_counter() - start
    cache.crop(-steps)
    return elapsed


@torch.no_grad()
def matches_cache_free(model, tokenizer, packed: bool) -> bool:
    prompt = tokenize(tokenizer, load_text(str(WIKITEXT / "wiki.test.raw"))[:2000])[None, :64].long()
    cache = WKVQuantCache(model.config) if packed else DynamicCache(config=model.config)
    got = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                         eos_token_id=None, pad_token_id=0, **with_cache(cache))
    with quant_state(model, weights=True, kv=True):
        expected, _ = greedy_without_cache(model, prompt, 32)
    return torch.equal(got, expected)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=4, help="decode steps per measurement block")
    parser.add_argument("--repeats", type=int, default=3, help="blocks per variant, interleaved")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    source = fetch_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    fp16, fp32 = (AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
                  for dtype in (torch.float16, torch.float32))
    with tempfile.TemporaryDirectory() as workdir:
        models = {"fp16": fp16, "fp32": fp32, "wkv4": packed_model(source, tokenizer, workdir)}
    checks = {name: matches_cache_free(model, tokenizer, name == "wkv4") for name, model in models.items()}
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            caches, grown = {}, {}
            for name, model in models.items():
                gc.collect()  # what earlier steps freed is not counted against this cache
                before = rss_bytes()
                caches[name] = filled_cache(model, batch, context)
                grown[name] = rss_bytes() - before
            tokens = torch.randint(0, fp32.config.vocab_size, (batch, 1))
            seconds = {name: [] for name in models}
            for _ in range(args.repeats):
                for name, model in models.items():
                    seconds[name].append(decode_block(model, caches[name], tokens, args.steps))
            speed = {name: batch * args.steps / statistics.median(s) for name, s in seconds.items()}
            for name in models:
                held, allocated = cache_bytes(caches[name])
                rows.append((context, batch, name, speed[name], speed[name] / speed["fp16"],
                             speed[name] / speed["fp32"], held, allocated, grown[name]))
            del caches
    print(f"# decode.py, {datetime.date.today()}, code {code_version('wkvq_core', 'benchmarks')}")
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# command: python {shlex.join(['benchmarks/decode.py', *sys.argv[1:]])}")
    print("# greedy tokens equal to the cache-free reference (64-token prompt, 32 new): "
          + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in checks.items()))
    print("| context | batch | variant | tokens/s | vs fp16 | vs fp32 | cache MiB | RSS + MiB |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for context, batch, name, tps, r16, r32, held, allocated, grown in rows:
        room = f" ({allocated / 2**20:.0f})" if allocated != held else ""
        print(f"| {context} | {batch} | {name} | {tps:.1f} | {r16:.2f}x | {r32:.2f}x | {held / 2**20:.0f}{room} "
              f"| {grown / 2**20:.0f} |")


if __name__ == "__main__":
    main()
