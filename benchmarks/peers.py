"""WKVQuant side by side with what users would pick instead, in one run on one checkpoint, one calibration text and
one held-out evaluation text, with one perplexity metric and one memory accounting.

    python benchmarks/peers.py                       # full: quality.py settings, appends to RESULTS.md, peers.png
    python benchmarks/peers.py --quick --no-write    # tiny model, few samples / windows / epochs
    python benchmarks/peers.py --quick --rows fp,kivi,qc --windows 1 --no-write

Rows: FP reference; weights: llm-compressor `oneshot` GPTQ and AWQ W4A16 (run in their own virtual environment,
created by this script, exchanging the checkpoint through files), our W4 RTN and W4 LWC; KV cache: transformers'
`QuantizedCache` (quanto and HQQ backends, default residual length 128 and residual 0), a KIVI-style cache
(`wkvq_core.evaluation.baselines.kivi_cache`, KV4 and KV2), our KV4 WKVQuant with FP weights, W4KV4 RTN, W4KV4/KV3/KV2 WKVQuant;
combined: GPTQ W4 + QuantizedCache or KIVI KV4 (default residuals, and residuals small enough that the total decode
memory is at most WKVQuant W4KV4's), and our W4 LWC + KIVI KV4.

Metric: the peers' quantized KV caches (`QuantizedCache`, `KIVICache`) are scored by token-by-token decoding
through the cache (`decode_perplexity`). WKVQuant rows are scored by the parallel POQ pass, which
tests/test_kv_quant.py proves equal to decoding, and rows with a full-precision cache by the parallel pass, the same
computation; the run checks both on the first windows by decoding them through the real cache (the packed
`WKVQuantCache` for ours). Memory: weights as stored (packed codes, scales, zero points; every float
tensor at 2 bytes per element, an fp16 deployment, although this CPU run computes in fp32) and the real bytes, the
most bytes the cache holds at any step while decoding a window of seqlen tokens (same fp16 rule for its float
tensors; residual windows included; for a cache that only grows, its bytes at the end), divided by seqlen.
Decode memory = weights + that KV, batch 1; activations not counted.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, QuantizedCache
from transformers.cache_utils import DynamicLayer, QuantizedLayer

from wkvq_core.calib.data import calibration_samples, eval_windows, load_text, tokenize
from wkvq_core.config import FP_BITS, CalibConfig, WeightQuantConfig, WKVQuantConfig, kv_config
from wkvq_core.evaluation.baselines.kivi_cache import KIVI_GROUP, KIVI_RESIDUAL, KIVICache, KIVILayer
from wkvq_core.evaluation.perplexity import EvalMode, _mode_flags, decode_perplexity, perplexity
from wkvq_core.model import attentions, frozen_weights, load_model, quant_linears, quant_state
from wkvq_core.pipeline import quantize_model_
from wkvq_core.quant.packing import pack_bits
from wkvq_core.runtime.cache_keyword import with_cache
from wkvq_core.runtime.kv_cache import PackedKVLayer, WKVQuantCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, code_version, shown
from quality import FIXTURES, SHIPPED_MODEL, reset_peak_rss, resolve_model

ASSETS = ROOT / "wkvq_core" / "assets"
WORKER = Path(__file__).resolve().parent / "peers_llmcompressor.py"
PEER_VENV = Path(__file__).resolve().parent / ".venvs" / "llmcompressor"
LLMCOMPRESSOR_SPEC = "llmcompressor==0.14.0.1"
FP_BYTES = 2  # every float tensor is accounted as fp16
QC_RESIDUAL_DEFAULT = 128  # transformers QuantizedLayer's default residual_length
KB = 1e3


# ---------------------------------------------------------------- rows

@dataclass(frozen=True)
class Row:
    key: str
    name: str
    group: str  # reference | weights | kv | w+kv | combined
    weights: str  # key of a weight preparation (PREPS)
    cache: str  # fp16 | wkvq:BITS | kivi:BITS | qc:BACKEND:RESIDUAL


ROWS = [
    Row("fp", "FP reference (fp32 compute, fp16 accounting)", "reference", "fp", "fp16"),
    Row("gptq", "GPTQ W4A16 (llm-compressor)", "weights", "gptq", "fp16"),
    Row("gptq-asym", "GPTQ W4A16_ASYM (llm-compressor)", "weights", "gptq-asym", "fp16"),
    Row("awq", "AWQ W4A16_ASYM (llm-compressor)", "weights", "awq", "fp16"),
    Row("w4-rtn", "W4 RTN (ours)", "weights", "w4-rtn", "fp16"),
    Row("w4-lwc", "W4 LWC (ours, OmniQuant)", "weights", "w4-lwc", "fp16"),
    Row("qc-quanto", "QuantizedCache quanto KV4, R 128 (default)", "kv", "fp", "qc:quanto:128"),
    Row("qc-quanto-r0", "QuantizedCache quanto KV4, R 0", "kv", "fp", "qc:quanto:0"),
    Row("qc-hqq", "QuantizedCache HQQ KV4, R 128 (default)", "kv", "fp", "qc:hqq:128"),
    Row("qc-hqq-r0", "QuantizedCache HQQ KV4, R 0", "kv", "fp", "qc:hqq:0"),
    Row("kivi4", "KIVI-style KV4 (G 32, R 128)", "kv", "fp", "kivi:4"),
    Row("kivi2", "KIVI-style KV2 (G 32, R 128)", "kv", "fp", "kivi:2"),
    Row("kivi4-r32", "KIVI-style KV4 (G 32, R 32)", "kv", "fp", "kivi:4:32"),
    Row("kv4-wkvq", "KV4 WKVQuant (FP weights)", "kv", "kv4-wkvq", "wkvq:4"),
    Row("w4kv4-rtn", "W4KV4 RTN (ours)", "w+kv", "w4kv4-rtn", "wkvq:4"),
    Row("w4kv4-wkvq", "**W4KV4 WKVQuant**", "w+kv", "w4kv4-wkvq", "wkvq:4"),
    Row("kv4-rec", "KV4 WKVQuant, method recommended (FP weights)", "kv", "kv4-rec", "wkvq:4"),
    Row("w4kv4-rec", "**W4KV4 WKVQuant, method recommended**", "w+kv", "w4kv4-rec", "wkvq:4"),
    Row("w4kv3-wkvq", "W4KV3 WKVQuant", "w+kv", "w4kv3-wkvq", "wkvq:3"),
    Row("w4kv2-wkvq", "W4KV2 WKVQuant", "w+kv", "w4kv2-wkvq", "wkvq:2"),
    Row("gptq+qc-quanto", "GPTQ W4 + QuantizedCache quanto KV4, R 128", "combined", "gptq", "qc:quanto:128"),
    Row("gptq+qc-quanto-r0", "GPTQ W4 + QuantizedCache quanto KV4, R 0", "combined", "gptq", "qc:quanto:0"),
    Row("gptq+qc-quanto-r16", "GPTQ W4 + QuantizedCache quanto KV4, R 16", "combined", "gptq", "qc:quanto:16"),
    Row("gptq+qc-hqq-r0", "GPTQ W4 + QuantizedCache HQQ KV4, R 0", "combined", "gptq", "qc:hqq:0"),
    Row("gptq+qc-hqq-r16", "GPTQ W4 + QuantizedCache HQQ KV4, R 16", "combined", "gptq", "qc:hqq:16"),
    Row("gptq+kivi4", "GPTQ W4 + KIVI-style KV4, R 128", "combined", "gptq", "kivi:4"),
    Row("gptq+kivi4-r32", "GPTQ W4 + KIVI-style KV4, R 32", "combined", "gptq", "kivi:4:32"),
    Row("lwc+kivi4", "W4 LWC (ours) + KIVI-style KV4", "combined", "w4-lwc", "kivi:4"),
]
ALIASES = {  # --rows shorthands
    "qc": [r.key for r in ROWS if r.key.startswith("qc-")],
    "kivi": ["kivi4", "kivi2", "kivi4-r32"],
    "llmcompressor": [r.key for r in ROWS if r.weights in ("gptq", "gptq-asym", "awq")],
    "ours": [r.key for r in ROWS if r.weights.startswith(("w4", "kv4"))],
}


def select_rows(spec: str | None) -> list[Row]:
    if not spec:
        return list(ROWS)
    wanted: set[str] = set()
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        keys = ALIASES.get(part) or [r.key for r in ROWS if r.key == part or r.group == part]
        if not keys:
            raise SystemExit(f"unknown row {part!r}; rows: {', '.join(r.key for r in ROWS)}; "
                             f"aliases: {', '.join(ALIASES)}; groups: reference, weights, kv, w+kv, combined")
        wanted.update(keys)
    wanted.add("fp")  # the reference for Δ
    return [r for r in ROWS if r.key in wanted]


# ---------------------------------------------------------------- memory accounting

def tensor_bytes(obj) -> int:
    """Bytes of the tensors in obj (a tensor, a tensor subclass such as a quanto QTensor, or a tuple / list / dict
    of them, as HQQ's (codes, meta) pair); float tensors counted at FP_BYTES per element."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor and not isinstance(obj, nn.Parameter):
            return sum(tensor_bytes(getattr(obj, name)) for name in obj.__tensor_flatten__()[0])
        return obj.numel() * FP_BYTES if obj.is_floating_point() else obj.nbytes
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x) for x in obj.values())
    return 0


