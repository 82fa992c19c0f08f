"""Loading LLaMA-family checkpoints and swapping in the fake-quantized modules."""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .config import FP_BITS, WKVQuantConfig
from .errors import ModelError
from .quant.kv_quant import ATTENTION_PROJECTIONS, WKVAttention
from .quant.weight_clip import QuantLinear
from .targets import check_config

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def check_architecture(config_dict: dict, where: str) -> None:
    if not isinstance(config_dict, dict):
        raise ModelError(f"{where}: config.json does not hold a JSON object")
    archs = config_dict.get("architectures") or [config_dict.get("model_type", "unknown")]
    archs = [archs] if isinstance(archs, str) else [str(a) for a in archs]
    archs = [a.removeprefix("WKVQuant") for a in archs]  # a WKVQuant artifact of the base architecture
    if not SUPPORTED_ARCHITECTURES.intersection(archs):
        raise ModelError(
            f"{where}: architecture {', '.join(archs)} is not supported; "
            f"expected one of {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )


def _local_config(source: str | os.PathLike) -> dict:
    """The config.json of a local model directory, checked to be a supported architecture."""
    config_file = Path(source) / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{source}: not a model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_file}: invalid JSON ({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise ModelError(f"{config_file}: not UTF-8 text (invalid byte at offset {exc.start})") from exc
    except OSError as exc:
        raise ModelError(f"{config_file}: cannot read ({exc.strerror})") from exc
    check_architecture(config, str(source))
    return config


def _unreachable_hub(source: str | os.PathLike) -> ModelError:
    return ModelError(
        f"{source}: not a local directory and could not be fetched from the Hugging Face hub "
        "(offline or unknown id); download it first and pass the directory"
    )


def model_config(source: str | os.PathLike, revision: str | None = None) -> dict:
    """The config of a local model directory or a hub model (a quantized artifact's too), without its weights."""
    if Path(source).exists():
        return _local_config(source)
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise ModelError(f"{source}: no such model directory")
    try:
        config = AutoConfig.from_pretrained(source, revision=revision).to_dict()
    except OSError as exc:
        raise _unreachable_hub(source) from exc
    except ValueError as exc:
        raise ModelError(f"{source}: cannot load the model config ({' '.join(str(exc).split())})") from exc
    check_architecture(config, str(source))
    return config


def hub_snapshot(source: str, revision: str | None = None) -> Path:
    """A hub model's config, tokenizer and safetensors files in the local hub cache (downloaded when missing)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))
    except (OSError, ValueError) as exc:
        raise _unreachable_hub(source) from exc


def load_model(source: str | os.PathLike, revision: str | None = None, dtype=torch.float32):
    """Model and tokenizer from a local directory, or a hub id (fails with a clear message when offline)."""
    model_config(source, revision)  # a bad directory or an unreachable hub fails here, with a clear message
    path = Path(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=dtype, attn_implementation="eager"
        )
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError, SafetensorError) as exc:
        if path.exists() or not isinstance(exc, OSError):
            reason = " ".join(str(exc).split()) or type(exc).__name__  # one line
            raise ModelError(f"{source}: cannot load model files ({reason})") from exc
        raise _unreachable_hub(source) from exc
    check_architecture(model.config.to_dict(), str(source))
    # Weights come memory-mapped from safetensors at offsets that depend on the file's header length; CPU kernels
    # round differently on unaligned data, so a saved artifact would not reproduce its own metrics. Own copies fix it.
    for param in model.parameters():
        param.data = param.data.clone()
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return model.model.layers


def prepare_model_(model: PreTrainedModel, config: WKVQuantConfig) -> PreTrainedModel:
    """Replace every decoder layer's attention with `WKVAttention` and its MLP linears with `QuantLinear`,
    in place. Weights are kept in full precision; quantization is simulated on the fly: the KV cache's as the
    config's target engine computes it, the smoothing and weight scales as that engine can carry them."""
    target = check_config(config)
    smoothing = config.kv.smoothing and config.kv.enabled
    kv_cfg = dataclasses.replace(config.kv, smoothing=smoothing)
    kv_quantizer = target.kv_quantizer(kv_cfg)  # stateless: one serves every layer
    model.set_attn_implementation("eager")  # masks arrive as additive (B, 1, T, S) tensors
    rotary = getattr(model.model, "rotary_emb", None)  # needed by k_pre_rope only
    for layer in decoder_layers(model):
        layer.self_attn = WKVAttention(layer.self_attn, config.weight, kv_cfg, kv_quantizer, target.poq,
                                       config.act_bits, rotary, target.k_smoothing_folded)
        for name in MLP_PROJECTIONS:
            setattr(layer.mlp, name, QuantLinear(getattr(layer.mlp, name), config.weight, config.act_bits))
    for lin in quant_linears(model):
        lin.scale_bits, lin.input_rounding = target.weight_scale_bits, target.matmul_input
    model.requires_grad_(False)
    return model


def quant_linears(module: nn.Module) -> list[QuantLinear]:
    return [m for m in module.modules() if isinstance(m, QuantLinear)]


def attentions(module: nn.Module) -> list[WKVAttention]:
    return [m for m in module.modules() if isinstance(m, WKVAttention)]


def calibration_parameters(block: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(LWC clip logits, smoothing parameters) of one decoder block."""
    clip = [p for lin in quant_linears(block) if lin.clip is not None for p in lin.clip.parameters()]
    smooth = [p for attn in attentions(block) if attn.smoothing_configured for p in attn.smoothing_parameters()]
    return clip, smooth


@contextmanager
def frozen_weights(module: nn.Module, dtype: torch.dtype | None = None):
    """Fake-quantize every QuantLinear's own weight once for a run of forwards that do not train it (evaluation,
    the fixed blocks of a calibration), in the quantization state set on entry, instead of on every forward.
    dtype: hold it cast to the autocast dtype the forwards run in (autocast re-casts only weights that train).
    An attention's projections are held with its smoothing folded in (`WKVAttention.projection`)."""
    lins = quant_linears(module)
    try:
        with torch.no_grad():
            folded = {id(getattr(attn, name)): attn.projection(name) for attn in attentions(module)
                      for name in ATTENTION_PROJECTIONS if attn.folds(name)}
            for lin in lins:
                weight, bias = folded.get(id(lin), (lin.weight, lin.bias))
                lin.frozen_weight = lin.fake_quant(weight).detach().to(dtype)
                lin.frozen_bias = None if bias is None else bias.detach().to(dtype)
        yield module
    finally:
        for lin in lins:
            lin.frozen_weight = lin.frozen_bias = None


@contextmanager
def quant_state(module: nn.Module, *, weights: bool, kv: bool, smoothing: bool | None = None):
    """Temporarily switch quantization of every prepared sub-module. `weights` covers weight (and activation)
    quantization; smoothing (if configured) follows `weights or kv` unless given. weights=False, kv=False is the
    original full-precision model."""
    lins, atts = quant_linears(module), attentions(module)
    saved = [(lin.weight_quant, lin.act_quant) for lin in lins], [(a.kv_quant, a.smoothing) for a in atts]
    try:
        for lin in lins:
            lin.weight_quant = weights and lin.bits != FP_BITS
            lin.act_quant = weights and lin.act_bits != FP_BITS
        for attn in atts:
            attn.kv_quant = kv and attn.kv_bits != FP_BITS
            attn.smoothing = attn.smoothing_configured and ((weights or kv) if smoothing is None else smoothing)
        yield module
    finally:
        for lin, (w, a) in zip(lins, saved[0]):
            lin.weight_quant, lin.act_quant = w, a
        for attn, (k, sm) in zip(atts, saved[1]):
            attn.kv_quant, attn.smoothing = k, sm
