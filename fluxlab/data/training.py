"""What the trainer reads: a config's training and held-out datasets and the batches over them.

Three sources share one interface: the latent cache written by ``fluxlab cache`` (single-bucket
batches gathered in memory), WebDataset shards (the order lives in the dataset) and map-style
datasets (OpenMoji, image folders, edit pairs) read through ``InfiniteBatchSampler``. Every iterator
can start at any batch, which is how a resumed run continues exactly where it stopped. A batch in
which no image could be read comes out as an ``UnreadableBatch``: the trainer counts it and reads
on, and too many in a row stop the run with an error naming the dataset.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from fluxlab.config.schema import Config
from fluxlab.data import build_dataset, collate_skip_bad
from fluxlab.data.cache import open_cache
from fluxlab.data.edit_pairs import build_edit_dataset
from fluxlab.data.samplers import InfiniteBatchSampler
from fluxlab.eval.validation import limit_dataset

# Batches in a row without one readable image after which the data is declared unreadable (fewer
# when an epoch has fewer batches: a whole epoch of them already says so).
MAX_UNREADABLE_IN_A_ROW = 100


@dataclass(frozen=True)
class UnreadableBatch:
    """A batch in which no image could be read: not a training step, but its images count as
    skipped."""

    images: int


def collate_training(items: list[dict[str, Any] | None]) -> dict[str, Any] | UnreadableBatch:
    """``collate_skip_bad``, with a batch of only unreadable images kept as ``UnreadableBatch``."""
    batch = collate_skip_bad(items)
    return UnreadableBatch(len(items)) if batch is None else batch


def unreadable_limit(batches_per_epoch: int) -> int:
    """How many unreadable batches in a row mean the data yields nothing."""
    return max(1, min(MAX_UNREADABLE_IN_A_ROW, batches_per_epoch))


def next_readable_batch(
    batches: Iterator[dict[str, Any] | UnreadableBatch], limit: int, dataset: str
) -> tuple[dict[str, Any], int, int]:
    """The next batch with a readable image, how many batches were drawn for it (itself included)
    and how many images the unreadable ones among them held. ``limit`` unreadable batches in a row
    raise an error naming ``dataset``: it yields nothing to train on."""
    drawn, unreadable_images = 0, 0
    while True:
        batch = next(batches)
        drawn += 1
        if not isinstance(batch, UnreadableBatch):
            return batch, drawn, unreadable_images
        unreadable_images += batch.images
        if drawn >= limit:
            raise ValueError(
                f"data.dataset={dataset!r} gave {drawn} batches in a row without one readable "
                f"image ({unreadable_images} images skipped); the warnings above name the files "
                "and why they failed to load"
            )


def ignore_stop_signals(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C/SIGTERM to the trainer, which finishes its step and saves
    a checkpoint; a worker dying first would end the run with a loader error instead."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


def _split(cfg: Config, split: str, augment: bool) -> Dataset:
    """The OpenMoji/folder/shards split, or the edit-pair split for ``data.task=edit``."""
    # edit: (condition, instruction, target) pairs
    build = build_edit_dataset if cfg.data.task == "edit" else build_dataset
    d = cfg.data
    extra: dict[str, Any] = {
        "hflip": d.hflip,
        "color_jitter": d.color_jitter,
        "shuffle_buffer": d.shuffle_buffer,
    }
    return build(
        d.dataset,
        resolution=d.resolution,
        split=split,
        val_fraction=d.val_fraction,
        seed=cfg.train.seed,
        crop=d.crop,
        limit=d.limit,
        openmoji_subset=d.openmoji_subset,
        max_pixels=d.max_pixels,
        include=d.include,
        exclude=d.exclude,
        **(extra if augment else {}),
    )


def train_dataset(cfg: Config, device: torch.device) -> Any:
    """The training split; with data.val_fraction=0 it holds every example, read exactly as a
    training split is (augmented, shuffled, dealt over ranks)."""
    if cfg.data.cache_dir is not None:  # latents + text embeddings written by `fluxlab cache`
        return open_cache(cfg, "train", device)
    ds = _split(cfg, "train", augment=True)
    if len(ds) == 0:
        raise ValueError(f"data.dataset={cfg.data.dataset!r} has no training examples")
    return ds


def val_dataset(
    cfg: Config, device: torch.device, log: Callable[[str], None]
) -> tuple[Any, list[str]]:
    """The held-out split (capped at data.val_limit) and all its captions."""
    d = cfg.data
    if d.cache_dir is not None:
        cached = open_cache(cfg, "val", device).take(d.val_limit)
        return cached, list(cached.captions)
    try:
        ds = _split(cfg, "val", augment=False)
    except ValueError as err:  # e.g. an empty split
        raise ValueError(
            f"train.eval_every={cfg.train.eval_every} needs a validation split: {err}"
        ) from err
    if len(ds) == 0:
        raise ValueError(
            "train.eval_every is set but the validation split is empty; raise data.val_fraction"
        )
    log(f"validation: {min(len(ds), d.val_limit or len(ds))} held-out examples × 8 timesteps")
    if isinstance(ds, IterableDataset):  # shards have no indices for a Subset: read fewer instead
        return ds.take(d.val_limit), list(ds.captions)
    return limit_dataset(ds, d.val_limit), list(getattr(ds, "captions", []))


def train_batches(
    dataset: Any, cfg: Config, batches_seen: int, rank: int, world: int, device: torch.device
) -> Iterator[dict[str, Any] | UnreadableBatch]:
    """This rank's batches from batch ``batches_seen`` on."""
    bs, workers = cfg.optim.batch_size, cfg.data.num_workers
    if hasattr(dataset, "batches"):  # the latent cache: single-bucket batches gathered in memory
        return dataset.batches(bs, cfg.train.seed, batches_seen, rank, world)
    # A DataLoader draws its workers' base seed when iterated, from the global RNG unless given a
    # generator; that draw would shift every later random augmentation of a resumed run by one.
    seeds = torch.Generator().manual_seed(cfg.train.seed * 100_003 + batches_seen)
    common: dict[str, Any] = dict(
        num_workers=workers,
        collate_fn=collate_training,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=seeds,
        worker_init_fn=ignore_stop_signals,
    )
    if isinstance(dataset, IterableDataset):  # WebDataset shards: the order lives in the dataset
        dataset.resume_at(batches_seen * bs, batch_size=bs)
        common["collate_fn"] = _collate_with_shard_tally
        return ShardBatches(iter(DataLoader(dataset, batch_size=bs, **common)), dataset)
    sampler = InfiniteBatchSampler(
        len(dataset), bs, cfg.train.seed, start_batch=batches_seen, rank=rank, world=world
    )
    return iter(DataLoader(dataset, batch_sampler=sampler, **common))