def cache_bytes(cache) -> int:
    """Bytes a cache holds: quantized stores, scales / zero points and full-precision residuals."""
    total = 0
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        if isinstance(layer, KIVILayer):
            total += layer.nbytes(fp_bytes=FP_BYTES)
        elif isinstance(layer, PackedKVLayer):  # uint8 records (codes, fp16 scales and zeros) in pages, and sinks
            total += layer.allocated_bytes(fp_bytes=FP_BYTES)
        elif isinstance(layer, QuantizedLayer):
            total += sum(tensor_bytes(x) for x in (layer._quantized_keys, layer._quantized_values,
                                                   layer.keys, layer.values))
        elif isinstance(layer, DynamicLayer):
            total += tensor_bytes(layer.keys) + tensor_bytes(layer.values)
        else:
            raise TypeError(f"no byte count for {type(layer).__name__}")
    return total


@dataclass
class WeightBytes:
    total: int
    linear: int  # the decoder's linears (quantized or not)
    linear_params: int

    @property
    def bits_per_param(self) -> float:
        return self.linear * 8 / self.linear_params


def decoder_linears(model) -> list[nn.Linear]:
    return [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]


def fp_weight_bytes(model) -> WeightBytes:
    linears = decoder_linears(model)
    params = sum(m.weight.numel() for m in linears)
    return WeightBytes(sum(p.numel() for p in model.parameters()) * FP_BYTES, params * FP_BYTES, params)


