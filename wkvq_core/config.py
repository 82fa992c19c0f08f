"""Configuration dataclasses. A bit width of 16 means "not quantized" everywhere."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import ConfigError

FP_BITS = 16
QUANT_BITS = range(2, 9)
DEFAULT_SEQLEN = 2048
# Evaluation reads at most this many tokens of its text (0: all of it): 32 windows of 2048, 256 of 256, a perplexity
# stable to ~1 %; WikiText-2's whole test split (~300k tokens) takes hours on a CPU.
DEFAULT_EVAL_TOKENS = 65536
SMOOTH_PARAMS = ("direct", "relative")
SMOOTH_INITS = ("range", "identity")
RUN_DTYPES = ("auto", "float32", "bfloat16")
ATTENTION_KERNELS = ("eager", "sdpa")  # WKVAttention.attention_backend
ATTENTION_BACKENDS = ("auto", *ATTENTION_KERNELS)
# The deployment targets (`wkvq_core.targets`, one module each; a test keeps this list equal to theirs).
RUNTIME_TARGET = "runtime"
TARGET_NAMES = (RUNTIME_TARGET, "llamacpp", "vllm")


class EvalMode(str, Enum):
    """What a perplexity evaluation quantizes."""

    FP = "fp"  # the original model
    W = "w"  # quantized weights (and activations, if configured), full-precision KV cache
    WKV = "wkv"  # quantized weights and KV cache


class CRRLoss(str, Enum):
    """Distance between the quantized and full-precision paths after k blocks."""

    MAE = "mae"  # WKVQuant cross-block reconstruction regularization
    MSE = "mse"  # with k = 1: OmniQuant's block-wise loss


def _check_bits(name: str, bits: int) -> None:
    if bits != FP_BITS and bits not in QUANT_BITS:
        raise ConfigError(f"{name} must be between 2 and 8, or 16 for full precision; got {bits}")


def model_context(model_config: dict[str, Any]) -> int | None:
    """The model's context length (config.json's max_position_embeddings), when it states one."""
    max_len = model_config.get("max_position_embeddings")
    return max_len if isinstance(max_len, int) and max_len > 0 else None


def check_seqlen(seqlen: int, model_config: dict[str, Any]) -> None:
    max_len = model_context(model_config)
    if max_len is not None and seqlen > max_len:
        raise ConfigError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {max_len}")


EQUALIZE_ALPHAS = tuple(i / 20 for i in range(20))  # the exponents AWQ's search tries (0: no scaling)
EQUALIZE_TOKENS = 8192  # inputs per linear the search keeps (every k-th token)
DEFAULT_GROUP_SIZES = (128, 64, 32)  # smaller groups would cost more in scales and zeros than they save


def linear_inputs(model_config: dict[str, Any]) -> dict[str, int]:
    """The input dims of the quantized linears: hidden_size (q, k, v, o, gate, up) and intermediate_size (down)."""
    dims = {name: model_config.get(name) for name in ("hidden_size", "intermediate_size")}
    if not all(isinstance(dim, int) and dim > 0 for dim in dims.values()):
        raise ConfigError("model config lacks hidden_size / intermediate_size")
    return dims


def default_group_size(model_config: dict[str, Any]) -> int:
    """The largest of DEFAULT_GROUP_SIZES that divides every quantized linear's input, else -1 (one group per row)."""
    dims = linear_inputs(model_config).values()
    return next((size for size in DEFAULT_GROUP_SIZES if all(dim % size == 0 for dim in dims)), -1)


def check_group_size(group_size: int, model_config: dict[str, Any]) -> None:
    """The check a real run makes when it builds the quantized linears (weight_clip), from config.json alone."""
    if group_size < 1:  # -1: one group per row; other values are refused by WeightQuantConfig
        return
    for name, dim in linear_inputs(model_config).items():
        if dim % group_size:
            raise ConfigError(f"group_size {group_size} does not divide the model's {name} {dim} (use a divisor, "
                              f"or -1 for one group per row; default: {default_group_size(model_config)})")


