"""All service settings in one class, read from WKVQ_* environment variables and an optional `.env` file."""

from __future__ import annotations

from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from wkvq_core.calib.estimate import DEVICE_KINDS

SHIPPED_MODELS = Path(__file__).resolve().parents[2] / "wkvq_core" / "assets"


class DispatcherKind(str, Enum):
    LOCAL = "local"  # workers poll the database; no broker
    CELERY = "celery"  # Celery over BROKER_URL, one queue per GPU class


class LogFormat(str, Enum):
    TEXT = "text"  # one line: time level [job=... worker=...] logger: message
    JSON = "json"  # one JSON object per line


class GpuBudget(BaseModel):
    """What one job of a GPU class may need: its resource estimate (`wkvq_core.calib.estimate`) is checked against these
    at submit, and a job over any of them is refused (422). Sizes in GB (10^9 bytes)."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field("a100-80gb", description="a wkvq_core.calib.estimate.DEVICE_KINDS name: its speed, and its memory")
    device_memory_gb: float | None = Field(None, gt=0, description="default: 90% of the kind's memory (cpu: none, "
                                                                   "the host budget covers it)")
    host_memory_gb: float = Field(512, gt=0)
    max_seconds: float | None = Field(None, gt=0, description="estimated run time; default: JOB_TIME_LIMIT_SECONDS")

    @field_validator("device")
    @classmethod
    def _known_kind(cls, device: str) -> str:
        if device not in DEVICE_KINDS:
            raise ValueError(f"unknown device kind {device!r}; one of {', '.join(DEVICE_KINDS)}")
        return device

    @property
    def device_memory_bytes(self) -> int | None:
        if self.device_memory_gb is not None:
            return int(self.device_memory_gb * 1e9)
        memory = DEVICE_KINDS[self.device].memory_bytes
        return int(memory * 0.9) if memory else None

    @property
    def host_memory_bytes(self) -> int:
        return int(self.host_memory_gb * 1e9)

    def seconds(self, settings: Settings) -> float:
        return self.max_seconds if self.max_seconds is not None else settings.JOB_TIME_LIMIT_SECONDS


# The budget of a GPU class without a WKVQ_GPU_BUDGETS entry, by a kind named in the class ("gpu-h100" -> H100):
# (name fragment, device kind, host GB). Any other class: an A100 80GB with 512 GB of host memory, or the CPU with
# 64 GB where WKVQ_DEVICE is cpu.
DEFAULT_BUDGETS = (("h200", "h200", 2048), ("h100", "h100-80gb", 1024), ("a100", "a100-80gb", 512),
                   ("cpu", "cpu", 64))
CPU_BUDGET = GpuBudget(device="cpu", host_memory_gb=64)


@cache
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WKVQ_", env_file=".env", env_ignore_empty=True, extra="ignore",
                                      hide_input_in_errors=True)  # errors must not show a password

    # Where the service keeps its state unless DATABASE_URL / STORAGE_URL say otherwise (relative: to the working
    # directory of the process that reads the settings).
    DATA_DIR: Path = Path("wkvq-data")
    # The service's address as its users reach it (https://wkvq.example.com): absolute URLs in answers and the origin
    # the dashboard accepts forms from. Unset: URLs are root-relative and the origin is the request's Host.
    PUBLIC_URL: str | None = None
    DATABASE_URL: str  # default: sqlite:///DATA_DIR/wkvq.db
    # Postgres connections a process keeps open once it has needed them, and how many more it may open for a while
    # (closed when given back). Pool + overflow = 40 = the API's thread pool, so a request thread never waits for a
    # connection; a pool smaller than the usual concurrency opens and closes a connection (a Postgres backend) per
    # request under load.
    DB_POOL_SIZE: int = Field(20, ge=1)
    DB_MAX_OVERFLOW: int = Field(20, ge=0)
    # Threads of an API process that run job status and list reads (what clients poll) at once. A read is one or two
    # short queries; a few threads keep the database busy, dozens only contend for the GIL (benchmarks/RESULTS.md).
    READ_THREADS: int = Field(2, ge=1)
    STORAGE_URL: str  # default: file://DATA_DIR/store
    STORAGE_OPTIONS: dict[str, Any] = Field(default_factory=dict)
    DISPATCHER: DispatcherKind = DispatcherKind.LOCAL
    BROKER_URL: str = "redis://127.0.0.1:6379/0"
    MODELS_DIR: Path = SHIPPED_MODELS
    GPU_CLASSES: list[str] = Field(default_factory=lambda: ["default"])
    # Per GPU class, what one job may need (GpuBudget), e.g. {"gpu-a100": {"device": "a100-80gb",
    # "host_memory_gb": 256, "max_seconds": 43200}}; a class not listed gets `default_budget`.
    GPU_BUDGETS: dict[str, GpuBudget] = Field(default_factory=dict)
    LEASE_SECONDS: float = 60.0
    HEARTBEAT_SECONDS: float = 10.0
    REAPER_SECONDS: float = 15.0
    POLL_SECONDS: float = 1.0
    # Open event streams (GET /v1/jobs/{id}/events) a team, and one API key, may hold in each API process; beyond: 429
    MAX_STREAMS_PER_TEAM: int = Field(50, ge=1)
    MAX_STREAMS_PER_KEY: int = Field(20, ge=1)
    MAX_ATTEMPTS: int = 3
    # Wall-clock limit of one attempt of a job, in every mode: past it the worker stops the job at its next cancel
    # check and fails it ("time limit of N s exceeded"), keeping its checkpoints for a retry. Celery's hard
    # task_time_limit sits HARD_LIMIT_GRACE_SECONDS above it, as a backstop.
    JOB_TIME_LIMIT_SECONDS: float = Field(24 * 3600, gt=0)
    MAX_UPLOAD_BYTES: int = Field(64 * 1024 * 1024, ge=1)
    # Any other request body (a job spec, a form): refused (413) before it is read when it declares more
    MAX_BODY_BYTES: int = Field(64 * 1024, ge=1024)
    MIN_UPLOAD_CHARS: int = 1000
    # `wkvq serve` closes a connection that has not sent a complete request line and headers this long after it
    # opened or after its last response (slowloris); a 408 if it sent part of one
    REQUEST_HEAD_TIMEOUT_SECONDS: float = Field(10, gt=0)
    # What a team may keep in the store (datasets, artifacts, checkpoints) unless `wkvq admin set-team` says
    # otherwise; unset: no quota
    TEAM_STORAGE_QUOTA_GB: float | None = Field(500, gt=0)
    # Per team, unless `wkvq admin set-team` says otherwise: jobs queued at once and jobs submitted in any minute,
    # at most (429 with Retry-After beyond); unset: no limit
    TEAM_MAX_QUEUED: int | None = Field(200, ge=1)
    TEAM_SUBMISSIONS_PER_MINUTE: int | None = Field(60, ge=1)
    # Block checkpoints of a succeeded job are deleted once its artifact is published (False: kept for audits)
    KEEP_CHECKPOINTS: bool = False
    DEVICE: str = "auto"
    LOG_FORMAT: LogFormat = LogFormat.TEXT
    # /metrics (unauthenticated) lists each worker by id, which names its host, only when true
    METRICS_WORKER_LABELS: bool = False

    @model_validator(mode="before")
    @classmethod
    def _state_under_data_dir(cls, values: dict[str, Any]) -> dict[str, Any]:
        data_dir = Path(values.get("DATA_DIR") or cls.model_fields["DATA_DIR"].default).expanduser().resolve()
        defaults = {"DATABASE_URL": f"sqlite:///{data_dir / 'wkvq.db'}", "STORAGE_URL": f"file://{data_dir / 'store'}"}
        return defaults | values | {"DATA_DIR": data_dir}

    @field_validator("DATABASE_URL")
    @classmethod
    def _psycopg3(cls, url: str) -> str:
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                url = "postgresql+psycopg://" + url.removeprefix(prefix)
        try:
            make_url(url)
        except (ArgumentError, ValueError):
            raise ValueError("not a database URL (sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB)") from None
        return url

    @field_validator("STORAGE_URL")
    @classmethod
    def _absolute_file_url(cls, url: str) -> str:
        if "://" not in url or url.startswith("file://"):
            return "file://" + str(Path(url.removeprefix("file://")).resolve())
        return url.rstrip("/")

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.HEARTBEAT_SECONDS * 2 > self.LEASE_SECONDS:
            raise ValueError("WKVQ_HEARTBEAT_SECONDS must be at most half of WKVQ_LEASE_SECONDS")
        if not self.GPU_CLASSES:
            raise ValueError("WKVQ_GPU_CLASSES needs at least one class")
        return self

    def budget(self, gpu_class: str) -> GpuBudget:
        """The budget of `gpu_class`: its GPU_BUDGETS entry, else one by the kind its name mentions; on the CPU
        kind, with the entry's limits, where this service's own workers run jobs on the CPU."""
        listed = self.GPU_BUDGETS.get(gpu_class)
        if self.embedded_on_cpu:
            return (listed or CPU_BUDGET).model_copy(update={"device": "cpu", "device_memory_gb": None})
        if listed is not None:
            return listed
        for fragment, device, host_gb in DEFAULT_BUDGETS:
            if fragment in gpu_class.lower():
                return GpuBudget(device=device, host_memory_gb=host_gb)
        return CPU_BUDGET if self.DEVICE == "cpu" else GpuBudget()

    @property
    def embedded_on_cpu(self) -> bool:
        """Jobs run by workers polling this database (WKVQ_DISPATCHER=local) run on the CPU: WKVQ_DEVICE=cpu, or
        auto on a machine without a GPU."""
        return self.DISPATCHER == DispatcherKind.LOCAL and (
            self.DEVICE == "cpu" or (self.DEVICE == "auto" and not cuda_available()))

    @property
    def is_sqlite(self) -> bool:
        return self.DATABASE_URL.startswith("sqlite")

    @property
    def database_display(self) -> str:
        """DATABASE_URL with its password masked, for logs and messages."""
        return make_url(self.DATABASE_URL).render_as_string(hide_password=True)
