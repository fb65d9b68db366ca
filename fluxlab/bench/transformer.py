"""Speed of our Flux against diffusers' ``FluxTransformer2DModel``, side by side in one process.

Both models get the same configuration, the same weights (converted with
``fluxlab.models.weights.flux_diffusers``) and the same inputs, so the ratios compare
implementations, not luck. Throughput is counted token-wise like the workplace's anchor script:
24·d² + 4·S·d FLOPs per token per block (the QKV/out/MLP matmuls and the two attention products),
plus the input and output projections; modulation and embedders are left out. MFU is that rate over
a bf16 matmul ceiling measured in the same run.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.profiler import ProfilerActivity, profile

from fluxlab.bench.impls import IMPLS, Impl
from fluxlab.conditioning.tokens import image_ids, text_ids
from fluxlab.models.flux.model import FluxParams
from fluxlab.models.flux.presets import flux_params
from fluxlab.parallel.attention_kernels import sdpa_backends
from fluxlab.parallel.attention_names import TRAINING_BACKENDS
from fluxlab.train.master_weights import MasterWeightAdamW
from fluxlab.train.overlap import BlockwiseAdamW, block_groups

# The bf16 modes a training step can run in. "autocast": fp32 parameters (the master weights) under
# torch.autocast, diffusers' usual recipe. "bf16-params": FSDP2's MixedPrecisionPolicy on one GPU,
# bf16 parameters for compute cast once per step from fp32 master weights that the optimizer
# updates. "autocast-overlap": autocast, with each block's AdamW update started during the backward
# pass on a side stream (fluxlab.train.overlap.BlockwiseAdamW); the same arithmetic, overlapped with
# the backward GEMMs. "master": the matmul weights are bf16 parameters, the fp32 masters live in
# MasterWeightAdamW, which rewrites the bf16 copies in its fused update (autocast stays on for
# everything else).
TRAIN_MODES = ("autocast", "bf16-params", "autocast-overlap", "master")

P = ParamSpec("P")
R = TypeVar("R")


def flops_forward(params: FluxParams, batch: int, img_tokens: int, txt_tokens: int) -> float:
    """Token-wise forward FLOPs of a Flux MM-DiT (the anchor script's count)."""
    d, s = params.hidden_size, img_tokens + txt_tokens
    per_block = s * 24 * d * d + 4 * s * s * d
    io = txt_tokens * 2 * params.context_in_dim * d + img_tokens * 2 * 2 * params.in_channels * d
    return batch * ((params.depth + params.depth_single_blocks) * per_block + io)


def time_cuda(fn: Callable[[], Any], warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call, timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def matmul_ceiling(device: torch.device, n: int = 8192) -> float:
    """bf16 TFLOP/s of one large square matmul: the rate MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = time_cuda(lambda: a @ b, warmup=5, iters=20)
    return 2 * n**3 / seconds / 1e12


def bench_params(which: str) -> FluxParams:
    """``train``: the 2.56B model (flux-2.56b); ``infer``: flux-dev."""
    return flux_params("flux-2.56b" if which == "train" else "flux-dev")


def make_inputs(
    params: FluxParams,
    batch: int,
    height: int,
    width: int,
    txt_tokens: int,
    device: torch.device,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Random packed latents (2×2 patches of a 16-channel latent, 8× down) and text embeddings."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows, cols = height // 16, width // 16

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    return {
        "img": randn(batch, rows * cols, params.in_channels),
        "img_ids": image_ids(batch, rows, cols).to(device),
        "txt": randn(batch, txt_tokens, params.context_in_dim),
        "txt_ids": text_ids(batch, txt_tokens).to(device),
        "timesteps": torch.rand(batch, generator=gen).to(device),
        "y": randn(batch, params.vec_in_dim),
        "guidance": torch.full((batch,), 3.5, device=device),
        "target": randn(batch, rows * cols, params.in_channels),
    }


def cast_inputs(inputs: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {
        k: v.to(dtype) if v.is_floating_point() and not k.endswith("ids") else v
        for k, v in inputs.items()
    }


def _free() -> None:
    # Each case compiles afresh: cases share the blocks' code objects, and their guards (attention
    # kernel, grad mode, dtypes) would add up past Dynamo's recompile limit.
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _one_case_in_memory(bench: Callable[P, R]) -> Callable[P, R]:
    """``bench`` between two ``_free()``: it starts on an empty GPU, and what it built (garbage
    once it returns) is given back before the next case. Inductor's settings are restored too:
    torchao's fp8 sampling config sets its recommended ones process-wide."""

    @functools.wraps(bench)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        _free()
        inductor = torch._inductor.config.get_config_copy()
        try:
            return bench(*args, **kwargs)
        finally:
            torch._inductor.config.load_config(inductor)
            _free()

    return wrapper


def _single_rank_group() -> None:
    """FSDP2 needs a process group even on one GPU."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)


def _shard_bf16(impl: Impl, model: nn.Module) -> None:
    """fully_shard each block and the root with bf16 compute and fp32 gradient reduction."""
    _single_rank_group()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in impl.blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


@_one_case_in_memory
def bench_train(
    impl_name: str,
    mode: str,
    compiled: str,
    batch: int = 8,
    resolution: int = 512,
    txt_tokens: int = 256,
    steps_for_loss: int = 3,
    seed: int = 0,
    params: FluxParams | None = None,
    backends: tuple[str, ...] = TRAINING_BACKENDS,
    profile: int = 0,
) -> dict[str, Any]:
    """One AdamW training step (fp32 master weights, bf16 compute): median time, TFLOP/s, peak
    memory.

    The first ``steps_for_loss`` losses are returned too, so a compiled run can be checked against
    an eager one from the same weights and inputs. ``backends``: the attention kernels
    (``attention_names``). ``profile``: how many of the longest GPU kernels to print (0: none).
    """
    if mode not in TRAIN_MODES:
        raise ValueError(f"training mode {mode!r}: choose one of {TRAIN_MODES}")
    device = torch.device("cuda")
    params = params or bench_params("train")
    impl = IMPLS[impl_name]()
    model = impl.build(params, device, torch.float32, seed).train()
    impl.set_attention(model, backends)
    impl.prepare_training(model)  # fp8: before the optimizer and compile, as the trainer does
    overlap = mode == "autocast-overlap"
    optimizer: Any
    if overlap:
        optimizer = BlockwiseAdamW(block_groups(impl.blocks(model), model), lr=1e-5, fused=True)
    if mode == "master":
        optimizer = MasterWeightAdamW(model, lr=1e-5)  # before compiling: it swaps in bf16 weights
    if compiled != "eager":
        model = impl.compile(model, compiled)
    if mode == "bf16-params":
        _shard_bf16(impl, model)
    if mode in ("autocast", "bf16-params"):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=mode == "autocast")
    x = make_inputs(params, batch, resolution, resolution, txt_tokens, device, seed)
    losses: list[float] = []

    def step() -> Tensor:
        autocast = mode != "bf16-params"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            xin = x if autocast else cast_inputs(x, torch.bfloat16)
            out = impl.forward(model, xin)
        loss = F.mse_loss(out.float(), x["target"])
        loss.backward()
        if overlap:
            optimizer.finish()
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    with sdpa_backends(list(backends)):
        start = time.perf_counter()
        for _ in range(steps_for_loss):
            losses.append(step().item())
        first_steps_s = time.perf_counter() - start
        seconds = time_cuda(step, warmup=2, iters=10)
        if profile:
            print(profile_table(step, rows=profile), flush=True)
    flops = 3 * flops_forward(params, batch, (resolution // 16) ** 2, txt_tokens)
    return {
        "impl": impl_name,
        "mode": mode,
        "compiled": compiled,
        "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "batch": batch,
        "step_s": seconds,
        "tflops": flops / seconds / 1e12,
        "img_per_s": batch / seconds,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
        "first_losses": losses,
        "first_steps_s": first_steps_s,
    }


@_one_case_in_memory
def bench_infer(
    impl_name: str,
    compiled: str,
    resolution: int = 1024,
    txt_tokens: int = 512,
    seed: int = 0,
    params: FluxParams | None = None,
    backends: tuple[str, ...] | None = None,
    profile: int = 0,
) -> dict[str, Any]:
    """One bf16 forward of the transformer (one sampling step).

    ``compiled``: eager, block or full (``+max`` autotunes). ``backends``: SDPA's kernels (None:
    PyTorch's choice). ``profile``: how many of the longest GPU kernels to print (0: none).
    """
    device = torch.device("cuda")
    params = params or bench_params("infer")
    impl = IMPLS[impl_name]()
    model = impl.build(params, device, torch.bfloat16, seed).eval().requires_grad_(False)
    impl.prepare_inference(model)  # before compiling: the graphs hold the sampling path
    if backends:
        impl.set_attention(model, backends)
    x = cast_inputs(
        make_inputs(params, 1, resolution, resolution, txt_tokens, device, seed), torch.bfloat16
    )
    if compiled != "eager":
        model = impl.compile(model, compiled)
    ctx = sdpa_backends(list(backends)) if backends else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        start = time.perf_counter()
        impl.forward(model, x)
        torch.cuda.synchronize()
        first_call_s = time.perf_counter() - start
        seconds = time_cuda(functools.partial(impl.forward, model, x), warmup=2, iters=10)
        if profile:
            table = profile_table(functools.partial(impl.forward, model, x), rows=profile)
            print(table, flush=True)
        out = impl.forward(model, x).float()
    flops = flops_forward(params, 1, (resolution // 16) ** 2, txt_tokens)
    return {
        "impl": impl_name,
        "compiled": compiled,
        "backends": list(backends) if backends else "default",
        "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "step_s": seconds,
        "tflops": flops / seconds / 1e12,
        "first_call_s": first_call_s,
        "out_rms": out.pow(2).mean().sqrt().item(),
        "out_sample": out[0, :4, :4].flatten().tolist(),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
    }


def profile_table(fn: Callable[[], Any], steps: int = 3, rows: int = 25) -> str:
    """The GPU kernels that take the time over ``steps`` calls, longest first."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90
    )
