"""Find a job's model config without loading weights (and without torch): the models directory or the hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wkvq_core.config import check_seqlen
from wkvq_core.errors import ConfigError

from ..core.config import Settings
from ..core.errors import InvalidField
from .schemas import HubModel, LocalModel

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")  # as wkvq_core.model (no torch import here)
LOC = ("body", "model")


def local_models(settings: Settings) -> list[str]:
    """The model directories (those with a config.json) under the models directory."""
    root = settings.MODELS_DIR.resolve()
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def local_model_dir(settings: Settings, name: str) -> Path:
    root = settings.MODELS_DIR.resolve()
    path = (root / name).resolve()
    if path.parent != root or not (path / "config.json").is_file():
        known = local_models(settings)
        raise InvalidField((*LOC, "name"), f"unknown model {name!r}; available: {', '.join(known) or 'none'}")
    return path


def _hub_config(spec: HubModel) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        return Path(hf_hub_download(spec.id, "config.json", revision=spec.revision))
    except LocalEntryNotFoundError as exc:  # offline or no connection (a subclass of EntryNotFoundError)
        raise _unreachable(spec, exc) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise InvalidField((*LOC, "id"), f"{spec.id}: not found on the model hub ({type(exc).__name__})") from exc
    except Exception as exc:  # offline mode, DNS, proxy, timeouts: all mean the same to the user
        raise _unreachable(spec, exc) from exc


def _unreachable(spec: HubModel, exc: Exception) -> InvalidField:
    return InvalidField((*LOC, "id"), f"{spec.id}: the model hub is unreachable from this service "
                                      f"({type(exc).__name__}); put the model in the models directory and use "
                                      "source 'local'")


def model_config(settings: Settings, spec: LocalModel | HubModel) -> dict[str, Any]:
    """The model's config.json, checked to be a supported architecture."""
    path = local_model_dir(settings, spec.name) / "config.json" if isinstance(spec, LocalModel) else _hub_config(spec)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidField(LOC, f"unreadable model config: {exc}") from exc
    archs = config.get("architectures") or [config.get("model_type", "unknown")] if isinstance(config, dict) else []
    if not set(SUPPORTED_ARCHITECTURES).intersection(map(str, archs)):
        raise InvalidField(LOC, f"architecture {', '.join(map(str, archs)) or 'unknown'} is not supported; "
                                f"expected {', '.join(SUPPORTED_ARCHITECTURES)}")
    return config


def check_dims(config: dict[str, Any], quant) -> None:
    """Group sizes must divide the inputs of every quantized linear and the head dim; seqlen must fit the model."""
    hidden, inter = config.get("hidden_size"), config.get("intermediate_size")
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    if not all(isinstance(x, int) and x > 0 for x in (hidden, inter, head_dim)):
        raise InvalidField(LOC, "model config lacks hidden_size / intermediate_size / head_dim")
    if quant.w_bits != 16 and quant.group_size != -1:
        for name, dim in (("hidden_size", hidden), ("intermediate_size", inter)):
            if dim % quant.group_size:
                raise InvalidField(("body", "config", "group_size"),
                                   f"group_size {quant.group_size} does not divide the model's {name} {dim} "
                                   "(use a divisor, or -1 for one group per row)")
    if quant.kv_bits != 16 and quant.kv_group_size is not None and head_dim % quant.kv_group_size:
        raise InvalidField(("body", "config", "kv_group_size"),
                           f"kv_group_size {quant.kv_group_size} does not divide head_dim {head_dim}")
    try:
        check_seqlen(quant.seqlen, config)  # the same check and message as `wkvq quantize` / `wkvq eval`
    except ConfigError as exc:
        raise InvalidField(("body", "config", "seqlen"), str(exc)) from None
