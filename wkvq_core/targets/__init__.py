"""Deployment targets: what the engine that runs an artifact computes on its KV cache, and what the export for it
writes. Calibration and evaluation use a target's KV arithmetic, so the smoothing is learned for that engine and the
perplexity reported is the one it will give.

A target is one module in this package that defines `TARGET` (a `base.Target`); `TARGETS` finds them all, so a new
engine is a new module here (and, for a new file format, one in `wkvq_core.export`).
"""

from __future__ import annotations

import importlib
import pkgutil

from typing import Any

from ..config import RECOMMENDED, RUNTIME_TARGET, KVQuantConfig, WKVQuantConfig, kv_config as method_kv_config
from ..errors import ConfigError
from .base import Target

RUNTIME = RUNTIME_TARGET


def _discover() -> dict[str, Target]:
    found = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name == "base":
            continue
        target = importlib.import_module(f"{__name__}.{module.name}").TARGET
        found[target.name] = target
    return found


TARGETS: dict[str, Target] = _discover()


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ConfigError(f"target must be one of {', '.join(sorted(TARGETS))}; got {name!r}")
    return TARGETS[name]


def kv_config(method: str, target: str, **fields: Any) -> KVQuantConfig:
    """`config.kv_config` for `target`: the method's options but those the target's engine cannot compute, and for
    the recommended method the target's own recommendations (`Target.recommended_kv`); `fields` set the rest."""
    engine = get_target(target)
    tuned = engine.recommended_kv if method == RECOMMENDED else {}
    return method_kv_config(method, engine.refused_kv_options, **(tuned | fields))


def check_config(config: WKVQuantConfig, model_config: dict[str, Any] | None = None) -> Target:
    """The config's target, after checking that its engine can run the config, and the model given its config.json
    (ConfigError naming what not)."""
    target = get_target(config.target)
    target.check(config, model_config)
    return target
