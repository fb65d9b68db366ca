"""Aspect-ratio buckets: assignment, resize + crop, single-bucket batches seen once per epoch."""

from itertools import islice

import pytest
from PIL import Image

from fluxlab.data.buckets import (
    BucketBatchSampler,
    bucket_tensor,
    check_buckets,
    nearest_bucket,
    resize_crop,
)
from fluxlab.train.trainer import InfiniteBatchSampler

BUCKETS = [(64, 64), (48, 80), (80, 48)]


def test_nearest_bucket_by_aspect() -> None:
    assert nearest_bucket(100, 100, BUCKETS) == 0
    assert nearest_bucket(300, 500, BUCKETS) == 1  # landscape
    assert nearest_bucket(500, 300, BUCKETS) == 2  # portrait
    assert nearest_bucket(100, 1000, BUCKETS) == 1  # extreme landscape still lands in the widest


def test_resize_crop_gives_the_bucket_size() -> None:
    img = Image.new("RGB", (333, 211), "red")
    assert resize_crop(img, (48, 80)).size == (80, 48)
    t = bucket_tensor(img, (80, 48))
    assert tuple(t.shape) == (3, 80, 48) and t.min() >= -1 and t.max() <= 1


def test_bad_buckets_are_named() -> None:
    with pytest.raises(ValueError, match=r"data.buckets\[1\]"):
        check_buckets([[64, 64], [0, 3]], "data.buckets")
    with pytest.raises(ValueError, match="empty"):
        check_buckets([], "data.buckets")


def _buckets_of(n: int) -> list[int]:
    return [(i * 7) % 3 if i % 5 else 0 for i in range(n)]  # uneven bucket sizes


def test_batches_are_single_bucket_and_cover_the_epoch_once() -> None:
    bucket_of = _buckets_of(53)
    sampler = BucketBatchSampler(bucket_of, batch_size=4, seed=3, epochs=2)
    batches = list(sampler)
    per_epoch = sampler.batches_per_epoch
    assert len(batches) == 2 * per_epoch
    for epoch in range(2):
        seen = [i for b in batches[epoch * per_epoch : (epoch + 1) * per_epoch] for i in b]
        assert sorted(seen) == list(range(53))  # every example exactly once
    for b in batches:
        assert len({bucket_of[i] for i in b}) == 1 and 1 <= len(b) <= 4
    assert batches[:per_epoch] != batches[per_epoch:]  # reshuffled each epoch
    assert list(BucketBatchSampler(bucket_of, 4, seed=3, epochs=2)) == batches  # deterministic
    assert list(BucketBatchSampler(bucket_of, 4, seed=4, epochs=2)) != batches


def test_ranks_take_every_world_th_batch() -> None:
    bucket_of = _buckets_of(61)
    whole = BucketBatchSampler(bucket_of, 4, seed=1).epoch_batches(0)
    ranks = [
        list(BucketBatchSampler(bucket_of, 4, seed=1, rank=r, world=3, epochs=1)) for r in range(3)
    ]
    assert len({len(r) for r in ranks}) == 1  # same number of steps on every rank
    assert ranks[1] == whole[1::3][: len(ranks[1])]
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen))  # no example on two ranks


def test_resume_and_single_bucket_match_the_plain_sampler() -> None:
    bucket_of = [0] * 30
    run = list(islice(iter(BucketBatchSampler(bucket_of, 4, seed=2)), 12))
    later = list(islice(iter(BucketBatchSampler(bucket_of, 4, seed=2, start_batch=5)), 7))
    assert later == run[5:12]
    plain = list(islice(iter(InfiniteBatchSampler(30, 4, seed=2)), 7))
    assert run[:7] == plain  # one bucket: the same batches as without buckets
