"""Images in batches: the one generation loop of ``fluxlab sample``, ``edit`` and ``eval``.

Batch seeds follow the item positions, so the same prompt at the same position gets the same image
from every command that uses the same seed and batch size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

# generate_batch(items, seed, progress): the images of items[...] drawn with ``seed``; ``progress``
# asks for a bar over the sampler's steps.
BatchGenerator = Callable[[slice, int, bool], Tensor]


def generate_in_batches(
    generate_batch: BatchGenerator,
    count: int,
    *,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> Tensor:
    """The images of ``count`` items, ``batch_size`` at a time, concatenated in item order.

    The batch that starts at item ``k`` is drawn with seed ``seed + k``. With ``progress`` each
    batch shows its sampler steps, and with several batches a bar over images (with an ETA) too.
    """
    if count < 1 or batch_size < 1:
        raise ValueError(
            f"nothing to generate: {count} items in batches of {batch_size}; give at least one "
            "prompt and a batch size of at least 1"
        )
    starts = range(0, count, batch_size)
    images = []
    with tqdm(
        total=count,
        unit="img",
        desc="images",
        dynamic_ncols=True,
        disable=not progress or len(starts) == 1,
    ) as bar:
        for start in starts:
            batch = generate_batch(slice(start, start + batch_size), seed + start, progress)
            images.append(batch)
            bar.update(batch.shape[0])
    return torch.cat(images)
