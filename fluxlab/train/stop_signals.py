"""Ctrl-C (SIGINT) and SIGTERM while training: finish the step, save a checkpoint, stop cleanly.

A signal handler only notes the signal; the training loop checks the note between steps, so the
step in flight completes and the checkpoint holds a consistent state. The first signal also puts
the previous handlers back: a second Ctrl-C stops at once, without saving, as users expect.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch

from fluxlab.parallel import distributed

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving ``checkpoint`` (None: nothing to save yet)."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path | None):
        self.signal_number, self.step, self.checkpoint = signal_number, step, checkpoint
        super().__init__(f"stopped by {self.signal_name} at step {step}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name

    @property
    def exit_code(self) -> int:
        """128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports it."""
        return 128 + self.signal_number

    def summary(self, resume_command: str) -> str:
        """One line for the user: where training stopped, what was saved, how to continue."""
        if self.checkpoint is None:
            return f"{self}, before anything was saved; start again with: {resume_command}"
        return f"{self}; saved {self.checkpoint}. Continue with: {resume_command}"


class StopSignals:
    """Notes SIGINT/SIGTERM while active (a ``with`` block) instead of dying mid-step.

    Off the main thread, where Python cannot install handlers, it notes nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()

    def agreed(self, world: distributed.DistInfo, device: torch.device) -> int | None:
        """The signal to stop on after this step (None: go on). Under torchrun a collective: one
        rank's signal stops every rank at the same step."""
        if not world.enabled:
            return self.received
        stop = torch.tensor(self.received is not None, device=device)
        if distributed.any_rank(stop, world).item():
            return self.received or signal.SIGTERM
        return None

    def _note(self, number: int, frame: FrameType | None) -> None:
        self.received = number
        self._restore()  # a second signal acts at once

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; the default is.
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
