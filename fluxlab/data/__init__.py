"""Datasets, decoding and transforms: the first stage of the data flow (see DESIGN.md)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from fluxlab.data.common import cache_dir, check_limit, collate_skip_bad
from fluxlab.data.folder import IMAGE_EXTENSIONS, ImageCaptionFolder
from fluxlab.data.images import DEFAULT_MAX_PIXELS, BadImageError, load_image
from fluxlab.data.openmoji import OpenMoji
from fluxlab.data.openmoji_names import GROUPS as OPENMOJI_GROUPS
from fluxlab.data.openmoji_select import openmoji_only, select_openmoji
from fluxlab.data.shards import ShardDataset, is_shard_spec
from fluxlab.data.transforms import ImageTransform, make_grid, to_pil

__all__ = [
    "BadImageError",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageCaptionFolder",
    "ImageTransform",
    "OPENMOJI_GROUPS",
    "OpenMoji",
    "ShardDataset",
    "build_dataset",
    "cache_dir",
    "collate_skip_bad",
    "load_image",
    "make_grid",
    "to_pil",
]


def build_dataset(
    name_or_path: str | os.PathLike[str],
    resolution: int,
    split: Literal["train", "val", "all"] = "all",
    val_fraction: float = 0.05,
    seed: int = 0,
    crop: Literal["center", "random"] = "center",
    hflip: bool = False,
    color_jitter: float = 0.0,
    caption_ext: str = ".txt",
    limit: int | None = None,
    openmoji_subset: str = "all",
    shuffle_buffer: int = 1000,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> Dataset:
    """ "openmoji" -> the embedded OpenMoji set; WebDataset shards ("data/{000000..000127}.tar",
    "pipe:..." URLs) -> a streaming ShardDataset; anything else is an image folder path.

    Augmentation (random crop, flip, jitter) applies only to the train split; val and all are
    deterministic so validation losses are comparable between runs. OpenMoji renders are already
    square at `resolution`, so only flips/jitter can change them. `max_pixels` caps decoded image
    size (a guard against decompression bombs; None lifts it). `include`/`exclude` choose OpenMoji
    emoji (`fluxlab.data.openmoji_select`) before the split and `limit`.
    """
    check_limit(limit)
    openmoji_only(str(name_or_path), include, exclude)
    augment = split == "train"
    transform = ImageTransform(
        resolution,
        crop=crop if augment else "center",
        hflip=hflip and augment,
        color_jitter=color_jitter if augment else 0.0,
    )
    if is_shard_spec(name_or_path):
        # Training streams forever in shuffled order; val/all are one unshuffled pass seen whole by
        # every rank, so evaluation over them is deterministic.
        train = split == "train"
        return ShardDataset(
            name_or_path,
            transform,
            split,
            val_fraction,
            seed,
            shuffle_buffer=shuffle_buffer if train else 0,
            limit=limit,
            epochs=None if train else 1,
            rank=None if train else 0,
            world=None if train else 1,
            max_pixels=max_pixels,
        )
    if str(name_or_path).lower() == "openmoji":
        needs_transform = augment and (hflip or color_jitter > 0)
        return OpenMoji(
            resolution,
            transform if needs_transform else None,
            split,
            val_fraction,
            seed,
            limit=limit,
            include=select_openmoji(openmoji_subset, include, exclude),
        )
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"dataset {str(name_or_path)!r} is neither 'openmoji' nor an existing folder"
        )
    folder = ImageCaptionFolder(
        path,
        transform,
        caption_ext=caption_ext,
        split=split,
        val_fraction=val_fraction,
        seed=seed,
        max_pixels=max_pixels,
    )
    return folder if limit is None else folder.take(limit)
