"""Evaluation with a deployment target's semantics: the model computed as the target's engine computes it.

`apply_semantics_(model, config, target, cache_type, rotate)` switches a loaded artifact (`load_quantized`) or a
prepared model (RTN weights, `prepare_model_`) in place; `perplexity` then gives what that engine gives.

- "runtime": our packed runtime (`WKVQuantCache`): the model's own KV quantization per token (its group size and
  sink tokens) with POQ, its K smoothing.
- "llamacpp": llama.cpp running the model's GGUF export (`export.gguf`):
  - the KV cache as the llamacpp target stores it (`targets.llamacpp.LlamaCppKV`: blocks of 32 of the cache type,
    Hadamard rotation unless `rotate` is False, i.e. LLAMA_ATTN_ROT_DISABLE=1; every token attends to its own
    quantized K/V, no POQ; no sink tokens or full-precision prefill; K quantized after RoPE);
  - K as the export carries it: a model of another target loses its per-channel K smoothing (the export drops
    it); a llamacpp-target model keeps its own, which the export folds into q_proj / k_proj. The V smoothing is
    folded into v_proj / o_proj either way;
  - the inputs of the 4-bit linears rounded to Q8_1 blocks (the target's `matmul_input`), as llama.cpp's CPU
    Q4_1 matmuls round them (ggml's vec_dot type for Q4_1), and the query as its attention rounds it for the
    quantized K (`LlamaCppKV`). A KV-only artifact's linears are unquantized in the GGUF too (its dtype), their
    inputs left as they are.
  An "f16" cache leaves K/V unquantized here (llama.cpp rounds them to fp16, which this leaves out).
  Not computed: the fp16 rounding of the Q8_1 block sums that multiply Q4_1's m, the F16 matmuls of the
  embeddings / lm_head, the rest of the attention's own arithmetic, and the Q4_1 blocks that the export cannot
  write exactly (notes `q4_1.inexact_blocks`; none for a llamacpp-target artifact).
- "vllm": vLLM serving the model's compressed-tensors export (`export.vllm`) in bf16 on a GPU (sm80+):
  - the KV cache as `--kv-cache-dtype int4_per_token_head` stores it (`targets.vllm.VllmKV`: randomized Hadamard
    rotation, 4-bit asymmetric per token and KV head, the kernel's rounding and scale truncation; no POQ, K after
    RoPE, no sink tokens), or unquantized (`auto`), and the query rounded as it rotates it;
  - K as the export carries it (as for llamacpp: a per-channel K smoothing is dropped, a vllm-target model's folded
    one kept), the V smoothing folded;
  - the linears' inputs rounded to bf16 (the target's `matmul_input`). The rest of the bf16 model (its residual
    stream, norms, attention output, the weights' bf16 dequantization) is computed in fp32 here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import gguf
import torch
from torch import nn

from ..config import FP_BITS, TARGET_NAMES, WKVQuantConfig, head_dim
from ..errors import ConfigError
from ..model import attentions, decoder_layers
from ..quant.weight_clip import QuantLinear
from ..runtime.packed_linear import PackedLinear
from ..targets import RUNTIME, get_target
from ..targets.llamacpp import BITS_OF_TYPE, BLOCK, TARGET as LLAMACPP_TARGET, cache_type as config_cache_type
from ..targets.llamacpp import kv_quantizer_for
from ..targets import vllm

LLAMACPP = LLAMACPP_TARGET.name
VLLM = vllm.TARGET.name


@dataclass(frozen=True)
class Semantics:
    """What `apply_semantics_` set up, as the json of an evaluation reports it."""

    target: str
    kv_cache_type: str | None = None  # llamacpp: the cache type (-ctk / -ctv); vllm: --kv-cache-dtype
    rotation: bool | None = None  # llamacpp: its Hadamard rotation of a quantized cache
    matmul_inputs: str | None = None  # the rounding of the linears' inputs: llamacpp "q8_1", vllm "bf16"

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    def kv_bytes_per_token(self, model_config) -> float | None:
        """Bytes of K and V cache per token over all layers in the engine's cache type (None: no engine cache)."""
        if self.kv_cache_type is None:
            return None
        dim = head_dim(model_config.to_dict())
        if self.target == VLLM:
            per_head = vllm.bytes_per_head(self.kv_cache_type, dim)
        else:
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.kv_cache_type.upper()]]
            per_head = dim / block * block_bytes
        return 2 * model_config.num_hidden_layers * model_config.num_key_value_heads * per_head


def _llamacpp_linears(model: nn.Module) -> list[nn.Module]:
    """The decoder layers' 4-bit linears, checked to be what the GGUF export writes as Q4_1: groups of a multiple of
    32, unquantized activations. Unquantized linears (a KV-only artifact) are written in the artifact's dtype; all
    or none of them must be, as the export writes them."""
    linears, unquantized = [], []
    for name, module in decoder_layers(model).named_modules():
        if isinstance(module, (PackedLinear, QuantLinear)) and module.bits != FP_BITS:
            group = module.in_features if module.group_size == -1 else module.group_size
            if module.bits != 4:
                raise ConfigError(f"llama.cpp runs the GGUF export, whose quantized linears are 4-bit Q4_1; layer "
                                  f"{name} has {module.bits}-bit weights")
            if group % BLOCK:
                raise ConfigError(f"layer {name}: weight groups of {group} input channels are not a multiple of "
                                  f"Q4_1's {BLOCK}-weight blocks")
            if module.act_bits != FP_BITS:
                raise ConfigError(f"layer {name}: {module.act_bits}-bit activations; llama.cpp runs weight-only (A16) "
                                  "models")
            linears.append(module)
        elif isinstance(module, (PackedLinear, QuantLinear, nn.Linear)):
            unquantized.append(name)
    if linears and unquantized:
        raise ConfigError(f"the GGUF export writes every linear as Q4_1 or none; layer {unquantized[0]} is not "
                          "quantized")
    return linears


