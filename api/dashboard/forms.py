"""The new-job form: its fields, turned into a JobCreate and submitted through job_service (the API's validation);
every error, pydantic's or a service's InvalidField, is mapped back to the form field it concerns."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import UploadFile
from pydantic import BaseModel, ValidationError, field_validator
from sqlalchemy.orm import Session

from ..core.context import ServiceContext
from ..core.errors import Conflict, InvalidField, PayloadTooLarge, TooManyRequests
from ..datasets.service import dataset_service
from ..jobs.model_source import local_models
from ..jobs.schemas import BUILTIN_DATASETS, TARGET_CACHE_TYPES, TARGETS, JobCreate, QuantConfig
from ..jobs.service import job_service
from ..models import Job, Team

PRESETS = {"W4KV4": (4, 4), "W4": (4, 16), "W4KV8": (4, 8)}  # (w_bits, kv_bits)
PRESET_LABELS = {"W4KV4": "W4KV4 (4-bit weights, 4-bit KV cache)", "W4": "W4 (4-bit weights, fp16 KV cache)",
                 "W4KV8": "W4KV8 (4-bit weights, 8-bit KV cache)"}
TARGET_LABELS = {"runtime": "WKVQuant runtime (the packed artifact, our KV cache)",
                 "llamacpp": "llama.cpp (a GGUF, llama.cpp's own KV cache)",
                 "vllm": "vLLM (a compressed-tensors checkpoint, vLLM's int4_per_token_head KV cache)"}
CHOICE_FIELDS = ("target", "kv_cache_type")  # config fields chosen from a list; empty: left out
NUMBER_FIELDS = ("group_size", "nsamples", "seqlen", "epochs", "crr_k", "seed")
MODEL_DEFAULTS = ("group_size", "seqlen")  # left empty: the API picks them for the model (model_source.check_dims)
CALIBRATION_SOURCES = ("builtin", "dataset", "file")
PLACEHOLDER_ID = "0" * 32  # stands for a file not uploaded yet while the rest of the form is validated


class JobForm(BaseModel):
    """The form as posted: strings, validated only when turned into a JobCreate."""

    model: str = ""
    preset: str = "W4KV4"
    target: str = "runtime"
    kv_cache_type: str | None = None
    group_size: str | None = None
    nsamples: str | None = None
    seqlen: str | None = None
    epochs: str | None = None
    crr_k: str | None = None
    seed: str | None = None
    gpu_class: str | None = None
    calib_source: str = "builtin"
    builtin_name: str = BUILTIN_DATASETS[0]
    dataset_id: str = ""
    file: UploadFile | None = None
    idempotency_key: str = ""

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, value: str) -> str:
        return value if len(value) <= 200 else ""  # not a key this form made: submit without one

    @classmethod
    def initial(cls, ctx: ServiceContext) -> JobForm:
        defaults = QuantConfig()
        models = local_models(ctx.settings)
        return cls(model=models[0] if models else "", gpu_class=ctx.settings.GPU_CLASSES[0],
                   idempotency_key=uuid.uuid4().hex,
                   **{f: str(getattr(defaults, f)) for f in NUMBER_FIELDS if f not in MODEL_DEFAULTS})

    def body(self, dataset_id: str) -> dict[str, Any]:
        w_bits, kv_bits = PRESETS.get(self.preset, (None, None))
        config: dict[str, Any] = {"w_bits": w_bits, "kv_bits": kv_bits}
        fields = (*CHOICE_FIELDS, *NUMBER_FIELDS)
        config.update({f: value for f in fields if (value := getattr(self, f)) not in (None, "")})
        if self.calib_source == "builtin":
            calibration = {"source": "builtin", "name": self.builtin_name}
        else:
            calibration = {"source": "upload", "dataset_id": dataset_id}
        return {"model": {"source": "local", "name": self.model}, "config": config, "calibration": calibration,
                "gpu_class": self.gpu_class or None}


def field_for(loc: Sequence[str | int]) -> str:
    """The form field an error's loc points at (`form` for the form as a whole)."""
    parts = [str(p) for p in loc if p != "body"]
    if not parts:
        return "form"
    head = parts[0]
    if head == "config":
        name = parts[1] if len(parts) > 1 else ""
        if name in NUMBER_FIELDS or name in CHOICE_FIELDS:
            return name
        return "preset" if name in ("w_bits", "kv_bits") else "form"
    if head in ("evaluation", "calibration"):
        return "calibration"
    return head if head in ("model", "gpu_class", "file") else "form"


def _message(error: dict[str, Any]) -> str:
    return str(error["msg"]).removeprefix("Value error, ")


def _check_choices(form: JobForm) -> dict[str, str]:
    errors = {}
    if form.preset not in PRESETS:
        errors["preset"] = f"choose one of {', '.join(PRESETS)}"
    if form.calib_source not in CALIBRATION_SOURCES:
        errors["calibration"] = "choose a built-in set, an uploaded dataset or a file"
    elif form.calib_source == "dataset" and not form.dataset_id:
        errors["calibration"] = "choose one of your uploaded datasets"
    elif form.calib_source == "file" and form.file is None:
        errors["file"] = "choose a UTF-8 text file to upload"
    return errors


def submit_form(ctx: ServiceContext, session: Session, team: Team, form: JobForm) -> tuple[Job | None, dict[str, str]]:
    """(the job, {}) or (None, {field: message}). A file is uploaded only once the rest of the form is valid; if the
    job is then refused, the upload is kept and preselected, so that it need not be sent again."""
    errors = _check_choices(form)
    try:
        body = JobCreate.model_validate(form.body(form.dataset_id if form.calib_source == "dataset" else PLACEHOLDER_ID))
    except ValidationError as exc:
        for error in exc.errors():
            errors.setdefault(field_for(error["loc"]), _message(error))
        return None, errors
    if errors:
        return None, errors
    try:
        if form.calib_source == "file":
            data = form.file.file.read(ctx.settings.MAX_UPLOAD_BYTES + 1)
            dataset = dataset_service.create(session, ctx.store, ctx.settings, team=team,
                                             filename=form.file.filename, data=data)
            form.calib_source, form.dataset_id, form.file = "dataset", dataset.id, None
            body = JobCreate.model_validate(form.body(dataset.id))
        job, _ = job_service.submit(ctx, session, team=team, body=body, idempotency_key=form.idempotency_key or None)
    except InvalidField as exc:
        return None, {field_for(exc.loc): exc.message}
    except PayloadTooLarge as exc:
        return None, {"file": exc.message}
    except (Conflict, TooManyRequests) as exc:  # a full quota or queue, too many submissions: no field to correct
        return None, {"form": exc.message}
    return job, {}


def form_context(ctx: ServiceContext, session: Session, team: Team, form: JobForm,
                 errors: dict[str, str] | None = None) -> dict[str, Any]:
    return {"form": form, "errors": errors or {}, "models": local_models(ctx.settings), "presets": PRESET_LABELS,
            "targets": {name: TARGET_LABELS.get(name, name) for name in TARGETS}, "kv_cache_types": TARGET_CACHE_TYPES,
            "gpu_classes": ctx.settings.GPU_CLASSES, "builtins": BUILTIN_DATASETS,
            "datasets": dataset_service.list(session, team=team), "nav": "new"}
