"""Request and response models of the job API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wkvq_core.config import DEFAULT_EVAL_TOKENS, DEFAULT_METHOD, TARGET_NAMES, calib_config

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"
QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
FP_BITS = 16
BUILTIN_DATASETS = ("tinystories",)  # keys of api.datasets.builtin.BUILTIN_TEXTS
TARGETS = tuple(TARGET_NAMES)
# each engine's names of its KV cache types (wkvq_core.targets.llamacpp.KV_TYPES, .vllm.KV_CACHE_DTYPES; listed
# here so that the schema imports no torch); the target checks which go with it and with kv_bits
TARGET_CACHE_TYPES = {"llamacpp": ("q4_0", "q4_1", "q8_0", "f16"), "vllm": ("int4_per_token_head", "auto")}
KV_CACHE_TYPES = tuple(name for names in TARGET_CACHE_TYPES.values() for name in names)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalModel(Strict):
    source: Literal["local"]
    name: str = Field(pattern=NAME_PATTERN, description="a model directory under WKVQ_MODELS_DIR")


class HubModel(Strict):
    source: Literal["hf"]
    id: str = Field(pattern=HUB_ID_PATTERN, max_length=200, description="a Hugging Face model id")
    revision: str | None = Field(None, pattern=NAME_PATTERN)


ModelSpec = Annotated[LocalModel | HubModel, Field(discriminator="source")]


class BuiltinData(Strict):
    source: Literal["builtin"]
    name: Literal[BUILTIN_DATASETS] = Field(description="a text set shipped with the service")  # type: ignore[valid-type]


class UploadedData(Strict):
    source: Literal["upload"]
    dataset_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="the id returned by POST /v1/datasets")


class HubData(Strict):
    source: Literal["hf"]
    name: str = Field(pattern=HUB_ID_PATTERN, max_length=200, examples=["wikitext"],
                      description="a Hugging Face dataset id, fetched from the hub (never a local path)")
    config: str | None = Field(None, pattern=NAME_PATTERN, examples=["wikitext-2-raw-v1"])
    split: str = Field("train", pattern=NAME_PATTERN)
    field: str = Field("text", pattern=NAME_PATTERN)

    @field_validator("name")
    @classmethod
    def _hub_id(cls, name: str) -> str:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(name)
        except HFValidationError as exc:
            raise ValueError(f"not a Hugging Face dataset id: {exc}") from None
        return name

    @model_validator(mode="after")
    def _field_needs_config(self) -> HubData:
        if self.field != "text" and self.config is None:
            raise ValueError("a text field other than 'text' needs the dataset config too")
        return self


DataSpec = Annotated[BuiltinData | UploadedData | HubData, Field(discriminator="source")]


def _bits(value: int, name: str) -> int:
    if value != FP_BITS and value not in QUANT_BITS:
        raise ValueError(f"{name} must be between 2 and 8, or 16 for full precision")
    return value


class QuantConfig(Strict):
    """WKVQuant bit configuration and calibration budget (the paper's defaults) and the KV method."""

    w_bits: int = 4
    kv_bits: int = 4
    group_size: int = Field(128, ge=-1, le=65536, description="weight group along the input dim; -1 = per row; left "
                                                              "out: the largest of 128, 64, 32 dividing every "
                                                              "linear's input dim of the model, else -1")
    kv_group_size: int | None = Field(None, ge=1, le=1024, description="KV channels per group; null = head_dim")
    crr_k: int | None = Field(None, ge=1, le=64, description="blocks in the cross-block reconstruction loss; left "
                                                           "out: the method's (paper 5, recommended "
                                                           f"{calib_config('recommended').crr_k}), stored so")
    loss: Literal["mae", "mse"] = "mae"
    epochs: int = Field(5, ge=0, le=50)
    nsamples: int = Field(128, ge=1, le=4096)
    seqlen: int = Field(2048, ge=16, le=32768, description="left out: 2048, or the model's context if shorter")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    eval_tokens: int = Field(DEFAULT_EVAL_TOKENS, ge=0, le=2**31 - 1,
                             description="evaluate at most this many tokens of the evaluation text; 0: all of it")
    lwc: bool = True
    equalize: bool | None = Field(None, description="AWQ's activation-aware scaling folded into each block before it "
                                                   "trains; null: the method's (off in both: no gain measured on "
                                                   "top of recommended's gptq)")
    gptq: bool | None = Field(None, description="GPTQ's error-compensating rounding on the learned grid once a block "
                                               "is trained; null: the method's (recommended: on, paper: off)")
    smoothing: bool = True
    poq: bool = True
    target: Literal[TARGETS] = Field(  # type: ignore[valid-type]
        "runtime", description="the engine the model is calibrated and evaluated for (wkvq_core.targets): runtime, "
                               "the packed artifact on WKVQuant's runtime; llamacpp, a GGUF on llama.cpp with its own "
                               "KV cache (the job also ships model.gguf, and its WKV perplexity is the one predicted "
                               "for llama.cpp); vllm, a compressed-tensors checkpoint served by vLLM with its "
                               "int4_per_token_head cache (the job also ships model-vllm.tar, the directory to serve, "
                               "and its WKV perplexity is the one predicted for vLLM)")
    kv_cache_type: Literal[KV_CACHE_TYPES] | None = Field(  # type: ignore[valid-type]
        None, description="the engine's KV cache type, agreeing with kv_bits; llamacpp (-ctk / -ctv): 4 -> q4_0 or "
                          "q4_1, 8 -> q8_0, 16 -> f16; vllm (--kv-cache-dtype): 4 -> int4_per_token_head, 16 -> "
                          "auto; null: the one of kv_bits (q4_0 for llamacpp's 4)")
    method: Literal["paper", "recommended"] = Field(
        DEFAULT_METHOD, description="paper: arXiv 2402.12065 exactly; recommended: with the weight and KV options "
                                    "that won on held-out text (docs/method.md, benchmarks/RESULTS.md)")

    @field_validator("w_bits")
    @classmethod
    def _w_bits(cls, value: int) -> int:
        return _bits(value, "w_bits")

    @field_validator("kv_bits")
    @classmethod
    def _kv_bits(cls, value: int) -> int:
        return _bits(value, "kv_bits")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value == 0:
            raise ValueError("group_size must be positive or -1")
        return value

    @model_validator(mode="after")
    def _method_crr_k(self) -> QuantConfig:
        if self.crr_k is None:
            self.crr_k = calib_config(self.method).crr_k
        return self


class JobCreate(Strict):
    model: ModelSpec
    config: QuantConfig = Field(default_factory=QuantConfig)
    calibration: DataSpec
    evaluation: DataSpec | None = Field(
        None, description="held-out text for perplexity; a built-in calibration set brings its own by default"
    )
    gpu_class: str | None = Field(None, pattern=NAME_PATTERN, description="default: the first configured class")
    priority: int = Field(0, ge=-100, le=100, description="higher runs first")


class JobRead(BaseModel):
    id: str
    status: str
    model: dict[str, Any]
    config: dict[str, Any]
    calibration: dict[str, Any]
    evaluation: dict[str, Any] | None
    gpu_class: str
    priority: int
    attempts: int
    max_attempts: int
    cancel_requested: bool
    current_block: int
    total_blocks: int | None
    progress: float = Field(description="finished blocks / total blocks")
    eta_seconds: float | None
    heartbeat_age_seconds: float | None
    last_loss: float | None
    epoch: int | None = Field(None, description="epochs finished in the block being calibrated (of config.epochs)")
    stage: str | None = Field(None, description="the stage the latest attempt is in, or ended in: loading, baselines, "
                                                "calibrating, evaluating, writing, exporting (a target with an export "
                                                "format: the GGUF, the vLLM directory), publishing (a job publishing "
                                                "its artifact can no longer be cancelled), done (succeeded); null "
                                                "before it starts")
    worker: str | None
    error: str | None
    estimate: dict[str, Any] | None = Field(
        None, description="resources estimated at submit (wkvq_core.calib.estimate.ResourceEstimate): peak_device_bytes, "
                          "peak_host_bytes, flops, seconds on the device kind of the job's GPU class, and a "
                          "breakdown by component; null for jobs submitted before estimates")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobList(BaseModel):
    data: list[JobRead]
    count: int


class JobEventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime
    kind: str
    block: int | None
    n_blocks: int | None
    epoch: int | None
    epochs: int | None
    loss: float | None
    seconds: float | None
    message: str | None


class ArtifactRead(BaseModel):
    name: str
    size: int
    sha256: str
    media_type: str
    download_url: str
    available: bool = True  # false once the stored object was found truncated or altered: downloads answer 410
    unavailable_reason: str | None = None