def ours_weight_bytes(model) -> WeightBytes:
    """Packed codes + fp16 scale and zero per group for every quantized QuantLinear (as in an artifact); all other
    parameters (embeddings, norms, KV smoothing) fp16; LWC clip logits are calibration state, not stored."""
    linear = params = 0
    owned = set()
    for lin in quant_linears(model):
        owned.update(id(p) for p in lin.parameters())
        params += lin.weight.numel()
        if lin.bits == FP_BITS:
            linear += lin.weight.numel() * FP_BYTES
            continue
        codes, scale, zero = lin.quantize(lin.weight)
        linear += pack_bits(codes, lin.bits).nbytes + (scale.numel() + zero.numel()) * FP_BYTES
    rest = sum(p.numel() for p in model.parameters() if id(p) not in owned) * FP_BYTES
    return WeightBytes(linear + rest, linear, params)


def ct_weight_bytes(checkpoint: Path) -> WeightBytes:
    """Bytes of a compressed-tensors checkpoint's tensors: packed int4 weights, scales, zero points, shapes."""
    from safetensors import safe_open

    total = linear = params = 0
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                t = f.get_tensor(key)
                n = tensor_bytes(t)
                total += n
                if key.rsplit(".", 1)[-1] in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
                    linear += n
                if key.endswith(".weight_shape"):
                    params += math.prod(t.tolist())
    return WeightBytes(total, linear, params)


# ---------------------------------------------------------------- weight preparations

@dataclass
class Prepared:
    model: nn.Module | None
    ours: bool  # a model prepared with QuantLinear / WKVAttention (eval modes apply)
    weights: WeightBytes | None = None
    seconds: float | None = None
    peak_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    checkpoint_versions: dict | None = None


def ours_config(calib: CalibConfig, group_size: int, *, w_bits=4, kv_bits=FP_BITS, lwc=True, smoothing=True,
                method="paper", **changes):
    return WKVQuantConfig(weight=WeightQuantConfig(bits=w_bits, group_size=group_size, lwc=lwc),
                          kv=kv_config(method, bits=kv_bits, smoothing=smoothing, poq=True),
                          calib=replace(calib, **changes))


def our_configs(calib: CalibConfig, group_size: int) -> dict[str, WKVQuantConfig]:
    rtn = dict(lwc=False, smoothing=False, epochs=0)
    wkvq = dict(crr_k=5, loss="mae")
    return {
        "w4-rtn": ours_config(calib, group_size, **rtn),
        "w4-lwc": ours_config(calib, group_size, crr_k=1, loss="mse"),
        "kv4-wkvq": ours_config(calib, group_size, w_bits=FP_BITS, kv_bits=4, lwc=False, **wkvq),
        "w4kv4-rtn": ours_config(calib, group_size, kv_bits=4, **rtn),
        **{f"w4kv{b}-wkvq": ours_config(calib, group_size, kv_bits=b, **wkvq) for b in (4, 3, 2)},
        "kv4-rec": ours_config(calib, group_size, w_bits=FP_BITS, kv_bits=4, lwc=False, method="recommended", **wkvq),
        "w4kv4-rec": ours_config(calib, group_size, kv_bits=4, method="recommended", **wkvq),
    }


