"""The whole job: load model and text, prepare, calibrate, evaluate, save. Used by the CLI and the service."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .artifact import ArtifactWriter
from .calib.calibrate import CalibrationReport, Precision, calibrate_
from .calib.data import calibration_samples, eval_windows, evaluation_ids, load_text, tokenize
from .calib.equalize import unscale_
from .calib.loader import CheckpointReader, ResidentLayers, StreamedLayers, load_skeleton
from .calib.progress import CalibrationCallbacks
from .config import DEFAULT_EVAL_TOKENS, FP_BITS, WKVQuantConfig
from .errors import ConfigError
from .evaluation.perplexity import EvalMode, LayerwiseEval, Perplexity, kv_bytes_per_token, layerwise_perplexities
from .model import attentions, hub_snapshot, load_model, model_config, prepare_model_, quant_linears
from .targets import check_config


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


def eval_table(model_config, config: WKVQuantConfig, ppl: dict[str, Perplexity], modes) -> dict[str, Any]:
    """metrics["eval"] of a job: perplexity per mode, tokens, KV cache bytes per token (and unquantized)."""
    result: dict[str, Any] = {"tokens": ppl[EvalMode(modes[0]).value].tokens if modes else 0,
                              "ppl": {EvalMode(m).value: ppl[EvalMode(m).value].ppl for m in modes}}
    result["kv_bytes_per_token"] = kv_bytes_per_token(model_config, config.kv)
    result["kv_bytes_per_token_fp16"] = kv_bytes_per_token(model_config, type(config.kv)(bits=16))
    return result


def evaluate_modes(model, config: WKVQuantConfig, windows: torch.Tensor, modes, device="cpu",
                   callbacks: CalibrationCallbacks | None = None) -> dict[str, Any]:
    ppl = layerwise_perplexities(model, windows, modes, device=device, callbacks=callbacks)
    return eval_table(model.config, config, ppl, modes)


def rtn_modes(config: WKVQuantConfig) -> list[EvalMode]:
    """The modes a round-to-nearest baseline is measured in: `w` when weights or activations are quantized, `wkv`
    when the KV cache is."""
    quantized = {EvalMode.W: config.weight.enabled or config.act_bits != FP_BITS, EvalMode.WKV: config.kv.enabled}
    return [mode for mode, on in quantized.items() if on]


def rtn_layer(layer):
    """A copy of a prepared decoder layer quantized by round to nearest: no learned clipping, no smoothing, no
    equivalent scaling (undone) and no GPTQ codes."""
    rtn = copy.deepcopy(layer)
    unscale_(rtn)
    for lin in quant_linears(rtn):
        lin.clip = None
        lin.fix_quantization_(None, None, None)
    for attn in attentions(rtn):
        attn.smoothing = attn.smoothing_configured = False
    return rtn


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
    eval_tokens: int = DEFAULT_EVAL_TOKENS  # evaluate at most this many tokens of `eval` (0: all)

    def __post_init__(self) -> None:
        if self.fp_dtype not in FP_DTYPES:
            raise ConfigError(f"fp_dtype must be one of {', '.join(FP_DTYPES)}; got {self.fp_dtype!r}")
        if self.eval_tokens < 0:
            raise ConfigError(f"eval_tokens must be 0 (the whole text) or positive; got {self.eval_tokens}")


class _JobEvaluation:
    """The job's evaluation, interleaved with calibration: each finished block (still on the device) advances the
    evaluation windows in modes fp, w and wkv, and its round-to-nearest copy advances the RTN baseline streams."""

    def __init__(self, model, config: WKVQuantConfig, windows: torch.Tensor, device: torch.device, dtype,
                 precision: Precision, callbacks: CalibrationCallbacks) -> None:
        self.config, self.rtn = config, rtn_modes(config)
        streams = {mode.value: mode for mode in EvalMode} | {f"rtn_{mode.value}": mode for mode in self.rtn}
        self.run = LayerwiseEval(model, windows, streams, device=device, dtype=dtype, precision=precision,
                                 callbacks=callbacks)

    def advance(self, layer) -> None:
        for mode in EvalMode:
            self.run.advance(layer, mode.value)
        if self.rtn:
            rtn = rtn_layer(layer)
            for mode in self.rtn:
                self.run.advance(rtn, f"rtn_{mode.value}")

    def finish(self, model) -> dict[str, Any]:
        ppl = self.run.finish()
        result = eval_table(model.config, self.config, ppl, list(EvalMode))
        result["baselines"] = {"rtn": {mode.value: ppl[f"rtn_{mode.value}"].ppl for mode in self.rtn}}
        return result


def load_for_calibration(source: str, revision: str | None = None):
    """(model, tokenizer, layers): a safetensors checkpoint (a directory, or a hub model's files downloaded to the
    hub cache) as a skeleton whose decoder layers are read one at a time (`StreamedLayers`); .bin weights are
    loaded whole (`ResidentLayers`)."""
    model_config(source, revision)  # a clear message for a bad directory, an unreachable hub, an architecture
    directory = Path(source) if Path(source).exists() else hub_snapshot(source, revision)
    if CheckpointReader.has_safetensors(directory):
        model, tokenizer, reader = load_skeleton(directory)
        return model, tokenizer, StreamedLayers(model, reader, torch.float32)
    model, tokenizer = load_model(source, revision=revision)
    return model, tokenizer, ResidentLayers(model, "cpu")


def run_quantize_job(job: QuantizeJob, callbacks: CalibrationCallbacks | None = None) -> dict[str, Any]:
    """Run a job end to end, one decoder layer at a time: each layer is read from the checkpoint when calibration
    reaches it, evaluated and written to the artifact when its block is done, then released. The artifact's
    metrics.json holds what the same job always reproduces (losses, perplexities); the returned metrics add this
    run's `run` section (seconds, peak memory, resumed blocks).

    With an eval text, `metrics["eval"]` is `{"ppl": {"fp", "w", "wkv"}, "baselines": {"rtn": {"w", "wkv"}},
    "tokens", ...}`: `baselines.rtn` holds round-to-nearest perplexities at the job's bits (`rtn_modes`), so that
    `ppl[mode]` against `baselines.rtn[mode]` shows what calibration bought. Cancellable at every stage."""
    callbacks = callbacks or CalibrationCallbacks()
    device = torch.device(resolve_device(job.device))
    callbacks.stage("loading")
    model, tokenizer, layers = load_for_calibration(job.model, job.revision)
    check_config(job.config, model.config.to_dict())
    calib = job.config.calib
    samples = calibration_samples(tokenize(tokenizer, load_text(job.calib)), calib.nsamples, calib.seqlen, calib.seed)
    windows, truncated = None, False
    if job.eval:
        ids, truncated = evaluation_ids(tokenizer, load_text(job.eval), job.eval_tokens)
        windows = eval_windows(ids, calib.seqlen)
    prepare_model_(model, job.config)
    precision = Precision.resolve(calib, device)
    evaluation = None
    if windows is not None:
        evaluation = _JobEvaluation(model, job.config, windows, device, layers.dtype, precision, callbacks)
    with ArtifactWriter(job.out, getattr(torch, job.fp_dtype), check=callbacks.check) as writer:

        def finished_block(index: int, layer) -> None:
            if evaluation is not None:
                evaluation.advance(layer)
            writer.add_layer(index, layer)

        callbacks.stage("calibrating")
        report = calibrate_(model, job.config, samples, device=device, callbacks=callbacks, layers=layers,
                            on_block_done=finished_block)
        metrics: dict[str, Any] = {
            "calibration": {"block_losses": [None if math.isnan(x) else x for x in report.block_losses],
                            "device": device.type},
        }
        if evaluation is not None:
            callbacks.stage("evaluating")
            metrics["eval"] = evaluation.finish(model)
            if truncated:
                metrics["eval"]["truncated_at_tokens"] = job.eval_tokens
        callbacks.stage("writing")
        writer.finish(model, tokenizer, job.config, metrics)
    run = {"seconds": report.seconds, "peak_memory_bytes": report.peak_memory_bytes,
           "resumed_blocks": report.resumed_blocks}
    return metrics | {"run": run}
