"""WKVQuant: 4-bit weights and a 4-bit KV cache for LLaMA-family models (arXiv 2402.12065).

Names are imported on first use, so `import wkvq_core.config` (or the `wkvq` command line's service commands)
does not pay for importing torch and transformers. The transformers integration (`hf_quantizer`: loading artifacts
with `AutoModelForCausalLM.from_pretrained`) registers itself as soon as transformers is imported, before or after
wkvq_core.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_EXPORTS = {
    "CRRLoss": ".config",
    "CalibConfig": ".config",
    "CalibrationCallbacks": ".calib.progress",
    "CalibrationEvent": ".calib.progress",
    "CalibrationReport": ".calib.calibrate",
    "DirectoryCheckpoints": ".calib.checkpoint",
    "EvalMode": ".evaluation.perplexity",
    "EventKind": ".calib.progress",
    "KVQuantConfig": ".config",
    "QuantizeJob": ".pipeline",
    "WKVQError": ".errors",
    "WKVQuantCache": ".runtime.kv_cache",
    "WKVQuantConfig": ".config",
    "WeightQuantConfig": ".config",
    "calibrate_": ".calib.calibrate",
    "calibration_samples": ".calib.data",
    "decode_perplexity": ".evaluation.perplexity",
    "eval_windows": ".calib.data",
    "kv_bytes_per_token": ".evaluation.perplexity",
    "load_model": ".model",
    "load_quantized": ".artifact",
    "load_text": ".calib.data",
    "perplexity": ".evaluation.perplexity",
    "prepare_model_": ".model",
    "quant_state": ".model",
    "quantize_model_": ".pipeline",
    "run_quantize_job": ".pipeline",
    "save_artifact": ".artifact",
    "tokenize": ".calib.data",
    "with_cache": ".runtime.cache_keyword",
}


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Imports `hf_quantizer` right after the `transformers` package itself has been executed."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def execute_then_register(module):
                execute(module)
                importlib.import_module(".hf_quantizer", __name__)

            spec.loader.exec_module = execute_then_register
        return spec


if "transformers" in sys.modules:
    importlib.import_module(".hf_quantizer", __name__)
elif not any(isinstance(finder, _RegisterWithTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "CRRLoss",
    "CalibConfig",
    "CalibrationCallbacks",
    "CalibrationEvent",
    "CalibrationReport",
    "DirectoryCheckpoints",
    "EvalMode",
    "EventKind",
    "KVQuantConfig",
    "QuantizeJob",
    "WKVQError",
    "WKVQuantCache",
    "WKVQuantConfig",
    "WeightQuantConfig",
    "calibrate_",
    "calibration_samples",
    "decode_perplexity",
    "eval_windows",
    "kv_bytes_per_token",
    "load_quantized",
    "load_model",
    "load_text",
    "perplexity",
    "prepare_model_",
    "quant_state",
    "quantize_model_",
    "run_quantize_job",
    "save_artifact",
    "tokenize",
    "with_cache",
]
