"""The whole job: load model and text, prepare, calibrate, evaluate, save. Used by the CLI and the service."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .artifact import save_artifact
from .calibrate import CalibrationReport, calibrate_
from .config import FP_BITS, WKVQuantConfig
from .data import calibration_samples, eval_windows, load_text, tokenize
from .errors import CalibrationCancelled, ConfigError
from .evaluate import EvalMode, kv_bytes_per_token, perplexity
from .model import load_model, prepare_model_
from .progress import CalibrationCallbacks


FP_DTYPES = ("float16", "bfloat16", "float32")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def quantize_model_(
    model, config: WKVQuantConfig, samples: torch.Tensor, *, device="cpu", callbacks: CalibrationCallbacks | None = None
) -> CalibrationReport:
    """Prepare `model` in place with fake-quantized modules and calibrate them on `samples` (nsamples, seqlen).

    Example::

        model, tok = load_model("wkvq_core/assets/stories260k")
        cfg = WKVQuantConfig(weight=WeightQuantConfig(group_size=-1), calib=CalibConfig(nsamples=16, seqlen=256))
        samples = calibration_samples(tokenize(tok, load_text("calib.txt")), 16, 256, seed=0)
        report = quantize_model_(model, cfg, samples)
        ppl = perplexity(model, eval_windows(tokenize(tok, load_text("eval.txt")), 256), EvalMode.WKV)
    """
    prepare_model_(model, config)
    return calibrate_(model, config, samples, device=device, callbacks=callbacks)


def evaluate_modes(model, config: WKVQuantConfig, windows: torch.Tensor, modes, device="cpu") -> dict[str, Any]:
    result: dict[str, Any] = {"tokens": 0, "ppl": {}}
    for mode in modes:
        ppl = perplexity(model, windows, EvalMode(mode), device=device)
        result["ppl"][EvalMode(mode).value] = ppl.ppl
        result["tokens"] = ppl.tokens
    result["kv_bytes_per_token"] = kv_bytes_per_token(model.config, config.kv)
    result["kv_bytes_per_token_fp16"] = kv_bytes_per_token(model.config, type(config.kv)(bits=16))
    return result


def rtn_baselines(
    model, config: WKVQuantConfig, windows: torch.Tensor, device="cpu", callbacks: CalibrationCallbacks | None = None
) -> dict[str, float]:
    """Perplexity (mode -> ppl) of round-to-nearest quantization at `config`'s bits and group sizes: a copy of the
    full-precision `model` prepared without learned clipping or smoothing and not calibrated. Mode `w` when weights
    or activations are quantized, `wkv` when the KV cache is. Raises CalibrationCancelled when `callbacks` asks."""
    quantized = {EvalMode.W: config.weight.enabled or config.act_bits != FP_BITS, EvalMode.WKV: config.kv.enabled}
    modes = [mode for mode, on in quantized.items() if on]
    if not modes:
        return {}
    rtn = replace(config, weight=replace(config.weight, lwc=False), kv=replace(config.kv, smoothing=False))
    rtn_model = prepare_model_(copy.deepcopy(model), rtn)
    baselines = {}
    for mode in modes:
        if callbacks is not None and callbacks.cancelled():
            raise CalibrationCancelled(f"cancelled while measuring the RTN baselines, before mode {mode.value}")
        baselines[mode.value] = perplexity(rtn_model, windows, mode, device=device).ppl
    return baselines


@dataclass
class QuantizeJob:
    model: str
    calib: str
    out: str | os.PathLike
    config: WKVQuantConfig = field(default_factory=WKVQuantConfig)
    eval: str | None = None
    device: str = "auto"
    revision: str | None = None
    fp_dtype: str = "float16"  # embeddings, norms, lm_head and biases in the artifact

    def __post_init__(self) -> None:
        if self.fp_dtype not in FP_DTYPES:
            raise ConfigError(f"fp_dtype must be one of {', '.join(FP_DTYPES)}; got {self.fp_dtype!r}")


def run_quantize_job(job: QuantizeJob, callbacks: CalibrationCallbacks | None = None) -> dict[str, Any]:
    """Run a job end to end. The artifact's metrics.json holds what the same job always reproduces (losses,
    perplexities); the returned metrics add this run's `run` section (seconds, peak memory, resumed blocks).

    With an eval text, `metrics["eval"]` is `evaluate_modes`' table plus `baselines.rtn` (`rtn_baselines`, measured
    on the full-precision model before calibrating): `{"ppl": {"fp", "w", "wkv"}, "baselines": {"rtn": {"w",
    "wkv"}}, "tokens", ...}`, so that `ppl[mode]` against `baselines.rtn[mode]` shows what calibration bought."""
    device = resolve_device(job.device)
    model, tokenizer = load_model(job.model, revision=job.revision)
    calib = job.config.calib
    samples = calibration_samples(tokenize(tokenizer, load_text(job.calib)), calib.nsamples, calib.seqlen, calib.seed)
    windows = eval_windows(tokenize(tokenizer, load_text(job.eval)), calib.seqlen) if job.eval else None
    baselines = rtn_baselines(model, job.config, windows, device, callbacks) if windows is not None else None
    report = quantize_model_(model, job.config, samples, device=device, callbacks=callbacks)
    metrics: dict[str, Any] = {
        "calibration": {"block_losses": [None if math.isnan(x) else x for x in report.block_losses], "device": device},
    }
    if windows is not None:
        metrics["eval"] = evaluate_modes(model, job.config, windows, list(EvalMode), device=device)
        metrics["eval"]["baselines"] = {"rtn": baselines}
    model.to("cpu")
    save_artifact(job.out, model, tokenizer, job.config, metrics, fp_dtype=getattr(torch, job.fp_dtype))
    run = {"seconds": report.seconds, "peak_memory_bytes": report.peak_memory_bytes,
           "resumed_blocks": report.resumed_blocks}
    return metrics | {"run": run}
