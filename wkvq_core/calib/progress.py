"""The library's only way to talk to its caller during calibration: plain callbacks."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Protocol

import torch

from ..errors import CalibrationCancelled


class EventKind(str, Enum):
    BLOCK_START = "block_start"
    EPOCH_END = "epoch_end"
    BLOCK_END = "block_end"
    BLOCK_RESUMED = "block_resumed"  # taken from a checkpoint, not recomputed
    STAGE = "stage"  # the job entered `CalibrationEvent.stage` (one of STAGES)
    EVAL_WINDOWS = "eval_windows"  # evaluation progress: `windows` of `n_windows` window passes done


STAGES = ("loading", "calibrating", "evaluating", "writing")


@dataclass(frozen=True)
class CalibrationEvent:
    kind: EventKind
    block: int  # 0-based
    n_blocks: int
    epoch: int = 0  # 1-based within the block; 0 outside epochs
    epochs: int = 0
    loss: float | None = None
    seconds: float | None = None
    stage: str | None = None  # with EventKind.STAGE
    windows: int = 0  # with EventKind.EVAL_WINDOWS: windows run through one block (or the head) in one mode so far
    n_windows: int = 0  # ... of windows x modes x (blocks + 1)


class CheckpointStore(Protocol):
    """Per-block checkpoints. `load` returns None when block `index` has none."""

    def save(self, index: int, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None: ...

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None: ...


@dataclass
class CalibrationCallbacks:
    on_event: Callable[[CalibrationEvent], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    checkpoints: CheckpointStore | None = None

    def emit(self, event: CalibrationEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def cancelled(self) -> bool:
        return self.should_cancel is not None and self.should_cancel()

    def stage(self, name: str) -> None:
        self.emit(CalibrationEvent(EventKind.STAGE, 0, 0, stage=name))

    def check(self, where: str) -> None:
        """Raise CalibrationCancelled (saying `where`) when the caller asked to stop."""
        if self.cancelled():
            raise CalibrationCancelled(f"cancelled {where}")
