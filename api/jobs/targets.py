"""Whether a job's target engine (`wkvq_core.targets`) can run its config on its model, checked at submit: a 422
naming the field, instead of a job that fails after calibrating (or at its export)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from wkvq_core.config import FP_BITS, WKVQuantConfig, head_dim, linear_inputs
from wkvq_core.errors import ConfigError
from wkvq_core.quant.kv_quant import KEY, VALUE
from wkvq_core.targets import check_config

from ..core.errors import InvalidField
from .estimate import job_wkvq_config
from .schemas import QuantConfig

LOC = ("body", "config")
# The request field a core message is about, by the option it names (first match; kv_group_size before group_size)
FIELD_NAMES = (("kv_cache_type", re.compile(r"\bcache_type\b")), ("kv_group_size", re.compile(r"\bkv_group_size\b")),
               ("group_size", re.compile(r"\bgroup_size\b")), ("w_bits", re.compile(r"\bw_bits\b")),
               ("kv_bits", re.compile(r"\bkv_bits\b")))


def field_of(message: str) -> str:
    """The field a target's refusal names; `target` when it names none of the request's fields."""
    return next((field for field, pattern in FIELD_NAMES if pattern.search(message)), "target")


def check_target(model_config: dict[str, Any], quant: QuantConfig) -> None:
    """InvalidField unless the target can run `quant` (its model defaults already filled in) on the model:
    `wkvq_core.targets.check_config`, then what only the model tells: per-row weight groups (group_size -1) are
    groups of each linear's input dim, and the KV cache is quantized per head_dim channels."""
    try:
        config = job_wkvq_config(quant.model_dump(mode="json"))
        target = check_config(config)
    except ConfigError as exc:
        raise InvalidField((*LOC, field_of(str(exc))), str(exc)) from None
    if config.weight.bits != FP_BITS and config.weight.group_size == -1:
        for name, dim in linear_inputs(model_config).items():
            try:
                check_config(dataclasses.replace(config, weight=dataclasses.replace(config.weight, group_size=dim)))
            except ConfigError as exc:
                raise InvalidField((*LOC, "group_size"), f"group_size -1 makes one group of the model's {name} "
                                                         f"({dim} input channels) per row: {exc}") from None
    if config.kv.bits != FP_BITS:
        _probe_kv(target.kv_quantizer(config.kv), head_dim(model_config))


def _probe_kv(quantizer, dim: int) -> None:
    """Runs the engine's KV arithmetic on one zero token of the model's head_dim: its own check of the head size
    (e.g. llama.cpp's 32-channel blocks), without loading the model."""
    import torch

    try:
        for kind in (KEY, VALUE):
            quantizer(torch.zeros(1, 1, 1, dim), 0, kind)
    except ConfigError as exc:
        raise InvalidField((*LOC, "kv_bits"), f"the model's head_dim is {dim}: {exc}") from None
