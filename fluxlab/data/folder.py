"""A dataset over a folder of images with captions: sidecar .txt files or an HF-style
metadata.jsonl."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fluxlab.data.common import check_limit, check_split, collate_skip_bad, keep_for_split
from fluxlab.data.images import DEFAULT_MAX_PIXELS, BadImageError, load_image

logger = logging.getLogger(__name__)

__all__ = ["ImageCaptionFolder", "collate_skip_bad", "find_images", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_FILE = "metadata.jsonl"
FLAT_CLASS = "."  # class name of images sitting directly in the root


def find_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted by relative path.

    Hidden files and folders are skipped (macOS `._x.jpg` resource forks look like images but are
    not). Symlinked folders are followed, but each real folder is read once: a link back up the tree
    would otherwise repeat its images, and two such links would never end.
    """
    found = []
    first_path: dict[str, str] = {}  # real folder -> the path it was first read through
    repeats: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in first_path:
            dirnames[:] = []
            repeats.append(f"{dirpath} (= {first_path[real]})")
            continue
        first_path[real] = dirpath
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, name))
    if repeats:
        logger.warning(
            "%d folders under %s are links to folders already read, so their images count once: %s",
            len(repeats),
            root,
            ", ".join(repeats[:3]),
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_text(path: Path) -> str:
    """A text file's contents, stripped; invalid UTF-8 is replaced (a warning names the file)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        logger.warning(
            "caption %s is not valid UTF-8 (%s); undecodable bytes replaced with U+FFFD", path, err
        )
        text = raw.decode("utf-8", errors="replace")
    return text.strip()


def read_metadata(path: Path) -> dict[str, str]:
    """file_name -> caption from an HF imagefolder metadata.jsonl ("text", else "caption")."""
    captions: dict[str, str] = {}
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} line {lineno} is not valid JSON ({err}); fix or remove that line"
            ) from None
        if not isinstance(row, dict) or "file_name" not in row:
            example = '{"file_name": "a.png", "text": "..."}'
            raise ValueError(f'{path} line {lineno} needs a "file_name" key, e.g. {example}')
        text = row.get("text", row.get("caption", ""))
        captions[Path(str(row["file_name"])).as_posix()] = "" if text is None else str(text).strip()
    return captions


class ImageCaptionFolder(Dataset):
    """Images under `root` with captions; items are {"image", "caption", "index", "label"} or None.

    Caption lookup: a sidecar `<stem><caption_ext>` next to the image wins over a `metadata.jsonl`
    row in the root. Labels index `classes`, the sorted names of the root's immediate subfolders
    ("." for images directly in the root). `split`/`val_fraction`/`seed` hold out a stable,
    hash-chosen subset.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Any], torch.Tensor],
        caption_ext: str = ".txt",
        split: str = "all",
        val_fraction: float = 0.05,
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist or is not a directory"
            )
        check_split(split, val_fraction, f"ImageCaptionFolder({self.root})")
        self.transform = transform
        self.max_pixels = max_pixels
        every = find_images(self.root)
        if not every:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            raise ValueError(
                f"no images ({exts}) found under {self.root}; "
                "point the data path at a folder of images"
            )
        rel = [p.relative_to(self.root) for p in every]
        # Classes come from the whole folder so train and val agree on label numbering.
        self.classes: list[str] = sorted(
            {r.parts[0] if len(r.parts) > 1 else FLAT_CLASS for r in rel}
        )
        keep = [keep_for_split(r.as_posix(), split, val_fraction, seed) for r in rel]
        self.paths: list[Path] = [p for p, k in zip(every, keep) if k]
        if not self.paths:
            raise ValueError(
                f"the {split!r} split of {self.root} is empty ({len(every)} images, "
                f"val_fraction={val_fraction}); add images or change val_fraction"
            )
        class_index = {c: i for i, c in enumerate(self.classes)}
        self.labels: list[int] = [
            class_index[r.parts[0] if len(r.parts) > 1 else FLAT_CLASS]
            for r, k in zip(rel, keep)
            if k
        ]
        self.captions: list[str] = self._read_captions(caption_ext, {r.as_posix() for r in rel})

    def _read_captions(self, caption_ext: str, every: set[str]) -> list[str]:
        """Captions of this split's images; warns about images without one, empty captions and
        metadata rows that name no image found (each counted in an ``n_...`` attribute)."""
        metadata_path = self.root / METADATA_FILE
        metadata = read_metadata(metadata_path) if metadata_path.is_file() else {}
        unmatched = [name for name in metadata if name not in every]
        if unmatched:
            logger.warning(
                "%d of %d rows of %s name no image found under %s (missing, hidden or not an "
                "image file), e.g. %s; those rows are ignored",
                len(unmatched),
                len(metadata),
                metadata_path,
                self.root,
                ", ".join(unmatched[:3]),
            )
        self.n_unmatched_rows = len(unmatched)
        captions, missing = [], []
        for path in self.paths:
            sidecar = path.with_suffix(caption_ext)
            if sidecar.is_file():
                captions.append(read_text(sidecar))
                continue
            key = path.relative_to(self.root).as_posix()
            if key in metadata:
                captions.append(metadata[key])
            else:
                captions.append("")
                missing.append(key)
        if missing:
            logger.warning(
                "%d of %d images under %s have no caption (no %s sidecar or %s row), e.g. %s; "
                "using empty captions",
                len(missing),
                len(self.paths),
                self.root,
                caption_ext,
                METADATA_FILE,
                ", ".join(missing[:3]),
            )
        self.n_missing_captions = len(missing)
        uncaptioned = set(missing)
        keys = [path.relative_to(self.root).as_posix() for path in self.paths]
        empty = [k for k, caption in zip(keys, captions) if not caption and k not in uncaptioned]
        if empty:
            logger.warning(
                "%d of %d images under %s have an empty caption (an empty %s sidecar or %s text), "
                "e.g. %s; they train as uncaptioned examples",
                len(empty),
                len(self.paths),
                self.root,
                caption_ext,
                METADATA_FILE,
                ", ".join(empty[:3]),
            )
        self.n_empty_captions = len(empty)
        return captions

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, n: int) -> ImageCaptionFolder:
        """The first ``n`` examples only (smoke runs, debugging), in place."""
        check_limit(n)
        self.paths, self.labels, self.captions = self.paths[:n], self.labels[:n], self.captions[:n]
        return self

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path = self.paths[index]
        try:
            img = load_image(path, max_pixels=self.max_pixels)
        except BadImageError as err:
            # One bad file must not end a long run; collate_skip_bad drops the None and counts it.
            logger.warning("skipping %s", err)
            return None
        return {
            "image": self.transform(img),
            "caption": self.captions[index],
            "index": index,
            "label": self.labels[index],
        }
