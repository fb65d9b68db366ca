"""``fluxlab bench-cache``: cache encode images/s, and training steps/s from the cache vs encoding
on the fly."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ACCEPTS_OVERRIDES = True


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-cache",
        help="benchmark the latent cache: encode images/s, train steps/s cached vs on the fly",
        description="In one process: (a) images/s encoding the config's dataset into a fresh "
        "cache, (b) training steps/s reading it, (c) training steps/s with the autoencoder and "
        "text encoder in the step; prints (b)/(c).",
    )
    p.add_argument(
        "--config",
        required=True,
        help="preset name (e.g. openmoji-latent-gpu, latent-debug) or a YAML file",
    )
    p.add_argument("--steps", type=int, default=50, help="timed training steps per mode")
    p.add_argument(
        "--warmup", type=int, default=10, help="untimed steps first (allocator, cuDNN autotune)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--workdir",
        default=None,
        help="where the benchmark's cache and run go (default: FLUXLAB cache)",
    )
    p.add_argument("--json", default=None, help="also write the results here")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    # torch and the benchmark load here, not at `fluxlab --help`.
    from fluxlab.bench.cache import bench_cache, format_report
    from fluxlab.config.loading import load_config
    from fluxlab.data import cache_dir
    from fluxlab.pipelines.build import resolve_device

    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be at least 1 and --warmup at least 0")
    cfg = load_config(args.config, overrides)
    workdir = (
        Path(args.workdir) if args.workdir else cache_dir() / "bench-cache" / Path(args.config).stem
    )
    result = bench_cache(cfg, resolve_device(args.device), args.steps, args.warmup, workdir)
    result["config"] = args.config
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
