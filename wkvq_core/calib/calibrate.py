"""Block-by-block calibration with the cross-block reconstruction (CRR) loss.

For block i (OmniQuant order), the inputs are the outputs of the already-quantized blocks 0..i-1 and the target is
the full-precision hidden state after blocks i..i+k-1 applied to full-precision inputs. The quantized path runs
block i quantized and blocks i+1..i+k-1 as they are (not yet quantized); blocks past the end are absent.
Trained: LWC clip logits (AdamW, lr 1e-2) and KV smoothing (AdamW, lr 5e-4), weight decay 0.

Memory: at most k decoder layers are materialised on `device` at a time: acquired from a `LayerSource` (the
model's own layers in memory, or `loader.StreamedLayers` reading each from the checkpoint) when the window reaches
them and released when their block is done. Activations (quantized-path inputs and FP targets, 2 x nsamples x
seqlen x hidden in `CalibConfig.cache_dtype`) stay on `offload_device`, are updated in place and move to `device`
one batch at a time. Peak device memory = k blocks + one block's calibration parameters and AdamW state +
autograd activations of one batch through k blocks.

Checkpoint after every block: that block's learned parameters only (clip logits and smoothing), so resuming
replays the finished quantized blocks on the calibration samples and continues bit-for-bit as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import CalibConfig, CRRLoss, WKVQuantConfig
from ..errors import ConfigError, WKVQError
from ..model import attentions, calibration_parameters, decoder_layers, frozen_weights, quant_state
from ..quant.kv_quant import SMOOTHING_PARAMETERS, ChannelRange, set_attention_backend
from .equalize import equalize_block_
from .gptq import gptq_block_
from .loader import LayerSource, ResidentLayers
from .progress import CalibrationCallbacks, CalibrationEvent, EventKind

CALIBRATED_SUFFIXES = (".clip.gamma", ".clip.beta", ".k_scale", ".k_shift", ".v_scale", ".v_shift")


class CalibrationDiverged(WKVQError):
    """The loss became NaN or infinite."""


@dataclass
class CalibrationReport:
    block_losses: list[float] = field(default_factory=list)
    resumed_blocks: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int = 0


def learned_parameters(block: nn.Module) -> dict[str, nn.Parameter]:
    """Clip logits and smoothing parameters of one block, by name."""
    return {name: p for name, p in block.named_parameters() if name.endswith(CALIBRATED_SUFFIXES)}


def block_state(block: nn.Module) -> dict[str, torch.Tensor]:
    """The learned calibration tensors of one block (what a checkpoint holds)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in learned_parameters(block).items()}


def load_block_state_(block: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = block_state(block)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ConfigError(f"{where}: tensors do not match this configuration (missing {missing}, unexpected {extra})")
    params = learned_parameters(block)
    with torch.no_grad():
        for name, value in state.items():
            if value.shape != params[name].shape:
                raise ConfigError(f"{where}: {name} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}")
            params[name].copy_(value)


def calibration_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"model.layers.{i}.{name}": t for i, block in enumerate(decoder_layers(model)) for name, t in block_state(block).items()
    }


