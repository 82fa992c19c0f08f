"""Layer-by-layer loading: a model skeleton without weights whose decoder layers are read from the checkpoint
(single or sharded safetensors) when their block is needed and released after.

Resident: embeddings, final norm and lm_head (in the checkpoint's dtype) and the rotary embedding. A decoder
layer's weights exist only between `acquire` and `release`; its calibration parameters (clip logits, smoothing)
stay, they are small. `ResidentLayers` is the same interface over a model already in memory.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Protocol

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ..errors import ModelError
from ..model import check_architecture, decoder_layers

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LAYER_PREFIX = "model.layers."


class CheckpointReader:
    """Tensors of a local safetensors checkpoint, read by name on demand (one open shard at a time)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self.shard_of = {name: self.directory / shard for name, shard in weight_map.items()}
            else:
                with safe_open(self.directory / SINGLE_FILE, framework="pt") as f:
                    self.shard_of = {name: self.directory / SINGLE_FILE for name in f.keys()}
        except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{self.directory}: cannot load model files ({' '.join(str(exc).split())})") from exc

    @staticmethod
    def has_safetensors(directory: str | os.PathLike) -> bool:
        return (Path(directory) / INDEX_FILE).is_file() or (Path(directory) / SINGLE_FILE).is_file()

    def names(self, prefix: str = "") -> list[str]:
        return sorted(name for name in self.shard_of if name.startswith(prefix))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_shard: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.shard_of:
                raise ModelError(f"{self.directory}: the checkpoint has no tensor {name}")
            by_shard.setdefault(self.shard_of[name], []).append(name)
        tensors = {}
        try:
            for shard, shard_names in by_shard.items():
                with safe_open(shard, framework="pt") as f:
                    # own, aligned copies: CPU kernels round differently on unaligned memory-mapped data
                    tensors.update({name: f.get_tensor(name).clone() for name in shard_names})
        except (OSError, SafetensorError) as exc:
            raise ModelError(f"{self.directory}: cannot load model files ({' '.join(str(exc).split())})") from exc
        return tensors


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    target._parameters[attr] = nn.Parameter(value, requires_grad=False)


def load_skeleton(directory: str | os.PathLike, compute_dtype: torch.dtype = torch.float32):
    """(model, tokenizer, reader): the model without decoder-layer weights, its resident tensors loaded."""
    directory = Path(directory)
    try:
        config = AutoConfig.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{directory}: cannot load model files ({' '.join(str(exc).split())})") from exc
    check_architecture(config.to_dict(), str(directory))
    reader = CheckpointReader(directory)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, attn_implementation="eager")
    try:
        model.generation_config = GenerationConfig.from_pretrained(directory)
    except OSError:
        pass  # no generation_config.json: the one derived from the model config stays
    resident = [name for name, _ in model.named_parameters() if not name.startswith(LAYER_PREFIX)]
    if config.tie_word_embeddings:
        resident = [name for name in resident if name != "lm_head.weight"]
    for name, value in reader.read(resident).items():
        _set_tensor(model, name, value)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    model.config.use_cache = False
    return model, tokenizer, reader


class LayerSource(Protocol):
    """Where the decoder layers of a run come from. `dtype`: the dtype of an acquired layer's weights."""

    dtype: torch.dtype

    def acquire(self, index: int, device: torch.device) -> nn.Module: ...

    def release(self, index: int) -> None: ...


class ResidentLayers:
    """Decoder layers of a model in memory: acquiring moves one to the compute device, releasing moves it back."""

    def __init__(self, model: nn.Module, offload: torch.device | str) -> None:
        self.layers, self.offload = decoder_layers(model), offload
        self.dtype = next(p.dtype for p in self.layers[0].parameters() if p.is_floating_point())

    def acquire(self, index: int, device: torch.device) -> nn.Module:
        return self.layers[index].to(device)

    def release(self, index: int) -> None:
        self.layers[index].to(self.offload)


class StreamedLayers:
    """Decoder layers read from the checkpoint on `acquire` (cast to `dtype`) and dropped to meta on `release`."""

    def __init__(self, model: nn.Module, reader: CheckpointReader, dtype: torch.dtype) -> None:
        self.layers, self.reader, self.dtype = decoder_layers(model), reader, dtype
        self.loaded: dict[int, list[str]] = {}  # layer -> names of its parameters read from the checkpoint

    def acquire(self, index: int, device: torch.device) -> nn.Module:
        layer = self.layers[index]
        if index not in self.loaded:
            prefix = f"{LAYER_PREFIX}{index}."
            names = [name for name, p in layer.named_parameters() if p.is_meta]
            for name, value in self.reader.read([prefix + name for name in names]).items():
                _set_tensor(layer, name[len(prefix):], value.to(device).to(self.dtype))  # cast where it computes
            self.loaded[index] = names
        return layer.to(device)

    def release(self, index: int) -> None:
        layer = self.layers[index]
        for name in self.loaded.pop(index, []):  # dropped where they are: no copy back to the host
            _set_tensor(layer, name, torch.empty_like(layer.get_parameter(name), device="meta"))
        layer._apply(lambda t: t if t.is_meta else t.to("cpu"))  # its calibration parameters and buffers
        return_freed_memory()


def _libc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def return_freed_memory() -> None:
    """Give freed heap memory back to the OS. glibc serves layer-sized allocations from its heap once a freed
    mmapped chunk has raised its mmap threshold; without a trim, every layer read and released leaves some of
    that heap resident, and host memory grows with depth."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
