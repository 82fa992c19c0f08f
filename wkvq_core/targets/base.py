"""What defines a deployment target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import KVQuantConfig
from ..quant.kv_quant import KVQuantizer


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    kv_quantizer: Callable[[KVQuantConfig], KVQuantizer]  # the engine's arithmetic on the K~ / V~ it stores
    poq: bool  # the engine attends to the current token's K/V in full precision, then stores them quantized
    export: str | None  # the `wkvq_core.export` format written for the engine; None: the artifact itself
