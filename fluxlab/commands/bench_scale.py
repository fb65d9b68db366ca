"""``fluxlab bench-scale``: Flux training throughput under torchrun, for scaling efficiency across
GPUs."""

from __future__ import annotations

import argparse
import json

ACCEPTS_OVERRIDES = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-scale",
        help="time Flux training steps under torchrun (DDP / FSDP2 / HSDP) for scaling efficiency",
        description="Run once per world size, e.g. `torchrun --standalone --nproc-per-node=N -m "
        "fluxlab.cli bench-scale --mode fsdp --json scale-N.json` for N = 1, 2, 4, 8; efficiency = "
        "images/s at N over N × images/s at 1 (docs/performance.md).",
    )
    p.add_argument(
        "--preset", default="flux-2.56b", help="model preset (flux-2.56b, flux-dev, ... flux-debug)"
    )
    p.add_argument("--mode", default="fsdp", choices=["none", "ddp", "fsdp", "hsdp"])
    p.add_argument("--replicate", type=int, default=1, help="hsdp: replica groups")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="per-block torch.compile")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--batch", type=int, default=8, help="per-GPU batch")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--txt-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="rank 0 writes the result here")
    p.add_argument(
        "--simulate-world",
        type=int,
        default=None,
        metavar="N",
        help="one process acting as rank 0 of N (fake process group: no communication, real "
        "allocations): the per-GPU peak memory of an N-GPU job, measured on one GPU; no throughput",
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    # torch and the benchmark load here, not at `fluxlab --help`.
    from fluxlab.bench.scale import bench_scale
    from fluxlab.config.sections import ParallelConfig
    from fluxlab.pipelines.build import resolve_device

    if min(args.batch, args.steps) < 1 or args.warmup < 0 or args.resolution % 16:
        raise ValueError(
            "--batch and --steps must be ≥ 1, --warmup ≥ 0, --resolution a multiple of 16"
        )
    cfg = ParallelConfig(
        mode=args.mode,
        replicate=args.replicate,
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile,
        compile_backend=args.compile_backend,
    )
    result = bench_scale(
        args.preset,
        cfg,
        args.batch,
        args.resolution,
        args.txt_tokens,
        args.steps,
        args.warmup,
        resolve_device(args.device),
        simulate_world=args.simulate_world,
    )
    if result is not None:
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return 0
