"""generate_in_batches: the slices, the per-batch seeds and the order of the images."""

import pytest
import torch

from fluxlab.pipelines.batches import generate_in_batches


def test_batches_cover_the_items_in_order_with_seed_plus_start() -> None:
    calls: list[tuple[slice, int, bool]] = []

    def generate_batch(items: slice, seed: int, progress: bool) -> torch.Tensor:
        calls.append((items, seed, progress))
        # One "image" per item: its position, then the batch's seed.
        positions = torch.arange(5)[items]
        return torch.stack([positions, torch.full_like(positions, seed)], dim=1)

    out = generate_in_batches(generate_batch, 5, batch_size=2, seed=10, progress=False)
    assert [(c[0].start, c[0].stop) for c in calls] == [(0, 2), (2, 4), (4, 6)]
    assert [c[1] for c in calls] == [10, 12, 14] and not any(c[2] for c in calls)
    assert out[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert out[:, 1].tolist() == [10, 10, 12, 12, 14]


def test_one_batch_when_the_batch_is_large_enough() -> None:
    calls: list[slice] = []

    def generate_batch(items: slice, seed: int, progress: bool) -> torch.Tensor:
        calls.append(items)
        assert progress  # the sampler's own bar is asked for
        return torch.zeros(len(range(3)[items]), 3, 2, 2)

    assert generate_in_batches(generate_batch, 3, batch_size=64, seed=0).shape == (3, 3, 2, 2)
    assert calls == [slice(0, 64)]


@pytest.mark.parametrize("count, batch_size", [(0, 4), (3, 0)])
def test_nothing_to_generate_is_an_error(count: int, batch_size: int) -> None:
    with pytest.raises(ValueError, match="nothing to generate"):
        generate_in_batches(
            lambda items, seed, progress: torch.zeros(1),
            count,
            batch_size=batch_size,
            seed=0,
        )
