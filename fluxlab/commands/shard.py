"""``fluxlab shard``: write WebDataset tar shards from an image folder with captions or from
OpenMoji."""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shard", help="write WebDataset tar shards from an image folder or OpenMoji")
    p.add_argument("--input", required=True, help="a folder of images with captions, or 'openmoji'")
    p.add_argument(
        "--output", required=True, help="an empty (or new) folder for 000000.tar, 000001.tar, ..."
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument(
        "--resolution", type=int, default=64, help="OpenMoji render size (ignored for folders)"
    )
    p.add_argument("--caption-ext", default=".txt", help="sidecar caption extension for folders")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples (smoke tests)")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    import itertools

    from fluxlab.data.shard_writer import (
        folder_samples,
        openmoji_samples,
        shard_pattern,
        write_shards,
    )

    if args.input.lower() == "openmoji":
        total, samples = openmoji_samples(args.resolution, args.limit)
    else:
        total, samples = folder_samples(args.input, args.caption_ext)
        if args.limit is not None:
            total, samples = min(total, args.limit), itertools.islice(samples, args.limit)
    paths = write_shards(samples, args.output, shard_size=args.shard_size, total=total)
    print(
        f"wrote {total} samples in {len(paths)} shards; train on them with "
        f"--data.dataset='{shard_pattern(paths)}'"
    )
    return 0
