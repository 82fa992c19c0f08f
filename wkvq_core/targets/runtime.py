"""wkvq_core's own packed runtime (`load_quantized`, or transformers after `import wkvq_core`): `WKVQuantCache`
stores K~ / V~ per token and KV head with the sink tokens in full precision, and attends with POQ."""

from ..config import KVQuantConfig
from ..quant.kv_quant import PerTokenKV
from .base import Target


def per_token(kv: KVQuantConfig) -> PerTokenKV:
    return PerTokenKV(kv.bits, kv.group_size, kv.sink_tokens)


TARGET = Target(name="runtime", summary="wkvq_core's packed runtime: WKVQuantCache, POQ, sink tokens",
                kv_quantizer=per_token, poq=True, export=None)