def head_dim(model_config: dict[str, Any]) -> int:
    hidden, heads = model_config.get("hidden_size"), model_config.get("num_attention_heads")
    dim = model_config.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int)
                                           and heads > 0 else None)
    if not isinstance(dim, int) or dim <= 0:
        raise ConfigError("model config lacks head_dim (or hidden_size and num_attention_heads)")
    return dim


def check_kv_group_size(kv_group_size: int | None, model_config: dict[str, Any]) -> None:
    """The check a real run makes when it builds the attention layers (kv_quant), from config.json alone."""
    if kv_group_size is not None and head_dim(model_config) % kv_group_size:
        raise ConfigError(f"kv_group_size {kv_group_size} does not divide head_dim {head_dim(model_config)}")


def resolve_group_size(group_size: int | None, model_config: dict[str, Any]) -> int:
    """`group_size` checked against the model; None: default_group_size."""
    if group_size is None:
        return default_group_size(model_config)
    check_group_size(group_size, model_config)
    return group_size


def resolve_seqlen(seqlen: int | None, model_config: dict[str, Any]) -> int:
    """`seqlen` checked against the model's context; None: DEFAULT_SEQLEN, or the context when it is shorter."""
    if seqlen is None:
        return min(DEFAULT_SEQLEN, model_context(model_config) or DEFAULT_SEQLEN)
    check_seqlen(seqlen, model_config)
    return seqlen


@dataclass
class WeightQuantConfig:
    """Asymmetric uniform group-wise weight quantization with OmniQuant learnable weight clipping (LWC).

    group_size: consecutive input channels sharing one (scale, zero); -1 = one group per output row.
    lwc: learn per-group clip factors sigmoid(gamma) on the max and sigmoid(beta) on the min.

    Beyond the paper (off in the `paper` method):
    equalize: before a block is calibrated, activation-aware equivalent scaling (AWQ's search) folded into its
        weights (RMSNorm -> q/k/v and gate/up, v_proj -> o_proj, up_proj -> down_proj): LWC and CRR train from there.
    gptq: once a block is calibrated, its codes are chosen by GPTQ's error-compensating rounding on the learned
        scales and zero points (the grid LWC found), from the block's inputs on the quantized path.
    """

    bits: int = 4
    group_size: int = 128
    lwc: bool = True
    lwc_init: float = 4.0
    lr: float = 1e-2
    equalize: bool = False
    gptq: bool = False

    def __post_init__(self) -> None:
        _check_bits("w_bits", self.bits)
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size must be a positive divisor of the input size or -1; got {self.group_size}")

    @property
    def enabled(self) -> bool:
        return self.bits != FP_BITS


