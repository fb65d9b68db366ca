"""Just enough multi-process plumbing for the trainer to run under ``torchrun``: gloo on CPU, nccl
on CUDA.

One process per device; rank 0 logs, samples and checkpoints while the others wait at a barrier.
When torchrun restarts the workers after a failure (``--max-restarts``), ``restarted()`` is true and
the trainer resumes from the newest valid checkpoint. How the model is spread over the processes
(DDP, FSDP2, HSDP, compile) belongs to ``parallelize.py``; this module only starts the process group
and answers a few collective questions.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """The process's place in a torchrun launch (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); a lone
    process is rank 0 of 1."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(
            f"WORLD_SIZE/RANK/LOCAL_RANK must be integers (set by torchrun): {e}"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(
            f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun --nproc-per-node=N"
        )
    return DistInfo(rank, world, local_rank)


def restarted() -> bool:
    """True in workers that torchrun's elastic agent started again after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def init(info: DistInfo, device: torch.device) -> torch.device:
    """Joins the process group (once); returns this rank's device (``cuda:LOCAL_RANK`` on GPUs)."""
    if not info.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _attempt_store(info)
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world)
    return device


def simulate(world: int, device: torch.device) -> DistInfo:
    """This process as rank 0 of ``world`` through PyTorch's fake process group.

    Every collective returns at once without moving data while every allocation is real, so one
    GPU holds exactly what one rank of a ``world``-GPU job holds: the way to size a sharded job
    before renting the GPUs (torchtitan estimates memory the same way). Numbers that cross ranks
    (gathered weights, reduced gradients, losses) are meaningless, and nothing that needs real
    collectives (checkpoints) can run.
    """
    # torch's testing internals (importing them registers the "fake" backend): only simulated runs
    # depend on them.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world < 1:
        raise ValueError(f"a simulated world needs at least 1 process, got {world}")
    if dist.is_initialized() or "TORCHELASTIC_RUN_ID" in os.environ:
        raise ValueError("a simulated world runs as one plain process: launch it without torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    return DistInfo(rank=0, world=world, local_rank=0)


def _attempt_store(info: DistInfo) -> dist.Store | None:
    """The agent's store under a per-attempt prefix, or None to let ``init_process_group`` build
    its own.

    torchrun's c10d rendezvous shares one TCPStore with the workers for the whole job, but
    ``env://`` adds no per-attempt prefix, so workers restarted by ``--max-restarts`` can read the
    dead ones' addresses and fail to connect (pytorch/pytorch#135712). Keys are therefore scoped by
    the restart count, which is the same for all workers of a single-node launch. (Multi-node jobs
    can instead set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every torchrun.)
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        info.world,
        is_master=False,
        timeout=default_pg_timeout,
    )
    return dist.PrefixStore(
        f"fluxlab/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store
    )


def shutdown(info: DistInfo) -> None:
    if info.enabled:
        destroy_group()


def destroy_group() -> None:
    """``dist.destroy_process_group()``, after a pause on gloo."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        # Lets gloo's workers free the last collective's tensors (they need the GIL) before the
        # group's destructor joins them holding it: else a hang at exit (docs/distributed.md).
        time.sleep(0.2)
    dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def any_rank(flags: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise OR of boolean ``flags`` over ranks, so every rank takes the same branch."""
    if not info.enabled:
        return flags
    out = flags.to(torch.int32)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.bool()


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, indexed by rank (a collective: all ranks must call it)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out
