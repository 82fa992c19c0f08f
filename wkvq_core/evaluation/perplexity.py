"""Perplexity that reads the quantized past, and KV-cache size accounting.

`perplexity` runs the parallel (teacher-forced) pass; with KV quantization on, every position attends to the
dequantized K/V of earlier positions and to its own K/V in full precision (POQ), which equals token-by-token
decoding through a quantized cache: `decode_perplexity` does exactly that, for verification.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import Cache, DynamicCache

from ..calib.calibrate import FULL_PRECISION, Precision, embed, rotary_embeddings
from ..calib.loader import LayerSource, ResidentLayers
from ..calib.progress import CalibrationCallbacks, CalibrationEvent, EventKind
from ..config import FP_BITS, EvalMode, KVQuantConfig
from ..model import attentions, decoder_layers, frozen_weights, quant_state
from ..runtime.cache_keyword import with_cache

EVAL_PROGRESS_STEPS = 100  # EVAL_WINDOWS events per evaluation, at most


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens


def _mode_flags(mode: EvalMode) -> dict[str, bool]:
    return {EvalMode.FP: dict(weights=False, kv=False), EvalMode.W: dict(weights=True, kv=False),
            EvalMode.WKV: dict(weights=True, kv=True)}[EvalMode(mode)]


def _summarise(nll_sum: float, tokens: int) -> Perplexity:
    return Perplexity(ppl=math.exp(nll_sum / tokens), nll=nll_sum / tokens, tokens=tokens)


class LayerwiseEval:
    """Teacher-forced perplexity computed one decoder block at a time, so that evaluation never holds more than one
    block on the device: the windows' hidden states (one stream per name, each in its `EvalMode`) stay on the host
    in `precision.cache`, blocks run under `precision`'s autocast; `advance` runs one block over every stream; `finish` applies the final norm and lm_head.
    Equal to a whole-model forward: each block sees the same inputs, causal masking, and rotary embeddings."""

    def __init__(self, model, windows: torch.Tensor, streams: dict[str, EvalMode], *, device="cpu",
                 dtype: torch.dtype = torch.float32, precision: Precision = FULL_PRECISION, batch_size: int = 1,
                 callbacks: CalibrationCallbacks | None = None) -> None:
        self.model, self.windows, self.modes = model, windows, {name: EvalMode(m) for name, m in streams.items()}
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.precision = precision
        self.callbacks = callbacks or CalibrationCallbacks()
        hidden = embed(model, windows, self.device, precision.cache, self.callbacks)
        self.states = {name: hidden.clone() for name in self.modes}
        self.position_embeddings = rotary_embeddings(model, windows.shape[1], self.device, dtype)
        self.passes, self.n_passes = 0, len(self.modes) * windows.shape[0] * (len(decoder_layers(model)) + 1)

    def _passed(self, windows: int) -> None:
        """Count `windows` window passes; an EVAL_WINDOWS event each 1/EVAL_PROGRESS_STEPS of the evaluation."""
        step = -(-self.n_passes // EVAL_PROGRESS_STEPS)
        before, self.passes = self.passes, self.passes + windows
        if self.passes // step > before // step or self.passes == self.n_passes:
            self.callbacks.emit(CalibrationEvent(EventKind.EVAL_WINDOWS, 0, 0, windows=self.passes,
                                                 n_windows=self.n_passes))

    @torch.no_grad()
    def advance(self, layer, name: str | None = None) -> None:
        """Run `layer` (on the device) over stream `name`'s windows in its mode; all streams when name is None."""
        # prepared attention masks causally itself (and only then may use the fused kernel); any other gets a mask
        mask = None if attentions(layer) else self._causal_mask()
        for stream in [name] if name is not None else list(self.states):
            x = self.states[stream]
            with quant_state(layer, **_mode_flags(self.modes[stream])), frozen_weights(layer), \
                    self.precision.autocasting(self.device):
                for s in range(0, x.shape[0], self.batch_size):
                    self.callbacks.check(f"while evaluating ({stream}), window {s} of {x.shape[0]}")
                    out = layer(x[s : s + self.batch_size].to(self.device, self.dtype), attention_mask=mask,
                                position_embeddings=self.position_embeddings)
                    x[s : s + self.batch_size] = out.to(x.dtype)
                    self._passed(out.shape[0])

    def _causal_mask(self) -> torch.Tensor:
        t = self.windows.shape[1]
        blocked = torch.ones(t, t, dtype=torch.bool, device=self.device).triu(1)
        return torch.zeros(1, 1, t, t, dtype=self.dtype, device=self.device).masked_fill(blocked, torch.finfo(self.dtype).min)

    @torch.no_grad()
    def finish(self) -> dict[str, Perplexity]:
        """The final norm and lm_head over every stream: perplexity by name."""
        norm, head = self.model.model.norm, self.model.lm_head
        homes = norm.weight.device, head.weight.device
        norm.to(self.device), head.to(self.device)
        results = {}
        try:
            weight = head.weight.to(self.dtype)
            for name, x in self.states.items():
                nll_sum, tokens = 0.0, 0
                for s in range(0, x.shape[0], self.batch_size):
                    self.callbacks.check(f"while evaluating ({name}), output of window {s} of {x.shape[0]}")
                    ids = self.windows[s : s + self.batch_size].to(self.device)
                    h = norm(x[s : s + self.batch_size].to(self.device, self.dtype))
                    logits = F.linear(h, weight)[:, :-1].float()
                    nll_sum += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
                    tokens += ids[:, 1:].numel()
                    self._passed(ids.shape[0])
                results[name] = _summarise(nll_sum, tokens)
        finally:
            norm.to(homes[0]), head.to(homes[1])
        return results


