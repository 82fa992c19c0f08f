"""Exports of an artifact for other engines' own loaders: one module per format, each defining `FORMAT` (its name),
`export(artifact_dir, out_dir) -> Path` and `describe(out_dir) -> str` (what was written and what the format could
not express). A target (`wkvq_core.targets`) names the format written for its engine."""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any

from ..config import FP_BITS
from ..errors import ArtifactError, ConfigError
from ..targets import RUNTIME, get_target

NOTES = "wkvquant_export.json"  # every format records in OUT what it wrote and what it could not express
FORMATS = {module.name.replace("_", "-"): f"{__name__}.{module.name}" for module in pkgutil.iter_modules(__path__)}


def exporter(fmt: str) -> ModuleType:
    """The module that writes format `fmt`."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(sorted(FORMATS))}; got {fmt!r}")
    return importlib.import_module(FORMATS[fmt])


def check_output_dir(out: Path, artifact: Path) -> None:
    """`out` may be missing, empty or a previous export (which the export replaces); nothing else."""
    if out.resolve() == artifact.resolve():
        raise ConfigError(f"{out}: the output directory must differ from the artifact")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not (out / NOTES).is_file():
            raise ConfigError(f"{out}: exists, is not empty and is not a previous export; remove it or pick another")


def load_exportable(artifact_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str,
                    fp_weights: bool = False):
    """The artifact's packed model (fp32) and its quantization_config, after the checks every format shares:
    an artifact with quantized weights (or unquantized ones where `fp_weights`), weight-only (A16), no run-time V
    rotation; `out_dir` writable."""
    from ..artifact import is_artifact, load_quantized

    artifact, out = Path(artifact_dir), Path(out_dir)
    if not artifact.is_dir():
        raise ArtifactError(f"{artifact}: no such directory")
    if not is_artifact(artifact):
        raise ArtifactError(f"{artifact}: not a WKVQuant artifact (config.json without quant_method 'wkvquant')")
    check_output_dir(out, artifact)
    model = load_quantized(artifact)  # fp32: every stored dtype (fp16 / bf16 / fp32) round-trips exactly
    quant: dict[str, Any] = model.config.quantization_config
    bits, act_bits = quant["w_bits"], quant.get("act_bits", FP_BITS)
    if bits == FP_BITS and not fp_weights:
        raise ConfigError(f"{artifact}: weights are not quantized (w_bits 16); nothing to export as {fmt}")
    if act_bits != FP_BITS:
        raise ConfigError(f"{artifact}: activations are quantized to {act_bits} bits (W{bits}A{act_bits}); "
                          f"only weight-only (A16) models can be exported")
    if quant["wkvquant_config"].get("kv", {}).get("rotate", False):
        raise ConfigError(f"{artifact}: its V values are rotated (kv rotate) at run time, outside the quantized "
                          f"v_proj / o_proj weights; {fmt} cannot express that (quantize without it to export)")
    return model, quant


def kv_not_expressed(wkv: dict[str, Any], details: dict[str, str]) -> list[dict[str, str]]:
    """The KV-cache features of an artifact (its wkvquant_config dict) that a format drops, each with the format's
    `details[feature]`: the quantized cache, and with it POQ (where its target ran it), the K smoothing (unless
    its target folded it into q_proj / k_proj), sink tokens and full-precision prefill; nothing when the cache is
    not quantized."""
    kv = wkv.get("kv", {})
    if kv.get("bits", FP_BITS) == FP_BITS:
        return []
    target = get_target(wkv.get("target", RUNTIME))
    present = {"kv_cache_quantization": True, "poq": kv.get("poq", False) and target.poq,
               "k_smoothing": kv.get("smoothing", False) and not target.k_smoothing_folded,
               "sink_tokens": kv.get("sink_tokens"), "fp_prefill": kv.get("fp_prefill")}
    return [{"feature": feature, "detail": details[feature]} for feature, on in present.items() if on]
