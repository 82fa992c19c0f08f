"""Decode memory of LLaMA-shaped models, FP16 weights + FP16 KV versus W4 + KV4, and CPU decode throughput of the
tiny model with the packed KV cache versus the FP cache.

    python benchmarks/memory.py                      # 13b, 7b, llama3-8b at 2048 tokens, batch 1
    python benchmarks/memory.py --models 7b --layers-measured 1 --no-write

Weights: the model is built on the meta device; `--layers-measured` decoder layers are materialised on CPU one at a
time with random fp16 weights, their 7 linears quantized (W4, group 128) and packed as stored in an artifact
(`qweight` uint8, fp16 `scales` and `zeros`), and the real `nbytes` summed. All decoder layers of a LLaMA have the
same parameter shapes (checked on the meta model), so the measured per-layer bytes are multiplied by the layer count.
Embeddings, final norm and lm_head stay fp16 and are counted from their shapes. KV: bytes per token from
`kv_bytes_per_token`, cross-checked against a real `WKVQuantCache` (and an fp16 `DynamicCache`) filled through
`Cache.update` with seqlen tokens per layer. GB = 1e9 bytes.

Throughput: the tiny model is RTN-quantized to a W4KV4 artifact in a temporary directory and loaded with
`load_quantized`; `generate()` is timed with a `DynamicCache` and with a `WKVQuantCache`, interleaved, in one run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM

from wkvq_core.calib.data import calibration_samples, load_text, tokenize
from wkvq_core.config import FP_BITS, CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.evaluation.perplexity import greedy_without_cache, kv_bytes_per_token
from wkvq_core.model import load_model
from wkvq_core.pipeline import quantize_model_
from wkvq_core.quant.packing import pack_bits
from wkvq_core.quant.primitives import quantize_weight
from wkvq_core.runtime.cache_keyword import with_cache

from provenance import ROOT, shown

try:
    from wkvq_core.runtime.kv_cache import WKVQuantCache
except ImportError:  # being written; the KV cross-check and the throughput part are then reported as not run
    WKVQuantCache = None

TINY_MODEL = ROOT / "wkvq_core" / "assets" / "stories260k"
PROMPT_TEXT = ROOT / "wkvq_core" / "assets" / "tinystories" / "eval.txt"
W_BITS, W_GROUP, KV_BITS = 4, 128, 4
GB, GIB = 1e9, 2**30
PAPER_13B = (27.1, 6.8)  # WKVQuant paper, LLaMA-2-13B: FP16 -> W4KV4 memory in "GB"

SHAPES = {
    "13b": ("LLaMA-2-13B", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                num_attention_heads=40, num_key_value_heads=40, vocab_size=32000)),
    "7b": ("LLaMA-2-7B", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "llama3-8b": ("LLaMA-3-8B (GQA)", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
}


# ---------------------------------------------------------------- weights

def packed_linear_bytes(weight: torch.Tensor) -> int:
    """Bytes of one linear as stored in an artifact: packed W4 codes + fp16 scales and zeros per group of 128."""
    codes, scale, zero = quantize_weight(weight.float(), W_BITS, W_GROUP)
    return sum(t.nbytes for t in (pack_bits(codes, W_BITS), scale.half(), zero.half()))


@torch.no_grad()
def layer_bytes(meta_layer: nn.Module, seed: int) -> tuple[int, int, int]:
    """(fp16 bytes, W4 bytes, bytes of the non-linear fp16 tensors) of one decoder layer, materialised on CPU with
    random weights."""
    torch.manual_seed(seed)
    layer = copy.deepcopy(meta_layer).to_empty(device="cpu")
    fp16 = w4 = kept = 0
    for module in layer.modules():
        for param in module.parameters(recurse=False):
            linear = isinstance(module, nn.Linear)
            if linear:
                param.normal_(0.0, 0.02)
            else:
                param.fill_(1.0)
            fp16 += param.nbytes
            w4 += packed_linear_bytes(param) if linear else param.nbytes
            kept += 0 if linear else param.nbytes
    return fp16, w4, kept


def weight_memory(model: LlamaForCausalLM, layers_measured: int) -> dict:
    layers = model.model.layers
    shapes = {tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()) for layer in layers}
    assert len(shapes) == 1, "decoder layers differ in shape; measure all of them"
    measured = [layer_bytes(layers[i], seed=i) for i in range(min(layers_measured, len(layers)))]
    assert len(set(measured)) == 1, f"measured layers differ in bytes: {measured}"
    (fp16_layer, w4_layer, kept), n = measured[0], len(layers)
    other = sum(p.nbytes for name, p in model.named_parameters() if ".layers." not in name)  # fp16 by shape
    return dict(fp16=fp16_layer * n + other, w4=w4_layer * n + other, fp16_layer=fp16_layer, w4_layer=w4_layer,
                other=other, measured=len(measured), linear_bits=(w4_layer - kept) * 8 / ((fp16_layer - kept) / 2))


# ---------------------------------------------------------------- KV cache

def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.no_grad()
def filled_cache_bytes(cache, config, seqlen: int) -> int:
    """Fill a cache through `update` as a prefill of seqlen - 1 tokens plus one decode step; its real bytes."""
    for i in range(config.num_hidden_layers):
        for t in (seqlen - 1, 1):
            shape = (1, config.num_key_value_heads, t, head_dim(config))
            cache.update(torch.randn(shape, dtype=torch.float16), torch.randn(shape, dtype=torch.float16), i)
    return cache_bytes(cache)


def cache_bytes(cache) -> int:
    if hasattr(cache, "allocated_bytes"):
        return cache.allocated_bytes()  # the packed cache: what it holds, its last page's room included
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def kv_memory(config, seqlen: int, real: bool) -> dict:
    out = dict(fp16=kv_bytes_per_token(config, KVQuantConfig(bits=FP_BITS)) * seqlen,
               kv4=kv_bytes_per_token(config, KVQuantConfig(bits=KV_BITS)) * seqlen, fp16_real=None, kv4_real=None)
    if real:
        out["fp16_real"] = filled_cache_bytes(DynamicCache(), config, seqlen)
        out["kv4_real"] = filled_cache_bytes(WKVQuantCache(config, kv_bits=KV_BITS), config, seqlen)
    return out


# ---------------------------------------------------------------- report

def measure_model(key: str, args) -> dict:
    name, shape = SHAPES[key]
    config = LlamaConfig(**shape, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).half()
    started = time.perf_counter()
    weights = weight_memory(model, args.layers_measured)
    kv = kv_memory(config, args.seqlen, real=WKVQuantCache is not None and not args.no_real_cache)
    print(f"  {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return dict(name=name, config=config, weights=weights, kv=kv)


def gb(n: float) -> str:
    return f"{n / GB:.2f}"


def memory_table(results: list[dict], seqlen: int) -> str:
    lines = [
        f"| model | FP16 weights | W4 weights (measured) | FP16 KV @{seqlen} | KV4 @{seqlen} | total FP16 "
        "| total W4KV4 | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        w, kv = r["weights"], r["kv"]
        fp, q = w["fp16"] + kv["fp16"], w["w4"] + kv["kv4"]
        lines.append(f"| {r['name']} | {gb(w['fp16'])} | {gb(w['w4'])} | {gb(kv['fp16'])} | {gb(kv['kv4'])} "
                     f"| {gb(fp)} | {gb(q)} | {fp / q:.2f}× |")
    return "\n".join(lines)


def model_notes(r: dict, seqlen: int) -> str:
    w, kv, c = r["weights"], r["kv"], r["config"]
    real = "formula only (--no-real-cache, or no WKVQuantCache)" if kv["kv4_real"] is None else (
        f"real caches filled to {seqlen} tokens: DynamicCache fp16 {kv['fp16_real']:,} B, WKVQuantCache "
        f"{kv['kv4_real']:,} B ({'=' if kv['kv4_real'] == kv['kv4'] else '≠'} formula {kv['kv4']:,.0f} B)")
    return (f"- {r['name']}: {c.num_hidden_layers} layers × (fp16 {w['fp16_layer']:,} B → W4 {w['w4_layer']:,} B, "
            f"{w['measured']} layer(s) quantized for real, identical bytes, multiplied by {c.num_hidden_layers}); "
            f"embeddings + lm_head + final norm fp16 {w['other']:,} B; {w['linear_bits']:.3f} bits per linear weight; "
            f"KV {c.num_key_value_heads} KV heads × head_dim {head_dim(c)}: {real}")


def paper_note(results: list[dict]) -> list[str]:
    r = next((r for r in results if r["name"] == SHAPES["13b"][0]), None)
    if r is None:
        return []
    w, kv = r["weights"], r["kv"]
    fp, q = w["fp16"] + kv["fp16"], w["w4"] + kv["kv4"]
    layers_fp16 = w["fp16_layer"] * r["config"].num_hidden_layers
    naive_fp, naive_q = layers_fp16 + kv["fp16"], (layers_fp16 + kv["fp16"]) / 4
    return [
        f"- LLaMA-2-13B vs paper ({PAPER_13B[0]} GB → {PAPER_13B[1]} GB, ×{PAPER_13B[0] / PAPER_13B[1]:.2f}): "
        f"measured {fp / GB:.2f} GB → {q / GB:.2f} GB (×{fp / q:.2f}) = {fp / GIB:.2f} GiB → {q / GIB:.2f} GiB; "
        f"without the fp16 embeddings/lm_head {(fp - w['other']) / GB:.2f} GB → {(q - w['other']) / GB:.2f} GB",
        f"- the paper's figures are reproduced by a cruder count: decoder layers only (no embeddings/lm_head) and "
        f"exactly 16 → 4 bits per weight and per KV element, no scales/zeros: {naive_fp / GB:.2f} GB → "
        f"{naive_q / GB:.2f} GB; the paper does not state its accounting",
    ]


# ---------------------------------------------------------------- throughput

def load_tiny(path: Path, workdir: str):
    """(model, tokenizer, description) for the throughput part: the WKVQuant artifact at `path`; for a plain model
    directory an RTN W4KV4 artifact of it written to `workdir` and read back with `load_quantized` (the deployment
    path: packed weights, WKVAttention with POQ); the FP model itself while `load_quantized` does not exist yet."""
    try:
        from wkvq_core.artifact import is_artifact, load_quantized, save_artifact
    except ImportError:
        model, tokenizer = load_model(path)
        return model, tokenizer, "FP32 model (load_model; `load_quantized` not available), stock LlamaAttention"
    if is_artifact(path):
        return load_quantized(path), AutoTokenizer.from_pretrained(path), "WKVQuant artifact, load_quantized"
    model, tokenizer = load_model(path)
    config = WKVQuantConfig(weight=WeightQuantConfig(bits=W_BITS, group_size=-1, lwc=False),
                            kv=KVQuantConfig(bits=KV_BITS), calib=CalibConfig(nsamples=16, seqlen=256, epochs=0))
    calib = tokenize(tokenizer, load_text(str(PROMPT_TEXT.with_name("calib.txt"))))
    quantize_model_(model, config, calibration_samples(calib, 16, 256, seed=0))
    save_artifact(Path(workdir) / "tiny-w4kv4", model, tokenizer, config)
    return (load_quantized(Path(workdir) / "tiny-w4kv4"), tokenizer,
            "RTN W4KV4 artifact of it (W4 per output row, KV4 with 2D smoothing initialised from 16×256 calibration "
            "tokens, epochs 0), loaded with load_quantized: PackedLinear + WKVAttention with POQ, fp32 compute; with the "
            "DynamicCache the attention stores fake-quantized (KV4-valued) K/V in fp32")


@torch.no_grad()
def throughput(args) -> str:
    if WKVQuantCache is None:
        return "- not run: `wkvq_core.runtime.kv_cache.WKVQuantCache` does not exist yet"
    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer, kind = load_tiny(Path(args.tiny_model), workdir)
    ids = tokenizer(PROMPT_TEXT.read_text(encoding="utf-8")[:500], return_tensors="pt").input_ids[:, : args.prompt_len]
    dtype = str(model.dtype).removeprefix("torch.")
    caches = {f"FP cache (DynamicCache, {dtype})": lambda: DynamicCache(config=model.config),
              "packed KV4 (WKVQuantCache)": lambda: WKVQuantCache(model.config, kv_bits=KV_BITS)}
    times, outputs, held = {k: [] for k in caches}, {}, {}
    n = args.new_tokens
    for rep in range(args.repeats + 1):  # repeat 0 warms up and is not timed
        for name, make in caches.items():
            cache = make()
            started = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=None,
                                 pad_token_id=tokenizer.eos_token_id, **with_cache(cache))
            if rep:
                times[name].append(time.perf_counter() - started)
            outputs[name], held[name] = out[0, ids.shape[1]:], cache_bytes(cache)
    (fp_name, fp_t), (q_name, q_t) = ((k, statistics.median(v)) for k, v in times.items())
    reference = greedy_without_cache(model, ids, n)[0][0, ids.shape[1]:]  # a full POQ forward per step, no cache
    agree = {k: (v == reference).int().cumprod(0).sum().item() for k, v in outputs.items()}
    tokens = ids.shape[1] + n - 1
    formula = kv_bytes_per_token(model.config, KVQuantConfig(bits=KV_BITS)) * tokens
    return "\n".join([
        f"- model `{shown(args.tiny_model)}`: {kind}; prompt {ids.shape[1]} tokens + {n} new tokens, greedy, batch 1, "
        f"torch threads {torch.get_num_threads()}; {args.repeats} interleaved timed repeats after 1 warm-up, median "
        "(tokens/s = new tokens / whole generate() time, prefill included)",
        "",
        "| cache | tokens/s | median s | cache bytes at end |",
        "|---|---:|---:|---:|",
        *(f"| {k} | {n / statistics.median(v):.1f} | {statistics.median(v):.3f} | {held[k]:,} |"
          for k, v in times.items()),
        "",
        f"- throughput ratio packed / FP: **{fp_t / q_t:.2f}×** (same run, interleaved)",
        f"- packed cache holds {tokens} tokens: {held[q_name]:,} B allocated vs formula {formula:,.0f} B",
        *(f"- {k}: greedy tokens equal the cache-free reference (full forward per step) for the first {agree[k]} "
          f"of {n} new tokens" for k in caches),
    ])


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="13b,7b,llama3-8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--layers-measured", type=int, default=2, help="decoder layers quantized for real per model")
    parser.add_argument("--no-real-cache", action="store_true", help="KV from the formula only")
    parser.add_argument("--tiny-model", default=str(TINY_MODEL), help="model dir or WKVQuant artifact for throughput")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the throughput part")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-write", dest="results", action="store_const", const=None, help="do not append results")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(SHAPES)
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    started = datetime.datetime.now(datetime.timezone.utc)
    results = [measure_model(key, args) for key in args.models]
    torch.set_num_threads(args.threads)
    speed = throughput(args)
    minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
    section = "\n".join([
        f"## Memory run {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- date (UTC): {started:%Y-%m-%d %H:%M}; total runtime {minutes:.1f} min; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- decode memory at batch 1, {args.seqlen} tokens; GB = 1e9 bytes. W4: asymmetric, group {W_GROUP}, packed "
        "codes + fp16 scale and zero per group (as in an artifact); embeddings, norms, lm_head fp16 (untied). "
        "KV4: packed codes + fp16 scale and zero per token and KV head (group = head_dim). Activations and "
        "framework overhead not counted",
        "",
        f"### Decode memory (GB) at batch 1, {args.seqlen} tokens",
        "",
        memory_table(results, args.seqlen),
        "",
        *(model_notes(r, args.seqlen) for r in results),
        *paper_note(results),
        "",
        "### CPU decode throughput, packed KV cache vs FP cache",
        "",
        speed,
        "",
    ])
    print(section)
    if args.results:
        with Path(args.results).open("a", encoding="utf-8") as fh:
            fh.write(section + "\n")


if __name__ == "__main__":
    main()
