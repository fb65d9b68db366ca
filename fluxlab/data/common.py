"""Pieces shared by the datasets: the split rule, limits, the cache folder and the collate that
drops bad samples."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import torch

Split = Literal["train", "val", "all"]
SPLITS = ("train", "val", "all")


def check_split(split: str, val_fraction: float, where: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"{where}: val_fraction must be in [0, 1), got {val_fraction}")


def check_limit(limit: int | None, setting: str = "data.limit") -> None:
    """A limit on the number of examples is None (all) or at least 1."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{setting}={limit!r} must be at least 1, or null to use every example")


def in_val(key: str, val_fraction: float, seed: int) -> bool:
    """Whether `key` belongs to the validation split.

    A hash of (seed, key) rather than a shuffled index: an item keeps its split when items are
    added or removed, so a growing folder never leaks old val images into train.
    """
    digest = hashlib.sha1(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def keep_for_split(key: str, split: str, val_fraction: float, seed: int) -> bool:
    if split == "all":
        return True
    return in_val(key, val_fraction, seed) == (split == "val")


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """`override`, else $FLUXLAB_CACHE, else ~/.cache/fluxlab."""
    if override is not None:
        return Path(override)
    env = os.environ.get("FLUXLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fluxlab"


def collate_skip_bad(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Collate dataset items, dropping the `None`s that stand for undecodable images.

    Tensors are stacked, ints become a LongTensor, anything else becomes a list. `skipped` holds the
    number dropped so the trainer can count them; when every item was bad the result is None.
    """
    good = [item for item in batch if item is not None]
    if not good:
        return None
    out: dict[str, Any] = {}
    for key in good[0]:
        values = [item[key] for item in good]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int) and not isinstance(values[0], bool):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    out["skipped"] = len(batch) - len(good)
    return out
