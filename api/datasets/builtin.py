"""Text sets shipped with the service (no hub needed): name -> calibration and evaluation files."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "wkvq_core" / "assets"

BUILTIN_TEXTS: dict[str, dict[str, Path]] = {
    "tinystories": {"calibration": ASSETS / "tinystories" / "calib.txt",
                    "evaluation": ASSETS / "tinystories" / "eval.txt"},
}