class Preparer:
    """Builds each weight preparation once (GPTQ serves several rows) and keeps it for the run."""

    def __init__(self, args, fp_model, samples: torch.Tensor, workdir: Path) -> None:
        self.args, self.fp_model, self.samples, self.workdir = args, fp_model, samples, workdir
        self.configs = our_configs(args.calib_config, args.group_size)
        self.done: dict[str, Prepared] = {}
        self.peer_python: Path | None = None
        self.peer_error: str | None = None

    def get(self, key: str) -> Prepared:
        if key not in self.done:
            print(f"  preparing weights: {key}", file=sys.stderr, flush=True)
            try:
                self.done[key] = self._build(key)
            except Exception as exc:  # a failed preparation is reported in its rows
                traceback.print_exc()
                self.done[key] = Prepared(None, False, error=f"{type(exc).__name__}: {one_line(str(exc))}")
        return self.done[key]

    def _build(self, key: str) -> Prepared:
        if key == "fp":
            return Prepared(self.fp_model, False, fp_weight_bytes(self.fp_model))
        if key in self.configs:
            torch.manual_seed(self.args.seed)
            model = copy.deepcopy(self.fp_model)
            reset_peak_rss()
            report = quantize_model_(model, self.configs[key], self.samples, device="cpu")
            return Prepared(model, True, ours_weight_bytes(model), report.seconds, report.peak_memory_bytes)
        method, scheme = {"gptq": ("gptq", "W4A16"), "gptq-asym": ("gptq", "W4A16_ASYM"),
                          "awq": ("awq", "W4A16_ASYM")}[key]
        return self._llmcompressor(key, method, scheme)

    # -------------------------------------------------------- llm-compressor, in its own venv

    def _ensure_peer_venv(self) -> Path | None:
        if self.peer_python or self.peer_error:
            return self.peer_python
        venv, log = Path(self.args.peer_venv), Path(self.args.peer_venv).with_suffix(".log")
        python = venv / "bin" / "python"
        probe = [python, "-c", "import llmcompressor"]
        if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
            self.peer_python = python
            return python
        torch_spec = f"torch=={torch.__version__.split('+')[0]}"  # the local CPU wheel; a newer one pulls CUDA
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", torch_spec],
                 [str(python), "-m", "pip", "install", "-q", self.args.llmcompressor_spec]]
        print(f"  creating {shown(str(venv))} ({self.args.llmcompressor_spec}); log {shown(str(log))}",
              file=sys.stderr, flush=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as fh:
            for cmd in steps:
                fh.write(f"$ {shlex.join(map(str, cmd))}\n")
                fh.flush()
                result = subprocess.run(cmd, stdout=fh, stderr=subprocess.PIPE, text=True)
                fh.write(result.stderr)
                if result.returncode:
                    self.peer_error = (f"could not create its virtual environment: `{shlex.join(map(str, cmd[-2:]))}` "
                                       f"exited {result.returncode}: {last_line(result.stderr)}")
                    return None
        self.peer_python = python
        return python

    def _llmcompressor(self, key: str, method: str, scheme: str) -> Prepared:
        python = self._ensure_peer_venv()
        if python is None:
            return Prepared(None, False, error=f"llm-compressor not run: {self.peer_error}")
        samples_file = self.workdir / "calib_samples.pt"
        if not samples_file.exists():
            torch.save(self.samples.clone(), samples_file)
        out, report_file, log = (self.workdir / f"{key}-ckpt", self.workdir / f"{key}-report.json",
                                 self.workdir / f"{key}.log")
        cmd = [str(python), str(WORKER), "--method", method, "--scheme", scheme, "--model", self.args.model_dir,
               "--samples", str(samples_file), "--out", str(out), "--report", str(report_file),
               "--threads", str(self.args.threads)]
        if self.args.group_size != -1:
            cmd += ["--group-size", str(self.args.group_size)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)
        if not report_file.exists():  # a work dir kept between runs (benchmarks/vllm_target.py) may hold it
            with log.open("w", encoding="utf-8") as fh:
                result = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=3600)
            if result.returncode:
                text = log.read_text(encoding="utf-8", errors="replace")
                return Prepared(None, False, error=f"llm-compressor {method} failed (exit {result.returncode}): "
                                                   f"{last_line(text)}")
        report = json.loads(report_file.read_text())
        from transformers.utils.quantization_config import CompressedTensorsConfig

        model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                     dtype=torch.float32, attn_implementation="eager").eval()
        model.config.use_cache = False
        weights = report["quantization_config"]["config_groups"]["group_0"]["weights"]
        notes = [f"`oneshot` recipe {'GPTQModifier' if method == 'gptq' else 'AWQModifier + QuantizationModifier'}"
                 f"(scheme {scheme}, targets Linear, ignore lm_head): int{weights['num_bits']} "
                 f"{'symmetric' if weights['symmetric'] else 'asymmetric'}, strategy {weights['strategy']}"
                 f"{'' if weights.get('group_size') is None else ' group ' + str(weights['group_size'])}; "
                 "loaded with CompressedTensorsConfig(dequantize=True)"]
        if report.get("preset_error"):
            notes.append("the preset's group 128 was rejected by llm-compressor ("
                         f"{report['preset_error'][:150]}…): ran channel-wise (one group per output row), "
                         "the closest valid grouping")
        if report.get("cpu_workaround"):
            notes.append(f"CPU: {report['cpu_workaround']} (a host-to-device transfer optimisation; no number changes)")
        if method == "awq":
            notes.append("AWQ skips the v_proj→o_proj smoothing mapping under GQA (shapes differ), as llm-compressor "
                         "logs")
        return Prepared(model, False, ct_weight_bytes(out), report["seconds"], report["peak_memory_bytes"], notes,
                        checkpoint_versions=report["versions"])


# ---------------------------------------------------------------- caches

def qc_settings(backend: str, config, residual: int) -> tuple[dict, list[str]]:
    """QuantizedCache arguments: the defaults where they work on this model; otherwise the reason and the
    closest valid setting. HQQ uses axis 1 for keys and values, the setting transformers' docs recommend for it."""
    kwargs: dict = {"nbits": 4, "residual_length": residual}
    notes = []
    if backend == "hqq":
        kwargs.update(axis_key=1, axis_value=1)
    try:  # one token through a cache built with the default group size
        probe = QuantizedCache(backend, config, **kwargs)
        shape = (1, config.num_key_value_heads, 1, config.head_dim)
        probe.update(torch.zeros(shape), torch.zeros(shape), 0)
        probe.update(torch.zeros(shape), torch.zeros(shape), 0)
    except (ValueError, AssertionError) as exc:
        group = min(64, config.head_dim)
        notes.append(f"default q_group_size 64 rejected on this model ({one_line(str(exc))[:120]}): used "
                     f"{group} = head_dim, one group per token and KV head (64 is half a head at head_dim 128)")
        kwargs["q_group_size"] = group
    axis = "axis_key = axis_value = 1 (docs' HQQ setting)" if backend == "hqq" else "axis 0 (default)"
    notes.append(f"{backend} 4-bit, {axis}, residual_length {residual}"
                 f"{' (default)' if residual == QC_RESIDUAL_DEFAULT else ''}; every flush re-quantizes the "
                 "dequantized past with the residual")
    return kwargs, notes


