"""Saving and loading a calibration result: a self-contained, atomically written directory.

Layout (format "wkvquant-sim", version 1):
    config.json, generation_config.json, model.safetensors   the base model (transformers layout)
    tokenizer files
    wkvquant.json           {"format", "version", "config": WKVQuantConfig.to_dict()}
    wkvquant.safetensors    learned clip logits and smoothing per layer ("model.layers.{i}.…")
    metrics.json            evaluation table of the run (optional)
    manifest.json           {"files": {name: {"sha256", "size"}}} of every other file
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .calibrate import calibration_state, load_calibration_state_
from .checkpoint import load_safetensors, save_safetensors_atomic
from .config import WKVQuantConfig
from .errors import ArtifactError, ConfigError
from .model import load_model, prepare_model_

FORMAT = "wkvquant-sim"
FORMAT_VERSION = 1
QUANT_CONFIG = "wkvquant.json"
QUANT_STATE = "wkvquant.safetensors"
METRICS = "metrics.json"
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def save_artifact(out: str | os.PathLike, model, tokenizer, config: WKVQuantConfig, base_state_dict: dict,
                  metrics: dict[str, Any] | None = None) -> Path:
    """Write to a temporary sibling directory, then rename; an existing `out` is replaced only on success."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp, state_dict=base_state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / QUANT_CONFIG).write_text(
            json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "config": config.to_dict()}, indent=2)
        )
        save_safetensors_atomic(tmp / QUANT_STATE, calibration_state(model), {"format": FORMAT})
        if metrics is not None:
            (tmp / METRICS).write_text(json.dumps(metrics, indent=2))
        for path in tmp.iterdir():
            path.chmod(0o644)
        tmp.chmod(0o755)
        files = {
            p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()
        }
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def verify_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{directory / MANIFEST}: missing") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{directory / MANIFEST}: invalid JSON ({exc.msg})") from exc
    for name, entry in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256/size does not match the manifest (corrupt or truncated)")
    return manifest


def load_artifact(directory: str | os.PathLike, dtype=None):
    """(prepared model with the learned parameters, tokenizer, config) from `save_artifact`'s directory."""
    directory = Path(directory)
    verify_manifest(directory)
    header = json.loads((directory / QUANT_CONFIG).read_text())
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory / QUANT_CONFIG}: unknown format {header.get('format')!r} version {header.get('version')!r}"
        )
    config = WKVQuantConfig.from_dict(header["config"])
    model, tokenizer = load_model(directory, **({} if dtype is None else {"dtype": dtype}))
    prepare_model_(model, config)
    state, _ = load_safetensors(directory / QUANT_STATE)
    try:
        load_calibration_state_(model, state, str(directory / QUANT_STATE))
    except ConfigError as exc:
        raise ArtifactError(str(exc)) from exc
    return model, tokenizer, config
