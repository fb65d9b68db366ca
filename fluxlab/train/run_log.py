"""What a run tells its user: messages, a progress bar, ``log.jsonl`` and TensorBoard scalars.

Both trainers log through one ``RunLog``. Under torchrun only rank 0 writes files (``writes``);
``quiet`` silences the messages and the bar but never the files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from fluxlab.train.checkpoint import forget_log_after

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tb"


class RunLog:
    """Messages, the progress bar, a JSON line per logged step, and the TensorBoard writer."""

    def __init__(self, run_dir: Path, *, writes: bool = True, quiet: bool = False):
        self.run_dir = run_dir
        self.writes = writes
        self.quiet = quiet
        # None until ``start``, and on ranks that do not write or with TensorBoard off.
        self.writer: SummaryWriter | None = None
        self._bar: tqdm | None = None

    def info(self, message: str) -> None:
        """A line for the user, printed above the progress bar."""
        if not self.quiet:
            tqdm.write(message)

    def start(self, *, desc: str, total: int, initial: int, tensorboard: bool) -> None:
        """Opens the progress bar (at ``initial`` of ``total`` steps) and, if asked, TensorBoard."""
        if tensorboard and self.writes:
            self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR))
        self._bar = tqdm(
            total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=self.quiet
        )

    def advance(self) -> None:
        """One more step on the progress bar."""
        if self._bar is not None:
            self._bar.update(1)

    def show(self, **values: str) -> None:
        """Values shown beside the progress bar (the latest loss, the learning rate)."""
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def end_progress(self) -> None:
        """Closes the bar, so what is printed next starts on a line of its own."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def record(self, record: dict[str, Any]) -> None:
        """Appends one JSON line to ``log.jsonl``: the loss curve survives without TensorBoard."""
        if not self.writes:
            return
        with open(self.run_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def scalars(self, values: dict[str, float], step: int) -> None:
        """TensorBoard scalars of one step, written in the order given."""
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        """A TensorBoard image (a sample or reconstruction grid)."""
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def forget_after(self, step: int) -> None:
        """Drops the lines past ``step`` (a resumed run rewrites them), torn last line included."""
        if self.writes:
            forget_log_after(self.run_dir, step)

    def close(self) -> None:
        self.end_progress()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
