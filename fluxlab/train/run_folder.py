"""A training run's folder: its config, sample grids and checkpoints, and the resume from them.

Both trainers save and resume through ``RunFolder``, so what a run folder guarantees (atomic
checkpoints, ``train.keep_last``, a log that reads as one run after a resume, one process at a
time, no run silently mixed into another) holds for each of them alike, and rules about the folder
as a whole have one place to live.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fluxlab.config.schema import Config
from fluxlab.train.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_path,
    describe_problems,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
    staging_path,
)
from fluxlab.train.run_lock import RunLock
from fluxlab.train.run_log import LOG_FILE, TENSORBOARD_DIR, RunLog

TRAIN_STATE = "train_state.pt"
CONFIG_FILE = "config.json"
SAMPLES_DIR = "samples"
# Any of these makes a folder hold a run that a new run would mix into.
RUN_MARKERS = (CHECKPOINT_DIR, LOG_FILE, CONFIG_FILE)
# What ``--overwrite`` removes: everything a run writes (``metrics.json`` and ``ae/``: train-ae).
RUN_CONTENTS = (
    CHECKPOINT_DIR,
    LOG_FILE,
    CONFIG_FILE,
    SAMPLES_DIR,
    TENSORBOARD_DIR,
    "metrics.json",
    "ae",
)


class RunFolder:
    """``train.output_dir`` of a run: ``config.json``, ``samples/``, ``checkpoints/``, the log."""

    def __init__(self, path: str | Path, *, keep_last: int, log: RunLog):
        self.path = Path(path)
        self.keep_last = keep_last
        self.log = log
        self.lock = RunLock(self.path)
        self._made_folder = False  # whether ``claim`` created it (``release`` removes it if empty)
        self._overwrite = False

    # ------------------------------------------------------------------------------- ownership
    def claim(self, *, resume: bool, overwrite: bool) -> None:
        """Before any work: makes sure the folder can be written, locks it for this process, and
        refuses a new run into a folder that holds one unless ``overwrite`` (see ``create``)."""
        if resume and overwrite:
            raise ValueError(
                f"--resume continues the run in {self.path} and --overwrite deletes it: pick one"
            )
        self._check_writable()
        self.lock.acquire()
        try:
            found = [] if resume else self.previous_run()
            if found and not overwrite:
                raise ValueError(
                    f"{self.path} already holds a run ({', '.join(found)}); a new run would mix "
                    "its checkpoints and log into it. Continue that run with --resume, start over "
                    f"with --overwrite (removes {', '.join(self._contents())} first), or choose "
                    "another train.output_dir"
                )
        except BaseException:
            self.release()
            raise
        self._overwrite = bool(found)

    def previous_run(self) -> list[str]:
        """What of an earlier run the folder holds, e.g. ``["checkpoints/ (2, up to step_0000004)",
        "log.jsonl"]``; empty when there is none."""
        found = []
        for name in RUN_MARKERS:
            path = self.path / name
            if name == CHECKPOINT_DIR:
                steps = list_checkpoints(self.path)
                if steps:
                    found.append(f"{name}/ ({len(steps)}, up to {steps[-1].name})")
                elif path.is_dir() and any(path.iterdir()):
                    found.append(f"{name}/ (unfinished saves)")
            elif path.exists():
                found.append(name)
        return found

    def _contents(self) -> list[str]:
        """The run's files and folders present, as ``--overwrite`` would name them."""
        return [
            f"{name}/" if (self.path / name).is_dir() else name
            for name in RUN_CONTENTS
            if (self.path / name).exists()
        ]

    def _check_writable(self) -> None:
        """The folder, made if missing, and the parts of a run in it that exist take new files;
        else one error naming the path, before any data or model loads."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"train.output_dir={self.path} is a file, not a folder")
        if not self.path.exists():
            try:
                self.path.mkdir(parents=True)
            except OSError as err:
                raise ValueError(
                    f"cannot create train.output_dir={self.path} ({err.strerror}): choose a "
                    "folder this user can write"
                ) from None
            self._made_folder = True
        folders = [self.path / name for name in (CHECKPOINT_DIR, SAMPLES_DIR, TENSORBOARD_DIR)]
        for folder in [self.path, *folders]:
            if not folder.is_dir():
                continue
            try:
                with tempfile.TemporaryFile(dir=folder, prefix=".write-test-"):
                    pass
            except OSError as err:
                raise ValueError(
                    f"{folder} is not writable ({err.strerror}): training writes its config, log, "
                    "samples and checkpoints under train.output_dir; fix its permissions or choose "
                    "another train.output_dir"
                ) from None

    def release(self) -> None:
        """Unlocks the folder; removes it if ``claim`` made it and nothing was written since."""
        self.lock.release()
        if self._made_folder and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def create(self, cfg: Config) -> None:
        """Makes the folder and writes the run's config (once data and model are known to load);
        with ``--overwrite``, first removes the previous run's files."""
        if self._overwrite:
            removed = self._contents()
            for name in RUN_CONTENTS:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            self._overwrite = False
            self.log.info(f"--overwrite: removed {', '.join(removed)} from {self.path}")
        self.path.mkdir(parents=True, exist_ok=True)
        cfg.save(self.path / CONFIG_FILE)

    # ------------------------------------------------------------------------------- contents
    def sample_file(self, name: str) -> Path:
        """``samples/<name>.png``, its folder made."""
        out = self.path / SAMPLES_DIR / f"{name}.png"
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
        """Restores the newest intact checkpoint that has a training state; None when the folder
        has no checkpoint (the run starts from scratch, without the log lines of a run that died
        before its first one). Corrupt ones are skipped with a warning; an error when all are.

        ``restore(checkpoint, train_state)`` loads the trainer's part and returns the step it
        resumes at; log lines past that step belong to the run that died and are dropped.
        """
        path = latest_checkpoint(self.path, need_train_state=True)
        if path is None:
            if found := list_checkpoints(self.path):
                raise ValueError(
                    f"--resume: none of the {len(found)} checkpoints in {self.path} can be "
                    f"resumed ({describe_problems(found, need_train_state=True)}). Restore one "
                    "from a backup, or start over with --overwrite instead of --resume"
                )
            self.log.info(f"--resume: no checkpoint in {self.path}, starting from scratch")
            self.log.forget_after(0)
            return None
        state = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=False)
        step = restore(path, state)
        self.log.forget_after(step)
        self.log.info(f"resumed from {path} at step {step}")
        return path
