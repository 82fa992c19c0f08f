"""A directory of per-block checkpoints: block-NNNN.safetensors, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, safe_open, save, save_file

from .errors import ArtifactError


META_KEY = "wkvq"  # one metadata entry: safetensors writes several in no fixed order


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}


def _metadata(meta: dict[str, str]) -> dict[str, str]:
    return {META_KEY: json.dumps(meta, sort_keys=True)}


def save_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Byte-reproducible: same tensors and meta give the same file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(_contiguous(tensors), tmp, metadata=_metadata(meta))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        return load_file(path), meta
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable safetensors file ({exc})") from exc


def encode_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """The bytes `save_safetensors_atomic` would write, for a store that takes bytes."""
    return save(_contiguous(tensors), metadata=_metadata(meta))


def decode_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`load_safetensors` of bytes. The metadata is read from the header as the format defines it (a little-endian
    u64 length, then that many bytes of JSON): the library reads metadata only from files."""
    try:
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        meta = json.loads((header.get("__metadata__") or {}).get(META_KEY, "{}"))
        return load(data), meta
    except (SafetensorError, ValueError, AttributeError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise ArtifactError(f"unreadable safetensors bytes ({exc})") from exc


class DirectoryCheckpoints:
    """`CheckpointStore` on a local directory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path(self, index: int) -> Path:
        return self.directory / f"block-{index:04d}.safetensors"

    def save(self, index: int, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        save_safetensors_atomic(self.path(index), tensors, meta)

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        path = self.path(index)
        return load_safetensors(path) if path.exists() else None
