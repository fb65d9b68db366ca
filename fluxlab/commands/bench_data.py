"""``fluxlab bench-data``: images/s decoded, resized and batched per loader worker, folder vs shards
vs cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ACCEPTS_OVERRIDES = False


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    try:
        return int(w), int(h or w)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size like 512 or 768x512, got {text!r}"
        ) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-data", help="benchmark the data loader: image folder vs shards vs in-memory cache"
    )
    p.add_argument("--resolution", type=int, default=512, help="training resolution (default 512)")
    p.add_argument(
        "--source-size",
        type=_size,
        default=None,
        help="stored JPEG size WxH (default: resolution²)",
    )
    p.add_argument("--num-images", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--repeats", type=int, default=3, help="runs per measurement; the fastest is kept"
    )
    p.add_argument(
        "--noise", type=float, default=0.0, help="grain (std, 8-bit levels) added to the JPEGs"
    )
    p.add_argument(
        "--workdir", default=None, help="where the generated folder and shards go (default: cache)"
    )
    p.add_argument(
        "--step-seconds",
        type=float,
        default=0.317,
        help="training step time to feed (default: 2.56B FLUX, batch 8 at 512², one H100)",
    )
    p.add_argument("--json", default=None, help="also write the results here")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    # torch and the benchmark load here, not at `fluxlab --help`.
    from fluxlab.bench.loader import bench_data, workers_to_feed
    from fluxlab.data import cache_dir

    workers = [int(w) for w in args.workers.split(",")]
    workdir = Path(args.workdir) if args.workdir else cache_dir() / "bench-data"
    size = args.source_size or (args.resolution, args.resolution)
    report = bench_data(
        workdir,
        args.resolution,
        args.num_images,
        size,
        args.batch_size,
        workers,
        args.epochs,
        args.noise,
        args.repeats,
    )
    m = report["machine"]
    print(
        f"{m['cpu']} ({m['nproc']} CPUs), torch {m['torch']}, Pillow {m['pillow']}, "
        f"webdataset {m['webdataset']}"
    )
    print(
        f"{args.num_images} JPEGs {size[0]}x{size[1]} -> {args.resolution}², "
        f"batch {args.batch_size}; "
        f"shard index pass {report['shard_index_seconds']:.2f}s"
    )
    print("| source | workers | images/s (wall) | per worker (wall) | per CPU-second (workers=0) |")
    print("|---|---:|---:|---:|---:|")
    for r in report["results"]:
        cpu = "" if r["images_per_cpu_s"] is None else f"{r['images_per_cpu_s']:.1f}"
        print(
            f"| {r['source']} | {r['workers']} | {r['images_per_s']:.1f} "
            f"| {r['images_per_s_per_worker']:.1f} | {cpu} |"
        )
    # A worker's capacity: images per CPU-second in one process (robust to a shared CPU), else the
    # wall rate of a single worker.
    capacity = {
        r["source"]: r["images_per_cpu_s"] for r in report["results"] if r["images_per_cpu_s"]
    }
    for r in report["results"]:
        if r["workers"] == 1:
            capacity.setdefault(r["source"], r["images_per_s"])
    need = args.batch_size / args.step_seconds
    for source, rate in capacity.items():
        n = workers_to_feed(rate, args.batch_size, args.step_seconds)
        print(
            f"{source}: {need:.1f} images/s needed; {n} worker(s) feed it with 2x margin "
            f"({rate:.1f} per worker)"
        )
    report["workers_to_feed"] = {
        s: workers_to_feed(r, args.batch_size, args.step_seconds) for s, r in capacity.items()
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
