"""Resource estimates of a calibration job, from the model's config.json and a `WKVQuantConfig`: no weights, no
torch (the API computes them at submit, `wkvq quantize --dry-run` prints them).

What is estimated is the layer-by-layer engine (`loader.StreamedLayers`, `calibrate_`, `evaluate.LayerwiseEval`).

Host: the process (python + torch + transformers, `HOST_BASELINE_BYTES`); embeddings, final norm and an untied
lm_head in the checkpoint dtype; one layer being read (checkpoint dtype, and its fp32 cast for a CUDA device); the
activation caches, quantized-path inputs and FP targets, 2 x nsamples x seqlen x hidden in the cache dtype, updated
in place; the evaluation hidden states, one stream per mode (fp, w, wkv and the RTN baselines w, wkv) x windows x
seqlen x hidden in the cache dtype; tokenizing the larger text (`TEXT_BYTES_PER_CHAR`, and one tokenizer call on a
`TOKENIZE_CHUNK_CHARS` piece). On the CPU the device is the host: its working set is added (x
`CPU_ALLOCATOR_FACTOR`).

Device: the k = crr_k decoder blocks of the window in fp32; one block's calibration parameters (LWC clip logits
gamma, beta: (out, in/group, 1) fp32 per linear; KV smoothing 4 x (kv_heads, head_dim)), their gradients and AdamW
state (2x); what autograd saves for one batch through the k blocks (`layer_saved_bytes`) and the backward's working
set; the batch's inputs, targets and output. Evaluation: the window's blocks + a round-to-nearest copy + frozen
fake-quantized weights; then lm_head and one window's logits (seqlen x vocab fp32). The peak is the largest phase.

FLOPs: matmuls only, 2 x params x tokens for the linears plus 2 x 2 x T^2 x (heads x head_dim) / 2 per sequence for
causal attention (`layer_forward_flops`). Per block: FP propagation (1 forward of the layer over all samples),
smoothing initialisation (1), calibration (epochs x nsamples x (forward + backward = 3 forwards) through the
window's min(k, blocks left) layers), quantized propagation (1); evaluation: every stream through every layer plus
the lm_head. Seconds = FLOPs / (peak of the compute dtype x efficiency) of a `DEVICE_KINDS` entry; on the CPU also
the elementwise work (activation bytes of each layer call / `traffic_bytes_per_second`); plus the start
(`STARTUP_SECONDS`, `LOAD_SECONDS_PER_PARAM`) and tokenization (`TOKENIZE_SECONDS_PER_CHAR`). The CPU's numbers are
fitted to the CPU time (user + sys, one thread) of measured runs: about the wall time on an idle machine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import ATTENTION_KERNELS, EQUALIZE_ALPHAS, EQUALIZE_TOKENS, FP_BITS, WKVQuantConfig
from ..errors import ConfigError

__all__ = [
    "DEVICE_KINDS",
    "HOST_BASELINE_BYTES",
    "DeviceKind",
    "ModelShape",
    "ResourceEstimate",
    "estimate_resources",
    "eval_windows_for_chars",
    "format_bytes",
    "format_seconds",
    "layer_forward_flops",
    "layer_saved_bytes",
]

GiB = 2**30
# Peak RSS of `wkvq quantize` on the shipped 260k-parameter model (python, torch, transformers, tokenizers,
# safetensors imported; allocator arenas; thread pools): 400-450 MiB measured on x86-64 Linux, torch 2.13 CPU; set
# higher because the allocator's retention varies between runs of the same job (tests/test_estimate.py's stories260k
# run peaked at 733-805 MiB on one machine, the most with other jobs running beside it).
# A CUDA build adds its libraries and the CUDA context on the host (~1-2 GB more, not measured here).
HOST_BASELINE_BYTES = 544 * 2**20
HOST_BASELINE_CUDA_BYTES = 2 * GiB
# On the CPU, glibc keeps freed tensors of up to 32 MiB (its dynamic mmap threshold) in its arenas, so a run's peak
# RSS exceeds its live tensors. The factor on the CPU compute working set is set from two measured runs: a
# 12M-parameter LLaMA (H 512, 4 layers, 8 x 256 samples) peaked at 612 MiB (528 MiB with MALLOC_MMAP_THRESHOLD_=
# 65536: the difference is the allocator), estimated 676 MiB; the shipped stories260k at 256 x 256 samples in
# batches of 8 peaked at 733-805 MiB, estimated 844 MiB (tests/test_estimate.py re-measures that one).
CPU_ALLOCATOR_FACTOR = 1.75
CHARS_PER_TOKEN = 3.0  # evaluation text -> tokens when only its length is known (English, 32k-vocab BPE: ~3.5-4.5)
# Tokenizing a text (`data.tokenize`): the file's bytes and the decoded str (2 B per character of English text), the
# int32 ids (4 B per token, at most a token per character) and the id buffer's growth and the allocator: 117 MiB
# measured for 16 MiB of WikiText with stories260k's 512-token vocabulary (1.6 characters per token), 80 MiB with
# SmolLM2's. One tokenizer call on a TOKENIZE_CHUNK_CHARS piece holds ~160 B per character (its encoding).
TEXT_BYTES_PER_CHAR = 8
TOKENIZE_SECONDS_PER_CHAR = 1e-6  # CPU time: 0.42 us (stories260k), 0.80 us (SmolLM2) measured on WikiText
# What a run spends besides the estimated phases, in CPU time of runs with nothing to calibrate (1 x 16 tokens, 0
# epochs; benchmarks/RESULTS.md): python, torch and transformers imports, 6.8 s with the 260k-parameter model; reading
# the checkpoint and writing the artifact, 11.1 s with SmolLM2-135M: 3.2e-8 s per parameter.
STARTUP_SECONDS = 6.5
LOAD_SECONDS_PER_PARAM = 3.2e-8
TOKENIZE_CHUNK_CHARS = 64 * 1024
TOKENIZER_CALL_BYTES_PER_CHAR = 160
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
BLOCK_BYTES = 4  # decoder layers are materialised in fp32 (`StreamedLayers(..., torch.float32)`)


@dataclass(frozen=True)
class DeviceKind:
    """A compute device class. peak_flops: dense matmul peak by compute dtype ("float32" is fp32 without TF32:
    the engine does not enable TF32); efficiency: the fraction of that peak the calibration loop is assumed to
    sustain (fake quantization, norms, softmax and small kernels between the matmuls); traffic_bytes_per_second:
    the elementwise work beside the matmuls, as activation bytes autograd saves per layer call (`layer_saved_bytes`)
    handled per second (0: not counted, the matmuls dominate)."""

    name: str
    cuda: bool
    memory_bytes: int  # device memory; 0 for the CPU (the host's)
    peak_flops: dict[str, float]
    efficiency: float
    note: str
    traffic_bytes_per_second: float = 0.0

    def flops_per_second(self, compute_dtype: str) -> float:
        return self.peak_flops[compute_dtype] * self.efficiency


# Assumed, not measured here (no GPU): about what OmniQuant's reported ~1-2 h for a LLaMA-7B W4A16 calibration on
# one A100 implies for its ~2e17 FLOPs with bf16 matmuls.
GPU_EFFICIENCY = 0.2
_NVIDIA_H100_SXM = {"float32": 67e12, "tf32": 495e12, "bfloat16": 989e12}
DEVICE_KINDS: dict[str, DeviceKind] = {
    kind.name: kind
    for kind in (
        DeviceKind("cpu", False, 0, {"float32": 200e9, "tf32": 200e9, "bfloat16": 200e9}, 0.4,
                   "2-core x86-64: ~100 GFLOP/s fp32 sgemm (2048^3) per core measured; efficiency and traffic fitted "
                   "to the CPU time of stories260k and SmolLM2-135M jobs (benchmarks/RESULTS.md)",
                   traffic_bytes_per_second=0.65e9),
        DeviceKind("a100-80gb", True, 80 * GiB, {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12},
                   GPU_EFFICIENCY,
                   "NVIDIA A100 SXM 80GB datasheet dense peaks"),
        DeviceKind("h100-80gb", True, 80 * GiB, dict(_NVIDIA_H100_SXM), GPU_EFFICIENCY,
                   "NVIDIA H100 SXM 80GB datasheet dense peaks"),
        DeviceKind("h200", True, 140 * GiB, dict(_NVIDIA_H100_SXM), GPU_EFFICIENCY,
                   "NVIDIA H200 (H100 compute, 141 GB HBM3e) datasheet dense peaks"),
    )
}

# Bytes autograd keeps per decoder layer and sample, by (attention, activation bytes, quantized block), per unit:
# T*I, T*H, T*kv_dim, heads*T^2, weight elements, weight groups. Measured on WKVAttention / QuantLinear with
# torch.autograd.graph.saved_tensors_hooks (distinct storages, parameters and inputs left out), least squares over
# 24 LLaMA shapes (the quantized block's rows refitted when the fake quantization's backward was written out);
# tests/test_estimate.py re-measures them. The quantized block keeps, per linear, the fake quantization's levels
# (fp32) and clamp mask (bool) and the quantized weight; under bf16 autocast every block keeps bf16 copies of its
# weights for the input gradient. Eager attention keeps the (heads, T, T) probabilities (fp32, plus a bf16 copy under
# autocast); the fused SDPA path does not.
_SAVED = {
    # (attention, act bytes, quantized): (TI, TH, Tkv, hT2, P, G)
    ("eager", 4, True): (18.5, 41.5, 12.0, 4.5, 11.5, 0.5),
    ("eager", 4, False): (12.0, 6.0, 16.0, 4.5, 0.0, 0.0),
    ("eager", 2, True): (9.0, 40.0, 10.0, 6.5, 10.0, 0.5),
    ("eager", 2, False): (6.0, 8.0, 4.5, 6.0, 2.0, 0.0),
    ("sdpa", 4, True): (16.5, 51.0, 7.0, 0.0, 11.5, 0.5),
    ("sdpa", 4, False): (12.0, 10.0, 15.0, 0.3, 0.0, 2.0),
    ("sdpa", 2, True): (7.5, 36.5, 13.5, 0.0, 10.0, 0.5),
    ("sdpa", 2, False): (6.0, 7.0, 8.0, 0.2, 2.0, 1.0),
}


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a LLaMA / Mistral config.json that the estimate needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    dtype: str = "float32"  # the checkpoint's

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        def need(name: str) -> int:
            value = config.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model config: {name} must be a positive integer; got {value!r}")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
        return cls(hidden=hidden, intermediate=need("intermediate_size"), layers=need("num_hidden_layers"),
                   heads=heads, kv_heads=int(kv_heads), head_dim=int(head_dim), vocab=need("vocab_size"),
                   tied=bool(config.get("tie_word_embeddings", False)), dtype=dtype)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of the 7 linears of a decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (self.q_dim, h), "k_proj": (self.kv_dim, h), "v_proj": (self.kv_dim, h),
                "o_proj": (h, self.q_dim), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    @property
    def linear_params(self) -> int:
        return sum(o * i for o, i in self.linears().values())

    @property
    def layer_params(self) -> int:
        return self.linear_params + 2 * self.hidden  # + the two RMSNorm weights

    @property
    def resident_params(self) -> int:
        """Embeddings, final norm and an untied lm_head: what stays loaded for the whole run."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def checkpoint_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)


