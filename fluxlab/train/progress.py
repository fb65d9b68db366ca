"""How a run is going: the training loss between log lines (overall, per t bin, per epoch) and its
time budget. Under torchrun both are agreed across ranks, so every rank logs and stops at the same
step."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from fluxlab.parallel import distributed

T_BINS = 10  # the loss-per-t curve splits t ∈ [0, 1] into this many equal bins


class LossWindow:
    """The training loss since the last log line (its mean, its curve over t) and the epoch's."""

    def __init__(self, device: torch.device, world: distributed.DistInfo, steps_per_epoch: int):
        self.world = world
        self.steps_per_epoch = steps_per_epoch
        self.bin_sum = torch.zeros(T_BINS, device=device)
        self.bin_count = torch.zeros(T_BINS, device=device)
        self.loss_sum, self.loss_steps = 0.0, 0
        self.epoch_sum, self.epoch_steps = 0.0, 0

    def add(self, loss: float, samples: list[tuple[Tensor, Tensor]]) -> None:
        """One step's loss, and its micro-batches' (t, per-sample loss) pairs for the t curve."""
        for t, per_sample in samples:
            bins = (t * T_BINS).long().clamp(0, T_BINS - 1)
            values = per_sample.float()
            self.bin_sum.scatter_add_(0, bins, values)
            self.bin_count.scatter_add_(0, bins, torch.ones_like(values))
        self.loss_sum, self.loss_steps = self.loss_sum + loss, self.loss_steps + 1
        self.epoch_sum, self.epoch_steps = self.epoch_sum + loss, self.epoch_steps + 1

    def flush(self) -> tuple[float, list[float | None]]:
        """The mean loss, and the mean loss per t bin (None if empty), since the last flush.

        Under torchrun a collective: every rank's samples join the curve."""
        if self.world.enabled:
            dist.all_reduce(self.bin_sum)
            dist.all_reduce(self.bin_count)
        mean = self.loss_sum / self.loss_steps
        curve = [
            (self.bin_sum[i] / self.bin_count[i]).item() if self.bin_count[i] > 0 else None
            for i in range(T_BINS)
        ]
        self.loss_sum, self.loss_steps = 0.0, 0
        self.bin_sum.zero_()
        self.bin_count.zero_()
        return mean, curve

    def end_of_epoch(self, step: int) -> tuple[int, float] | None:
        """(epoch, its mean loss) when ``step`` ends an epoch with steps in it, else None."""
        if not (self.steps_per_epoch and step % self.steps_per_epoch == 0 and self.epoch_steps):
            return None
        mean = self.epoch_sum / self.epoch_steps
        self.epoch_sum, self.epoch_steps = 0.0, 0
        return step // self.steps_per_epoch, mean


def t_bin_name(i: int) -> str:
    """The TensorBoard tag of t bin ``i``, e.g. ``loss_t/0.3-0.4``."""
    return f"loss_t/{i / T_BINS:.1f}-{(i + 1) / T_BINS:.1f}"


def skip_summary(skipped_images: int, broken_shards: int, nonfinite_steps: int) -> list[str]:
    """The end-of-run lines about what training passed over (none when nothing was)."""
    lines = []
    if skipped_images:
        lines.append(
            f"skipped {skipped_images} unreadable images (see the warnings above for their names)"
        )
    if broken_shards:
        lines.append(
            f"stopped reading {broken_shards} broken shard(s) at the break, once per epoch that "
            "read them (see the warnings above for which)"
        )
    if nonfinite_steps:
        lines.append(f"skipped {nonfinite_steps} steps with a non-finite loss or gradient")
    return lines


class TimeBudget:
    """``max_minutes`` of training from now (None: no limit)."""

    def __init__(
        self,
        max_minutes: float | None,
        world: distributed.DistInfo | None = None,
        device: torch.device | None = None,
    ):
        self.max_minutes = max_minutes
        self.world, self.device = world, device
        self.start = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the budget started."""
        return time.monotonic() - self.start

    def exhausted(self) -> bool:
        """Whether the time is up; under torchrun a collective, since the ranks' clocks differ."""
        if self.max_minutes is None:
            return False
        out = self.elapsed() > 60 * self.max_minutes
        if self.world is not None and self.world.enabled:  # stop together
            out = bool(distributed.any_rank(torch.tensor(out, device=self.device), self.world))
        return out
