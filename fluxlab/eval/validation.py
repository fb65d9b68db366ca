"""Validation loss at fixed timesteps (the MLPerf FLUX metric).

Validation loss is a measurement, not a training loss: every held-out example is scored at the same
``num_t`` stratified times t = (i + 0.5) / num_t with noise fixed by (seed, example index), so two
evaluations of the same weights give the same number whatever the batch size, and a change in the
number is a change in the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from fluxlab.data.common import collate_skip_bad

VAL_TIMESTEPS = 8


@dataclass
class ValidationLoss:
    loss: float  # mean over every example and timestep
    per_t: list[float]  # mean over examples at each of the fixed timesteps
    timesteps: list[float]
    num_examples: int


def stratified_timesteps(n: int = VAL_TIMESTEPS) -> Tensor:
    """The bin centres (i + 0.5) / n: each of n equal slices of [0, 1] is measured once."""
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def _example_noise(positions: Sequence[int], seed: int) -> Callable[[torch.Size], Tensor]:
    """Noise for a batch, one generator per example, so an example's noise never depends on its
    batch.

    The returned function draws on its first call and returns the same tensor afterwards: every
    timestep of a batch sees the same noise, as in MLPerf's evaluation.
    """
    drawn: list[Tensor] = []

    def make(shape: torch.Size) -> Tensor:
        if not drawn:
            rows = [
                torch.randn(
                    tuple(shape[1:]),
                    generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)),
                )
                for i in positions
            ]
            drawn.append(torch.stack(rows))
        return drawn[0]

    return make


def _accepts_fixed_t(task: Any) -> bool:
    params = inspect.signature(task.loss).parameters
    return "t" in params and "noise" in params


def limit_dataset(dataset: Dataset, limit: int | None) -> Dataset:
    """The first ``limit`` examples (all of them for None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, range(limit))


@torch.no_grad()
def validation_loss(
    task: Any,
    model: nn.Module,
    dataset: Dataset,
    *,
    seed: int = 0,
    num_t: int = VAL_TIMESTEPS,
    batch_size: int = 32,
    progress: bool = False,
) -> ValidationLoss:
    """Mean loss of ``model`` over every example of ``dataset`` at each of ``num_t`` stratified
    timesteps.

    The model is put in eval mode and left there; the caller restores train mode. Global RNGs are
    not touched, so calling this inside a training run does not change the run.
    """
    if not _accepts_fixed_t(task):
        raise ValueError(
            f"{type(task).__name__}.loss has no t/noise arguments, so it cannot be validated at "
            "fixed timesteps; set train.eval_every=0"
        )
    if len(dataset) == 0:
        raise ValueError(
            "the validation split is empty: raise data.val_fraction or drop data.limit"
        )
    model.eval()
    timesteps = stratified_timesteps(num_t)
    sums = torch.zeros(num_t, dtype=torch.float64)
    count = 0
    # Its own generator: a DataLoader otherwise draws its base seed from the global RNG, which would
    # make a run with validation differ from one without. A bucketed dataset (the latent cache) cuts
    # its sequential batches at bucket boundaries.
    batches = dataset.eval_batches(batch_size) if hasattr(dataset, "eval_batches") else None
    loader = DataLoader(
        dataset,
        batch_size=1 if batches else batch_size,
        batch_sampler=batches,
        shuffle=False,
        collate_fn=collate_skip_bad,
        generator=torch.Generator(),
    )
    position = 0
    for batch in tqdm(loader, desc="val", disable=not progress, leave=False, dynamic_ncols=True):
        if batch is None:
            continue
        n = len(batch["caption"])
        # Positions in the split, not dataset "index" fields: a Subset or a folder may renumber
        # those.
        noise = _example_noise(range(position, position + n), seed)
        position += n
        for i, t in enumerate(timesteps):
            per_sample, _ = task.loss(model, batch, None, t=torch.full((n,), float(t)), noise=noise)
            sums[i] += per_sample.double().sum().cpu()
        count += n
    per_t = (sums / count).tolist()
    return ValidationLoss(float(np.mean(per_t)), per_t, timesteps.tolist(), count)