def _group(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def calibration_parameter_count(shape: ModelShape, config: WKVQuantConfig) -> tuple[int, int]:
    """(LWC clip logits, KV smoothing) elements of one block."""
    clip = 0
    if config.weight.enabled and config.weight.lwc:
        clip = sum(2 * o * math.ceil(i / _group(i, config.weight.group_size)) for o, i in shape.linears().values())
    smooth = 4 * shape.kv_dim if config.kv.enabled and config.kv.smoothing else 0
    return clip, smooth


def layer_forward_flops(shape: ModelShape, seqlen: int, sequences: int = 1, causal: bool = True) -> float:
    """Matmul FLOPs of one decoder layer's forward over `sequences` sequences of `seqlen` tokens: 2 x params x
    tokens for the linears, 2 x 2 x T^2 x heads x head_dim per sequence for QK^T and PV, halved when causal (the
    eager kernel computes the whole square, `causal=False` counts that)."""
    attention = 4 * seqlen * seqlen * shape.q_dim * (0.5 if causal else 1.0)
    return float(sequences) * (2 * shape.linear_params * seqlen + attention)


def layer_saved_bytes(shape: ModelShape, config: WKVQuantConfig, seqlen: int, *, quantized: bool, attention: str,
                      act_bytes: int) -> tuple[float, float]:
    """(activation bytes per sample, weight-shaped bytes) autograd keeps through one decoder layer in a
    calibration step: `quantized` for the block being calibrated (its clip logits and smoothing train), else a
    later block of the window (full precision, gradients only flow through). act_bytes: 4, or 2 under bf16
    autocast. See `_SAVED` for where the coefficients come from."""
    ti, th, tkv, ht2, per_weight, per_group = _SAVED[(attention, act_bytes, quantized)]
    t = seqlen
    activations = (ti * t * shape.intermediate + th * t * shape.hidden + tkv * t * shape.kv_dim
                   + ht2 * shape.heads * t * t)
    weights = 0.0
    if per_weight or per_group:
        linears = shape.linears()
        if quantized and not (config.weight.enabled and config.weight.lwc):  # only the smoothing folds in v / o
            linears = {n: linears[n] for n in ("v_proj", "o_proj")} if config.kv.enabled and config.kv.smoothing else {}
            per_weight = per_weight if linears else 0.0
        elements = sum(o * i for o, i in linears.values())
        groups = sum(o * math.ceil(i / _group(i, config.weight.group_size)) for o, i in linears.values())
        weights = per_weight * elements + (per_group * groups if quantized else 0.0)
    return activations, weights


def eval_windows_for_chars(chars: int, seqlen: int, eval_tokens: int = 0,
                           chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """Evaluation windows of a text of `chars` characters when its tokens are not counted: chars / chars_per_token
    tokens, at most `eval_tokens` (0: no bound), in non-overlapping windows of `seqlen`."""
    tokens = int(chars / chars_per_token)
    return (min(tokens, eval_tokens) if eval_tokens else tokens) // seqlen


# upper bounds of what a stored object holds besides its tensors: a checkpoint's header; an artifact's headers,
# config, metrics, manifest and tar framing
CHECKPOINT_OVERHEAD, ARTIFACT_OVERHEAD = 64 << 10, 1 << 20


def estimate_storage(model_config: dict[str, Any], config: WKVQuantConfig) -> dict[str, int]:
    """Upper bounds of the bytes a run stores: its block checkpoints (the learned fp32 tensors of every block) and
    its artifact's packed weights (`wkvq_core.artifact`: codes, fp16 scales and zeros per group, fp16 everything
    else, fp32 K scale and shift), with their overheads. Tokenizer files are not included."""
    shape = ModelShape.from_config(model_config)
    clip, smooth = calibration_parameter_count(shape, config)
    checkpoints = shape.layers * ((clip + smooth) * 4 + CHECKPOINT_OVERHEAD)
    bits = config.weight.bits if config.weight.enabled else FP_BITS
    linears = 0
    for out_features, in_features in shape.linears().values():
        if bits == FP_BITS:
            linears += out_features * in_features * 2
        else:
            groups = math.ceil(in_features / _group(in_features, config.weight.group_size))
            linears += out_features * ((in_features * bits + 7) // 8 + 2 * groups * 2)
    per_layer = linears + 2 * (shape.kv_dim + shape.hidden) + 2 * shape.hidden * 2 + 2 * shape.kv_dim * 4
    artifact = shape.layers * per_layer + shape.resident_params * 2 + ARTIFACT_OVERHEAD
    return {"checkpoints": checkpoints, "artifact": artifact}


def rtn_mode_count(config: WKVQuantConfig) -> int:
    return int(config.weight.enabled or config.act_bits != FP_BITS) + int(config.kv.enabled)


@dataclass
class ResourceEstimate:
    """What a job is expected to need. breakdown: {"device": {component: bytes}, "host": {component: bytes},
    "flops": {phase: FLOPs}, "seconds": {phase: s}}; device_phase: the phase that sets the device peak."""

    device: str
    attention: str
    compute_dtype: str
    cache_dtype: str
    peak_device_bytes: int
    peak_host_bytes: int
    flops: float
    seconds: float
    device_phase: str
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResourceEstimate:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def dominant(self, section: str) -> str:
        """The largest component of a breakdown section ("device", "host", "flops")."""
        items = self.breakdown.get(section) or {}
        return max(items, key=items.get) if items else ""


def estimate_resources(model_config: dict[str, Any], config: WKVQuantConfig, *, eval_windows: int = 0,
                       text_chars: tuple[int, ...] = (), device: str = "cpu",
                       attention: str | None = None) -> ResourceEstimate:
    """Peak device and host memory, FLOPs and seconds of a calibration job (see the module docstring).

    model_config: the model's config.json; eval_windows: evaluation windows of `seqlen` tokens (0: no
    evaluation); text_chars: characters of each text the job tokenizes (calibration, evaluation); device: a
    `DEVICE_KINDS` name; attention: "eager" | "sdpa" (default: `calib.attention`, whose
    "auto" is sdpa on CUDA, eager on the CPU). Raises ConfigError for an unknown device or a config lacking a size.

    Example::

        est = estimate_resources(json.load(open("Llama-2-7b-hf/config.json")), WKVQuantConfig(), device="a100-80gb")
        print(format_bytes(est.peak_device_bytes), est.dominant("device"))
    """
    if device not in DEVICE_KINDS:
        raise ConfigError(f"unknown device kind {device!r}; one of {', '.join(DEVICE_KINDS)}")
    kind, shape, calib = DEVICE_KINDS[device], ModelShape.from_config(model_config), config.calib
    cache, compute, calib_attention = calib.resolved(kind.cuda)
    attention = calib_attention if attention in (None, "auto") else attention
    if attention not in ATTENTION_KERNELS:
        raise ConfigError(f"attention must be {' or '.join(ATTENTION_KERNELS)}; got {attention!r}")
    act, cache_bytes = DTYPE_BYTES[compute], DTYPE_BYTES[cache]
    n, t, b, layers, hidden = calib.nsamples, calib.seqlen, calib.batch_size, shape.layers, shape.hidden
    window = min(calib.crr_k, layers)
    clip, smooth = calibration_parameter_count(shape, config)
    trained = clip + smooth
    eval_windows = max(0, int(eval_windows))
    streams = (len(("fp", "w", "wkv")) + rtn_mode_count(config)) if eval_windows else 0

    # ---- device: calibration of one block (the largest phase unless nothing is trained)
    q_act, q_w = layer_saved_bytes(shape, config, t, quantized=True, attention=attention, act_bytes=act)
    f_act, f_w = layer_saved_bytes(shape, config, t, quantized=False, attention=attention, act_bytes=act)
    # backward: gradients of the largest intermediates; eager attention differentiates through ~6 (heads, T, T)
    # fp32 tensors (probabilities, scores, mask, POQ select, scaling) in one layer
    largest = max(6 * shape.heads * t * t * 4 if attention == "eager" else 0, 2 * t * shape.intermediate * act)
    block_bytes = shape.layer_params * BLOCK_BYTES
    calibration = {"blocks": window * block_bytes}
    if trained and calib.epochs:
        calibration |= {
            "calibration_parameters": trained * 4,
            "gradients": trained * 4,
            "optimizer_state": 2 * trained * 4,
            "saved_weights": q_w + (window - 1) * f_w,
            "saved_activations": b * (q_act + (window - 1) * f_act),
            "backward_working_set": b * largest,
        }
    calibration["batch"] = 3 * b * t * hidden * 4 + 2 * t * shape.head_dim * 4
    forward_transient = b * (3 * t * shape.intermediate * act
                             + (2 * shape.heads * t * t * 4 if attention == "eager" else 0))
    phases = {"calibration": calibration}
    gptq = config.weight.enabled and config.weight.gptq
    if gptq:  # one group's Hessian (fp32) and gptq_codes' float32 copies: of it and its factors, and of the group's
        # weights, their expanded scales and zeros, each also permuted, and the codes
        widest = max(i for _, i in shape.linears().values())
        # the largest group gptq_codes rounds stacked (calib.gptq.SEQUENTIAL): q/k/v or gate/up
        largest_weight = max(shape.q_dim + 2 * shape.kv_dim, 2 * shape.intermediate) * shape.hidden
        phases["gptq"] = {"blocks": window * block_bytes, "hessian": widest * widest * 4,
                          "gptq_working_set": 3 * widest * widest * 4 + 7 * largest_weight * 4}
    if eval_windows:
        phases["evaluation"] = {"blocks": window * block_bytes,
                                "rtn_copy": block_bytes if rtn_mode_count(config) else 0,
                                "frozen_weights": shape.linear_params * BLOCK_BYTES,
                                "forward": forward_transient + 2 * t * hidden * 4}
        phases["evaluation_head"] = {"lm_head": shape.vocab * hidden * (shape.checkpoint_bytes + BLOCK_BYTES),
                                     "logits": 3 * t * shape.vocab * 4}
    device_phase = max(phases, key=lambda name: sum(phases[name].values()))
    device_parts = {name: float(v) for name, v in phases[device_phase].items() if v}
    peak_device = int(sum(device_parts.values()))

    # ---- host
    host = {
        "baseline": float(HOST_BASELINE_CUDA_BYTES if kind.cuda else HOST_BASELINE_BYTES),
        "resident_weights": float(shape.resident_params * shape.checkpoint_bytes),
        # a layer being read: its memory-mapped checkpoint pages, their copy and (for a CUDA device) the fp32 cast
        "layer_staging": float(shape.layer_params * (2 * shape.checkpoint_bytes + (BLOCK_BYTES if kind.cuda else 0))),
        "activation_caches": float(2 * n * t * hidden * cache_bytes),
        "token_ids": float((n + eval_windows) * t * 8),
    }
    if text_chars:  # one text at a time, before calibration
        largest = max(text_chars)
        host["tokenization"] = float(largest * TEXT_BYTES_PER_CHAR
                                     + min(largest, TOKENIZE_CHUNK_CHARS) * TOKENIZER_CALL_BYTES_PER_CHAR)
    if eval_windows:
        host["evaluation_states"] = float(streams * eval_windows * t * hidden * cache_bytes)
    if not kind.cuda:
        host["compute (cpu is the device)"] = float(peak_device * CPU_ALLOCATOR_FACTOR)
    peak_host = int(sum(host.values()))

    # ---- FLOPs and time
    per_layer = layer_forward_flops(shape, t, n)
    window_layers = sum(min(calib.crr_k, layers - i) for i in range(layers))
    flops = {
        "fp_propagation": layers * per_layer,
        "smoothing_init": layers * per_layer if smooth else 0.0,
        "calibration": calib.epochs * 3 * window_layers * per_layer if trained else 0.0,
        "quantized_propagation": layers * per_layer,
    }
    if config.weight.enabled and config.weight.equalize:  # a full-precision pass, then the search's grid
        kept = min(n * t, EQUALIZE_TOKENS)
        flops["equalize"] = layers * (per_layer + (len(EQUALIZE_ALPHAS) + 1) * 2.0 * kept * shape.linear_params)
    if gptq:  # a quantized pass per group of linears sharing an input (q/k/v, o, gate/up, down), the Hessians,
        # GPTQ's updates (~2 out in^2 per linear)
        flops["gptq"] = layers * (4 * per_layer
                                  + sum(2.0 * n * t * i * i + 2.0 * o * i * i for o, i in shape.linears().values()))
    if eval_windows:
        flops["evaluation"] = streams * (layers * layer_forward_flops(shape, t, eval_windows)
                                         + eval_windows * 2.0 * t * shape.vocab * hidden)
    flops = {name: float(v) for name, v in flops.items() if v}
    rate = kind.flops_per_second(compute)
    seconds = {name: v / rate for name, v in flops.items()}
    params = layers * shape.layer_params + shape.resident_params
    seconds["startup"] = STARTUP_SECONDS + params * LOAD_SECONDS_PER_PARAM
    if kind.traffic_bytes_per_second:
        traffic = {
            "fp_propagation": layers * n * f_act,
            "smoothing_init": layers * n * f_act if smooth else 0.0,
            "calibration": calib.epochs * 3 * n * sum(q_act + (min(calib.crr_k, layers - i) - 1) * f_act
                                                      for i in range(layers)) if trained else 0.0,
            "quantized_propagation": layers * n * q_act,
            "evaluation": streams * eval_windows * layers * f_act,
        }
        for name, v in traffic.items():
            if v:
                seconds[name] = seconds.get(name, 0.0) + v / kind.traffic_bytes_per_second
    if text_chars:
        seconds["tokenization"] = sum(text_chars) * TOKENIZE_SECONDS_PER_CHAR
    return ResourceEstimate(
        device=device, attention=attention, compute_dtype=compute, cache_dtype=cache,
        peak_device_bytes=peak_device, peak_host_bytes=peak_host, flops=float(sum(flops.values())),
        seconds=float(sum(seconds.values())), device_phase=device_phase,
        breakdown={"device": device_parts, "host": host, "flops": flops, "seconds": seconds},
        inputs={"layers": layers, "hidden": hidden, "nsamples": n, "seqlen": t, "epochs": calib.epochs,
                "batch_size": b, "crr_k": calib.crr_k, "eval_windows": eval_windows, "eval_streams": streams,
                "checkpoint_dtype": shape.dtype, "flops_per_second": rate},
    )


def format_bytes(n: float) -> str:
    """Decimal units, 2 significant digits at least: 8.8 TB, 512 GB, 950 MB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


def format_seconds(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.0f} min"
    return f"{s:.1f} s"