def cache_factory(row: Row, model, config) -> tuple[Callable | None, str, list[str]]:
    """(a new cache per window, label, notes)."""
    kind, *rest = row.cache.split(":")
    if kind == "fp16":
        return (lambda: DynamicCache(config=config)), "DynamicCache", []
    if kind == "wkvq":
        bits, sinks = int(rest[0]), attentions(model)[0].sink_tokens
        return (lambda: WKVQuantCache(config, kv_bits=bits, sink_tokens=sinks)), "WKVQuantCache (packed)", []
    if kind == "kivi":
        bits, residual = int(rest[0]), int(rest[1]) if len(rest) > 1 else KIVI_RESIDUAL
        return (lambda: KIVICache(config, bits=bits, residual_length=residual)), "KIVICache", [
            f"KIVI-{bits}: K per channel over groups of {KIVI_GROUP} tokens, V per token over groups of "
            f"{min(KIVI_GROUP, config.head_dim)} channels (head_dim < {KIVI_GROUP}), fp16 scale and min, "
            f"full-precision residual R {residual}{' (KIVI default)' if residual == KIVI_RESIDUAL else ''} "
            "(K: up to R-1 tokens, V: the last R)"]
    backend, residual = rest[0], int(rest[1])
    kwargs, notes = qc_settings(backend, config, residual)
    return (lambda: QuantizedCache(backend, config, **kwargs)), f"QuantizedCache ({backend})", notes


# ---------------------------------------------------------------- evaluation

@dataclass
class Result:
    row: Row
    ppl: float | None = None
    weights: WeightBytes | None = None
    kv_per_token: float | None = None
    seconds: float | None = None
    peak_bytes: int | None = None
    cache: str = ""
    scored: str = ""
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    eval_seconds: float = 0.0

    def decode_memory(self, seqlen: int) -> float | None:
        if self.weights is None or self.kv_per_token is None:
            return None
        return self.weights.total + self.kv_per_token * seqlen


def decode_eval(model, windows: torch.Tensor, mode: EvalMode, make_cache: Callable) -> tuple[float, float, float]:
    """(ppl by token-by-token decoding through a new cache per window, and the bytes per token a cache holds while
    decoding a whole window: the most over the steps and at the end, each ÷ seqlen). Caches with a residual window
    (KIVI, QuantizedCache) peak before the end: their peak is the memory a window needs."""
    ppl = decode_perplexity(model, windows, mode, make_cache=make_cache).ppl
    cache, held = make_cache(), []
    with torch.no_grad(), quant_state(model, **_mode_flags(mode)), frozen_weights(model):
        for t in range(windows.shape[1]):
            model(windows[-1:, t : t + 1], **with_cache(cache), use_cache=True)
            held.append(cache_bytes(cache))
    return ppl, max(held) / windows.shape[1], held[-1] / windows.shape[1]


def evaluate_row(row: Row, prep: Prepared, windows: torch.Tensor, args) -> Result:
    result = Result(row, weights=prep.weights, seconds=prep.seconds, peak_bytes=prep.peak_bytes,
                    notes=list(prep.notes))
    if prep.error:
        result.error = prep.error
        return result
    model = prep.model
    mode = EvalMode.WKV if row.cache.startswith("wkvq") else (EvalMode.W if prep.ours else EvalMode.FP)
    started = time.perf_counter()
    try:
        make_cache, result.cache, notes = cache_factory(row, model, model.config)
        result.notes += notes
        if row.cache == "fp16" or row.cache.startswith("wkvq"):
            # full-precision KV: the parallel pass is the decode computation; WKVQuant: the parallel POQ pass is
            # proven equal to decoding (tests/test_kv_quant.py). Both checked here by decoding the first windows
            # through the real cache (for WKVQuant the packed WKVQuantCache).
            result.ppl = perplexity(model, windows, mode).ppl
            check = windows[: args.check_windows]
            decoded, result.kv_per_token, _ = decode_eval(model, check, mode, make_cache)
            parallel = perplexity(model, check, mode).ppl
            result.scored = (f"parallel{' POQ' if mode == EvalMode.WKV else ''} pass, = decode on "
                             f"{len(check)} window(s) (Δppl {decoded - parallel:+.1e})")
            if abs(decoded / parallel - 1) > 1e-3:  # tests/test_smollm2.py: equal in float64
                result.notes.append(f"decode ppl {decoded:.4f} vs parallel {parallel:.4f} on the check windows: in "
                                    "fp32 a K/V element on a rounding boundary can take the other 4-bit code")
        else:
            result.ppl, result.kv_per_token, at_end = decode_eval(model, windows, mode, make_cache)
            result.scored = "decode"
            if at_end != result.kv_per_token:
                result.notes.append(f"KV column = the most the cache holds during a {windows.shape[1]}-token window "
                                    f"÷ {windows.shape[1]}; after the whole window it holds {at_end:.1f} B/token")
    except Exception as exc:  # the row says why it could not run
        traceback.print_exc()
        result.error = f"{type(exc).__name__}: {one_line(str(exc))}"
        result.ppl = None
    result.eval_seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------- report

