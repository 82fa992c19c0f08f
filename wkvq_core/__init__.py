"""WKVQuant: 4-bit weights and a 4-bit KV cache for LLaMA-family models (arXiv 2402.12065)."""

from .artifact import load_quantized, save_artifact
from .calibrate import CalibrationReport, calibrate_
from .checkpoint import DirectoryCheckpoints
from .config import CalibConfig, CRRLoss, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from .data import calibration_samples, eval_windows, load_text, tokenize
from .errors import WKVQError
from .kv_cache import WKVQuantCache
from .evaluate import EvalMode, decode_perplexity, kv_bytes_per_token, perplexity
from .model import load_model, prepare_model_, quant_state
from .pipeline import QuantizeJob, quantize_model_, run_quantize_job
from .progress import CalibrationCallbacks, CalibrationEvent, EventKind

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
]
