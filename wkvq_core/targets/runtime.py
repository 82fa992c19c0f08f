"""wkvq_core's own packed runtime (`load_quantized`, or transformers after `import wkvq_core`): `WKVQuantCache`
stores K~ / V~ per token and KV head with the sink tokens in full precision, and attends with POQ."""

from typing import Any

from ..config import KVQuantConfig, WKVQuantConfig
from ..errors import ConfigError
from ..quant.kv_quant import PerTokenKV
from .base import Target


def per_token(kv: KVQuantConfig) -> PerTokenKV:
    return PerTokenKV(kv.bits, kv.group_size, kv.sink_tokens)


def check(config: WKVQuantConfig, model_config: dict[str, Any] | None = None) -> None:
    if config.kv.cache_type is not None:
        raise ConfigError(f"kv cache_type {config.kv.cache_type!r} names an engine's cache type; the runtime target "
                          "has one per bit width: leave it unset")


TARGET = Target(name="runtime", summary="wkvq_core's packed runtime: WKVQuantCache, POQ, sink tokens",
                kv_quantizer=per_token, poq=True, export=None, check=check)
