"""Export a WKVQuant artifact as a compressed-tensors "pack-quantized" checkpoint (weight-only, W{bits}A16,
asymmetric) that transformers (with the `compressed-tensors` package) and vLLM load.

Written with plain torch / safetensors; the layout follows compressed-tensors 0.20 (`PackedQuantizationCompressor`):

    <linear>.weight_packed      int32 (out, ceil(in * bits / 32)): the codes q + 2**(bits-1) as an LSB-first
                                bitstream along the input dim, 32 bits per little-endian word
    <linear>.weight_scale       the artifact's fp16 scales, (out, in // group); (out, 1) for per-row (strategy channel)
    <linear>.weight_zero_point  int32 (ceil(out * bits / 32), n_groups): zp + 2**(bits-1), packed along the output dim
    <linear>.weight_shape       int64 [out, in]
    compressed-tensors dequantizes (q - zp) * scale with q, zp in [-2**(bits-1), 2**(bits-1) - 1].

Mapping, exact for every weight: ours is (code - zero) * scale with code in [0, 2**bits - 1] and an integer zero point,
so q = code - 2**(bits-1), zp = zero - 2**(bits-1) (the stored nibbles are then our codes unchanged). A zero point
outside [0, 2**bits - 1] (near-constant groups) is re-expressed with another zp when every (code - zero) of its group
still fits; otherwise the export fails naming the layer. Scales stay fp16, so decompression in fp16 rounds
(q - zp) * scale to fp16 exactly as our own fp16 dequantization does; in fp32 it is exact.

The V smoothing is folded into v_proj / o_proj (weights and biases), so the config declares `attention_bias: true`
and q_proj / k_proj get zero biases. What the format cannot express is listed in `wkvquant_export.json`: the KV-cache
quantization and POQ (the exported model runs with an ordinary KV cache) and the K smoothing, which is dropped --
exact with a full-precision cache: softmax((q * s) . (k - d) / s) = softmax(q . k - q . d) = softmax(q . k) since
q . d is the same for every key of a query.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from ..artifact import MANIFEST, METRICS, WEIGHTS
from ..atomic import atomic_directory
from ..config import FP_BITS
from ..errors import ArtifactError, ConfigError
from ..model import MLP_PROJECTIONS, decoder_layers
from ..quant.kv_quant import ATTENTION_PROJECTIONS
from ..quant.packing import pack_bits, unpack_bits
from ..runtime.hf_model import REMOTE_CODE_FILE
from ..runtime.packed_linear import PackedLinear
from . import NOTES, kv_not_expressed, load_exportable

FORMAT = "compressed-tensors"
CT_FORMAT = "pack-quantized"
CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this writes
README = "README.md"
_NOT_COPIED = {"config.json", WEIGHTS, MANIFEST, METRICS, REMOTE_CODE_FILE, README}
BASE_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
_RUNTIME_DTYPES = {"float16": "float16", "float32": "float16", "bfloat16": "bfloat16"}


def _int32_words(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes (..., n) of an LSB-first bitstream -> int32 little-endian words (..., ceil(n / 4)), endian-safe."""
    packed = torch.nn.functional.pad(packed, (0, (-packed.shape[-1]) % 4)).to(torch.int64)
    words = (packed.unflatten(-1, (-1, 4)) << torch.tensor([0, 8, 16, 24])).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int32(values: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    """Unsigned `bits`-bit values (2-D) -> compressed-tensors' `pack_to_int32` layout along `packed_dim`
    (`values` are its signed inputs plus 2**(bits-1))."""
    if packed_dim == 0:
        return _int32_words(pack_bits(values.t(), bits)).t().contiguous()
    return _int32_words(pack_bits(values, bits))


def _layer_qparams(name: str, lin: PackedLinear) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Unsigned codes (out, in) and zero points (out, n_groups) in compressed-tensors' offset form (value + 2**(bits-1)),
    with (q - zp) == (code - zero) everywhere; and the number of re-expressed zero points."""
    bits, offset = lin.bits, 2 ** (lin.bits - 1)
    codes = unpack_bits(lin.qweight, bits, lin.in_features).to(torch.int64)
    zero = lin.zeros.to(torch.float32)
    if not torch.isfinite(zero).all() or not torch.equal(zero, zero.round()):
        raise ArtifactError(f"{name}: zero points are not integers (corrupt artifact)")
    zero = zero.to(torch.int64)
    n_groups = zero.shape[1]
    diff = codes.reshape(codes.shape[0], n_groups, -1) - zero.unsqueeze(-1)  # what (q - zp) must equal
    lo = (-offset - diff.amin(-1)).clamp(min=-offset)  # zp range keeping q = diff + zp in [-offset, offset - 1]
    hi = (offset - 1 - diff.amax(-1)).clamp(max=offset - 1)
    bad = lo > hi
    if bad.any():
        row, group = (int(i) for i in bad.nonzero()[0])
        d = diff[row, group]
        reach = int(d.min()) if int(d.min()) < -(2**bits - 1) else int(d.max())
        raise ConfigError(
            f"{name}: zero point {int(zero[row, group])} (row {row}, group {group}) cannot be represented: "
            f"code - zero reaches {reach}, beyond the +-{2**bits - 1} that q - zp can take in compressed-tensors' "
            f"signed {bits}-bit range ({int(bad.sum())} group(s) of this layer affected)"
        )
    zp = torch.minimum(torch.maximum(zero - offset, lo), hi)
    q = diff + zp.unsqueeze(-1)
    remapped = int((zp != zero - offset).sum())
    return (q + offset).reshape(codes.shape).to(torch.uint8), (zp + offset).to(torch.uint8), remapped


def _export_linear(name: str, lin: PackedLinear) -> tuple[dict[str, torch.Tensor], int]:
    codes, zp, remapped = _layer_qparams(name, lin)
    tensors = {
        f"{name}.weight_packed": pack_int32(codes, lin.bits),
        f"{name}.weight_scale": lin.scales.to(torch.float16),
        f"{name}.weight_zero_point": pack_int32(zp, lin.bits, packed_dim=0),
        f"{name}.weight_shape": torch.tensor([lin.out_features, lin.in_features], dtype=torch.int64),
    }
    return tensors, remapped


def quantization_config(bits: int, group_size: int) -> dict[str, Any]:
    """The `quantization_config` of config.json, as compressed-tensors' `ModelCompressor.update_config` writes it."""
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "dynamic": False,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size}
    return {
        "version": CT_VERSION,
        "quant_method": "compressed-tensors",
        "format": CT_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": CT_FORMAT}},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "moe_sparsity_config": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def _not_expressed(wkv: dict[str, Any]) -> list[dict[str, str]]:
    kv = wkv.get("kv", {})
    dropped = "a property of the quantized cache, dropped with it"
    return kv_not_expressed(wkv, {
        "kv_cache_quantization": (
            f"{kv.get('bits', FP_BITS)}-bit dynamic asymmetric per-token KV quantization per KV head (group "
            f"{kv.get('group_size') or 'head_dim'}); compressed-tensors' kv_cache_scheme only describes static "
            "scales, so kv_cache_scheme is null and the KV cache is whatever the runtime uses (full precision unless "
            "asked otherwise)"),
        "poq": ("past-only quantization (a token attends to its own K/V in full precision) only matters with the "
                "quantized KV cache; dropped with it"),
        "k_smoothing": (
            "self_attn.k_scale / k_shift are dropped (vLLM would also mistake `k_scale` for an FP8 KV-cache scale). "
            "Exact with a full-precision cache: scores (q * s) . (k - d) / s = q . k - q . d, and q . d is the "
            "same for every key of a query, so the softmax is unchanged (with k_pre_rope the smoothing is undone "
            "before RoPE: exact as well)"),
        "sink_tokens": f"the first tokens kept in full precision in the cache: {dropped}",
        "fp_prefill": f"full-precision attention within a prefill: {dropped}",
    })


def export(artifact_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir` (atomically: temporary sibling directory, then rename; a previous export there is replaced)
    from the WKVQuant artifact in `artifact_dir`. Returns `out_dir`."""
    return write(artifact_dir, out_dir, FORMAT)


# (the artifact's quantization_config, the export's config.json, the notes, changed in place) -> README.md text
Deployment = Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], str]


def write(artifact_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str,
          deployment: Deployment | None = None, fp_weights: bool = False) -> Path:
    """`export` as format `fmt`, with an engine's `deployment` notes and README (`export.vllm`); `fp_weights`:
    an artifact with unquantized weights (w_bits 16) becomes a plain checkpoint with its smoothing folded."""
    artifact, out = Path(artifact_dir), Path(out_dir)
    model, quant = load_exportable(artifact, out, fmt, fp_weights)
    wkv = quant["wkvquant_config"]
    bits, group_size = quant["w_bits"], quant["group_size"]
    stored_dtype = getattr(torch, quant.get("non_quantized_dtype", "float16"))
    config = json.loads((artifact / "config.json").read_text())
    arch = (config.get("architectures") or ["LlamaForCausalLM"])[0].removeprefix("WKVQuant")
    config.pop("auto_map", None)  # the export is a plain model of the base architecture
    config.update(architectures=[arch], model_type=BASE_MODEL_TYPES[arch])

    tensors: dict[str, torch.Tensor] = {}
    remapped: dict[str, int] = {}
    attn_bias = bool(config.get("attention_bias", False))
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        for module, names, part in ((layer.self_attn, ATTENTION_PROJECTIONS, "self_attn"),
                                    (layer.mlp, MLP_PROJECTIONS, "mlp")):
            for proj in names:
                name, lin = f"model.layers.{i}.{part}.{proj}", getattr(module, proj)
                if isinstance(lin, PackedLinear):
                    layer_tensors, n = _export_linear(name, lin)
                else:
                    layer_tensors, n = {f"{name}.weight": lin.weight.to(stored_dtype)}, 0
                tensors.update(layer_tensors)
                if n:
                    remapped[name] = n
                if lin.bias is not None:
                    tensors[f"{name}.bias"] = lin.bias.to(stored_dtype)
                    attn_bias = attn_bias or part == "self_attn"
    if attn_bias:
        if arch == "MistralForCausalLM":
            raise ConfigError(f"{artifact}: the folded V smoothing needs attention biases, which "
                              "MistralForCausalLM does not have (quantize with --no-smoothing to export it)")
        for i, layer in enumerate(layers):
            for proj in ATTENTION_PROJECTIONS:
                lin = getattr(layer.self_attn, proj)
                tensors.setdefault(f"model.layers.{i}.self_attn.{proj}.bias",
                                   torch.zeros(lin.out_features, dtype=stored_dtype))
    for key, value in model.state_dict().items():
        in_block = ".self_attn." in key or ".mlp." in key
        if not in_block and not (model.config.tie_word_embeddings and key == "lm_head.weight"):
            tensors[key] = value.to(stored_dtype)

    config.pop("quantization_config", None)
    config["attention_bias"] = attn_bias
    config["dtype"] = _RUNTIME_DTYPES.get(str(stored_dtype).removeprefix("torch."), "float16")
    config.pop("torch_dtype", None)
    config["use_cache"] = True
    if bits == FP_BITS:
        scheme, weights_exact = "unquantized weights (W16A16)", f"every linear weight, as stored ({stored_dtype})"
    else:
        config["quantization_config"] = quantization_config(bits, group_size)
        scheme = f"W{bits}A16 asymmetric, " + ("per row (strategy channel)" if group_size == -1 else f"group {group_size}")
        weights_exact = ("every linear weight: (q - zp) * scale with q - zp == code - zero and the artifact's fp16 "
                         "scales (decompressing in fp16 rounds the product to fp16, as our own fp16 dequantization "
                         "does)")
    notes = {
        "format": fmt,
        "compressed_tensors_format": None if bits == FP_BITS else CT_FORMAT,
        "scheme": scheme,
        "source": {"quantization_config": quant,
                   "model.safetensors_sha256": json.loads((artifact / MANIFEST).read_text())["files"][WEIGHTS]["sha256"]},
        "exact": [
            weights_exact,
            "V smoothing: folded into v_proj / o_proj weights and biases (attention_bias: true, zero q_proj / "
            "k_proj biases)",
        ],
        "not_expressed": _not_expressed(wkv),
        "zero_points_reexpressed": remapped,
        "loading": ("vLLM: `vllm serve OUT` (compressed-tensors WNA16 with zero points; its kernels add shape and "
                    "group-size limits). transformers: pass quantization_config=CompressedTensorsConfig(dequantize=True); "
                    "with compressed-tensors 0.20.1 no zero-point layout loads on the default path: its "
                    "PackedQuantizationCompressor.compress leaves the meta model's zero point unpacked ((out, groups) "
                    "int8, so the packed (ceil(out * bits / 32), groups) int32 tensor that it, vLLM and this export "
                    "write is a shape mismatch), while its decompress on the first forward requires that packed int32 "
                    "(unpacked int8 loads, then fails there)"),
        "runtime_dtype": (f"config dtype {config['dtype']}; non-quantized tensors are stored as in the artifact "
                          f"({str(stored_dtype).removeprefix('torch.')}); in bfloat16 a runtime rounds the fp16 "
                          "scales to bfloat16"),
    }

    readme = None if deployment is None else deployment(quant, config, notes)

    with atomic_directory(out) as tmp:
        for path in sorted(artifact.iterdir()):
            if path.is_file() and path.name not in _NOT_COPIED:
                shutil.copyfile(path, tmp / path.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, tmp / WEIGHTS, metadata={"format": "pt"})
        if readme is not None:
            (tmp / README).write_text(readme)
        notes["files"] = sorted(path.name for path in tmp.iterdir()) + [NOTES]
        (tmp / NOTES).write_text(json.dumps(notes, indent=2) + "\n")
    return out


def describe(out_dir: str | os.PathLike) -> str:
    notes = json.loads((Path(out_dir) / NOTES).read_text())
    dropped = ", ".join(item["feature"] for item in notes["not_expressed"]) or "nothing"
    return (f"{FORMAT} {notes['compressed_tensors_format']}, {notes['scheme']}); not expressed: {dropped} "
            f"(see {NOTES}")