@dataclass
class KVQuantConfig:
    """Two-dimensional KV-cache quantization.

    Static per-channel smoothing of K (after RoPE) and V: X~ = (X - shift) / scale, learnable, initialised from
    calibration statistics (see `kv_quant.init_smoothing_`); then dynamic per-token asymmetric quantization per KV
    head in groups of `group_size` channels (None: the whole head_dim).
    poq: past-only quantization, the current token attends to its own K/V in full precision.
    smooth_alpha: initial scale = half-range ** smooth_alpha per channel, normalised to geometric mean 1.
    smooth_init: "range" starts the smoothing from calibration statistics (shift = mid-range, scale from
        smooth_alpha: the paper); "identity" from scale 1, shift 0, so training starts from the unsmoothed cache.

    Beyond the paper (all off in the `paper` preset):
    smooth_param: "direct" trains scale and shift themselves (the paper); "relative" trains log(scale) and the
        shift in units of the channel's initial scale, so an Adam step moves every channel by the same relative
        amount (use with a larger lr, e.g. 1e-2: at 5e-4 neither form moves far in one block's few steps).
    k_pre_rope: smooth and quantize K before RoPE (KVQuant); RoPE is applied to the dequantized keys.
    rotate: an orthonormal Hadamard rotation of the head dim after smoothing (K with q, V undone after attention).
    sink_tokens: the first tokens of every sequence stay in full precision in the cache (attention sinks) and are
        left out of the smoothing's calibration statistics.
    fp_prefill: a forward of several new tokens through a cache (generate's prefill) attends to all of them in full
        precision; they are stored quantized. Teacher-forced perplexity (one pass, no cache) is unaffected.
    smooth_v_scale: False keeps V's smoothing scale at 1 (V only shifted): the scale is folded into o_proj's input
        channels, which widens its weight groups; the shift folds into o_proj's bias exactly.
    cache_type: the engine's KV cache type, for targets that have several of one bit width (llamacpp: q4_0 or q4_1);
        None: the target's default for `bits`.
    """

    bits: int = 4
    group_size: int | None = None
    smoothing: bool = True
    smooth_alpha: float = 0.75
    lr: float = 5e-4
    poq: bool = True
    smooth_param: str = "direct"
    k_pre_rope: bool = False
    rotate: bool = False
    sink_tokens: int = 0
    fp_prefill: bool = False
    cache_type: str | None = None
    smooth_init: str = "range"
    smooth_v_scale: bool = True

    def __post_init__(self) -> None:
        _check_bits("kv_bits", self.bits)
        if self.smooth_init not in SMOOTH_INITS:
            raise ConfigError(f"smooth_init must be one of {', '.join(SMOOTH_INITS)}; got {self.smooth_init!r}")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"kv_group_size must be positive; got {self.group_size}")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"smooth_alpha must be in [0, 1]; got {self.smooth_alpha}")
        if self.smooth_param not in SMOOTH_PARAMS:
            raise ConfigError(f"smooth_param must be one of {', '.join(SMOOTH_PARAMS)}; got {self.smooth_param!r}")
        if self.sink_tokens < 0:
            raise ConfigError(f"sink_tokens must be >= 0; got {self.sink_tokens}")

    @property
    def enabled(self) -> bool:
        return self.bits != FP_BITS


# KV options beyond the paper, by method name: "paper" is arXiv 2402.12065 as published (KVQuantConfig's own
# defaults); "recommended" won on held-out text over 3 calibration seeds on SmolLM2-135M (benchmarks/RESULTS.md).
RECOMMENDED_KV: dict[str, Any] = dict(smooth_param="relative", lr=1e-2, k_pre_rope=True, sink_tokens=4,
                                      smooth_v_scale=False)
RECOMMENDED = "recommended"
METHODS: dict[str, dict[str, Any]] = {
    "paper": {},
    RECOMMENDED: RECOMMENDED_KV,
}
DEFAULT_METHOD = "recommended"
# The weight side of each method: the paper's LWC, and the options beyond it that won (benchmarks/weights.py).
RECOMMENDED_WEIGHT: dict[str, Any] = dict(gptq=True)
WEIGHT_METHODS: dict[str, dict[str, Any]] = {"paper": {}, RECOMMENDED: RECOMMENDED_WEIGHT}
# Its calibration: with gptq's rounding after each block, CRR windows of 1-5 blocks gave the same perplexity at a
# fraction of the cost (benchmarks/weights.py `-kN` rows, benchmarks/scale.py block-seconds); paper: k = 5.
RECOMMENDED_CALIB: dict[str, Any] = dict(crr_k=2)
CALIB_METHODS: dict[str, dict[str, Any]] = {"paper": {}, RECOMMENDED: RECOMMENDED_CALIB}


