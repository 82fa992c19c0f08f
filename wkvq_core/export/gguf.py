"""Export a WKVQuant artifact as a GGUF file (architecture "llama") that llama.cpp loads: the 4-bit weights as Q4_1
blocks, written with the `gguf` package (gguf-py, llama.cpp's own writer) in the layout of llama.cpp's
`convert_hf_to_gguf.py` (`LlamaModel`).

Q4_1 (`gguf.quants.Q4_1`): a block of 32 consecutive input channels is fp16 d, fp16 m and 16 bytes of 4-bit q (byte j:
q[j] in the low nibble, q[j + 16] in the high one), dequantized q * d + m in fp32. Ours is (code - zero) * scale per
group of G input channels (G a multiple of 32, or the whole row), so every 32-block of a group takes d = scale,
q = code + k and m = -(zero + k) * scale for an integer shift k keeping q in [0, 15] (k = 0 always does). That is
bit-exact when m is an fp16 number (q * d is exact in fp32, and so is the sum, our exact fp32 value). k is chosen per
block among the shifts its codes allow, to make m exact -- or, where none does, as close as fp16 gets; the blocks left
inexact, their fraction and the largest deviation of a dequantized weight are reported (notes json and `describe`).

Like the converter: q_proj / k_proj rows are permuted from HF's rotate_half layout to llama.cpp's interleaved rotary
pairs (`LlamaModel.permute`, k_proj with the KV head count; biases too), norms and biases are F32, tied embeddings
leave out `output.weight`. Embeddings and an untied lm_head keep the artifact's dtype (F16 for the default float16,
so they are exact too). The V smoothing is folded into attn_v / attn_output weights and biases (llama.cpp's llama
graph adds attention biases when present).

An artifact calibrated for the `llamacpp` target is exact in llama.cpp as a whole: its K smoothing (one scale per
rotary pair) is already folded into q_proj / k_proj, its weight scales have 7 significant bits (every Q4_1 block
exact), and its KV quantization is llama.cpp's own cache type, which the metadata records
(`wkvquant.recommended_cache_type_k` / `_v`) for -ctk / -ctv. Any other artifact's K smoothing is dropped (exact
with a full-precision cache, see `compressed_tensors`) and its KV quantization is not expressible: llama.cpp
quantizes its cache its own way (q4_0: symmetric blocks of 32 with an fp16 scale); the metadata recommends the
nearest cache type.

An artifact with unquantized weights (w_bits 16, e.g. KV-only) is written with its linears in the artifact's dtype
(F16 for the default float16): the unquantized reference for llama.cpp's own quantization recipes.

Tokenizer, as the converter writes it from tokenizer.json: a byte-fallback BPE (sentencepiece-style, e.g. the llama2
family and stories260k) as tokenizer model "llama" with token scores = -(merge rank) so that llama.cpp's score-driven
merging follows the BPE merge order (the converter's `LlamaHfVocab` writes -1000 for all); a byte-level BPE
(GPT-2 style, e.g. SmolLM2) as "gpt2" with its merges and the pre-tokenizer named from tokenizer.json's pre_tokenizer
("gpt-2": ByteLevel alone; "smollm": single digits, then ByteLevel -- llama.cpp's regexes for those names).
add_bos / add_eos are what the HF tokenizer does.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..artifact import MANIFEST, WEIGHTS
from ..atomic import atomic_directory
from ..config import FP_BITS, WKVQuantConfig
from ..errors import ArtifactError, ConfigError
from ..model import MLP_PROJECTIONS, decoder_layers
from ..quant.kv_quant import ATTENTION_PROJECTIONS
from ..quant.packing import unpack_bits
from ..runtime.packed_linear import PackedLinear
from ..targets import llamacpp
from ..targets.llamacpp import interleave_pairs
from . import NOTES, kv_not_expressed, load_exportable

FORMAT = "gguf"
GGUF_FILE = "model.gguf"
ARCH = gguf.MODEL_ARCH.LLAMA
Q4_1 = gguf.GGMLQuantizationType.Q4_1
BLOCK, BLOCK_BYTES = gguf.GGML_QUANT_SIZES[Q4_1]  # 32 weights in 20 bytes
CACHE_TYPE_KEYS = ("wkvquant.recommended_cache_type_k", "wkvquant.recommended_cache_type_v")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_SHIFTS = torch.tensor([0] + [s * k for k in range(1, 16) for s in (1, -1)])  # k = 0 first: preferred on ties
_FP_TYPES = {"float16": gguf.GGMLQuantizationType.F16, "float32": gguf.GGMLQuantizationType.F32,
             "bfloat16": gguf.GGMLQuantizationType.BF16}
_FP_FILE_TYPES = {"float16": gguf.LlamaFileType.MOSTLY_F16, "float32": gguf.LlamaFileType.ALL_F32,
                  "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}


def permute_rotary(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """q_proj / k_proj rows (weights, biases, or any per-row data) from HF's rotate_half order to llama.cpp's
    interleaved rotary pairs: `LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py, the order the llamacpp
    target quantizes K in."""
    return interleave_pairs(rows.unflatten(0, (n_head, -1)), dim=1).flatten(0, 1)


def q4_1_blocks(name: str, lin: PackedLinear) -> tuple[np.ndarray, dict[str, Any]]:
    """The Q4_1 bytes (out, in // 32 * 20) of a 4-bit PackedLinear, and what is inexact about them."""
    out_features, in_features = lin.out_features, lin.in_features
    group = in_features if lin.group_size == -1 else lin.group_size
    if lin.bits != 4:
        raise ConfigError(f"{name}: {lin.bits}-bit weights; Q4_1 holds 4-bit codes (quantize with 4-bit weights)")
    if group % BLOCK:
        what = "per-row groups" if lin.group_size == -1 else "groups"
        raise ConfigError(f"{name}: {what} of {group} input channels are not a multiple of Q4_1's {BLOCK}-weight "
                          f"blocks, so its (scale, zero) cannot be given per block")
    zero = lin.zeros.to(torch.float64)
    if not torch.isfinite(zero).all() or not torch.equal(zero, zero.round()):
        raise ArtifactError(f"{name}: zero points are not integers (corrupt artifact)")
    codes = unpack_bits(lin.qweight, 4, in_features).to(torch.int64).reshape(out_features, -1, BLOCK)
    per_group = group // BLOCK
    scale = lin.scales.to(torch.float16).repeat_interleave(per_group, dim=1)  # (out, blocks)
    zero = zero.repeat_interleave(per_group, dim=1)

    # every shift k the block's codes allow; m = -(zero + k) * scale is exact in float64 (|zero + k| < 2**12)
    low, high = codes.amin(-1, keepdim=True), codes.amax(-1, keepdim=True)
    allowed = (low + _SHIFTS >= 0) & (high + _SHIFTS <= 15)
    m_exact = -(zero.unsqueeze(-1) + _SHIFTS) * scale.to(torch.float64).unsqueeze(-1)
    m16 = m_exact.to(torch.float16)
    error = torch.where(allowed & m16.isfinite(), (m16.to(torch.float64) - m_exact).abs(), torch.inf)
    best = error.argmin(-1, keepdim=True)
    chosen_error = error.gather(-1, best).squeeze(-1)
    if torch.isinf(chosen_error).any():
        row, block = (int(i) for i in torch.isinf(chosen_error).nonzero()[0])
        raise ConfigError(f"{name}: -zero * scale (row {row}, block {block}) overflows fp16 for Q4_1's m")
    m = m16.gather(-1, best).squeeze(-1)
    q = (codes + _SHIFTS[best]).to(torch.uint8)

    # the weights as Q4_1 dequantizes them (ggml and gguf-py: fp32 q * d + m), against our fp32 dequantization
    engine = q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1) + m.to(torch.float32).unsqueeze(-1)
    deviation = (engine.reshape(out_features, in_features) - lin.dequantized_weight()).abs()
    inexact = chosen_error > 0
    stats = {"blocks": inexact.numel(), "inexact_blocks": int(inexact.sum()),
             "inexact_blocks_without_shift": int((error[..., 0] > 0).sum()),
             "max_abs_deviation": float(deviation.max())}

    nibbles = (q[..., : BLOCK // 2] | (q[..., BLOCK // 2:] << 4)).numpy()
    blocks = np.concatenate([scale.numpy().astype("<f2").view(np.uint8).reshape(*scale.shape, 2),
                             m.numpy().astype("<f2").view(np.uint8).reshape(*m.shape, 2), nibbles], axis=-1)
    return blocks.reshape(out_features, -1), stats


# --- tokenizer ---------------------------------------------------------------------------------------------------

def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's pre-tokenizer for a tokenizer.json byte-level pre_tokenizer; None when it has none for it."""
    def byte_level(p: dict[str, Any]) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if pre is None:
        return None
    if byte_level(pre):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and byte_level(steps[1])):
        return "smollm"
    return None


def _add_vocab(writer: gguf.GGUFWriter, artifact: Path, vocab_size: int) -> dict[str, Any]:
    """Write the tokenizer metadata; returns what was written, for the notes."""
    from transformers import AutoTokenizer

    path = artifact / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{artifact}: no tokenizer.json; the GGUF tokenizer is written from it")
    spec = json.loads(path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"{path}: a {model.get('type')} tokenizer; only BPE tokenizers are exported")
    byte_fallback = bool(model.get("byte_fallback"))
    pre = None if byte_fallback else _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if not byte_fallback and pre is None:
        raise ConfigError(f"{path}: pre_tokenizer {json.dumps(spec.get('pre_tokenizer'))} has no llama.cpp "
                          "pre-tokenizer known here (byte-level 'gpt-2' or 'smollm')")

    tokens = dict(model["vocab"])
    added = {item["id"]: item for item in spec.get("added_tokens", [])}
    tokens |= {item["content"]: index for index, item in added.items()}
    if max(tokens.values()) >= vocab_size:
        raise ConfigError(f"{path}: token id {max(tokens.values())} beyond the model's vocab_size {vocab_size}")
    by_id = {index: token for token, index in tokens.items()}
    rank = {}
    for r, (left, right) in enumerate(_merge_pairs(model)):
        rank.setdefault(left + right, r)

    names, types, scores = [], [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            names.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            names.append(token)
            if index in added:
                special = added[index].get("special", False)
                types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            elif byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
        scores.append(-float(rank[token]) if token in rank else 0.0)

    writer.add_tokenizer_model("llama" if byte_fallback else "gpt2")
    writer.add_tokenizer_pre("default" if byte_fallback else pre)
    writer.add_token_list(names)
    writer.add_token_types(types)
    if byte_fallback:
        writer.add_token_scores(scores)
    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)  # its warnings about unusual templates concern add_bos / add_eos, set below
    try:
        special = gguf.SpecialVocab(artifact, load_merges=not byte_fallback, n_vocab=vocab_size)
    finally:
        gguf_log.setLevel(level)
    hf = AutoTokenizer.from_pretrained(artifact)
    ids = hf("a b")["input_ids"]
    special.add_special_token = {"bos": hf.bos_token_id is not None and ids[0] == hf.bos_token_id,
                                 "eos": hf.eos_token_id is not None and ids[-1] == hf.eos_token_id}
    special.add_to_gguf(writer, quiet=True)
    return {"model": "llama" if byte_fallback else "gpt2", "pre": "default" if byte_fallback else pre,
            "tokens": vocab_size, "special_token_ids": special.special_token_ids,
            "add_bos": special.add_special_token["bos"], "add_eos": special.add_special_token["eos"],
            **({"scores": "-(merge rank) of the BPE merge producing the token, 0 for the others"}
               if byte_fallback else {"merges": len(special.merges)})}


# --- export ------------------------------------------------------------------------------------------------------

def _hyperparameters(writer: gguf.GGUFWriter, config, where: Path) -> None:
    arch = (config.architectures or ["LlamaForCausalLM"])[0].removeprefix("WKVQuant")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"{where}: architecture {arch}; the GGUF export writes {' / '.join(SUPPORTED_ARCHITECTURES)}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{where}: RoPE scaling {rope.get('rope_type')!r} is not exported (plain RoPE only)")
    if config.hidden_act != "silu":
        raise ConfigError(f"{where}: hidden_act {config.hidden_act!r}; llama.cpp's llama graph uses SiLU")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _not_expressed(wkv: dict[str, Any], cache_type: str) -> list[dict[str, str]]:
    kv = wkv.get("kv", {})
    return kv_not_expressed(wkv, {
        "kv_cache_quantization": (
            f"{kv.get('bits', FP_BITS)}-bit dynamic asymmetric per-token KV quantization per KV head (group "
            f"{kv.get('group_size') or 'head_dim'}); llama.cpp quantizes its cache its own way, chosen at run time: "
            f"recommended {cache_type} (-ctk {cache_type} -ctv {cache_type}), symmetric blocks of 32 with an fp16 "
            "scale -- not the calibrated scheme"),
        "poq": ("past-only quantization (a token attends to its own K/V in full precision): llama.cpp attends to its "
                "cached K/V"),
        "k_smoothing": (
            "self_attn.k_scale / k_shift are dropped: exact with a full-precision cache (the shift adds q . d to every "
            "score of a query, the scale cancels); with a quantized llama.cpp cache its K is quantized unsmoothed"),
        "sink_tokens": "the first tokens kept in full precision in the cache: a property of the calibrated cache",
        "fp_prefill": "full-precision attention within a prefill: a property of the calibrated cache",
    })


def export(artifact_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir`/model.gguf and the notes json (atomically: temporary sibling directory, then rename; a
    previous export there is replaced) from the WKVQuant artifact in `artifact_dir`. Returns `out_dir`."""
    artifact, out = Path(artifact_dir), Path(out_dir)
    model, quant = load_exportable(artifact, out, "GGUF Q4_1", fp_weights=True)
    config, wkv = model.config, quant["wkvquant_config"]
    fp_name = quant.get("non_quantized_dtype", "float16")
    fp_type = _FP_TYPES[fp_name]
    kv = wkv.get("kv", {})
    for_llamacpp = wkv.get("target") == llamacpp.TARGET.name
    if for_llamacpp:
        cache_type = llamacpp.cache_type(WKVQuantConfig.from_dict(wkv).kv)
    else:
        cache_type = "q4_0" if kv.get("bits", FP_BITS) == 4 else "f16"

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[ARCH])
    writer.add_name(artifact.resolve().name)
    fp_linears = quant["w_bits"] == FP_BITS
    writer.add_file_type(_FP_FILE_TYPES[fp_name] if fp_linears else gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hyperparameters(writer, config, artifact)
    for key in CACHE_TYPE_KEYS:
        writer.add_string(key, cache_type)

    names = gguf.get_tensor_name_map(ARCH, config.num_hidden_layers)
    n_head, n_head_kv = config.num_attention_heads, config.num_key_value_heads
    rotary_heads = {"q_proj": n_head, "k_proj": n_head_kv}
    types: dict[str, str] = {}
    stats: dict[str, dict[str, Any]] = {}

    def add(hf_name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"{hf_name}: no GGUF tensor name for it in architecture {gguf.MODEL_ARCH_NAMES[ARCH]}")
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        types[name] = qtype.name

    def add_fp(hf_name: str, value: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> None:
        data = value.detach().to(torch.float32).numpy()
        add(hf_name, gguf.quants.quantize(data, qtype), qtype)

    for i, layer in enumerate(decoder_layers(model)):
        prefix = f"model.layers.{i}"
        for module, projections, part in ((layer.self_attn, ATTENTION_PROJECTIONS, "self_attn"),
                                          (layer.mlp, MLP_PROJECTIONS, "mlp")):
            for proj in projections:
                hf_name, lin = f"{prefix}.{part}.{proj}", getattr(module, proj)
                bias = lin.bias
                if proj in rotary_heads:
                    bias = None if bias is None or not bias.any() else permute_rotary(bias, rotary_heads[proj])
                if fp_linears:
                    weight = lin.weight if proj not in rotary_heads else permute_rotary(lin.weight, rotary_heads[proj])
                    add_fp(f"{hf_name}.weight", weight, fp_type)
                else:
                    blocks, stats[hf_name] = q4_1_blocks(hf_name, lin)
                    if proj in rotary_heads:
                        blocks = permute_rotary(torch.from_numpy(blocks), rotary_heads[proj]).numpy()
                    add(f"{hf_name}.weight", blocks, Q4_1)
                if bias is not None:
                    add_fp(f"{hf_name}.bias", bias, gguf.GGMLQuantizationType.F32)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            add_fp(f"{prefix}.{norm}.weight", getattr(layer, norm).weight, gguf.GGMLQuantizationType.F32)
    add_fp("model.embed_tokens.weight", model.model.embed_tokens.weight, fp_type)
    add_fp("model.norm.weight", model.model.norm.weight, gguf.GGMLQuantizationType.F32)
    if not config.tie_word_embeddings:
        add_fp("lm_head.weight", model.lm_head.weight, fp_type)
    tokenizer = _add_vocab(writer, artifact, config.vocab_size)

    group = quant["group_size"]
    if fp_linears:
        scheme, q4_1, linears_exact = (f"unquantized linears ({fp_type.name})", None,
                                       f"linear weights as stored in the artifact ({fp_type.name})")
    else:
        blocks = sum(s["blocks"] for s in stats.values())
        inexact = sum(s["inexact_blocks"] for s in stats.values())
        scheme = (f"Q4_1 from W4A16 asymmetric, {'per row' if group == -1 else f'group {group}'} "
                  f"(d = scale and m = -(zero + k) * scale for every {BLOCK}-weight block)")
        q4_1 = {"blocks": blocks, "inexact_blocks": inexact, "inexact_fraction": inexact / blocks,
                "inexact_fraction_without_shift": sum(s["inexact_blocks_without_shift"] for s in stats.values())
                / blocks,
                "max_abs_deviation": max(s["max_abs_deviation"] for s in stats.values()),
                "per_linear": stats}
        linears_exact = ("Q4_1 blocks whose m = -(zero + k) * scale is an fp16 number: q * d + m in fp32 is exactly "
                         "our fp32 dequantized weight (the others deviate by at most q4_1.max_abs_deviation)")
    notes = {
        "format": FORMAT,
        "file": GGUF_FILE,
        "architecture": gguf.MODEL_ARCH_NAMES[ARCH],
        "scheme": scheme,
        "source": {"quantization_config": quant,
                   "model.safetensors_sha256": json.loads((artifact / MANIFEST).read_text())["files"][WEIGHTS]["sha256"]},
        "tensor_types": dict(sorted(types.items())),
        "q4_1": q4_1,
        "exact": [
            linears_exact,
            f"embeddings{'' if config.tie_word_embeddings else ' and lm_head'} as stored in the artifact "
            f"({fp_type.name}), norms and biases in F32",
            "V smoothing: folded into attn_v / attn_output weights and biases",
            *([f"K smoothing: one scale per rotary pair, folded into attn_q / attn_k; the KV cache: calibrated for "
               f"llama.cpp's {cache_type} cache with its Hadamard rotation (-ctk {cache_type} -ctv {cache_type})"]
              if for_llamacpp else []),
        ],
        "not_expressed": [] if for_llamacpp else _not_expressed(wkv, cache_type),
        "recommended_cache_type": {"k": cache_type, "v": cache_type},
        "tokenizer": tokenizer,
        "loading": (f"llama.cpp: llama-cli -m OUT/{GGUF_FILE} -ctk {cache_type} -ctv {cache_type}"
                    + (" -fa on (a quantized V cache needs flash attention)" if cache_type != "f16" else "")
                    + ("" if fp_linears else ". Its Q4_1 matmuls quantize the activations to Q8_1 (ggml's vec_dot "
                       "type for Q4_1), so its outputs differ slightly from W4A16 even where the weights are exact")),
    }

    with atomic_directory(out) as tmp:
        writer.write_header_to_file(tmp / GGUF_FILE)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        (tmp / NOTES).write_text(json.dumps(notes, indent=2) + "\n")
    return out


def describe(out_dir: str | os.PathLike) -> str:
    notes = json.loads((Path(out_dir) / NOTES).read_text())
    q4 = notes["q4_1"]
    dropped = ", ".join(item["feature"] for item in notes["not_expressed"]) or "nothing"
    cache = notes["recommended_cache_type"]
    exactness = "exact" if q4 is None else (
        f"{q4['inexact_blocks']} of {q4['blocks']} blocks ({q4['inexact_fraction']:.1%}) inexact in fp16, "
        f"max abs deviation {q4['max_abs_deviation']:.3g}")
    return (f"{FORMAT} {notes['file']}, {notes['architecture']}, {notes['scheme']}: {exactness}; recommended KV "
            f"cache: -ctk {cache['k']} -ctv {cache['v']}; not expressed: {dropped} (see {NOTES})")
