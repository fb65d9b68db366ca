"""Training randomness that belongs to a sample, not to a process: the same numbers at any world
size.

A loss draws caption dropout, t and noise for every sample of a micro-batch. With one generator per
process those numbers depend on how the global batch was split over ranks, so a run on 2 GPUs could
never reproduce a run on 1. Here each global micro-batch gets a generator seeded by (train.seed,
global micro-batch index) that draws for the whole global batch, and each rank keeps its samples'
positions; sample j of micro-batch k draws the same dropout, t and noise whether it lands on rank 0
of 1 or rank 1 of 2, and a resumed run needs no generator state.

The draw helpers accept either a plain ``torch.Generator`` (sampling, validation, tests) or
``SampleGenerators``, so tasks and objectives stay agnostic of which one the trainer passes.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """A 64-bit mixer, so neighbouring (seed, batch, position) triples give unrelated streams."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def batch_seed(seed: int, micro_batch: int) -> int:
    return _splitmix64(_splitmix64(seed) ^ micro_batch) & ((1 << 63) - 1)


class SampleGenerators:
    """Draws for this rank's samples of a global micro-batch, equal at any world size.

    One generator per global micro-batch draws every value for the *whole* global batch (local size
    × world) and each rank keeps its own positions ``i·world + rank`` (see InfiniteBatchSampler).
    Drawing world× more numbers than needed costs one kernel launch a draw; a generator per sample
    would cost one per sample (hundreds per step on a GPU).
    """

    def __init__(self, seed: int, size: int, rank: int, world: int, device: torch.device):
        self.device = torch.device(device)
        self.size, self.rank, self.world = size, rank, world
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    @classmethod
    def for_batch(
        cls, seed: int, micro_batch: int, size: int, rank: int, world: int, device: torch.device
    ) -> SampleGenerators:
        return cls(batch_seed(seed, micro_batch), size, rank, world, device)

    def __len__(self) -> int:
        return self.size

    def _mine(self, draw: Tensor) -> Tensor:
        return draw[self.rank :: self.world]

    def _check(self, n: int) -> None:
        if n != self.size:
            raise ValueError(f"generators for {self.size} samples were asked for {n} draws")

    def rand(self, n: int) -> Tensor:
        self._check(n)
        return self._mine(torch.rand(n * self.world, generator=self.gen, device=self.device))

    def randn(self, shape: Sequence[int], dtype: torch.dtype | None = None) -> Tensor:
        self._check(shape[0])
        full = (shape[0] * self.world, *shape[1:])
        return self._mine(torch.randn(full, generator=self.gen, device=self.device, dtype=dtype))

    def randint(self, high: int, n: int) -> Tensor:
        self._check(n)
        return self._mine(
            torch.randint(0, high, (n * self.world,), generator=self.gen, device=self.device)
        )


def _gen_device(
    generator: torch.Generator | SampleGenerators | None, device: torch.device
) -> torch.device:
    return generator.device if generator is not None else torch.device(device)


def rand(
    n: int, generator: torch.Generator | SampleGenerators | None, device: torch.device
) -> Tensor:
    if isinstance(generator, SampleGenerators):
        return generator.rand(n).to(device)
    return torch.rand(n, generator=generator, device=_gen_device(generator, device)).to(device)


def randn(
    shape: Sequence[int],
    generator: torch.Generator | SampleGenerators | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> Tensor:
    if isinstance(generator, SampleGenerators):
        return generator.randn(shape, dtype).to(device)
    return torch.randn(
        tuple(shape), generator=generator, device=_gen_device(generator, device), dtype=dtype
    ).to(device)


def randint(
    high: int, n: int, generator: torch.Generator | SampleGenerators | None, device: torch.device
) -> Tensor:
    if isinstance(generator, SampleGenerators):
        return generator.randint(high, n).to(device)
    return torch.randint(
        0, high, (n,), generator=generator, device=_gen_device(generator, device)
    ).to(device)


def seed_everything(seed: int) -> None:
    """Seeds this process's global RNGs (model initialisation, random augmentations)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def process_rng_state() -> dict[str, Any]:
    """This process's global RNGs (data augmentation draws from them), for a checkpoint."""
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
    }


def set_process_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])


def restore_process_rng_state(state: dict[str, Any], rank: int, world: int, source: Any) -> None:
    """This rank's global RNGs from a checkpoint's training state (``source`` names it). Written at
    another world size, they cannot be matched to ranks: a warning says what still replays."""
    per_rank = state.get("rank_rng") or [state]
    if len(per_rank) == world:
        set_process_rng_state(per_rank[rank])
        return
    warnings.warn(
        f"{source} was written by {len(per_rank)} process(es), this run has {world}: data order, "
        "dropout, t and noise still replay exactly, random augmentations (per-process RNG) do not",
        stacklevel=3,
    )
