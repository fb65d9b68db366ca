"""``fluxlab bench``: our Flux vs diffusers' FluxTransformer2DModel, training and inference, in one
process."""

from __future__ import annotations

import argparse
import functools
import json
import platform
from collections.abc import Callable

from fluxlab.parallel.attention_names import TRAINING_BACKENDS, check_backend_names

ACCEPTS_OVERRIDES = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time a training step (2.56B Flux, 512²) and a sampling step (flux-dev, 1024²) "
        "against diffusers",
    )
    p.add_argument(
        "--what",
        default="train,infer",
        help="comma-separated: train, infer (default both), gemm (each matmul of a sampling step "
        "alone); or lora alone: a rank-16 LoRA step on flux-dev at 1024² for each --lora-cases",
    )
    p.add_argument(
        "--lora-cases",
        default="bf16,int8,float8,nf4,diffusers",
        help="--what lora: fluxlab's frozen bases (bf16, int8, float8, nf4), each optionally "
        "BASE:compile and/or BASE:acN (checkpoint every N-th block, ac0 none; default ac1), and "
        "diffusers' recipe",
    )
    p.add_argument(
        "--smoke", action="store_true", help="--what lora: a tiny model on the CPU (tests)"
    )
    p.add_argument(
        "--impls",
        default="fluxlab,diffusers",
        help="comma-separated: fluxlab, diffusers, fluxlab-plain (no sampling GEMM epilogues), "
        "fluxlab-fp8 (torchao float8 training, tensorwise; fp8 sampling as fluxlab sample --fp8), "
        "fluxlab-fp8-rowwise, fluxlab-fp8-tensorwise (tensor-wise sampling scales), "
        "fluxlab-fp8-unfused (sampling without the one-pass GELU quantisation), diffusers-fp8 "
        "(torchao fp8 sampling, the peers' recipe; not trained). fp8 cases are skipped, saying "
        "why, without torchao or a GPU of compute capability 8.9+",
    )
    p.add_argument(
        "--train-modes",
        default="autocast,master",
        help="comma-separated: autocast, bf16-params, autocast-overlap, master (the trainer's "
        "one-GPU default); diffusers runs its own recipe, autocast, unless named in --train-cases",
    )
    p.add_argument(
        "--train-compile",
        default="eager,block",
        help="comma-separated: eager, block (per-block torch.compile), full; '+max' adds GEMM "
        "autotuning",
    )
    p.add_argument(
        "--infer-compile",
        default="eager,block",
        help="comma-separated: eager, block, full (torch.compile of the whole model); then '+max' "
        "(GEMM autotuning), '+graphs' (reduce-overhead) or '+tune' (coordinate-descent tuning), "
        "and '+cudagraph' (one CUDA graph per step, as fluxlab sample replays it)",
    )
    p.add_argument(
        "--infer-backends",
        default="default",
        help="SDPA backends for inference, e.g. 'default' or 'cudnn' or 'flash+efficient' "
        "(';'-separated sets)",
    )
    p.add_argument(
        "--train-backends",
        default="+".join(TRAINING_BACKENDS),
        help="attention kernels for training, '+'-separated: SDPA's flash/efficient/cudnn/math, "
        "and cudnn-forward (fluxlab's models: cuDNN forward, FlashAttention-2 backward; cuDNN's "
        "own backward failed on Flux shapes before)",
    )
    p.add_argument(
        "--train-cases",
        default=None,
        help="explicit training cases IMPL:MODE:COMPILE[:ATTENTION], comma-separated (replaces "
        "the product of the above; ATTENTION defaults to --train-backends)",
    )
    p.add_argument(
        "--infer-cases",
        default=None,
        help="explicit inference cases IMPL:COMPILE[:BACKENDS], comma-separated (replaces the "
        "product)",
    )
    p.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    p.add_argument(
        "--profile", action="store_true", help="also print the top GPU kernels of each case"
    )
    p.add_argument(
        "--profile-rows", type=int, default=25, help="how many kernels --profile lists (default 25)"
    )
    p.add_argument("--json", default=None, help="write every measurement here")