def load_calibration_state_(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    for i, block in enumerate(decoder_layers(model)):
        prefix = f"model.layers.{i}."
        load_block_state_(block, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, where)


def fingerprint(config: WKVQuantConfig, samples: torch.Tensor) -> str:
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    digest.update(samples.cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Precision:
    """How a run computes: `CalibConfig`'s "auto" values resolved for its device."""

    cache: torch.dtype  # activation caches on the host
    autocast: torch.dtype | None  # block computation under autocast; None: in the weights' dtype
    attention: str  # POQ attention backend of WKVAttention

    @classmethod
    def resolve(cls, calib: CalibConfig, device: torch.device | str) -> Precision:
        cache, compute, attention = calib.resolved(torch.device(device).type == "cuda")
        if compute == "bfloat16" and torch.device(device).type == "cpu" and not native_cpu_bf16():
            warnings.warn("compute_dtype bfloat16 on a CPU without native bf16 matmuls (AMX, avx512_bf16): torch "
                          "emulates them, many times slower than float32; use float32 (auto) here", stacklevel=2)
        return cls(getattr(torch, cache), None if compute == "float32" else getattr(torch, compute), attention)

    def autocasting(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None)


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX tiles or avx512_bf16), as oneDNN's bf16 matmuls need."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


FULL_PRECISION = Precision(torch.float32, None, "eager")  # CalibConfig's "auto" on the CPU


def rotary_embeddings(model: nn.Module, seqlen: int, device: torch.device, dtype: torch.dtype):
    """cos / sin of positions 0..seqlen-1, as the model's decoder layers take them."""
    position_ids = torch.arange(seqlen, device=device)[None]
    return model.model.rotary_emb.to(device)(torch.zeros(1, seqlen, 1, device=device, dtype=dtype), position_ids)


class _Blocks:
    """Runs decoder blocks over cached activations, one batch at a time on the compute device."""

    def __init__(self, model: nn.Module, seqlen: int, device: torch.device, batch_size: int, dtype: torch.dtype,
                 precision: Precision, callbacks: CalibrationCallbacks) -> None:
        self.layers = decoder_layers(model)
        self.device, self.batch_size, self.dtype, self.precision = device, batch_size, dtype, precision
        self.callbacks = callbacks
        self.position_embeddings = rotary_embeddings(model, seqlen, device, dtype)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype)

    def forward(self, x: torch.Tensor, first: int, last: int, quantize_first: bool) -> torch.Tensor:
        """Blocks first..last-1 on x (B, T, H); only block `first` quantized when `quantize_first`."""
        with self.precision.autocasting(self.device):
            for i in range(first, last):
                with quant_state(self.layers[i], weights=quantize_first and i == first, kv=quantize_first and i == first):
                    x = self.layers[i](x, attention_mask=None, position_embeddings=self.position_embeddings)
        return x.to(self.dtype)

    @contextmanager
    def fixed(self, first: int, last: int):
        """Blocks first..last-1 in full precision with their weights frozen (in the autocast dtype): the rest of a
        CRR window, which the training of the block before them runs through but does not change."""
        with ExitStack() as stack:
            for i in range(first, last):
                stack.enter_context(quant_state(self.layers[i], weights=False, kv=False))
                stack.enter_context(frozen_weights(self.layers[i], self.precision.autocast))
            yield

    @torch.no_grad()
    def propagate_(self, x: torch.Tensor, index: int, quantized: bool) -> None:
        """Block `index` over all cached samples, in place."""
        path = "quantized" if quantized else "full-precision"
        layer = self.layers[index]
        # the weights are fixed here: fake-quantize them once, not per batch
        with quant_state(layer, weights=quantized, kv=quantized), frozen_weights(layer, self.precision.autocast):
            for s in range(0, x.shape[0], self.batch_size):
                self.callbacks.check(f"while propagating block {index} ({path}), sample {s} of {x.shape[0]}")
                x[s : s + self.batch_size] = self.forward(self.batch(x[s : s + self.batch_size]), index, index + 1,
                                                          quantized)


