"""What defines a deployment target."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import KVQuantConfig, WKVQuantConfig
from ..errors import ConfigError
from ..quant.kv_quant import KVQuantizer


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    kv_quantizer: Callable[[KVQuantConfig], KVQuantizer]  # the engine's arithmetic on the K~ / V~ it stores
    poq: bool  # the engine attends to the current token's K/V in full precision, then stores them quantized
    export: str | None  # the `wkvq_core.export` format written for the engine; None: the artifact itself
    # raises ConfigError naming what the engine cannot run: of the config, and of the model (its config.json) if given
    check: Callable[[WKVQuantConfig, dict[str, Any] | None], None]
    refused_kv_options: tuple[str, ...] = ()  # KVQuantConfig options the engine cannot compute (methods drop them)
    # K smoothing as one scale per rotary pair folded into q_proj / k_proj, no shift (exact in an engine without
    # per-channel K scales); False: per-channel scale and shift on K, applied by the runtime
    k_smoothing_folded: bool = False
    weight_scale_bits: int | None = None  # significant bits of the weight scales (None: fp16's 11)
    # what the engine does to the input of a quantized-weight matmul (e.g. a rounding to 8-bit blocks); None: nothing
    matmul_input: Callable[[torch.Tensor], torch.Tensor] | None = None
    # the engine's name for the KV cache type of a config (llamacpp: -ctk / -ctv); None: the engine has no such name
    cache_type: Callable[[KVQuantConfig], str] | None = None
    # KV options `--method recommended` takes for this engine, over the method's own (measured: benchmarks/RESULTS.md)
    recommended_kv: dict[str, Any] = field(default_factory=dict)


def named_cache_type(kv: KVQuantConfig, bits_of: dict[str, int], default_for_bits: dict[int, str], engine: str,
                     target: str) -> str:
    """An engine's name for the KV cache of `kv`: its cache_type, checked against the engine's names (`bits_of`:
    name -> bits) and kv.bits, else `default_for_bits[kv.bits]`."""
    if kv.cache_type is None:
        if kv.bits not in default_for_bits:
            offered = ", ".join(f"{' or '.join(name for name in bits_of if bits_of[name] == bits)} (kv_bits {bits})"
                                for bits in sorted(default_for_bits))
            raise ConfigError(f"the {target} target stores the KV cache as {offered}; got kv_bits {kv.bits}")
        return default_for_bits[kv.bits]
    if kv.cache_type not in bits_of:
        raise ConfigError(f"{engine} KV cache type must be one of {', '.join(bits_of)}; got {kv.cache_type!r}")
    if bits_of[kv.cache_type] != kv.bits:
        raise ConfigError(f"kv cache_type {kv.cache_type} holds {bits_of[kv.cache_type]}-bit values; "
                          f"kv_bits is {kv.bits}")
    return kv.cache_type


# our runtime's KV options that an engine's cache, written after RoPE and read by the engine's own attention, lacks
RUNTIME_ONLY_KV_OPTIONS = ("k_pre_rope", "rotate", "sink_tokens", "fp_prefill")


def refuse_kv_options(kv: KVQuantConfig, refused: tuple[str, ...], cache: str, target: str) -> None:
    """ConfigError naming the options of `kv` in `refused` that are on (`cache`: the engine's cache, as named)."""
    unsupported = [name for name in refused if getattr(kv, name)]
    if unsupported:
        raise ConfigError(f"{cache} has no {', '.join(unsupported)}: turn them off for the {target} target")
