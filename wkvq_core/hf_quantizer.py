"""transformers integration: `AutoModelForCausalLM.from_pretrained(artifact)` after `import wkvq_core`.

Registers, on import:
- the quantization config and quantizer `wkvquant` in transformers' quantizer registry: before the weights are
  read, the quantizer turns the empty model into the packed runtime (`PackedLinear`, `WKVAttention` with the K
  smoothing and POQ) shaped after the checkpoint's tensor names, so transformers loads every tensor into place;
- the model types `wkvquant_llama` / `wkvquant_mistral` that artifacts declare. Plain transformers does not know
  them, so without wkvq_core it refuses the artifact (the config's `auto_map` names `wkvquant_hf.py`, shipped in the
  artifact: transformers asks for `trust_remote_code=True`, and that file imports wkvq_core) instead of loading
  random linears. Their model classes generate through the packed `WKVQuantCache` by default.

Only transformers and `runtime.hf_model` (which imports only transformers) are imported at module level:
`wkvq_core/__init__.py` imports this module right after transformers itself, possibly in the middle of importing
another wkvq_core module. Artifacts' `wkvquant_hf.py` imports the model classes from this module's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .runtime.hf_model import (ARTIFACT_CLASSES, QUANT_METHOD, WKVQuantLlamaConfig, WKVQuantLlamaForCausalLM,
                               WKVQuantMistralConfig, WKVQuantMistralForCausalLM)


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