def _unsmooth_keys_(attn: nn.Module) -> None:
    """Drop the attention's per-channel K smoothing (scale 1, shift 0), as the exports of a runtime artifact do."""
    with torch.no_grad():
        attn.k_scale.fill_(1)
        attn.k_shift.fill_(0)


def _engine_cache_(model: nn.Module, quantizer, poq: bool, kv_bits: int, export: str) -> None:
    """Every attention computing an engine's KV cache: `quantizer` (`kv_bits`, 16: none) on K after RoPE, the
    engine's POQ, no sink tokens or full-precision prefill, K as the `export` carries it."""
    for attn in attentions(model):
        if attn.rotation is not None:
            raise ConfigError(f"the model rotates V (kv rotate) at run time, outside its v_proj / o_proj weights; the "
                              f"{export} cannot express that")
        if not attn.k_folded:
            _unsmooth_keys_(attn)
        attn.kv_quantizer, attn.poq, attn.kv_bits = quantizer, poq, kv_bits
        attn.kv_quant = kv_bits != FP_BITS
        attn.k_pre_rope, attn.sink_tokens, attn.fp_prefill = False, 0, False


def apply_semantics_(model: nn.Module, config: WKVQuantConfig, target: str, cache_type: str | None = None,
                     rotate: bool | None = None, round_matmul_inputs: bool = True) -> Semantics:
    """Make `model` (quantized with `config`) compute what `target`'s engine computes, in place; apply once, to a
    freshly loaded or prepared model. llamacpp: `cache_type` (default `targets.llamacpp.cache_type(config.kv)`),
    `rotate` (default True; False: LLAMA_ATTN_ROT_DISABLE=1), `round_matmul_inputs` (False leaves out the Q8_1
    rounding: for measuring what it does). vllm: `cache_type` int4_per_token_head or auto (default
    `targets.vllm.cache_dtype(config.kv)`)."""
    if target not in TARGET_NAMES:
        raise ConfigError(f"semantics must be one of {', '.join(sorted(TARGET_NAMES))}; got {target!r}")
    if target != LLAMACPP and rotate is not None:
        raise ConfigError("the rotation switch applies to the llamacpp semantics only")
    if target == VLLM:
        return _vllm_semantics_(model, config, cache_type)
    if target == RUNTIME:
        if cache_type is not None:
            raise ConfigError("a KV cache type applies to an engine's semantics (llamacpp, vllm) only")
        runtime = get_target(RUNTIME)
        quantizer = runtime.kv_quantizer(config.kv)
        for attn in attentions(model):
            attn.kv_quantizer, attn.poq = quantizer, config.kv.poq and runtime.poq
        for linear in model.modules():
            if isinstance(linear, (PackedLinear, QuantLinear)):
                linear.input_rounding = runtime.matmul_input
        return Semantics(RUNTIME)

    quantizer = kv_quantizer_for(cache_type or config_cache_type(config.kv), rotate is not False)
    cache_type, rotate = quantizer.kv_type, quantizer.rotate
    linears = _llamacpp_linears(model)
    for attn in attentions(model):
        if attn.head_dim % BLOCK:
            raise ConfigError(f"llama.cpp's {cache_type} KV cache needs head_dim divisible by {BLOCK}; this model has "
                              f"{attn.head_dim}")
    _engine_cache_(model, quantizer, LLAMACPP_TARGET.poq, BITS_OF_TYPE[cache_type], "GGUF export")
    for linear in linears:
        linear.input_rounding = LLAMACPP_TARGET.matmul_input if round_matmul_inputs else None
    return Semantics(LLAMACPP, cache_type, rotate, "q8_1" if round_matmul_inputs and linears else None)


def _vllm_semantics_(model: nn.Module, config: WKVQuantConfig, cache_type: str | None) -> Semantics:
    kv_dtype = cache_type or vllm.cache_dtype(config.kv)
    if kv_dtype not in vllm.KV_CACHE_DTYPES:
        raise ConfigError(f"vLLM KV cache dtype must be one of {', '.join(vllm.KV_CACHE_DTYPES)}; got {kv_dtype!r}")
    for attn in attentions(model):
        if attn.head_dim < vllm.MIN_HEAD_DIM:
            raise ConfigError(f"vLLM's Triton attention backend needs head_dim >= {vllm.MIN_HEAD_DIM}; this model has "
                              f"{attn.head_dim}")
    _engine_cache_(model, vllm.VllmKV(), vllm.TARGET.poq, vllm.BITS_OF_DTYPE[kv_dtype], "vLLM export")
    for linear in model.modules():
        if isinstance(linear, (PackedLinear, QuantLinear)):
            if linear.act_bits != FP_BITS:
                raise ConfigError(f"{linear.act_bits}-bit activations: vLLM serves the export weight-only (A16)")
            linear.input_rounding = vllm.TARGET.matmul_input
    return Semantics(VLLM, kv_dtype, matmul_inputs="bf16")
