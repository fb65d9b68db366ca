"""Users' own editing pairs: a folder whose ``metadata.jsonl`` rows name (condition, target,
instruction).

    my_edits/
      metadata.jsonl   {"condition": "before/001.png", "target": "after/001.png",
                        "instruction": "make it night"}  (one row per line)
      before/001.png
      after/001.png

Paths are relative to the folder. The held-out split is drawn by condition image, so every edit of
a held-out source image stays out of training. Both images are resized and centre-cropped (never
randomly: a random crop would cut the condition and the target differently).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from fluxlab.data.common import check_limit, check_split, keep_for_split
from fluxlab.data.folder import read_text
from fluxlab.data.images import DEFAULT_MAX_PIXELS, BadImageError, load_image
from fluxlab.data.transforms import ImageTransform

logger = logging.getLogger(__name__)

EDIT_METADATA = "metadata.jsonl"
_FIELDS = ("condition", "target", "instruction")
_EXAMPLE = (
    '{"condition": "before/001.png", "target": "after/001.png", "instruction": "make it night"}'
)


def read_edit_metadata(path: Path) -> list[tuple[str, str, str]]:
    """(condition, target, instruction) rows of an edit folder's metadata.jsonl."""
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} line {lineno} is not valid JSON ({err}); fix or remove that line"
            ) from None
        missing = [
            k for k in _FIELDS if not isinstance(row, dict) or not isinstance(row.get(k), str)
        ]
        if missing:
            raise ValueError(
                f"{path} line {lineno} lacks {', '.join(missing)} (strings); "
                f"a row looks like {_EXAMPLE}"
            )
        rows.append(
            (
                Path(row["condition"]).as_posix(),
                Path(row["target"]).as_posix(),
                row["instruction"].strip(),
            )
        )
    return rows


class EditFolder(Dataset):
    """Edit pairs as items ``{"image": target, "condition": source, "caption": instruction,
    "index", "label": 0}``, or None for a pair with an unreadable image (``collate_skip_bad``
    drops and counts it)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        resolution: int,
        split: Literal["train", "val", "all"] = "all",
        val_fraction: float = 0.05,
        seed: int = 0,
        condition_resolution: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"edit folder {self.root} does not exist or is not a directory")
        check_split(split, val_fraction, f"EditFolder({self.root})")
        meta = self.root / EDIT_METADATA
        if not meta.is_file():
            raise ValueError(
                f"edit folder {self.root} has no {EDIT_METADATA}; each line looks like {_EXAMPLE}"
            )
        every = read_edit_metadata(meta)
        if not every:
            raise ValueError(f"{meta} has no rows; each line looks like {_EXAMPLE}")
        self.rows = [r for r in every if keep_for_split(r[0], split, val_fraction, seed)]
        if not self.rows:
            raise ValueError(
                f"the {split!r} split of {self.root} is empty ({len(every)} pairs, "
                f"val_fraction={val_fraction}); add pairs or change val_fraction"
            )
        self.transform = ImageTransform(resolution)
        self.condition_transform = ImageTransform(condition_resolution or resolution)
        self.max_pixels = max_pixels
        self.captions: list[str] = [r[2] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, n: int) -> EditFolder:
        """The first ``n`` pairs only (smoke runs, debugging), in place."""
        check_limit(n)
        self.rows, self.captions = self.rows[:n], self.captions[:n]
        return self

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        condition, target, instruction = self.rows[index]
        try:
            cond = load_image(self.root / condition, max_pixels=self.max_pixels)
            tgt = load_image(self.root / target, max_pixels=self.max_pixels)
        except BadImageError as err:
            logger.warning("skipping edit pair %d: %s", index, err)
            return None
        return {
            "image": self.transform(tgt),
            "condition": self.condition_transform(cond),
            "caption": instruction,
            "index": index,
            "label": 0,
        }
