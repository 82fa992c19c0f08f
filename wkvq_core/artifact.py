"""Quantized artifacts: a transformers-style directory with packed weights, written atomically.

    config.json             the model config under model_type wkvquant_llama / wkvquant_mistral (`hf_quantizer`), with
                            `quantization_config` (quant_method "wkvquant", format_version, …) and an `auto_map`
    wkvquant_hf.py          what transformers runs with trust_remote_code=True: imports wkvq_core's classes
    generation_config.json, tokenizer files
    model.safetensors       per quantized linear `<name>.qweight` (uint8, packed codes along the input dim),
                            `<name>.scales` and `<name>.zeros` (fp16, one per output row and group), `<name>.bias`
                            (v_proj / o_proj carry the folded V smoothing); per attention `k_scale` / `k_shift`
                            (fp32, applied to K after RoPE); everything else (embeddings, norms, lm_head) in fp16
    metrics.json            the evaluation table of the run (optional)
    manifest.json           sha256 and size of every other file

Load it with `load_quantized(DIR)`, or `AutoModelForCausalLM.from_pretrained(DIR)` after `import wkvq_core`;
`generate()` then runs through the packed `WKVQuantCache`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from safetensors import safe_open

from .atomic import atomic_directory
from .calib.checkpoint import SafetensorsStream, load_safetensors
from .config import FP_BITS, WeightQuantConfig, WKVQuantConfig
from .errors import ArtifactError, WKVQError
from .model import MLP_PROJECTIONS, check_architecture, decoder_layers, prepare_model_
from .quant.kv_quant import ATTENTION_PROJECTIONS
from .quant.packing import pack_bits, packed_size
from .quant.primitives import hadamard
from .runtime.hf_model import QUANT_METHOD, REMOTE_CODE, REMOTE_CODE_FILE, artifact_config
from .runtime.packed_linear import PackedLinear
from .targets import get_target

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: model_type llama / mistral, readable by load_quantized only
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_artifact(path: str | os.PathLike) -> bool:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def quantization_config(config: WKVQuantConfig, fp_dtype: torch.dtype) -> dict[str, Any]:
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "w_bits": config.weight.bits,
        "group_size": config.weight.group_size,
        "kv_bits": config.kv.bits,
        "kv_group_size": config.kv.group_size,
        "kv_granularity": "per_token_per_kv_head",
        "poq": config.kv.poq,
        "kv_sink_tokens": config.kv.sink_tokens if config.kv.enabled else 0,
        "smoothing": config.kv.smoothing and config.kv.enabled,
        "act_bits": config.act_bits,
        "packing": "lsb_first_bitstream_along_input_dim",
        "non_quantized_dtype": str(fp_dtype).removeprefix("torch."),
        "wkvquant_config": config.to_dict(),
    }


@torch.no_grad()
def packed_layer_tensors(layer, index: int, fp_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The tensors of `model.safetensors` from one prepared (calibrated) decoder layer."""
    tensors: dict[str, torch.Tensor] = {}

    def store_linear(prefix: str, lin, weight, bias) -> None:
        if lin.weight_quant:
            codes, scale, zero = lin.quantize(weight)
            tensors.update({f"{prefix}.qweight": pack_bits(codes, lin.bits), f"{prefix}.scales": scale.half(),
                            f"{prefix}.zeros": zero.half()})
        else:
            tensors[f"{prefix}.weight"] = weight.to(fp_dtype)
        if bias is not None:
            tensors[f"{prefix}.bias"] = bias.to(fp_dtype)

    attn, prefix = layer.self_attn, f"model.layers.{index}"
    for name in ATTENTION_PROJECTIONS:
        store_linear(f"{prefix}.self_attn.{name}", getattr(attn, name), *attn.projection(name))
    if attn.smoothing_configured and not attn.k_folded:
        tensors[f"{prefix}.self_attn.k_scale"] = attn.k_scale.float()
        tensors[f"{prefix}.self_attn.k_shift"] = attn.k_shift.float()
    for name in MLP_PROJECTIONS:
        lin = getattr(layer.mlp, name)
        store_linear(f"{prefix}.mlp.{name}", lin, lin.weight, lin.bias)
    for name, value in layer.named_parameters():
        if not name.startswith(("self_attn.", "mlp.")):
            tensors[f"{prefix}.{name}"] = value.to(fp_dtype)  # the norms
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def resident_tensors(model, fp_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The tensors of `model.safetensors` outside the decoder layers: embeddings, final norm, untied lm_head."""
    tied = model.config.tie_word_embeddings
    return {name: value.detach().to(fp_dtype).cpu().contiguous() for name, value in model.named_parameters()
            if not name.startswith("model.layers.") and not (tied and name == "lm_head.weight")}


def packed_state_dict(model, fp_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The tensors of `model.safetensors` from a prepared (calibrated) model."""
    tensors = resident_tensors(model, fp_dtype)
    for i, layer in enumerate(decoder_layers(model)):
        tensors.update(packed_layer_tensors(layer, i, fp_dtype))
    return tensors


class ArtifactWriter:
    """An artifact written as calibration goes, with bounded memory: `add_layer` spools a finished decoder layer's
    packed tensors, `finish` adds the resident tensors, config, tokenizer, metrics and manifest. Built in a
    temporary sibling directory that replaces `out` only when `finish` returns; removed on any error."""

    def __init__(self, out: str | os.PathLike, fp_dtype: torch.dtype = torch.float16,
                 check: Callable[[str], None] | None = None) -> None:
        self.out, self.fp_dtype, self.check = Path(out), fp_dtype, check
        self._directory = atomic_directory(self.out)
        self.tmp = self._directory.__enter__()
        self.weights = SafetensorsStream(self.tmp / WEIGHTS, {"format": QUANT_METHOD})

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        if exc_info[0] is not None:
            self.weights.close()
            self._directory.__exit__(*exc_info)

    def add_layer(self, index: int, layer) -> None:
        for name, value in packed_layer_tensors(layer, index, self.fp_dtype).items():
            self.weights.add(name, value)

    def finish(self, model, tokenizer, config: WKVQuantConfig, metrics: dict[str, Any] | None = None) -> Path:
        tmp = self.tmp
        artifact_config(model.config, quantization_config(config, self.fp_dtype)).save_pretrained(tmp)
        (tmp / REMOTE_CODE_FILE).write_text(REMOTE_CODE)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, value in resident_tensors(model, self.fp_dtype).items():
            self.weights.add(name, value)
        self.weights.finish(None if self.check is None else lambda: self.check("while writing the artifact"))
        if metrics is not None:
            (tmp / METRICS).write_text(json.dumps(metrics, indent=2))
        files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"format": QUANT_METHOD, "files": files}, indent=2))
        self._directory.__exit__(None, None, None)
        return self.out


