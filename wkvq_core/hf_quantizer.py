"""transformers integration: `AutoModelForCausalLM.from_pretrained(artifact)` after `import wkvq_core`.

Registers, on import:
- the quantization config and quantizer `wkvquant` in transformers' quantizer registry: before the weights are
  read, the quantizer turns the empty model into the packed runtime (`PackedLinear`, `WKVAttention` with the K
  smoothing and POQ) shaped after the checkpoint's tensor names, so transformers loads every tensor into place;
- the model types `wkvquant_llama` / `wkvquant_mistral` that artifacts declare. Plain transformers does not know
  them, so without wkvq_core it refuses the artifact (the config's `auto_map` names `wkvquant_hf.py`, shipped in the
  artifact: transformers asks for `trust_remote_code=True`, and that file imports wkvq_core) instead of loading
  random linears. Their model classes generate through the packed `WKVQuantCache` by default.

Only transformers is imported at module level: `wkvq_core/__init__.py` imports this module right after transformers
itself, possibly in the middle of importing another wkvq_core module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

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
        from .cache_keyword import CACHE_KEYWORD
        from .config import FP_BITS
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


@register_quantization_config(QUANT_METHOD)
class WKVQuantHfConfig(QuantizationConfigMixin):
    """The `quantization_config` of an artifact (artifact.quantization_config writes it), kept as its dict."""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        self.quant_method = QUANT_METHOD

    def to_dict(self) -> dict[str, Any]:
        return dict(self.fields)


@register_quantizer(QUANT_METHOD)
class WKVQuantHfQuantizer(HfQuantizer):
    """Loads pre-quantized WKVQuant artifacts (calibration is `wkvq quantize`'s job, not transformers')."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .artifact import MANIFEST, packed_skeleton_, safetensors_keys, verify_manifest

        directories = {Path(file).parent for file in checkpoint_files or []}
        for directory in directories:
            if (directory / MANIFEST).is_file():  # a `wkvq quantize` output (save_pretrained writes none)
                verify_manifest(directory)
        packed_skeleton_(model, self.quantization_config.to_dict(), safetensors_keys(checkpoint_files or []))

    def _process_model_after_weight_loading(self, model, **kwargs):
        model.config.quantization_config = self.quantization_config.to_dict()  # as `load_quantized` leaves it
        model.requires_grad_(False)
        return model.eval()

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


for _config_class, _model_class in ARTIFACT_CLASSES.values():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _model_class, exist_ok=True)
