"""Aspect-ratio buckets: each image goes to the [H, W] resolution nearest its aspect, and every
batch comes from one bucket (tokens of one batch must share a grid).

The batch order is a pure function of (seed, epoch): one permutation of all examples per epoch is
dealt into per-bucket batches as it is walked, so buckets interleave in proportion to their size,
and with a single bucket the batches are exactly the chunks of that permutation (the trainer's plain
sampler).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Sampler

from fluxlab.data.transforms import pil_to_tensor


def check_buckets(
    buckets: Sequence[Sequence[int]], where: str = "buckets"
) -> list[tuple[int, int]]:
    """``[[H, W], ...]`` as tuples, or a ValueError naming the bad entry."""
    if not buckets:
        raise ValueError(f"{where} is empty; give at least one [H, W] size, e.g. [[64, 64]]")
    out = []
    for i, b in enumerate(buckets):
        if len(b) != 2 or any(not isinstance(v, int) or v <= 0 for v in b):
            raise ValueError(
                f"{where}[{i}]={list(b)!r} must be [height, width] with two positive integers"
            )
        out.append((int(b[0]), int(b[1])))
    if len(set(out)) != len(out):
        raise ValueError(f"{where} lists a size twice: {out}")
    return out


def resolve_buckets(
    buckets: Sequence[Sequence[int]] | None, resolution: int
) -> list[tuple[int, int]]:
    """The configured buckets, or the single square one of ``resolution``."""
    return check_buckets(buckets, "data.buckets") if buckets else [(resolution, resolution)]


def bucket_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect is nearest in log space (so 2:1 and 1:2 are equally far from
    1:1); ties go to the larger bucket, which crops the least detail away."""
    aspect = math.log(height / width)
    return min(
        range(len(buckets)),
        key=lambda i: (
            abs(math.log(buckets[i][0] / buckets[i][1]) - aspect),
            -buckets[i][0] * buckets[i][1],
        ),
    )


def resize_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale so the image covers ``size`` (H, W), then center-crop to it."""
    h, w = size
    scale = max(h / img.height, w / img.width)
    new = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    if new != img.size:
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize(new, resample, reducing_gap=3.0 if scale < 1 else None)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((left, top, left + w, top + h))


def bucket_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """RGB image → float32 [3, H, W] in [-1, 1] at a bucket's size."""
    return pil_to_tensor(resize_crop(img.convert("RGB"), size))


class BucketBatchSampler(Sampler[list[int]]):
    """Single-bucket batches of indices, shuffled per (seed, epoch) and sharded over ranks.

    ``bucket_of[i]`` is example i's bucket. Per epoch every example is in exactly one batch (the
    last batch of a bucket may be short) unless ``drop_last``; with ``world`` ranks the epoch's
    batch list is cut to a multiple of ``world`` (dropping at most world − 1 batches, different ones
    each epoch) and rank r takes every world-th batch, so all ranks run the same number of steps.
    ``epochs=None`` iterates forever from batch ``start_batch`` of this rank (a resumed run replays
    the same order).
    """

    def __init__(
        self,
        bucket_of: Sequence[int],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start_batch: int = 0,
        drop_last: bool = False,
        epochs: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        self.bucket_of = torch.as_tensor(list(bucket_of), dtype=torch.long)
        self.n = len(self.bucket_of)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.start_batch, self.drop_last, self.epochs = start_batch, drop_last, epochs
        counts = torch.bincount(self.bucket_of).tolist() if self.n else []
        full = sum(c // batch_size for c in counts)
        partial = 0 if drop_last else sum(1 for c in counts if c % batch_size)
        self.batches_per_epoch = (full + partial) // world  # per rank
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.n} examples in buckets of sizes {counts} give no batch of {batch_size} "
                f"for each of {world} process(es); lower optim.batch_size or add data"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of one epoch, in order (rank r takes [r::world])."""
        perm = torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        )
        pending: dict[int, list[int]] = {}
        batches: list[list[int]] = []
        for i in perm.tolist():
            bucket = pending.setdefault(int(self.bucket_of[i]), [])
            bucket.append(i)
            if len(bucket) == self.batch_size:
                batches.append(bucket.copy())
                bucket.clear()
        if not self.drop_last:
            batches.extend(rest for _, rest in sorted(pending.items()) if rest)
        return batches[: len(batches) - len(batches) % self.world]

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start_batch
        cached_epoch, batches = -1, []
        while True:
            epoch, i = divmod(k, self.batches_per_epoch)
            if self.epochs is not None and epoch >= self.epochs:
                return
            if epoch != cached_epoch:
                cached_epoch, batches = epoch, self.epoch_batches(epoch)
            yield batches[i * self.world + self.rank]
            k += 1

    def __len__(self) -> int:
        if self.epochs is None:
            return 2**62  # infinite; DataLoader only needs a number
        return max(0, self.epochs * self.batches_per_epoch - self.start_batch)