def save_artifact(out: str | os.PathLike, model, tokenizer, config: WKVQuantConfig,
                  metrics: dict[str, Any] | None = None, fp_dtype: torch.dtype = torch.float16) -> Path:
    """Write a prepared model in memory; an existing `out` is replaced only on success."""
    with ArtifactWriter(out, fp_dtype) as writer:
        for i, layer in enumerate(decoder_layers(model)):
            writer.add_layer(i, layer)
        return writer.finish(model, tokenizer, config, metrics)


def verify_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (FileNotFoundError, NotADirectoryError) as exc:
        if not directory.is_dir():
            raise ArtifactError(f"{directory}: no such directory") from exc
        if not is_artifact(directory):
            raise ArtifactError(f"{directory} is not a WKVQuant artifact (run wkvq quantize first)") from exc
        raise ArtifactError(f"{directory / MANIFEST}: missing") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{directory / MANIFEST}: not a valid manifest") from exc
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256/size does not match the manifest (corrupt or truncated)")
    return manifest


def _read_config(directory: Path):
    path = directory / "config.json"
    try:
        check_architecture(json.loads(path.read_text()), str(directory))
        config = AutoConfig.from_pretrained(directory)
    except WKVQError:
        raise
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable model config ({exc})") from exc
    quant = getattr(config, "quantization_config", None) or {}
    if quant.get("quant_method") != QUANT_METHOD:
        raise ArtifactError(f"{path}: not a WKVQuant artifact (quant_method {quant.get('quant_method')!r})")
    if quant.get("format_version") not in READABLE_FORMATS:
        raise ArtifactError(
            f"{path}: unknown format_version {quant.get('format_version')!r} (this version reads {', '.join(map(str, READABLE_FORMATS))})"
        )
    return config, quant


def _take(tensors: dict[str, torch.Tensor], key: str, where: Path) -> torch.Tensor:
    try:
        return tensors.pop(key)
    except KeyError:
        raise ArtifactError(f"{where}: missing tensor {key}") from None


