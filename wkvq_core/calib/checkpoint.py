"""A directory of per-block checkpoints: block-NNNN.safetensors, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, safe_open, save, save_file

from ..errors import ArtifactError


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


_DTYPE_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
                torch.int64: "I64"}
_DTYPE_ORDER = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")  # safetensors' Dtype enum order
_COPY_CHUNK = 1 << 24


class SafetensorsStream:
    """A safetensors file written one tensor at a time with bounded memory: tensor bytes are spooled to disk as
    they come; `finish` writes the header and the data in the order `save_file` uses (dtype, then name), so the
    file has the same bytes as `save_safetensors_atomic` of all the tensors at once."""

    def __init__(self, path: Path, meta: dict[str, str]) -> None:
        self.path, self.meta = Path(path), meta
        self.spool_path = self.path.with_name(f".{self.path.name}.spool")
        self.spool = open(self.spool_path, "w+b")
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}  # name -> dtype, shape, spool offset, size

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.entries:
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        self.entries[name] = (_DTYPE_NAMES[tensor.dtype], list(tensor.shape), self.spool.tell(), data.nbytes)
        self.spool.write(data.tobytes())

    def finish(self, between_tensors: Callable[[], None] | None = None) -> None:
        order = sorted(self.entries, key=lambda name: (-_DTYPE_ORDER.index(self.entries[name][0]), name))
        header: dict = {"__metadata__": _metadata(self.meta)}
        position = 0
        for name in order:
            dtype, shape, _, size = self.entries[name]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}
            position += size
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        self.spool.flush()
        with open(self.path, "wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            for name in order:
                if between_tensors is not None:
                    between_tensors()
                _, _, offset, size = self.entries[name]
                self.spool.seek(offset)
                while size:
                    chunk = self.spool.read(min(size, _COPY_CHUNK))
                    out.write(chunk)
                    size -= len(chunk)
        self.close()

    def close(self) -> None:
        self.spool.close()
        self.spool_path.unlink(missing_ok=True)
