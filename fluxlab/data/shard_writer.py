"""Write WebDataset tar shards from an image folder (original file bytes) or from OpenMoji (PNG
renders).

A sample is `<key>.<image ext>` + `<key>.txt` (caption) + `<key>.json` ({"label", "class", "source"
or "code", "split_key"}). The label lives in the JSON rather than a `.cls` member (which
ShardDataset also reads) because every tar member costs a 512-byte header and ~0.1 ms of tarfile
parsing per sample.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from fluxlab.data.folder import ImageCaptionFolder
from fluxlab.data.openmoji import OpenMoji

__all__ = ["folder_samples", "openmoji_samples", "write_shards"]


def folder_samples(
    root: str | os.PathLike[str], caption_ext: str = ".txt"
) -> tuple[int, Iterator[dict[str, Any]]]:
    """(count, samples) of an image folder, found and captioned exactly as ImageCaptionFolder does.

    The image bytes are stored as they are on disk: re-encoding would cost quality (JPEG) or size
    (PNG) and a corrupt file is better found, named and skipped by the reader like any other bad
    sample.
    """
    folder = ImageCaptionFolder(
        root, transform=lambda img: img, caption_ext=caption_ext, split="all"
    )

    def samples() -> Iterator[dict[str, Any]]:
        for i, (path, caption, label) in enumerate(
            zip(folder.paths, folder.captions, folder.labels)
        ):
            rel = path.relative_to(folder.root).as_posix()
            ext = path.suffix.lower().lstrip(".")
            yield {
                "__key__": f"{i:09d}",
                ext: path.read_bytes(),
                "txt": caption,
                # the folder dataset splits by relative path: the shards keep its train/val split
                "json": {
                    "label": label,
                    "class": folder.classes[label],
                    "source": rel,
                    "split_key": rel,
                },
            }

    return len(folder.paths), samples()


def openmoji_samples(
    resolution: int, limit: int | None = None
) -> tuple[int, Iterator[dict[str, Any]]]:
    """(count, samples) of the OpenMoji set rendered at `resolution`, PNG-encoded (lossless)."""
    ds = OpenMoji(resolution, split="all", limit=limit)

    def samples() -> Iterator[dict[str, Any]]:
        for i in range(len(ds)):
            buf = io.BytesIO()
            Image.fromarray(ds.images[i]).save(buf, format="PNG")
            # the OpenMoji dataset's split rule: skin-tone variants share their emoji's side
            tone_free = re.sub(r"-1F3F[B-F]", "", ds.codes[i])
            yield {
                "__key__": f"{i:09d}",
                "png": buf.getvalue(),
                "txt": ds.captions[i],
                "json": {
                    "label": ds.labels[i],
                    "class": ds.classes[ds.labels[i]],
                    "code": ds.codes[i],
                    "split_key": tone_free,
                },
            }

    return len(ds), samples()


def write_shards(
    samples: Iterable[dict[str, Any]],
    output: str | os.PathLike[str],
    shard_size: int = 1000,
    total: int | None = None,
    max_bytes: float = 3e9,
) -> list[Path]:
    """Write `samples` into `output/000000.tar`, `000001.tar`, ...; returns the shard paths.

    A shard closes at `shard_size` samples or `max_bytes`; ~1 GB shards stream well from object
    storage.
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if stale:
        raise ValueError(
            f"{out} already holds shards (e.g. {stale[0].name}); write to an empty folder"
        )
    written: list[Path] = []
    with wds.ShardWriter(
        str(out / "%06d.tar"), maxcount=shard_size, maxsize=max_bytes, verbose=0
    ) as sink:
        for sample in tqdm(samples, total=total, desc=f"writing shards to {out}", unit="sample"):
            sink.write(sample)
            if not written or written[-1].name != Path(sink.fname).name:
                written.append(Path(sink.fname))
    return written


def shard_pattern(paths: list[Path]) -> str:
    """The brace pattern naming `paths` (as written by write_shards), for `--data.dataset=`."""
    if len(paths) == 1:
        return str(paths[0])
    return str(paths[0].parent / f"{{{paths[0].stem}..{paths[-1].stem}}}.tar")
