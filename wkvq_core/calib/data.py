"""Calibration / evaluation text -> fixed-length token windows.

A text SPEC is a local UTF-8 file, a local directory (its *.txt files, sorted), or
`hf:NAME[:CONFIG]:SPLIT[:FIELD]`: the hub dataset NAME, fetched into the hub cache by `huggingface_hub` and loaded
from that snapshot with `datasets` (rows joined with blank lines, FIELD defaults to "text"). NAME is only ever a hub
id: a local directory of that name is never read.
"""

from __future__ import annotations

from array import array
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .estimate import TOKENIZE_CHUNK_CHARS

HF_PREFIX = "hf:"
WIKITEXT2_TRAIN = "hf:wikitext:wikitext-2-raw-v1:train"


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc


def _load_hf(spec: str) -> str:
    parts = spec[len(HF_PREFIX):].split(":")
    if len(parts) == 2:
        name, config, split, field = parts[0], None, parts[1], "text"
    elif len(parts) in (3, 4):
        name, config, split, field = (*parts, "text")[:4]
    else:
        raise DataError(f"{spec}: expected hf:NAME[:CONFIG]:SPLIT[:FIELD]")
    import datasets

    snapshot = hub_snapshot(spec, name)
    try:
        rows = datasets.load_dataset(snapshot, config, split=split)
    except ValueError as exc:  # an unknown config or split
        raise DataError(f"{spec}: {exc}") from exc
    if field not in rows.column_names:
        raise DataError(f"{spec}: no field {field!r}; fields are {', '.join(rows.column_names)}")
    return "\n\n".join(str(row) for row in rows[field])


def hub_snapshot(spec: str, name: str) -> str:
    """The local snapshot of hub dataset `name`, downloaded into the hub cache (or found there when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        raise DataError(f"{spec}: {name!r} is not a Hugging Face dataset id ({exc})") from None
    try:
        return snapshot_download(repo_id=name, repo_type="dataset")
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise DataError(f"{spec}: no such dataset on the Hugging Face hub ({type(exc).__name__})") from None
    except Exception as exc:  # offline mode, not in the cache, DNS, proxy, timeouts: all mean the same to the user
        raise DataError(f"{spec}: cannot load dataset from the Hugging Face hub (offline or unreachable, and not in "
                        f"the hub cache: {type(exc).__name__})") from None


def load_text(spec: str) -> str:
    if spec.startswith(HF_PREFIX):
        return _load_hf(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"{spec}: directory holds no .txt files")
        return "\n\n".join(_read_file(f) for f in files)
    raise DataError(f"{spec}: no such file or directory")


def _pieces(text: str, size: int):
    """(previous piece's last character, piece) of about `size` characters each, split after a newline when the
    piece holds one."""
    start = 0
    while start < len(text):
        end = len(text) if start + size >= len(text) else text.rfind("\n", start, start + size) + 1
        if end <= start:  # no newline in the piece
            end = start + size
        yield text[start - 1] if start else "", text[start:end]
        start = end


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D int32 token ids of the text (at most `max_tokens`, reading no further than needed), without special
    tokens. A fast tokenizer's encoding of a whole text holds ~160 B per character (ids, offsets, token strings), so
    the text is tokenized in `TOKENIZE_CHUNK_CHARS` pieces, split after a newline: the peak memory is the text and
    4 bytes per token.
    Each piece after the first is encoded behind its preceding newline, whose tokens are then dropped: the ids equal
    the whole text's for tokenizers whose tokens do not span a newline (the shipped stories260k and SmolLM2-135M)."""
    ids = array("i")

    def encode(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]

    for before, piece in _pieces(text, TOKENIZE_CHUNK_CHARS):
        # behind its newline: a normalizer that prepends to every input (LLaMA's "▁") must not see a text start
        context, piece_ids = encode(before) if before else [], encode(before + piece)
        ids.extend(piece_ids[len(context):] if piece_ids[: len(context)] == context else encode(piece))
        if max_tokens is not None and len(ids) >= max_tokens:
            del ids[max_tokens:]
            break
    return torch.frombuffer(ids, dtype=torch.int32) if ids else torch.zeros(0, dtype=torch.int32)


def evaluation_ids(tokenizer, text: str, max_tokens: int) -> tuple[torch.Tensor, bool]:
    """(token ids of an evaluation text, at most `max_tokens` (0: all), whether the text holds more)."""
    if not max_tokens:
        return tokenize(tokenizer, text), False
    ids = tokenize(tokenizer, text, max_tokens + 1)
    return ids[:max_tokens], ids.numel() > max_tokens


def _require(ids: torch.Tensor, seqlen: int, what: str) -> None:
    if seqlen < 1:
        raise ConfigError(f"seqlen must be at least 1; got {seqlen}")
    if ids.numel() < seqlen:
        raise DataError(f"{what} text has {ids.numel()} tokens; one sample needs seqlen={seqlen}")


def calibration_samples(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) windows at seeded random offsets (GPTQ/OmniQuant sampling)."""
    _require(ids, seqlen, "calibration")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()]).long()


def eval_windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(n, seqlen) non-overlapping windows; the incomplete tail is dropped."""
    if seqlen < 2:
        raise ConfigError(f"evaluation seqlen must be at least 2 (a window predicts seqlen - 1 tokens); got {seqlen}")
    _require(ids, seqlen, "evaluation")
    n = ids.numel() // seqlen
    return ids[: n * seqlen].reshape(n, seqlen).long()
