"""A training run's folder: its config, sample grids and checkpoints, and the resume from them.

Both trainers save and resume through ``RunFolder``, so what a run folder guarantees (atomic
checkpoints, ``train.keep_last``, a log that reads as one run after a resume) holds for each of them
alike, and rules about the folder as a whole have one place to live.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fluxlab.config.schema import Config
from fluxlab.train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    save_checkpoint,
    staging_path,
)
from fluxlab.train.run_log import RunLog

TRAIN_STATE = "train_state.pt"


class RunFolder:
    """``train.output_dir`` of a run: ``config.json``, ``samples/``, ``checkpoints/``, the log."""

    def __init__(self, path: str | Path, *, keep_last: int, log: RunLog):
        self.path = Path(path)
        self.keep_last = keep_last
        self.log = log

    def create(self, cfg: Config) -> None:
        """Makes the folder and writes the run's config (once data and model are known to load)."""
        self.path.mkdir(parents=True, exist_ok=True)
        cfg.save(self.path / "config.json")

    def sample_file(self, name: str) -> Path:
        """``samples/<name>.png``, its folder made."""
        out = self.path / "samples" / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def checkpoint_path(self, step: int) -> Path:
        return checkpoint_path(self.path, step)

    def staging(self, step: int, name: str, owner_pid: int) -> Path:
        """A folder all ranks fill before ``save`` moves it into checkpoint ``step`` as ``name``."""
        return staging_path(self.path, step, name, owner_pid)

    def save(
        self,
        step: int,
        weights: dict[str, torch.Tensor] | None,
        ema: dict[str, torch.Tensor] | None,
        description: dict[str, Any],
        train_state: dict[str, Any],
        staged: dict[str, Path] | None = None,
    ) -> Path:
        """Writes checkpoint ``step`` atomically and keeps the newest ``keep_last``."""
        return save_checkpoint(
            self.path,
            step,
            weights,
            ema,
            description,
            train_state,
            keep_last=self.keep_last,
            staged=staged,
        )

    def latest(self) -> Path | None:
        """The newest valid checkpoint, if any."""
        return latest_checkpoint(self.path)

    def resume(self, restore: Callable[[Path, dict[str, Any]], int]) -> Path | None:
        """Restores the newest checkpoint that has a training state; None when there is none.

        ``restore(checkpoint, train_state)`` loads the trainer's part and returns the step it
        resumes at; log lines past that step belong to the run that died and are dropped.
        """
        path = latest_checkpoint(self.path, need_train_state=True)
        if path is None:
            self.log.info(f"--resume: no checkpoint in {self.path}, starting from scratch")
            return None
        state = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=False)
        step = restore(path, state)
        self.log.forget_after(step)
        self.log.info(f"resumed from {path} at step {step}")
        return path
