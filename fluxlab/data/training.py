"""What the trainer reads: a config's training and held-out datasets and the batches over them.

Three sources share one interface: the latent cache written by ``fluxlab cache`` (single-bucket
batches gathered in memory), WebDataset shards (the order lives in the dataset) and map-style
datasets (OpenMoji, image folders, edit pairs) read through ``InfiniteBatchSampler``. Every iterator
can start at any batch, which is how a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from fluxlab.config.schema import Config
from fluxlab.data import build_dataset, collate_skip_bad
from fluxlab.data.cache import open_cache
from fluxlab.data.edit_pairs import build_edit_dataset
from fluxlab.data.samplers import InfiniteBatchSampler
from fluxlab.eval.validation import limit_dataset


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
) -> Iterator[dict[str, Any]]:
    """This rank's batches from batch ``batches_seen`` on."""
    bs, workers = cfg.optim.batch_size, cfg.data.num_workers
    if hasattr(dataset, "batches"):  # the latent cache: single-bucket batches gathered in memory
        return dataset.batches(bs, cfg.train.seed, batches_seen, rank, world)
    # A DataLoader draws its workers' base seed when iterated, from the global RNG unless given a
    # generator; that draw would shift every later random augmentation of a resumed run by one.
    seeds = torch.Generator().manual_seed(cfg.train.seed * 100_003 + batches_seen)
    common: dict[str, Any] = dict(
        num_workers=workers,
        collate_fn=collate_skip_bad,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=seeds,
    )
    if isinstance(dataset, IterableDataset):  # WebDataset shards: the order lives in the dataset
        dataset.resume_at(batches_seen * bs, batch_size=bs)
        return iter(DataLoader(dataset, batch_size=bs, **common))
    sampler = InfiniteBatchSampler(
        len(dataset), bs, cfg.train.seed, start_batch=batches_seen, rank=rank, world=world
    )
    return iter(DataLoader(dataset, batch_sampler=sampler, **common))
