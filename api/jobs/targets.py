"""Whether a job's target engine (`wkvq_core.targets`) can run its config on its model, checked at submit as the run
checks it (`check_config`): a 422 naming the field, instead of a job that fails once it has started."""

from __future__ import annotations

import re
from typing import Any

from wkvq_core.errors import ConfigError

from ..core.errors import InvalidField
from .estimate import job_wkvq_config
from .schemas import QuantConfig

LOC = ("body", "config")
# The request field a refusal is about, by the option its message names (first match; kv_group_size before
# group_size; an engine's "cache type" or "cache dtype" is kv_cache_type); one naming none (the model's head_dim,
# say) is about the target.
FIELD_NAMES = (("kv_cache_type", re.compile(r"\bcache[_ ]d?type\b")),
               ("kv_group_size", re.compile(r"\bkv_group_size\b")), ("group_size", re.compile(r"\bgroup_size\b")),
               ("w_bits", re.compile(r"\bw_bits\b")), ("kv_bits", re.compile(r"\bkv_bits\b")))


def field_of(message: str) -> str:
    return next((field for field, pattern in FIELD_NAMES if pattern.search(message)), "target")


def check_target(model_config: dict[str, Any], quant: QuantConfig) -> None:
    """InvalidField unless the target can run `quant` (the model's defaults already filled in) on the model."""
    from wkvq_core.targets import check_config  # on first use: it imports torch (see estimate.job_wkvq_config)

    try:
        check_config(job_wkvq_config(quant.model_dump(mode="json")), model_config)
    except ConfigError as exc:
        raise InvalidField((*LOC, field_of(str(exc))), str(exc)) from None