def safetensors_keys(files) -> set[str]:
    """The tensor names in safetensors files, read from their headers."""
    keys: set[str] = set()
    for file in files:
        with safe_open(file, "pt") as f:
            keys.update(f.keys())
    return keys


def _empty_linear(lin, prefix: str, keys: set[str], bits: int, group_size: int, act_bits: int, dtype):
    """An uninitialised `PackedLinear` (or `nn.Linear` for unquantized weights) shaped like `lin`, with a bias
    when the checkpoint has one."""
    bias = torch.empty(lin.out_features, dtype=dtype) if f"{prefix}.bias" in keys else None
    if f"{prefix}.qweight" not in keys:
        return torch.nn.Linear(lin.in_features, lin.out_features, bias=bias is not None, dtype=dtype)
    groups = 1 if group_size == -1 else lin.in_features // group_size
    qweight = torch.empty(lin.out_features, packed_size(lin.in_features, bits), dtype=torch.uint8)
    scales = torch.empty(lin.out_features, groups, dtype=torch.float16)
    return PackedLinear(qweight, scales, torch.empty_like(scales), bias, lin.in_features, bits, group_size, act_bits)


def _unstored(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter the artifact does not store by a constant, non-persistent buffer."""
    delattr(module, name)
    module.register_buffer(name, value, persistent=False)


def packed_skeleton_(model, quantization: dict[str, Any], keys: set[str]):
    """Turn a (possibly empty, meta) base model into the packed runtime of an artifact whose model.safetensors
    holds `keys`, in place: `WKVAttention` with the V smoothing folded and the K smoothing as stored, `PackedLinear`
    for quantized linears; their tensors left uninitialised, to be loaded by name."""
    wkv = WKVQuantConfig.from_dict(quantization["wkvquant_config"])
    target = get_target(wkv.target)
    dtype = model.get_input_embeddings().weight.dtype
    prepare_model_(model, WKVQuantConfig(weight=WeightQuantConfig(bits=FP_BITS), kv=wkv.kv, target=wkv.target))
    shape = lambda attn: (attn.n_kv_heads, attn.head_dim)  # noqa: E731
    for i, layer in enumerate(decoder_layers(model)):
        prefix = f"model.layers.{i}"
        for module, names, part in ((layer.self_attn, ATTENTION_PROJECTIONS, "self_attn"),
                                    (layer.mlp, MLP_PROJECTIONS, "mlp")):
            for name in names:
                setattr(module, name, _empty_linear(getattr(module, name), f"{prefix}.{part}.{name}", keys,
                                                    wkv.weight.bits, wkv.weight.group_size, wkv.act_bits, dtype))
        for lin in layer.modules():
            if isinstance(lin, PackedLinear):
                lin.input_rounding = target.matmul_input
        attn = layer.self_attn
        attn.smoothing_folded = True
        _unstored(attn, "v_scale", torch.ones(shape(attn), dtype=dtype, device="cpu"))
        _unstored(attn, "v_shift", torch.zeros(shape(attn), dtype=dtype, device="cpu"))
        if f"{prefix}.self_attn.k_scale" not in keys:
            _unstored(attn, "k_scale", torch.ones(shape(attn), dtype=dtype, device="cpu"))
            _unstored(attn, "k_shift", torch.zeros(shape(attn), dtype=dtype, device="cpu"))
        if attn.rotation is not None:
            attn.rotation = hadamard(attn.head_dim, dtype, device="cpu")
    return model


def load_quantized(directory: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """A `LlamaForCausalLM` whose linears hold the packed weights (dequantized on the fly) and whose attention
    applies the K smoothing, per-token KV quantization and POQ. Verifies the manifest first.
    (`AutoModelForCausalLM.from_pretrained(directory)` after `import wkvq_core` builds the same model.)"""
    directory = Path(directory)
    verify_manifest(directory)
    config, quant = _read_config(directory)
    base = copy.deepcopy(config)
    del base.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(base, dtype=dtype, attn_implementation="eager")
    where = directory / WEIGHTS
    state, _ = load_safetensors(where)
    packed_skeleton_(model, quant, set(state))
    tensors = dict(state)  # consumed as the model takes its tensors; what is left over is unexpected
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    loaded = {key: _take(tensors, key, where).to(empty.dtype) for key, empty in expected.items()}
    if tensors:
        raise ArtifactError(f"{where}: unexpected tensors {sorted(tensors)[:3]}")
    model.load_state_dict(loaded, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.config.quantization_config = quant
    model.requires_grad_(False)
    return model.to(device).eval()
