"""What the job pages show, gathered from job_service (and queue_service for the worker's device)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from wkvq_core.calib.estimate import format_bytes, format_seconds

from ..core.errors import NotFound
from ..jobs.schemas import FP_BITS, JobRead
from ..jobs.service import PUBLISHING, RETRYABLE, job_service
from ..models import JobEvent, JobStatus, Team
from ..queue.service import queue_service
from .charts import loss_chart_svg, loss_points
from .web import duration, filesize

EVENT_PAGE = 500
EVENT_LOG_LIMIT = 40
PPL_MODES = {"fp": "full precision", "w": "W: weights quantized", "wkv": "WKV: weights + KV cache"}
# a target whose WKV perplexity predicts an engine's: (the engine's name, its unquantized cache, what it runs)
ENGINES = {"llamacpp": ("llama.cpp", "f16", "GGUF"), "vllm": ("vLLM", "auto", "compressed-tensors checkpoint")}


def engine_labels(engine: dict[str, Any] | None) -> dict[str, str]:
    """What the perplexities and the RTN baseline of a job mean under its target (metrics["eval"]["engine"]): for
    an engine (llama.cpp, vLLM), WKV is the perplexity predicted for its export run with that KV cache type, RTN
    uses the engine's own uncalibrated cache. Older jobs and runtime jobs: the packed runtime's."""
    if not engine or engine.get("target") not in ENGINES:
        return {**PPL_MODES, "rtn": "RTN, job's KV options"}
    name, unquantized, _ = ENGINES[engine["target"]]
    cache = engine.get("cache_type") or unquantized
    return {"fp": "full precision", "w": f"W: weights quantized ({unquantized} cache)",
            "wkv": f"predicted {name} perplexity ({cache} cache)", "rtn": f"RTN + {name}'s own {cache} cache"}


def target_label(config: dict[str, Any]) -> str:
    """The job's target as the job page says it: "runtime", "llamacpp" or "llamacpp, q4_1 cache"."""
    target = config.get("target", "runtime")  # jobs from before targets ran as runtime
    return f"{target}, {config['kv_cache_type']} cache" if config.get("kv_cache_type") else target


def run_instructions(export: dict[str, Any] | None) -> dict[str, Any] | None:
    """How to run a job's export (metrics["export"]) with the KV cache it was calibrated for: the llama.cpp commands
    for a GGUF, unpacking and `vllm serve` for a vLLM directory; None without an export."""
    if not export:
        return None
    notes = export.get("notes")
    if export.get("format") == "gguf":
        cache = export.get("recommended_cache_type") or {"k": "f16", "v": "f16"}
        flags = f"-ctk {cache['k']} -ctv {cache['v']}" + (" -fa on" if cache["v"] != "f16" else "")  # quantized V: FA
        return {"title": "Run the GGUF with llama.cpp", "commands": [
            f"llama-cli -m {export['file']} {flags}", f"llama-perplexity -m {export['file']} -f TEXT {flags}"],
            "note": f"The KV cache type is the one the job was calibrated for (export notes: {notes}); TEXT is your "
                    "evaluation text."}
    if export.get("serve") and export.get("directory"):
        directory, cache = export["directory"], export.get("kv_cache_dtype")
        serve = " ".join(directory if word == "OUT" else word for word in export["serve"].split())
        return {"title": "Serve it with vLLM", "commands": [f"tar -xf {export['file']}", serve],
                "note": f"{export['file']} unpacks to {directory}/ (config.json, model.safetensors, the tokenizer, "
                        f"README.md, {notes}). The KV cache dtype ({cache}) is the one the job was calibrated for"
                        + ("; it is in vLLM's Triton attention backend, on a GPU." if cache != "auto" else ".")}
    return None


def model_label(model: dict[str, Any]) -> str:
    return model.get("name") or model.get("id") or "?"


def bits_label(config: dict[str, Any]) -> str:
    w, kv = config.get("w_bits", 4), config.get("kv_bits", 4)
    return f"W{w}" + ("" if kv == FP_BITS else f"KV{kv}")


def job_row(job: JobRead) -> dict[str, Any]:
    return {"job": job, "model": model_label(job.model), "bits": bits_label(job.config),
            "target": target_label(job.config)}


def all_events(session: Session, job_id: str) -> list[JobEvent]:
    events: list[JobEvent] = []
    while True:
        page = job_service.events(session, job_id=job_id, after=events[-1].id if events else 0, limit=EVENT_PAGE)
        events += page
        if len(page) < EVENT_PAGE:
            return events


def current_epoch(job: JobRead, events: list[JobEvent]) -> tuple[int, int] | None:
    """(epoch, epochs) reached in the block being calibrated now, or None outside a block's epochs."""
    if job.status != JobStatus.RUNNING.value:
        return None
    for event in reversed(events):
        if event.kind == "epoch_end" and event.block == job.current_block and event.epochs:
            return event.epoch or 0, event.epochs
        if event.kind in ("block_start", "started") and event.block in (None, job.current_block):
            return (0, job.config.get("epochs", 0)) if event.kind == "block_start" else None
    return None


