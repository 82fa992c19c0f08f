"""Find a job's model config without loading weights (and without torch): the models directory or the hub.

Hub lookups never hold a request thread: they run on two threads of their own with a short timeout, and once the
hub has been unreachable, further lookups fail at once for a while (no request path waits on the network)."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from wkvq_core.config import (check_kv_group_size, head_dim, linear_inputs, resolve_group_size,
                              resolve_seqlen)
from wkvq_core.errors import ConfigError

from ..core.config import Settings
from ..core.errors import InvalidField
from .schemas import FP_BITS, HubData, HubModel, JobCreate, LocalModel, QuantConfig

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


HUB_TIMEOUT_SECONDS = 5.0
HUB_RETRY_AFTER_SECONDS = 60.0  # after an unreachable hub, lookups fail at once for this long
HUB_FOUND_SECONDS = 600.0  # a config found is reused this long


class HubConfigs:
    """config.json of hub models, looked up off the request thread pool."""

    def __init__(self) -> None:
        self.threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hub-lookup")
        self.found: dict[tuple[str, str | None], tuple[float, dict[str, Any]]] = {}
        self.unreachable_until = 0.0

    async def fetch(self, spec: HubModel) -> dict[str, Any]:
        from huggingface_hub import constants

        now = time.monotonic()
        if constants.HF_HUB_OFFLINE:
            raise _unreachable(spec, "this service runs offline (HF_HUB_OFFLINE)")
        if now < self.unreachable_until:
            raise _unreachable(spec, f"it did not answer within the last {HUB_RETRY_AFTER_SECONDS:g} s")
        key = (spec.id, spec.revision)
        if key in self.found and now - self.found[key][0] < HUB_FOUND_SECONDS:
            return self.found[key][1]
        try:
            path = await asyncio.wait_for(asyncio.wrap_future(self.threads.submit(_hub_config, spec)),
                                          HUB_TIMEOUT_SECONDS)
        except (asyncio.TimeoutError, HubUnreachable) as exc:
            self.unreachable_until = time.monotonic() + HUB_RETRY_AFTER_SECONDS
            reason = f"no answer within {HUB_TIMEOUT_SECONDS:g} s" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            raise _unreachable(spec, reason) from None
        config = read_config(path)
        self.found[key] = (time.monotonic(), config)
        return config


class HubUnreachable(Exception):
    pass


hub_configs = HubConfigs()


def _hub_config(spec: HubModel) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        return Path(hf_hub_download(spec.id, "config.json", revision=spec.revision, etag_timeout=HUB_TIMEOUT_SECONDS))
    except LocalEntryNotFoundError as exc:  # offline or no connection (a subclass of EntryNotFoundError)
        raise HubUnreachable(type(exc).__name__) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise InvalidField((*LOC, "id"), f"{spec.id}: not found on the model hub ({type(exc).__name__})") from exc
    except Exception as exc:  # offline mode, DNS, proxy, timeouts: all mean the same to the user
        raise HubUnreachable(type(exc).__name__) from exc


def _unreachable(spec: HubModel, reason: str) -> InvalidField:
    return InvalidField((*LOC, "id"), f"{spec.id}: the model hub is unreachable from this service ({reason}); "
                                      "put the model in the models directory and use source 'local'")


def check_hub_data(body: JobCreate) -> None:
    """422 for a hub dataset while this service runs offline (HF_HUB_OFFLINE): its job could only fail."""
    from huggingface_hub import constants

    for role in ("calibration", "evaluation"):
        spec = getattr(body, role)
        if isinstance(spec, HubData) and constants.HF_HUB_OFFLINE:
            raise InvalidField(("body", role, "name"),
                               f"{spec.name}: the dataset hub is unreachable from this service (it runs offline, "
                               "HF_HUB_OFFLINE); upload the text (POST /v1/datasets) and use source 'upload'")


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidField(LOC, f"unreadable model config: {exc}") from exc


def model_config(settings: Settings, spec: LocalModel | HubModel, hub_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's config.json, checked to be a supported architecture. A hub model's config comes from
    `hub_configs.fetch`, awaited by the caller (`hub_config`)."""
    if isinstance(spec, LocalModel):
        config = read_config(local_model_dir(settings, spec.name) / "config.json")
    elif hub_config is None:
        raise _unreachable(spec, "not looked up")
    else:
        config = hub_config
    archs = config.get("architectures") or [config.get("model_type", "unknown")] if isinstance(config, dict) else []
    if not set(SUPPORTED_ARCHITECTURES).intersection(map(str, archs)):
        raise InvalidField(LOC, f"architecture {', '.join(map(str, archs)) or 'unknown'} is not supported; "
                                f"expected {', '.join(SUPPORTED_ARCHITECTURES)}")
    return config


def check_dims(config: dict[str, Any], quant: QuantConfig) -> None:
    """Fills in the model-aware defaults of the fields the request left out (group_size, seqlen), then checks what
    a run checks: group sizes must divide the inputs of every quantized linear and the head dim; seqlen must fit."""
    try:  # a config without the dims is the model's fault, not a field's
        linear_inputs(config)
        head_dim(config)
    except ConfigError as exc:
        raise InvalidField(LOC, str(exc)) from None
    for field, resolve in (("group_size", resolve_group_size), ("seqlen", resolve_seqlen)):
        chosen = getattr(quant, field) if field in quant.model_fields_set else None
        if field == "group_size" and quant.w_bits == FP_BITS:
            continue  # not used
        try:
            setattr(quant, field, resolve(chosen, config))
        except ConfigError as exc:  # the same checks and messages as `wkvq quantize`
            raise InvalidField(("body", "config", field), str(exc)) from None
    if quant.kv_bits != FP_BITS:
        try:
            check_kv_group_size(quant.kv_group_size, config)
        except ConfigError as exc:
            raise InvalidField(("body", "config", "kv_group_size"), str(exc)) from None