ShardTally = tuple[int, int] | None  # (loader worker, broken shards it met), None in-process


def _collate_with_shard_tally(
    items: list[dict[str, Any] | None],
) -> tuple[dict[str, Any] | UnreadableBatch, ShardTally]:
    """``collate_training``, and the broken-shard tally of the worker that read the batch: each
    worker counts in its own copy of the dataset, which only it can read."""
    worker = get_worker_info()
    tally = None if worker is None else (worker.id, worker.dataset.broken_shards)
    return collate_training(items), tally


class ShardBatches:
    """The batches of a shard dataset and ``broken_shards``: how many times its readers found a
    shard broken (a shard read in several epochs counts in each)."""

    def __init__(self, loader: Iterator[tuple[Any, ShardTally]], dataset: Any):
        self._loader, self._dataset = loader, dataset
        self._tallies: dict[int, int] = {}  # the latest tally of each loader worker

    def __iter__(self) -> ShardBatches:
        return self

    def __next__(self) -> dict[str, Any] | UnreadableBatch:
        batch, tally = next(self._loader)
        if tally is not None:
            self._tallies[tally[0]] = tally[1]
        return batch

    @property
    def broken_shards(self) -> int:
        in_process = self._dataset.broken_shards  # batches collated without workers
        return in_process + sum(self._tallies.values())
