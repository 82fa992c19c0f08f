"""Exports of an artifact for other engines' own loaders: one module per format, each defining `FORMAT` (its name),
`export(artifact_dir, out_dir) -> Path` and `describe(out_dir) -> str` (what was written and what the format could
not express). A target (`wkvq_core.targets`) names the format written for its engine."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from ..errors import ConfigError

FORMATS = {module.name.replace("_", "-"): f"{__name__}.{module.name}" for module in pkgutil.iter_modules(__path__)}


def exporter(fmt: str) -> ModuleType:
    """The module that writes format `fmt`."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be {' or '.join(sorted(FORMATS))}; got {fmt!r}")
    return importlib.import_module(FORMATS[fmt])
