"""A job's resource estimate at submit (`wkvq_core.calib.estimate`, no torch) and the budget of its GPU class."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from wkvq_core.calib.estimate import (ModelShape, ResourceEstimate, estimate_resources, estimate_storage,
                                      eval_windows_for_chars, format_bytes, format_seconds)
from wkvq_core.config import FP_BITS, RUNTIME_TARGET, CalibConfig, WKVQuantConfig, weight_config
from wkvq_core.errors import ConfigError

from ..core.config import GpuBudget, Settings
from ..core.errors import InvalidField
from ..datasets.builtin import BUILTIN_TEXTS
from ..datasets.service import dataset_service
from ..models import Team
from .model_source import local_model_dir
from .schemas import BuiltinData, HubData, JobCreate, LocalModel, UploadedData

# A hub text is not read at submit: assume the size of WikiText-2's test split (~1.3 M characters) for evaluation,
# of its train split (~11 M) for calibration.
HUB_CHARS = {"evaluation": 1_300_000, "calibration": 11_000_000}
LOC = ("body", "config")
# A hub model's tokenizer files are not looked up at submit: what an artifact's tokenizer is assumed to take at most
HUB_TOKENIZER_BYTES = 32_000_000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
EXPORT_OVERHEAD = 1 << 20  # the export's headers, config, README, notes json and tar records


def job_wkvq_config(spec_config: dict[str, Any]) -> WKVQuantConfig:
    """The library config of a job's `config` (as stored in its spec; older rows without `method` run the paper,
    without `target` the runtime): what the worker runs and what the estimate at submit is computed for."""
    from wkvq_core.targets import kv_config  # on first use: it imports torch, which API processes load only then

    c = spec_config
    target = c.get("target", RUNTIME_TARGET)
    return WKVQuantConfig(
        target=target,
        weight=weight_config(c.get("method", "paper"), bits=c["w_bits"], group_size=c["group_size"], lwc=c["lwc"],
                             **{k: c[k] for k in ("equalize", "gptq") if c.get(k) is not None}),
        kv=kv_config(c.get("method", "paper"), target, bits=c["kv_bits"], group_size=c["kv_group_size"],
                     smoothing=c["smoothing"], poq=c["poq"], cache_type=c.get("kv_cache_type")),
        calib=CalibConfig(nsamples=c["nsamples"], seqlen=c["seqlen"], epochs=c["epochs"], crr_k=c["crr_k"],
                          loss=c["loss"], seed=c["seed"]),
    )


def export_bytes(model_config: dict[str, Any], config: WKVQuantConfig) -> int:
    """An upper bound of the target's export (0 without one), the vocabulary apart (bounded by the tokenizer's
    bytes, counted apart): every linear unquantized in 16 bits, or quantized as a GGUF's Q4_1 (20 bytes per 32
    weights) or compressed-tensors' packed codes with a 16-bit scale and at most 4 bytes of zero point per group,
    whichever is larger; biases, norms and the rest in F32 at most."""
    from wkvq_core.targets import get_target

    if get_target(config.target).export is None:
        return 0
    shape = ModelShape.from_config(model_config)
    bits = config.weight.bits if config.weight.enabled else FP_BITS
    weights = 0
    for out_features, in_features in shape.linears().values():
        if bits == FP_BITS:
            weights += out_features * in_features * 2
            continue
        group = in_features if config.weight.group_size == -1 else config.weight.group_size
        packed = out_features * ((in_features * bits + 7) // 8 + math.ceil(in_features / group) * 6)
        weights += max(out_features * in_features // 32 * 20, packed)
    per_layer = weights + 4 * (sum(o for o, _ in shape.linears().values()) + 2 * shape.hidden)
    return shape.layers * per_layer + shape.resident_params * 4 + EXPORT_OVERHEAD


@cache
def _file_chars(path: Path) -> int:
    return len(path.read_text(encoding="utf-8"))


def _text_chars(session: Session, team: Team, spec: BuiltinData | UploadedData | HubData | None,
                role: str) -> tuple[int, str]:
    """(characters of the job's `role` text, where the number comes from); (0, ...) without one."""
    if spec is None:
        return 0, f"no {role}"
    if isinstance(spec, BuiltinData):
        return _file_chars(BUILTIN_TEXTS[spec.name][role]), f"built-in {spec.name}"
    if isinstance(spec, UploadedData):
        return dataset_service.get(session, team=team, dataset_id=spec.dataset_id).chars, "uploaded dataset"
    assert isinstance(spec, HubData)
    return HUB_CHARS[role], f"hub dataset {spec.name}: assumed {HUB_CHARS[role]:,} characters"


def estimate_job(settings: Settings, session: Session, *, team: Team, body: JobCreate, gpu_class: str,
                 model_config: dict[str, Any]) -> ResourceEstimate:
    """The estimate of `body` on the device kind of `gpu_class`'s budget."""
    budget = settings.budget(gpu_class)
    evaluation = body.evaluation or (body.calibration if isinstance(body.calibration, BuiltinData) else None)
    chars, source = _text_chars(session, team, evaluation, "evaluation")
    calib_chars, _ = _text_chars(session, team, body.calibration, "calibration")
    try:
        config = job_wkvq_config(body.config.model_dump(mode="json"))
        windows = eval_windows_for_chars(chars, config.calib.seqlen, body.config.eval_tokens)
        estimate = estimate_resources(model_config, config, eval_windows=windows, text_chars=(calib_chars, chars),
                                      device=budget.device)
    except ConfigError as exc:
        raise InvalidField(LOC, str(exc)) from None
    estimate.inputs["eval_text"] = source
    tokenizer = _tokenizer_bytes(settings, body)
    estimate.breakdown["storage"] = {**estimate_storage(model_config, config), "tokenizer": tokenizer}
    if export := export_bytes(model_config, config):  # the export carries the vocabulary too
        estimate.breakdown["storage"]["export"] = export + tokenizer
    return estimate


def _tokenizer_bytes(settings: Settings, body: JobCreate) -> int:
    """What the artifact copies from the model besides its weights: a local model's other files."""
    if not isinstance(body.model, LocalModel):
        return HUB_TOKENIZER_BYTES
    files = local_model_dir(settings, body.model.name).iterdir()
    return sum(f.stat().st_size for f in files if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES))