def layerwise_perplexities(model, windows: torch.Tensor, modes, *, device="cpu", batch_size: int = 1,
                           layers: LayerSource | None = None, callbacks: CalibrationCallbacks | None = None,
                           ) -> dict[str, Perplexity]:
    """Perplexity (mode value -> result) of each of `modes`, one decoder block on the device at a time."""
    layers = layers or ResidentLayers(model, next(model.parameters()).device)
    run = LayerwiseEval(model, windows, {EvalMode(m).value: m for m in modes}, device=device, dtype=layers.dtype,
                        batch_size=batch_size, callbacks=callbacks)
    for i in range(len(decoder_layers(model))):
        run.advance(layers.acquire(i, torch.device(device)))
        layers.release(i)
    return run.finish()


def perplexity(model, windows: torch.Tensor, mode: EvalMode = EvalMode.WKV, device="cpu", batch_size: int = 1) -> Perplexity:
    """Teacher-forced perplexity over (n, seqlen) windows; each window predicts its tokens 1..seqlen-1."""
    return layerwise_perplexities(model, windows, [mode], device=device, batch_size=batch_size)[EvalMode(mode).value]


@torch.no_grad()
def decode_perplexity(
    model,
    windows: torch.Tensor,
    mode: EvalMode = EvalMode.WKV,
    device="cpu",
    make_cache: Callable[[], Cache] | None = None,
) -> Perplexity:
    """Perplexity by incremental decoding, one token per step, through a cache holding the quantized K/V.

    make_cache: a new cache per window (default: a `DynamicCache`, into which a prepared model's attention stores
    fake-quantized K/V); e.g. `lambda: WKVQuantCache(model.config, kv_bits=4)` for the packed cache, or any
    transformers `Cache` (a `QuantizedCache`, a `KIVICache`) for a model whose attention leaves quantization to it.
    """
    nll_sum, tokens = 0.0, 0
    model.to(device)
    with quant_state(model, **_mode_flags(mode)), frozen_weights(model):
        for window in windows.to(device):
            cache = make_cache() if make_cache is not None else DynamicCache(config=model.config)
            for t in range(window.numel() - 1):
                logits = model(window[None, t : t + 1], **with_cache(cache), use_cache=True).logits[0, -1].float()
                nll_sum += F.cross_entropy(logits[None], window[t + 1 : t + 2], reduction="sum").item()
                tokens += 1
    return _summarise(nll_sum, tokens)


@torch.no_grad()
def greedy_without_cache(model, ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache-free greedy decoding, the reference that decoding through any cache must reproduce: at each step a
    full forward (`use_cache=False`: the parallel POQ pass of a prepared model) over the whole sequence so far.

    ids (B, T) with no padding. Returns the sequences (B, T + max_new_tokens) and each step's last-position logits
    (B, max_new_tokens, vocab) in fp32. Pass the model in the quantization state to check (`quant_state`).
    """
    steps = []
    for _ in range(max_new_tokens):
        steps.append(model(ids, use_cache=False).logits[:, -1].float())
        ids = torch.cat([ids, steps[-1].argmax(-1, keepdim=True)], dim=1)
    return ids, torch.stack(steps, dim=1)


def kv_bytes_per_token(model_config, kv: KVQuantConfig) -> float:
    """Bytes of K and V cache per token over all layers: packed codes + an fp16 (scale, zero point) pair per group
    and KV head; 2 bytes per element when unquantized."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    per_head = head_dim * 2.0
    if kv.bits != FP_BITS:
        groups = head_dim // (kv.group_size or head_dim)
        per_head = head_dim * kv.bits / 8 + groups * 4
    return 2 * model_config.num_hidden_layers * model_config.num_key_value_heads * per_head
