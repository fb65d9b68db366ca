"""Training throughput across GPUs: the same Flux step under torchrun at 1, 2, 4, 8 processes.

Every rank builds the model, wraps it with ``fluxlab.parallel.parallelize.parallelize`` (the
trainer's own attention kernel, DDP / FSDP2 / HSDP, activation checkpointing and per-block compile)
and times AdamW steps on a per-GPU batch of random latents. Rank 0 reports the slowest rank's median
step, the images/s of the whole job, and every rank's peak memory; scaling efficiency is images/s at
N GPUs over N × images/s at one, at equal per-GPU batch.

``simulate_world=N`` runs one process as rank 0 of a world of N through PyTorch's fake process
group: every collective returns at once without moving data, while every allocation is real. The
peak memory is then that of one rank of an N-GPU job (the model, gradient and optimizer shards, the
all-gathered blocks, the activations) measured on a single GPU, which is how a job too big for the
GPUs at hand is sized (torchtitan's memory estimation works the same way). The step time of such a
run has no communication in it and the losses are meaningless (gathered weights are
uninitialised), so only the memory is a result.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fluxlab.bench.transformer import flops_forward, make_inputs
from fluxlab.config.sections import ParallelConfig
from fluxlab.models.flux.model import Flux
from fluxlab.models.flux.presets import flux_params
from fluxlab.parallel import attention_kernels, distributed
from fluxlab.parallel import parallelize as par


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bench_scale(
    preset: str,
    parallel: ParallelConfig,
    batch: int,
    resolution: int,
    txt_tokens: int,
    steps: int,
    warmup: int,
    device: torch.device,
    seed: int = 0,
    simulate_world: int | None = None,
) -> dict[str, Any] | None:
    """Times ``steps`` training steps after ``warmup``; the result on rank 0, None elsewhere."""
    if simulate_world is None:
        info = distributed.from_env()
        device = distributed.init(info, device)
    else:
        info = distributed.simulate(simulate_world, device)
    params = flux_params(preset)
    torch.manual_seed(seed)  # every rank starts from the same weights, as DDP and FSDP expect
    with torch.device(device):
        model = Flux(params)
    n_params = sum(p.numel() for p in model.parameters())  # before sharding
    cuda = device.type == "cuda"
    mode = par.resolve_mode(parallel, info.world)
    # FSDP2's MixedPrecisionPolicy; else autocast on CUDA.
    sharded_bf16 = cuda and mode in par.SHARDED_MODES
    net = par.parallelize(model, parallel, device, info, mixed_precision=cuda)
    # This rank's shard under FSDP.
    local_params = sum(par.local(p).numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    x = make_inputs(
        params, batch, resolution, resolution, txt_tokens, device, seed=seed + info.rank
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=cuda and not sharded_bf16
        )
        with autocast, attention_kernels.for_training(device):  # the trainer's attention kernels
            out = net(
                x["img"],
                x["img_ids"],
                x["txt"],
                x["txt_ids"],
                x["timesteps"],
                x["y"],
                x["guidance"],
            )
            loss = F.mse_loss(out.float(), x["target"])
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = _now(device)
        step()
        times.append(_now(device) - start)
    mine = torch.tensor(
        [
            statistics.median(times),
            torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
        ],
        dtype=torch.float64,
        device=device,
    )
    everyone = [torch.zeros_like(mine) for _ in range(info.world)] if info.enabled else [mine]
    if simulate_world is not None:
        everyone = [mine]  # the other ranks do not exist
    elif info.enabled:
        dist.all_gather(everyone, mine)
    result = None
    if info.is_main:
        step_s = max(float(t[0]) for t in everyone)  # the job moves at its slowest rank
        images = batch * info.world
        flops = 3 * flops_forward(params, images, (resolution // 16) ** 2, txt_tokens)
        result = {
            "preset": preset,
            "params_b": n_params / 1e9,
            "params_b_on_rank0": local_params / 1e9,
            "world": info.world,
            "mode": mode,
            "activation_checkpointing": parallel.activation_checkpointing,
            "compile": parallel.compile,
            "per_gpu_batch": batch,
            "resolution": resolution,
            "step_s": step_s,
            "images_per_s": images / step_s,
            "tflops_per_gpu": flops / step_s / info.world / 1e12,
            "peak_mem_gb_per_rank": [round(float(t[1]), 2) for t in everyone],
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__,
        }
        if simulate_world is not None:
            # Without communication neither the step time nor the losses describe a real job.
            result.update(simulated_world=True, step_s_without_communication=result.pop("step_s"))
            for key in ("images_per_s", "tflops_per_gpu"):
                result.pop(key)
    if simulate_world is not None:
        dist.destroy_process_group()
    else:
        distributed.shutdown(info)
    return result