def kv_config(method: str, refused: tuple[str, ...] = (), **fields: Any) -> KVQuantConfig:
    """A KVQuantConfig with a method's options, but those in `refused` (which a target's engine cannot compute);
    `fields` (bits, group_size, smoothing, poq, ...) set the rest."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    options = {name: value for name, value in METHODS[method].items() if name not in refused}
    return KVQuantConfig(**(options | fields))


def weight_config(method: str, **fields: Any) -> WeightQuantConfig:
    """A WeightQuantConfig with a method's weight options (WEIGHT_METHODS); `fields` (bits, group_size, lwc, ...)
    set the rest."""
    if method not in WEIGHT_METHODS:
        raise ConfigError(f"method must be one of {', '.join(WEIGHT_METHODS)}; got {method!r}")
    return WeightQuantConfig(**(WEIGHT_METHODS[method] | fields))


def calib_config(method: str, **fields: Any) -> CalibConfig:
    """A CalibConfig with a method's calibration options (CALIB_METHODS); `fields` (nsamples, crr_k, ...) set the
    rest."""
    if method not in CALIB_METHODS:
        raise ConfigError(f"method must be one of {', '.join(CALIB_METHODS)}; got {method!r}")
    return CalibConfig(**(CALIB_METHODS[method] | fields))


@dataclass
class CalibConfig:
    """Block-by-block calibration (OmniQuant order) with the cross-block reconstruction loss over `crr_k` blocks.

    Precision ("auto" resolves by device: `resolved`): cache_dtype of the activation caches
    on the host (auto: bfloat16 on CUDA, float32 elsewhere); compute_dtype of block computation (auto: bfloat16
    autocast on CUDA, float32 elsewhere; calibration parameters and optimizer state are always fp32); attention,
    the POQ attention kernel (auto: "sdpa" on CUDA, "eager" elsewhere).
    """

    nsamples: int = 128
    seqlen: int = DEFAULT_SEQLEN
    epochs: int = 5
    batch_size: int = 1
    crr_k: int = 5
    loss: CRRLoss = CRRLoss.MAE
    seed: int = 0
    cache_dtype: str = "auto"
    compute_dtype: str = "auto"
    attention: str = "auto"

    def __post_init__(self) -> None:
        self.loss = CRRLoss(self.loss)
        for name, allowed in (("cache_dtype", RUN_DTYPES), ("compute_dtype", RUN_DTYPES), ("attention", ATTENTION_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("nsamples", "seqlen", "batch_size", "crr_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0; got {self.epochs}")
        if self.nsamples % self.batch_size:
            raise ConfigError(f"batch_size {self.batch_size} must divide nsamples {self.nsamples}")

    def resolved(self, cuda: bool) -> tuple[str, str, str]:
        """(cache_dtype, compute_dtype, attention) with "auto" resolved: bfloat16, bfloat16 and sdpa on CUDA,
        float32, float32 and eager elsewhere."""
        auto_dtype = "bfloat16" if cuda else "float32"
        pick = lambda name, auto: auto if name == "auto" else name  # noqa: E731
        return (pick(self.cache_dtype, auto_dtype), pick(self.compute_dtype, auto_dtype),
                pick(self.attention, "sdpa" if cuda else "eager"))


@dataclass
class WKVQuantConfig:
    """Everything that defines a WKVQuant run. act_bits < 16 adds per-token input quantization to every linear
    (the W4A4 comparison baseline). target: the engine the artifact is calibrated for and exported to
    (`wkvq_core.targets`)."""

    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    kv: KVQuantConfig = field(default_factory=KVQuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    act_bits: int = FP_BITS
    target: str = RUNTIME_TARGET

    def __post_init__(self) -> None:
        _check_bits("act_bits", self.act_bits)
        if self.target not in TARGET_NAMES:
            raise ConfigError(f"target must be one of {', '.join(TARGET_NAMES)}; got {self.target!r}")

    def to_dict(self) -> dict[str, Any]:
        """As stored in artifacts and checkpoints; the runtime target, an unset cache_type and the range
        smooth_init are left out, so that what runs as before is written as before."""
        data = dataclasses.asdict(self) | {"calib": dataclasses.asdict(self.calib) | {"loss": self.calib.loss.value}}
        if self.kv.cache_type is None:
            del data["kv"]["cache_type"]
        if self.kv.smooth_init == "range":
            del data["kv"]["smooth_init"]
        if self.kv.smooth_v_scale:
            del data["kv"]["smooth_v_scale"]
        for option in ("equalize", "gptq"):  # the weight options beyond the paper, written only when on
            if not data["weight"][option]:
                del data["weight"][option]
        if self.target == RUNTIME_TARGET:
            del data["target"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WKVQuantConfig:
        try:
            return cls(
                weight=WeightQuantConfig(**data.get("weight", {})),
                kv=KVQuantConfig(**data.get("kv", {})),
                calib=CalibConfig(**data.get("calib", {})),
                act_bits=data.get("act_bits", FP_BITS),
                target=data.get("target", RUNTIME_TARGET),
            )
        except TypeError as exc:
            raise ConfigError(f"invalid WKVQuant config: {exc}") from exc
