"""Training randomness that belongs to a sample, not to a process: the same numbers at any world size.

A loss draws caption dropout, t and noise for every sample of a micro-batch. With one generator per
process those numbers depend on how the global batch was split over ranks, so a run on 2 GPUs could
never reproduce a run on 1. Here every sample gets its own generator, seeded by (train.seed, global
micro-batch index, position in the global batch); sample j of micro-batch k draws the same dropout, t
and noise whether it lands on rank 0 of 1 or rank 1 of 2, and a resumed run needs no generator state.

The draw helpers accept either a plain ``torch.Generator`` (sampling, validation, tests) or
``SampleGenerators``, so tasks and objectives stay agnostic of which one the trainer passes.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

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


def sample_seed(seed: int, micro_batch: int, position: int) -> int:
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ micro_batch) ^ position) & ((1 << 63) - 1)


class SampleGenerators:
    """One generator per sample of a local micro-batch; draws are stacked along the batch dimension."""

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.device = torch.device(device)
        self.gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]

    @classmethod
    def for_batch(
        cls, seed: int, micro_batch: int, size: int, rank: int, world: int, device: torch.device
    ) -> "SampleGenerators":
        """Rank ``rank`` holds positions ``i·world + rank`` of the global batch (see InfiniteBatchSampler)."""
        return cls([sample_seed(seed, micro_batch, i * world + rank) for i in range(size)], device)

    def __len__(self) -> int:
        return len(self.gens)

    def _check(self, n: int) -> None:
        if n != len(self.gens):
            raise ValueError(f"per-sample generators for {len(self.gens)} samples were asked for {n} draws")

    def rand(self, n: int) -> Tensor:
        self._check(n)
        return torch.cat([torch.rand(1, generator=g, device=self.device) for g in self.gens])

    def randn(self, shape: Sequence[int], dtype: torch.dtype | None = None) -> Tensor:
        self._check(shape[0])
        rest = tuple(shape[1:])
        return torch.stack([torch.randn(rest, generator=g, device=self.device, dtype=dtype) for g in self.gens])

    def randint(self, high: int, n: int) -> Tensor:
        self._check(n)
        return torch.cat([torch.randint(0, high, (1,), generator=g, device=self.device) for g in self.gens])


def _gen_device(generator: torch.Generator | SampleGenerators | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else torch.device(device)


def rand(n: int, generator: torch.Generator | SampleGenerators | None, device: torch.device) -> Tensor:
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
    return torch.randn(tuple(shape), generator=generator, device=_gen_device(generator, device), dtype=dtype).to(device)


def randint(high: int, n: int, generator: torch.Generator | SampleGenerators | None, device: torch.device) -> Tensor:
    if isinstance(generator, SampleGenerators):
        return generator.randint(high, n).to(device)
    return torch.randint(0, high, (n,), generator=generator, device=_gen_device(generator, device)).to(device)


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
