"""The model classes artifacts declare (`wkvquant_llama` / `wkvquant_mistral`), the config an artifact writes
(`artifact_config`) and the `wkvquant_hf.py` it ships. `wkvq_core.hf_quantizer` registers them with transformers.

Only transformers is imported at module level (see `wkvq_core.hf_quantizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM


QUANT_METHOD = "wkvquant"
REMOTE_CODE_FILE = "wkvquant_hf.py"
# wkvquant_hf.py: what `trust_remote_code=True` runs; the classes are wkvq_core's, registered by the import
REMOTE_CODE = '''"""A WKVQuant artifact (4-bit weights, 4-bit KV cache), loaded by the wkvq_core package (project wkvquant):
`import wkvq_core` before `AutoModelForCausalLM.from_pretrained` does the same as trust_remote_code=True."""

try:
    from wkvq_core.hf_quantizer import (WKVQuantLlamaConfig, WKVQuantLlamaForCausalLM, WKVQuantMistralConfig,
                                        WKVQuantMistralForCausalLM)
except ImportError as exc:
    raise ImportError("this is a WKVQuant artifact: install the wkvquant project (which provides wkvq_core), then "
                      "`import wkvq_core` before from_pretrained") from exc
'''


class _WKVQuantModel:
    """`generate()` without a cache argument uses a `WKVQuantCache` when the KV cache is quantized;
    `save_pretrained` also writes the file the config's `auto_map` names."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        (Path(save_directory) / REMOTE_CODE_FILE).write_text(REMOTE_CODE)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        from ..config import FP_BITS
        from .cache_keyword import CACHE_KEYWORD
        from .kv_cache import WKVQuantCache

        kv_bits = (getattr(self.config, "quantization_config", None) or {}).get("kv_bits", FP_BITS)
        if (model_kwargs.get(CACHE_KEYWORD) is None and generation_config.use_cache is not False
                and generation_config.cache_implementation is None and kv_bits != FP_BITS):
            model_kwargs[CACHE_KEYWORD] = WKVQuantCache(self.config)
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


class WKVQuantLlamaConfig(LlamaConfig):
    model_type = "wkvquant_llama"


class WKVQuantMistralConfig(MistralConfig):
    model_type = "wkvquant_mistral"


class WKVQuantLlamaForCausalLM(_WKVQuantModel, LlamaForCausalLM):
    config_class = WKVQuantLlamaConfig


class WKVQuantMistralForCausalLM(_WKVQuantModel, MistralForCausalLM):
    config_class = WKVQuantMistralConfig


# base architecture -> (config class, model class) that artifacts of it declare
ARTIFACT_CLASSES = {
    "LlamaForCausalLM": (WKVQuantLlamaConfig, WKVQuantLlamaForCausalLM),
    "MistralForCausalLM": (WKVQuantMistralConfig, WKVQuantMistralForCausalLM),
}


def artifact_config(model_config, quantization: dict[str, Any]):
    """The config an artifact declares: the base model's, under its wkvquant model type and architecture, with
    the quantization config and the `auto_map` that makes plain transformers ask for wkvq_core."""
    base = (model_config.architectures or [type(model_config).__name__.replace("Config", "ForCausalLM")])[0]
    config_class, model_class = ARTIFACT_CLASSES[base.removeprefix("WKVQuant")]
    values = {k: v for k, v in model_config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    config = config_class.from_dict(values)
    config.architectures = [model_class.__name__]
    config.auto_map = {"AutoConfig": f"{REMOTE_CODE_FILE[:-3]}.{config_class.__name__}",
                       "AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.{model_class.__name__}"}
    config.quantization_config = quantization
    config.use_cache = True
    return config