def one_line(text: str) -> str:
    return " ".join(text.split())


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line.lower()]
    return (errors or lines or ["no output"])[-1][:400]


def fmt(x: float | None, spec: str, none: str = "—") -> str:
    return none if x is None else format(x, spec)


def table(results: list[Result], seqlen: int) -> str:
    fp = next(r.ppl for r in results if r.row.key == "fp")
    lines = [
        f"| method | W bits/param | KV B/token @{seqlen} | decode memory @{seqlen} (kB) | ppl | Δppl vs FP "
        "| calib time (s) | calib peak (MiB) | cache, scored by |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.error and r.ppl is None:
            lines.append(f"| {r.row.name} | — | — | — | not run | — | — | — | {r.error[:300]} |")
            continue
        delta = "—" if fp is None else f"{r.ppl - fp:+.3f} ({(r.ppl / fp - 1) * 100:+.1f}%)"
        mem = r.decode_memory(seqlen)
        lines.append(
            f"| {r.row.name} | {fmt(r.weights and r.weights.bits_per_param, '.2f')} | {fmt(r.kv_per_token, '.1f')} "
            f"| {fmt(mem and mem / KB, '.1f')} | {r.ppl:.3f} | {delta} | {fmt(r.seconds, '.1f')} "
            f"| {fmt(r.peak_bytes and r.peak_bytes / 2**20, '.0f')} | {r.cache}, {r.scored} |"
        )
    return "\n".join(lines)


def notes_block(results: list[Result]) -> list[str]:
    out, seen = [], set()
    for r in results:
        notes = list(dict.fromkeys(r.notes))
        items = [n for n in notes if n not in seen] + ([f"**not run / failed**: {r.error}"] if r.error else [])
        if len(items) < len(notes) + bool(r.error):
            items.append("other settings as in the rows above")
        seen.update(notes)
        if items:
            out.append(f"- {r.row.name.strip('*')}: " + "; ".join(items))
    return out


def reading(results: list[Result], seqlen: int) -> list[str]:
    """Where WKVQuant wins and loses, with the numbers, generated from this run's rows."""
    by = {r.row.key: r for r in results if r.ppl is not None}

    def cmp(ours_key: str, peer_key: str, memory: str) -> str | None:
        ours, peer = by.get(ours_key), by.get(peer_key)
        if not ours or not peer:
            return None
        if memory == "kv":
            mo, mp, unit = ours.kv_per_token, peer.kv_per_token, "B/token KV"
        else:
            mo, mp, unit = ours.decode_memory(seqlen) / KB, peer.decode_memory(seqlen) / KB, f"kB at {seqlen}"
        ppl_word = "better" if ours.ppl < peer.ppl else "worse"
        mem_word = "less" if mo < mp else ("equal" if mo == mp else "more")
        verdict = ("ours wins" if ours.ppl <= peer.ppl and mo <= mp else
                   "ours loses" if ours.ppl > peer.ppl and mo >= mp else "trade-off")
        return (f"- {verdict}: {ours.row.name.strip('*')} ppl {ours.ppl:.3f} at {mo:.1f} {unit} vs "
                f"{peer.row.name} ppl {peer.ppl:.3f} at {mp:.1f} {unit} ({ppl_word} ppl by "
                f"{abs(ours.ppl - peer.ppl):.3f}, {mem_word} memory{'' if mo == mp else f' by {abs(mo - mp):.1f}'})")

    combined = ("gptq+qc-quanto", "gptq+qc-quanto-r16", "gptq+qc-quanto-r0", "gptq+qc-hqq-r16", "gptq+qc-hqq-r0",
                "gptq+kivi4", "gptq+kivi4-r32", "lwc+kivi4")
    caches = ("qc-quanto", "qc-quanto-r0", "qc-hqq", "qc-hqq-r0", "kivi4", "kivi4-r32")
    pairs = [(ours, p, "total") for ours in ("w4kv4-wkvq", "w4kv4-rec") for p in combined]
    pairs += [(ours, p, "kv") for ours in ("kv4-wkvq", "kv4-rec") for p in caches]
    pairs += [("w4-lwc", p, "total") for p in ("gptq", "gptq-asym", "awq")]
    return [line for line in (cmp(*p) for p in pairs) if line]


def plot(results: list[Result], seqlen: int, path: Path, title: str) -> None:
    """ppl vs decode memory: all rows (log ppl) and a zoom on the 4-bit-weight rows; points numbered, names listed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    colors = {"reference": "black", "weights": "tab:blue", "kv": "tab:orange", "w+kv": "tab:green",
              "combined": "tab:purple"}
    rows = [r for r in results if r.ppl is not None]
    fig = plt.figure(figsize=(15, 6.8), dpi=110)
    grid = fig.add_gridspec(1, 3, width_ratios=[1.0, 1.0, 0.72], wspace=0.2)
    ax_all, ax_zoom, ax_text = fig.add_subplot(grid[0]), fig.add_subplot(grid[1]), fig.add_subplot(grid[2])
    w4 = [r for r in rows if r.weights and r.weights.bits_per_param < 8]
    w4_ppl = [r.ppl for r in w4 if r.ppl < 1.2 * min(x.ppl for x in w4)] if w4 else []
    lines = []
    for i, r in enumerate(rows, 1):
        x = r.decode_memory(seqlen) / KB
        ours = r.row.weights.startswith(("w4", "kv4")) and "kivi" not in r.row.cache
        marker = "*" if "wkvq" in r.row.key else "o" if ours else "D" if r.row.key == "fp" else "s"
        style = dict(s=130 if marker == "*" else 45, c=colors[r.row.group], marker=marker, zorder=3)
        ax_all.scatter(x, r.ppl, **style)
        ax_all.annotate(str(i), (x, r.ppl), textcoords="offset points", xytext=(4, 3), fontsize=7)
        if r in w4 and r.ppl in w4_ppl:
            ax_zoom.scatter(x, r.ppl, **style)
            ax_zoom.annotate(str(i), (x, r.ppl), textcoords="offset points", xytext=(4, 3), fontsize=8)
        lines.append(f"{i:>2}  {r.row.name.strip('*')}: {r.ppl:.3f}, {x:.1f} kB")
    for group, color in colors.items():
        ax_all.scatter([], [], c=color, label=group)
    ax_all.legend(title="★ WKVQuant  ■ peer tool  ● our baseline  ◆ FP", fontsize=7, title_fontsize=7,
                  loc="upper right")
    ax_all.set_yscale("log")
    ax_all.set_title("all rows", fontsize=9)
    ax_zoom.set_title("zoom: 4-bit-weight rows within 20 % of the best of them", fontsize=9)
    for ax in (ax_all, ax_zoom):
        ax.set_xlabel(f"decode memory (kB): weights + KV at {seqlen} tokens, batch 1", fontsize=8)
        ax.set_ylabel("perplexity (decode-exact)", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    ax_text.axis("off")
    ax_text.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=6.6, family="monospace",
                 transform=ax_text.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------- main

def default_model() -> str:
    """The largest model among the shipped one and those under ../shared/fixtures/."""
    candidates = [SHIPPED_MODEL, *(p.parent for p in FIXTURES.glob("*/config.json"))]

    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.glob("*.safetensors")) or sum(
            f.stat().st_size for f in path.glob("*.bin"))

    return str(max(candidates, key=size))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", dest="model_dir", help="stories260k, smollm2-135m or a model directory (default: "
                        "the largest shipped/fixture model; --quick: the shipped stories260k)")
    parser.add_argument("--calib", help="calibration text (default: the model's quality.py protocol)")
    parser.add_argument("--eval", help="evaluation text (default: the model's quality.py protocol)")
    parser.add_argument("--eval-chars", type=int, help="evaluate on the first N characters of the eval text")
    for name in ("nsamples", "seqlen", "epochs", "group-size"):
        parser.add_argument(f"--{name}", type=int, help="default: the model's quality.py protocol")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, help="evaluate the first N eval windows (default: all; --quick: 2)")
    parser.add_argument("--check-windows", type=int, default=4, help="windows decoded to check the parallel pass")
    parser.add_argument("--rows", help="comma-separated row keys, groups or aliases (qc, kivi, llmcompressor, ours)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (also for the peer worker)")
    parser.add_argument("--quick", action="store_true", help="tiny model, nsamples 16, epochs 1, 2 eval windows")
    parser.add_argument("--peer-venv", default=str(PEER_VENV), help="virtual environment for llm-compressor")
    parser.add_argument("--llmcompressor-spec", default=LLMCOMPRESSOR_SPEC)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-write", dest="results", action="store_const", const=None, help="do not append results")
    parser.add_argument("--plot", help="PNG path (default: benchmarks/peers.png; --quick: none)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.nsamples, args.epochs = 16, 1
        args.windows = args.windows or 2
        args.check_windows = min(args.check_windows, 1)
        args.model_dir = args.model_dir or str(SHIPPED_MODEL)
    else:
        args.plot = args.plot or str(ROOT / "benchmarks" / "peers.png")
    if args.no_plot:
        args.plot = None
    args.model_dir, protocol = resolve_model(args.model_dir or default_model())
    for name in ("calib", "eval", "eval_chars", "nsamples", "seqlen", "epochs", "group_size"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(protocol, name))
    args.calib_config = CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen, epochs=args.epochs, seed=args.seed)
    return args


def run(args: argparse.Namespace) -> tuple[list[Result], dict]:
    """Every selected row; returns the results and the run's context (model facts, versions)."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    fp_model, tokenizer = load_model(args.model_dir)
    calib = args.calib_config
    samples = calibration_samples(tokenize(tokenizer, load_text(args.calib)), calib.nsamples, calib.seqlen, calib.seed)
    windows = eval_windows(tokenize(tokenizer, load_text(args.eval)[: args.eval_chars]), calib.seqlen)
    windows = windows[: args.windows] if args.windows else windows
    results = []
    with tempfile.TemporaryDirectory(prefix="wkvq-peers-") as tmp:
        preparer = Preparer(args, fp_model, samples, Path(tmp))
        for row in select_rows(args.rows):
            print(f"row {row.key}", file=sys.stderr, flush=True)
            result = evaluate_row(row, preparer.get(row.weights), windows, args)
            results.append(result)
            print(f"  {row.key}: ppl {fmt(result.ppl, '.3f')}, KV {fmt(result.kv_per_token, '.1f')} B/token, "
                  f"eval {result.eval_seconds:.0f} s{'; ' + result.error if result.error else ''}",
                  file=sys.stderr, flush=True)
        peer_versions = next((p.checkpoint_versions for p in preparer.done.values() if p.checkpoint_versions), None)
    cfg = fp_model.config
    context = dict(
        params=sum(p.numel() for p in fp_model.parameters()), config=cfg, windows=windows.shape[0],
        peer_versions=peer_versions, peer_error=preparer.peer_error,
    )
    return results, context


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    started, code = datetime.datetime.now(datetime.timezone.utc), code_version("wkvq_core")
    results, ctx = run(args)
    minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
    cfg, seqlen = ctx["config"], args.seqlen
    peer = ctx["peer_versions"]
    peer_line = (f"llm-compressor venv `{shown(args.peer_venv)}`: llmcompressor {peer['llmcompressor']}, transformers "
                 f"{peer['transformers']}, compressed-tensors {peer['compressed-tensors']}, torch {peer['torch']}"
                 if peer else f"llm-compressor: {ctx['peer_error'] or 'not run in this invocation'}")
    settings = "\n".join([
        f"- command: `{shlex.join(['python', *sys.argv])}`" if argv is None else
        f"- command: `python benchmarks/peers.py {shlex.join(argv)}`",
        f"- date (UTC): {started:%Y-%m-%d %H:%M}; total runtime {minutes:.1f} min; code {code}",
        f"- ours: torch {torch.__version__}, transformers {transformers.__version__}, compressed-tensors "
        f"{version('compressed-tensors')} (loads the llm-compressor checkpoints), optimum-quanto "
        f"{version('optimum-quanto')}, hqq {version('hqq')}, Python {platform.python_version()}, CPU, "
        f"torch threads {torch.get_num_threads()}",
        f"- {peer_line}",
        f"- model `{shown(args.model_dir)}`: {ctx['params'] / 1e6:.2f}M params, {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads × head_dim "
        f"{cfg.head_dim}, intermediate {cfg.intermediate_size}",
        f"- calibration `{shown(args.calib)}`: {args.nsamples} samples × {seqlen} tokens (seed {args.seed}; the same "
        f"token windows for every calibrating method); evaluation "
        f"{'' if args.eval_chars is None else f'the first {args.eval_chars:,} characters of '}`{shown(args.eval)}`: "
        f"{ctx['windows']} windows × {seqlen} tokens; our calibrations: epochs {args.epochs}",
        "- weights: " + ("one group per output row (-1) for ours, llm-compressor's channel strategy (the same "
                         "grouping) where its group 128 is impossible" if args.group_size == -1 else
                         f"groups of {args.group_size} along the input for every method (ours and llm-compressor's "
                         "group strategy)"),
        "- ppl: peers' quantized caches by token-by-token decoding through the cache; WKVQuant rows by the parallel "
        "POQ pass (proven equal to decoding in tests/test_kv_quant.py), full-precision caches by the parallel pass; "
        f"both checked in this run by decoding the first {args.check_windows} window(s) through the real cache "
        "(packed WKVQuantCache for ours): Δ in the last column",
        f"- memory: float tensors at {FP_BYTES} B/element (fp16 deployment; the run computes in fp32), integer "
        f"codes as stored; KV = the most bytes the cache really holds at any step of decoding a {seqlen}-token "
        f"window, ÷ {seqlen} (residual windows included; for caches that only grow, the bytes at the end); decode "
        "memory = weights + that KV, batch 1, kB = 1000 B; calib peak = max RSS of the calibrating process during "
        "that row's calibration (llm-compressor: its own process)",
    ])
    fp_row = next((r for r in results if r.row.key == "fp"), None)
    body = [
        settings, "", table(results, seqlen), "", "Row notes:", "", *notes_block(results), "",
        "Where WKVQuant (and our W4 LWC weights) win and lose (generated from the rows above):", "",
        *reading(results, seqlen),
    ]
    if args.plot and fp_row is not None and fp_row.ppl is not None:
        plot(results, seqlen, Path(args.plot),
             f"{shown(args.model_dir)}: {ctx['windows']}×{seqlen} eval tokens, {started:%Y-%m-%d} — ppl vs decode "
             "memory")
        body += ["", f"Plot: `{shown(args.plot)}` (ppl vs decode memory per method)."]
    section = f"## Peer comparison {started:%Y-%m-%d %H:%M} UTC{' (quick)' if args.quick else ''}\n\n" + \
        "\n".join(body) + "\n"
    print(section)
    if args.results:
        with Path(args.results).open("a", encoding="utf-8") as fh:
            fh.write(section + "\n")
    return results


if __name__ == "__main__":
    main()
