"""The batch order of a run: a pure function of (seed, batch index), split over ranks without
overlap."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class InfiniteBatchSampler(Sampler[list[int]]):
    """Shuffled batches forever, a fresh permutation per epoch, from a restorable position.

    Global batch ``k`` (``batch_size × world`` examples) is a pure function of (seed, k), so
    resuming at ``start_batch`` replays exactly the order an uninterrupted run would have seen,
    without loading the skipped data. Rank ``r`` takes positions ``r, r + world, r + 2·world, …``
    of it: the union over ranks is the same global batch at any world size, which is what lets 2
    processes reproduce 1 (and resume it).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start_batch: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if n < batch_size * world:
            raise ValueError(
                f"the dataset has {n} examples, fewer than one batch "
                f"({batch_size} × {world} processes); lower optim.batch_size"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_batch, self.rank, self.world = start_batch, rank, world
        self.batches_per_epoch = n // (batch_size * world)

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start_batch
        global_bs = self.batch_size * self.world
        while True:
            epoch, i = divmod(k, self.batches_per_epoch)
            perm = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
            yield perm[i * global_bs : (i + 1) * global_bs][self.rank :: self.world].tolist()
            k += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs this for len(loader)
        return 2**62