def reserved_bytes(estimate: ResourceEstimate) -> int:
    """The store bytes a job reserves at submit: its checkpoints and artifact, estimated."""
    return int(sum(estimate.breakdown["storage"].values()))


def check_budget(estimate: ResourceEstimate, gpu_class: str, budget: GpuBudget, settings: Settings) -> None:
    """InvalidField (422) naming every limit of `gpu_class` the estimate exceeds, with both numbers and the largest
    part of the estimate, e.g. "estimated peak host memory 8.8 TB exceeds the budget of gpu class 'a100' (512 GB,
    a100-80gb); largest part: activation_caches"."""
    limits = [("peak host memory", estimate.peak_host_bytes, budget.host_memory_bytes, "host", format_bytes)]
    if budget.device_memory_bytes is not None:
        limits.append(("peak device memory", estimate.peak_device_bytes, budget.device_memory_bytes, "device",
                       format_bytes))
    limits.append(("time", estimate.seconds, budget.seconds(settings), "seconds", format_seconds))
    over = [f"estimated {what} {fmt(value)} exceeds the budget of gpu class {gpu_class!r} ({fmt(limit)}, "
            f"{budget.device}); largest part: {estimate.dominant(section)}"
            for what, value, limit, section, fmt in limits if value > limit]
    if over:
        raise InvalidField(LOC, "; ".join(over) + ". Lower nsamples, seqlen or crr_k, or choose a larger gpu class")
