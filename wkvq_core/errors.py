"""User-facing errors: each carries a one-line message meant to be shown as is."""


class WKVQError(Exception):
    """Base class for errors caused by input (model, data, configuration, artifact)."""


class ConfigError(WKVQError, ValueError):
    """A configuration value is out of range or does not fit the model."""


class ModelError(WKVQError):
    """The model cannot be loaded or is not a supported LLaMA-family architecture."""


class DataError(WKVQError):
    """Calibration or evaluation text is missing, unreadable or too short."""


class ArtifactError(WKVQError):
    """A saved quantized model is incomplete, corrupt or of an unknown format."""


class CalibrationCancelled(WKVQError):
    """The cancel callback asked calibration to stop; finished blocks are checkpointed."""