@torch.no_grad()
def embed(model: nn.Module, ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
          callbacks: CalibrationCallbacks, store: torch.device | str = "cpu") -> torch.Tensor:
    """Input embeddings of (n, seqlen) token ids, one row at a time, kept on `store` in `dtype`."""
    embeddings = model.get_input_embeddings()
    home = embeddings.weight.device
    embeddings.to(device)
    out = torch.empty(*ids.shape, embeddings.embedding_dim, dtype=dtype, device=store)
    try:
        for s in range(ids.shape[0]):
            callbacks.check(f"while embedding sample {s} of {ids.shape[0]}")
            out[s] = embeddings(ids[s].to(device)).to(store, dtype)
    finally:
        embeddings.to(home)
    return out


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def calibrate_(
    model: nn.Module,
    config: WKVQuantConfig,
    samples: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    offload_device: str | torch.device = "cpu",
    callbacks: CalibrationCallbacks | None = None,
    layers: LayerSource | None = None,
    on_block_done: Callable[[int, nn.Module], None] | None = None,
) -> CalibrationReport:
    """Calibrate a model prepared with `prepare_model_` in place. samples: (nsamples, seqlen) token ids.

    layers: where decoder layers come from (default: the model's own, in memory; `loader.StreamedLayers` reads
    them from the checkpoint). on_block_done(i, layer): called once block i is final (calibrated or resumed) and
    still on the device, before it is released: the pipeline writes it to the artifact and evaluates it there."""
    callbacks = callbacks or CalibrationCallbacks()
    device, offload = torch.device(device), torch.device(offload_device)
    layers = layers or ResidentLayers(model, offload)
    calib = config.calib
    precision = Precision.resolve(calib, device)
    set_attention_backend(model, precision.attention)
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n_blocks, k = len(decoder_layers(model)), calib.crr_k
    run_key = fingerprint(config, samples)
    report = CalibrationReport()
    blocks = _Blocks(model, samples.shape[1], device, calib.batch_size, layers.dtype, precision, callbacks)
    x_q = embed(model, samples, device, precision.cache, callbacks, offload)
    x_fp, fp_depth = x_q.clone(), 0

    report.block_losses = _resume(decoder_layers(model), callbacks, run_key)
    resumed = report.resumed_blocks = len(report.block_losses)
    for i in range(resumed):
        layer = layers.acquire(i, device)
        blocks.propagate_(x_fp, i, quantized=False)
        fp_depth += 1
        _equalize_block(config, blocks, i, x_q)
        _round_block(config, blocks, i, x_q)
        blocks.propagate_(x_q, i, quantized=True)
        if on_block_done is not None:
            on_block_done(i, layer)
        layers.release(i)
        callbacks.emit(CalibrationEvent(EventKind.BLOCK_RESUMED, i, n_blocks, loss=report.block_losses[i]))

    for i in range(resumed, n_blocks):
        callbacks.check(f"before block {i} of {n_blocks}")
        block_started = time.perf_counter()
        callbacks.emit(CalibrationEvent(EventKind.BLOCK_START, i, n_blocks))
        window = range(i, min(i + k, n_blocks))
        for j in window:
            layers.acquire(j, device)
        while fp_depth < window.stop:
            blocks.propagate_(x_fp, fp_depth, quantized=False)
            fp_depth += 1
        _equalize_block(config, blocks, i, x_q)
        loss = _calibrate_block(config, blocks, i, window.stop, x_q, x_fp, callbacks)
        _round_block(config, blocks, i, x_q)
        blocks.propagate_(x_q, i, quantized=True)
        if on_block_done is not None:
            on_block_done(i, blocks.layers[i])
        # saved with no cancel check before BLOCK_END: the checkpoints are always exactly the finished blocks
        if callbacks.checkpoints is not None:
            callbacks.checkpoints.save(i, block_state(blocks.layers[i]), {"fingerprint": run_key, "loss": repr(loss)})
        layers.release(i)
        report.block_losses.append(loss)
        callbacks.emit(
            CalibrationEvent(EventKind.BLOCK_END, i, n_blocks, loss=loss, seconds=time.perf_counter() - block_started)
        )
    report.seconds = time.perf_counter() - started
    report.peak_memory_bytes = _peak_memory(device)
    return report


def _equalize_block(config: WKVQuantConfig, blocks: _Blocks, index: int, x_q: torch.Tensor) -> None:
    """AWQ's scales folded into a block before its calibration, when configured (rerun on resume: checkpoints hold
    no weights; the search depends only on the block's inputs and original weights)."""
    if config.weight.equalize and config.weight.enabled:
        equalize_block_(blocks.layers[index], index, blocks, x_q)


def _round_block(config: WKVQuantConfig, blocks: _Blocks, index: int, x_q: torch.Tensor) -> None:
    """GPTQ's codes for a calibrated block, when configured (rerun on resume: checkpoints hold no codes)."""
    if config.weight.gptq and config.weight.enabled:
        gptq_block_(blocks.layers[index], index, blocks, x_q)


def _resume(layers: nn.ModuleList, callbacks: CalibrationCallbacks, run_key: str) -> list[float]:
    """Load consecutive block checkpoints from block 0; returns the final losses of the finished blocks."""
    losses: list[float] = []
    while callbacks.checkpoints is not None and len(losses) < len(layers):
        index = len(losses)
        found = callbacks.checkpoints.load(index)
        if found is None:
            break
        state, meta = found
        if meta.get("fingerprint") != run_key:
            raise ConfigError(
                f"checkpoint of block {index} was made with another configuration or calibration data; "
                "use an empty checkpoint directory"
            )
        load_block_state_(layers[index], state, f"checkpoint of block {index}")
        losses.append(float(meta.get("loss", "nan")))
    return losses


def _calibrate_block(
    config: WKVQuantConfig,
    blocks: _Blocks,
    index: int,
    stop: int,
    x_q: torch.Tensor,
    x_fp: torch.Tensor,
    callbacks: CalibrationCallbacks,
) -> float:
    block = blocks.layers[index]
    clip, smooth = calibration_parameters(block)
    if smooth and config.kv.smooth_init == "range":
        _init_smoothing(block, blocks, x_q, config.kv.smooth_alpha)
    if not clip + smooth:
        return float("nan")
    if smooth and config.kv.smooth_param == "relative":
        with relative_smoothing(attentions(block)) as smooth:
            return _train_block(config, blocks, index, stop, x_q, x_fp, callbacks, clip, smooth)
    return _train_block(config, blocks, index, stop, x_q, x_fp, callbacks, clip, smooth)


