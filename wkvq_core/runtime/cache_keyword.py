"""The keyword a KV cache travels under in transformers: `cache=` from 5.24, `past_key_values=` before.

transformers 5.24 renamed it in every model, decoder layer and attention forward and in `generate`; the old name
still works at the model level but warns, and an attention that reads only the old name silently gets no cache.
"""

from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaModel

CACHE_KEYWORD = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def with_cache(cache) -> dict:
    """Keyword arguments that hand `cache` to a model's `forward` or `generate` in the installed transformers:
    `model(ids, **with_cache(cache), use_cache=True)`."""
    return {CACHE_KEYWORD: cache}
