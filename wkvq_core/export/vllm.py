"""Export for `vllm serve`: the compressed-tensors W4A16 checkpoint (`export.compressed_tensors`: the V smoothing
folded into v_proj / o_proj with biases, a vllm-target artifact's K smoothing already folded into q_proj /
k_proj), with a README and notes naming the command that serves it with the KV cache it was calibrated for:

    vllm serve OUT --dtype bfloat16 --kv-cache-dtype int4_per_token_head --attention-backend TRITON_ATTN

(int4_per_token_head exists in vLLM's Triton attention backend, on GPUs only; kv_bits 16: an `auto` cache.)
Transformers loads the export as a plain LlamaForCausalLM (`LOADING`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..artifact import is_artifact
from ..config import FP_BITS, KVQuantConfig, WKVQuantConfig
from ..targets import vllm as target
from . import NOTES
from .compressed_tensors import write

FORMAT = "vllm"
VLLM_VERSION = "0.32.0"  # the release whose int4_per_token_head arithmetic the vllm target emulates
ATTENTION_BACKEND = "TRITON_ATTN"
LOADING = (
    "transformers: AutoModelForCausalLM.from_pretrained(OUT) loads it as is with compressed-tensors 0.17 (vLLM "
    f"{VLLM_VERSION}'s pin) or transformers <= 5.22.2; with compressed-tensors >= 0.18 and transformers >= 5.23 (this "
    "project's lock) pass quantization_config=CompressedTensorsConfig(dequantize=True) (from "
    "transformers.utils.quantization_config): without it, loading fails on the weight_zero_point shape (a "
    "compressed-tensors bug: its meta-device compress leaves the zero point unpacked), never silently")


def serve_command(out: str, int4_cache: bool) -> str:
    """The `vllm serve` command of an export at `out`, with the int4_per_token_head cache or an unquantized one."""
    command = f"vllm serve {out} --dtype bfloat16"
    if int4_cache:
        command += f" --kv-cache-dtype {target.INT4} --attention-backend {ATTENTION_BACKEND}"
    return command


def _deployment(quant: dict[str, Any], config: dict[str, Any], notes: dict[str, Any]) -> str:
    wkv = WKVQuantConfig.from_dict(quant["wkvquant_config"])
    int4_cache = wkv.kv.bits == target.BITS_OF_DTYPE[target.INT4]
    calibrated = int4_cache and wkv.target == target.TARGET.name
    loading = LOADING if wkv.weight.enabled else "transformers: AutoModelForCausalLM.from_pretrained(OUT)"
    notes.update(serve=serve_command("OUT", int4_cache), kv_cache_dtype=target.INT4 if int4_cache else target.AUTO,
                 vllm_version=VLLM_VERSION, loading=loading)
    if calibrated:  # the serve flag carries the calibrated cache; its smoothing is in the weights
        notes["not_expressed"] = [item for item in notes["not_expressed"]
                                  if item["feature"] != "kv_cache_quantization"]
        notes["exact"].append(f"the KV cache at serve time: --kv-cache-dtype {target.INT4} computes what the vllm "
                              "target calibrated (randomized Hadamard rotation, 4-bit per token and KV head, no POQ)")
        cache = "The KV-cache smoothing was calibrated for this cache and is folded into the attention projections."
    elif wkv.kv.bits != FP_BITS:
        cache = notes["kv_cache_note"] = (
            f"The KV cache was calibrated for the {wkv.target} target, not vLLM: with --kv-cache-dtype "
            f"{target.INT4} the cache is vLLM's own, uncalibrated 4-bit quantization (quantize with --target vllm "
            "to calibrate it).")
    else:
        cache = "The KV cache is not quantized."
    return (f"# {config['architectures'][0]}: WKVQuant for vLLM {VLLM_VERSION}\n\n"
            "Serve it (on a GPU: the 4-bit cache is in vLLM's Triton attention backend):\n\n"
            f"    {serve_command('THIS_DIR', int4_cache)}\n\n"
            f"Weights: {notes['scheme']}. {cache}\n\n"
            f"Loading with transformers: {loading.removeprefix('transformers: ')}.\n\n"
            f"What was written, and what the format cannot express: {NOTES}.\n")


def _check_servable(artifact: Path) -> None:
    """Weights vLLM's WNA16 kernels take, before any work (KV options its cache drops are reported in the notes'
    not_expressed, not refused); what is not an artifact is left to `write` to name."""
    if not is_artifact(artifact):
        return
    config = json.loads((artifact / "config.json").read_text())
    wkv = WKVQuantConfig.from_dict(config["quantization_config"]["wkvquant_config"])
    target.check(dataclasses.replace(wkv, kv=KVQuantConfig(bits=FP_BITS)), config)


def export(artifact_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir` (atomically) from the artifact: the compressed-tensors checkpoint, README.md and notes."""
    _check_servable(Path(artifact_dir))
    return write(artifact_dir, out_dir, FORMAT, _deployment, fp_weights=True)


def describe(out_dir: str | os.PathLike) -> str:
    notes = json.loads((Path(out_dir) / NOTES).read_text())
    dropped = ", ".join(item["feature"] for item in notes["not_expressed"]) or "nothing"
    return (f"{notes['scheme']}; serve: "
            f"{notes['serve'].replace('OUT', str(out_dir))}; not expressed: {dropped} (see {NOTES})")