class _LogScale(nn.Module):
    def forward(self, log_scale: torch.Tensor) -> torch.Tensor:
        return log_scale.exp()

    def right_inverse(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.log()


class _RelativeShift(nn.Module):
    """shift = centre + unit * u: Adam's step on u moves the shift by a fixed fraction of the channel's range."""

    def __init__(self, centre: torch.Tensor, unit: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("centre", centre.detach().clone())
        self.register_buffer("unit", unit.detach().clone())

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.centre + self.unit * u

    def right_inverse(self, shift: torch.Tensor) -> torch.Tensor:
        return (shift - self.centre) / self.unit


@contextmanager
def relative_smoothing(atts: list[nn.Module]):
    """Train log(scale) and shift in units of the initial scale (the channel's smoothed half-range) instead of
    scale and shift; yields the parameters to train and leaves plain (trained) k/v scale and shift on exit."""
    try:
        for attn in atts:
            trained = attn.smoothing_parameter_names()
            for kind in "kv":
                scale = getattr(attn, f"{kind}_scale").detach()
                parametrize.register_parametrization(attn, f"{kind}_scale", _LogScale())
                if f"{kind}_shift" in trained:
                    parametrize.register_parametrization(
                        attn, f"{kind}_shift", _RelativeShift(getattr(attn, f"{kind}_shift"), scale)
                    )
        yield [attn.parametrizations[name].original for attn in atts for name in attn.smoothing_parameter_names()]
    finally:
        for attn in atts:
            for name in SMOOTHING_PARAMETERS:
                if parametrize.is_parametrized(attn, name):
                    parametrize.remove_parametrizations(attn, name, leave_parametrized=True)
                getattr(attn, name).requires_grad_(False)


def _train_block(config, blocks, index, stop, x_q, x_fp, callbacks, clip, smooth) -> float:
    groups = [g for g in ({"params": clip, "lr": config.weight.lr}, {"params": smooth, "lr": config.kv.lr}) if g["params"]]
    params = clip + smooth
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    try:
        with blocks.fixed(index + 1, stop):
            return _epochs(config.calib, blocks, index, stop, x_q, x_fp, callbacks, optimizer)
    finally:
        for p in params:
            p.requires_grad_(False)


def _epochs(calib, blocks, index, stop, x_q, x_fp, callbacks, optimizer) -> float:
    """The CRR training of block `index` through blocks index..stop-1; returns the last epoch's mean loss."""
    distance = nn.functional.l1_loss if calib.loss == CRRLoss.MAE else nn.functional.mse_loss
    gen = torch.Generator().manual_seed(calib.seed * 1_000_003 + index)
    n_blocks, n = len(blocks.layers), x_q.shape[0]
    epoch_loss = float("nan")
    for epoch in range(1, calib.epochs + 1):
        total = 0.0
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, calib.batch_size):
            idx = order[s : s + calib.batch_size]
            out = blocks.forward(blocks.batch(x_q[idx]), index, stop, quantize_first=True)
            loss = distance(out.float(), x_fp[idx].to(blocks.device, torch.float32))
            if not torch.isfinite(loss):
                raise CalibrationDiverged(f"loss became {loss.item()} in block {index}, epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            callbacks.check(f"in block {index} of {n_blocks}, epoch {epoch}")
        epoch_loss = total / n
        callbacks.emit(CalibrationEvent(EventKind.EPOCH_END, index, n_blocks, epoch, calib.epochs, epoch_loss))
    return epoch_loss


@torch.no_grad()
def _init_smoothing(block: nn.Module, blocks: _Blocks, x_q: torch.Tensor, alpha: float) -> None:
    """Observe K (post-RoPE) and V per channel over the block's quantized-path inputs, KV quantization off."""
    attn = attentions(block)[0]
    attn.observer = stats = ChannelRange()
    try:
        with quant_state(block, weights=True, kv=False), frozen_weights(block, blocks.precision.autocast), \
                blocks.precision.autocasting(blocks.device):
            for s in range(0, x_q.shape[0], blocks.batch_size):
                blocks.callbacks.check(f"while initialising the smoothing of block {attn.layer_idx}")
                block(blocks.batch(x_q[s : s + blocks.batch_size]), attention_mask=None,
                      position_embeddings=blocks.position_embeddings)
    finally:
        attn.observer = None
    attn.init_smoothing_(stats, alpha)