def estimate_summary(estimate: dict[str, Any] | None) -> dict[str, Any] | None:
    """The job's resource estimate (from submit) as rows for the job page: totals, then the largest parts."""
    if not estimate:
        return None
    breakdown = estimate.get("breakdown") or {}

    def top(section: str, fmt, n: int = 3) -> str:
        items = sorted((breakdown.get(section) or {}).items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{name} {fmt(value)}" for name, value in items) or "–"

    device = estimate.get("device", "?")
    return {"device": device, "rows": [
        ("Peak device memory" if device != "cpu" else "Compute working set",
         format_bytes(estimate["peak_device_bytes"]), top("device", format_bytes)),
        ("Peak host memory", format_bytes(estimate["peak_host_bytes"]), top("host", format_bytes)),
        ("Compute", f"{estimate['flops'] / 1e15:.3g} PFLOP", top("flops", lambda v: f"{v / 1e15:.3g} PFLOP")),
        ("Time", format_seconds(estimate["seconds"]),
         f"{estimate.get('compute_dtype', '?')}, {estimate.get('attention', '?')} attention"),
    ]}


def metric_summary(metrics: dict[str, Any] | None, whole_run: float | None = None) -> dict[str, Any] | None:
    """Perplexities against their baselines and facts of the run; `whole_run`: started to finished, in seconds."""
    if not metrics:
        return None
    evaluation, run = metrics.get("eval") or {}, metrics.get("run") or {}
    ppl = evaluation.get("ppl") or {}
    reference = ppl.get("fp")
    rtn = (evaluation.get("baselines") or {}).get("rtn")  # None for jobs from before the baselines
    baseline = rtn or {}
    labels = engine_labels(evaluation.get("engine"))
    rows = [{"mode": mode, "label": labels[mode], "ppl": ppl[mode],
             "delta": None if reference is None or mode == "fp" else ppl[mode] - reference,
             "rtn": baseline.get(mode), "rtn_delta": ppl[mode] - baseline[mode] if mode in baseline else None}
            for mode in PPL_MODES if mode in ppl]
    facts = []
    kv, kv16 = evaluation.get("kv_bytes_per_token"), evaluation.get("kv_bytes_per_token_fp16")
    if kv and kv16:
        facts.append(("KV cache / token", f"{filesize(kv)} (fp16 {filesize(kv16)}, {kv16 / kv:.1f}× smaller)"))
    if evaluation.get("tokens"):
        facts.append(("Evaluation tokens", f"{evaluation['tokens']:,}"))
    if run.get("seconds") is not None:
        facts.append(("Calibration with per-block evaluation", duration(run["seconds"])))  # wkvq_core.calib.calibrate
    if whole_run is not None:
        facts.append(("Whole run", duration(whole_run)))
    if run.get("peak_memory_bytes") is not None:
        facts.append(("Peak memory", filesize(run["peak_memory_bytes"])))
    if run.get("resumed_blocks"):
        facts.append(("Blocks resumed from checkpoints", str(run["resumed_blocks"])))
    if (metrics.get("calibration") or {}).get("device"):
        facts.append(("Device", metrics["calibration"]["device"]))
    if (metrics.get("artifact") or {}).get("size") is not None:
        facts.append(("Artifact size", filesize(metrics["artifact"]["size"])))
    if (metrics.get("export") or {}).get("size") is not None:
        facts.append((f"{metrics['export']['file']} size", filesize(metrics["export"]["size"])))
    name, _, runs = ENGINES.get((evaluation.get("engine") or {}).get("target"), (None, None, None))
    return {"ppl": rows, "rtn": rtn is not None, "rtn_label": labels["rtn"], "engine": name, "engine_runs": runs,
            "facts": facts, "run": run_instructions(metrics.get("export"))}


def job_detail(session: Session, *, team: Team, job_id: str) -> dict[str, Any]:
    """Everything the job page and its live fragment show; NotFound for another team's job."""
    job = job_service.read(session, job_service.get(session, team=team, job_id=job_id))
    status = JobStatus(job.status)
    events = all_events(session, job.id)
    try:
        metrics = job_service.metrics(session, team=team, job_id=job.id)
    except NotFound:
        metrics = None
    worker = queue_service.worker(session, job.worker) if job.worker else None
    return {
        **job_row(job),
        "live": not status.terminal,
        "can_cancel": (status in (JobStatus.QUEUED, JobStatus.RUNNING) and not job.cancel_requested
                       and job.stage != PUBLISHING),
        "can_retry": status in RETRYABLE,
        "epoch": current_epoch(job, events),
        "device": worker.device if worker else None,
        "chart": loss_chart_svg(loss_points(events)),
        "metrics": metric_summary(metrics, (job.finished_at - job.started_at).total_seconds()
                                  if job.finished_at and job.started_at else None),
        "estimate": estimate_summary(job.estimate),
        "artifacts": job_service.artifacts(session, team=team, job_id=job.id),
        "events": events[::-1][:EVENT_LOG_LIMIT],
        "event_count": len(events),
    }