def _table(rows: list[dict], ceiling: float, baseline: dict[str, float]) -> str:
    lines = [
        "| case | step (s) | TFLOP/s | MFU | vs diffusers eager | peak GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = baseline.get(r["kind"])
        ratio = f"{ref / r['step_s']:.2f}×" if ref else "–"
        mfu = 100 * r["tflops"] / ceiling
        lines.append(
            f"| {r['label']} | {r['step_s']:.4f} | {r['tflops']:.0f} | {mfu:.0f}% "
            f"| {ratio} | {r['peak_mem_gb']:.1f} |"
        )
    return "\n".join(lines)


def _train_case(spec: str, default_attention: str) -> tuple[str, str, str, str]:
    """``IMPL:MODE:COMPILE[:ATTENTION]`` checked field by field; the attention defaults to
    ``--train-backends``."""
    # These import torch: not at --help.
    from fluxlab.bench.impls import IMPLS
    from fluxlab.bench.transformer import TRAIN_MODES

    fields = spec.split(":")
    if len(fields) not in (3, 4):
        raise ValueError(
            f"training case {spec!r}: write IMPL:MODE:COMPILE or IMPL:MODE:COMPILE:ATTENTION"
        )
    impl, mode, comp, attention = (*fields, default_attention) if len(fields) == 3 else fields
    if impl not in IMPLS:
        raise ValueError(
            f"training case {spec!r}: unknown implementation {impl!r}; choose from {sorted(IMPLS)}"
        )
    if mode not in TRAIN_MODES:
        raise ValueError(
            f"training case {spec!r}: unknown mode {mode!r}; choose from {list(TRAIN_MODES)}"
        )
    if not IMPLS[impl].trains:
        raise ValueError(f"training case {spec!r}: {impl!r} is a sampling recipe only")
    try:
        check_backend_names(attention.split("+"))
    except ValueError as err:
        raise ValueError(f"training case {spec!r}: {err}") from None
    return impl, mode, comp, attention


def _lora(args: argparse.Namespace) -> int:
    """``--what lora``: LoRA steps on frozen bases against diffusers' recipe (bench/lora.py)."""
    from fluxlab.bench import lora

    if args.what != "lora":
        raise ValueError("--what lora runs alone: drop the other --what entries")
    rows = lora.run(args.lora_cases.split(","), smoke=args.smoke)  # prints each row as it comes
    print(lora.table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": rows}, f, indent=1)
    return 0


def run(args: argparse.Namespace, extra: list[str]) -> int:
    # torch and the benchmark load here, not at `fluxlab --help`.
    import torch

    from fluxlab.bench import transformer as B
    from fluxlab.bench.gemms import bench_gemms
    from fluxlab.bench.impls import IMPLS, parse_compile_spec

    what = args.what.split(",")
    if "lora" in what:
        return _lora(args)
    impls = args.impls.split(",")
    for impl in impls:
        if impl not in IMPLS:
            raise ValueError(
                f"--impls: unknown implementation {impl!r}; choose from {sorted(IMPLS)}"
            )
    # Every case is checked before anything is built: a typo must not cost a build and a compile.
    train_cases = (
        [_train_case(c, args.train_backends) for c in args.train_cases.split(",")]
        if args.train_cases
        else [
            _train_case(f"{i}:{m}:{c}", args.train_backends)
            for i in impls
            for m in args.train_modes.split(",")
            for c in args.train_compile.split(",")
            if IMPLS[i].trains and (not i.startswith("diffusers") or m == "autocast")
        ]
    )
    infer_cases = (
        [tuple((c + ":default").split(":")[:3]) for c in args.infer_cases.split(",")]
        if args.infer_cases
        else [
            (i, c, b)
            for i in impls
            for c in args.infer_compile.split(",")
            for b in args.infer_backends.split(";")
        ]
    )
    for impl, comp, *_ in infer_cases:
        if impl not in IMPLS:
            raise ValueError(
                f"unknown implementation {impl!r} in a case; choose from {sorted(IMPLS)}"
            )
        parse_compile_spec(comp)
    for *_, comp, _ in train_cases:
        if parse_compile_spec(comp)[2]:
            raise ValueError(f"{comp!r}: +cudagraph replays sampling steps; training backprops")
    if not torch.cuda.is_available():
        raise ValueError("fluxlab bench measures GPU speed and needs CUDA; none is available here")
    torch.backends.cuda.matmul.allow_tf32 = True
    info: dict = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import diffusers  # optional: only the diffusers implementation needs it

        info["diffusers"] = diffusers.__version__
    except ImportError:
        used = {c[0] for c in [*train_cases, *infer_cases]} | set(impls)
        if any(i.startswith("diffusers") for i in used):
            raise ValueError(
                "the cases include diffusers, which is not installed (pip install diffusers)"
            ) from None
    info["matmul_ceiling_tflops"] = B.matmul_ceiling(torch.device("cuda"))
    print(json.dumps(info), flush=True)
    rows: list[dict] = []

    def write_json(**extra: list[dict]) -> None:
        """Everything measured so far, rewritten after each measurement: a later crash loses
        nothing."""
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"info": info, "results": rows, **extra}, f, indent=1)

    def skipped(impl: str, label: str) -> bool:
        """Prints why ``impl`` cannot run here (fp8 without a suitable GPU or torchao)."""
        reason = IMPLS[impl]().unsupported(torch.device("cuda"))
        if reason is not None:
            print(json.dumps({"skipped": label, "reason": reason}), flush=True)
        return reason is not None

    failed: list[dict] = []

    def record(kind: str, label: str, run: Callable[[], dict]) -> None:
        """Runs one case; one that fails is reported and the others still run (a crash in the
        last of ten cases should not cost the nine measured before it)."""
        try:
            result = run()
        except Exception as err:  # noqa: BLE001 - reported, counted, exits non-zero at the end
            failed.append({"failed": label, "error": f"{type(err).__name__}: {err}"})
            print(json.dumps(failed[-1]), flush=True)
            write_json(failed=failed)
            torch.cuda.empty_cache()
            return
        result.update(kind=kind, label=label)
        rows.append(result)
        print(json.dumps(result), flush=True)
        write_json(failed=failed)

    if "train" in what:
        for impl, mode, comp, backends in train_cases:
            label = f"train {impl} {mode} {comp} attn={backends}"
            if skipped(impl, label):
                continue
            run = functools.partial(
                B.bench_train,
                impl,
                mode,
                comp,
                batch=args.batch,
                profile=args.profile_rows if args.profile else 0,
                backends=tuple(backends.split("+")),
            )
            record("train", label, run)
    if "infer" in what:
        for impl, comp, backends in infer_cases:
            chosen = None if backends == "default" else tuple(backends.split("+"))
            label = f"infer {impl} {comp} sdpa={backends}"
            if skipped(impl, label):
                continue
            run = functools.partial(
                B.bench_infer,
                impl,
                comp,
                backends=chosen,
                profile=args.profile_rows if args.profile else 0,
            )
            record("infer", label, run)

    if "gemm" in what:
        gemms = bench_gemms()
        for r in gemms:
            print(json.dumps(r), flush=True)
        total = sum(r["ms_per_step"] for r in gemms)
        print("\n| GEMM (M×K by N) | count | µs | TFLOP/s | GB/s | ms per step |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in gemms:
            print(
                f"| {r['gemm']} ({r['m']}×{r['k']} by {r['n']}) | {r['count']} | {r['us']:.1f} "
                f"| {r['tflops']:.0f} | {r['gb_per_s']:.0f} | {r['ms_per_step']:.2f} |"
            )
        print(f"| all | | | | | {total:.2f} |")
        write_json(gemms=gemms)

    baseline = {
        kind: next(
            (
                r["step_s"]
                for r in rows
                if r["kind"] == kind
                and r["impl"] == "diffusers"
                and r.get("compiled") == "eager"
                and r.get("mode", "autocast") == "autocast"
            ),
            0.0,
        )
        for kind in ("train", "infer")
    }
    print(
        f"\n{info['gpu']}, torch {info['torch']}, diffusers {info.get('diffusers', '-')}, "
        f"bf16 matmul ceiling {info['matmul_ceiling_tflops']:.0f} TFLOP/s"
    )
    if rows:  # --what gemm alone printed its own table
        print(_table(rows, info["matmul_ceiling_tflops"], baseline))
    for f in failed:
        print(f"FAILED {f['failed']}: {f['error']}")
    return 1 if failed else 0
