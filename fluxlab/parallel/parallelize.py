"""What training applies to a model from outside it (torchtitan style): the training attention
kernel, fp8 matmuls, activation checkpointing, compile, and DDP / FSDP2 / HSDP.

``parallelize`` converts the blocks' linears to fp8 first (``parallel.float8``), then wraps each
transformer block in order AC → compile → ``fully_shard`` (torchtitan's order: the compiled region
holds the recomputation and the fp8 casts, and FSDP's hooks stay outside it), then the root.
AC and compile replace only the block's ``forward`` attribute, so parameter names,
``state_dict()`` keys and checkpoints are the same as for the bare model.

Checkpoint state never records how it was sharded, so it resumes at any world size: plain and DDP
runs save rank 0's weights and name-keyed optimizer state; FSDP/HSDP runs save DCP shards written by
every rank (a collective), which DCP reshards on load. Either loads into a plain or a sharded model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from fluxlab.config.sections import ParallelConfig
from fluxlab.parallel.attention_kernels import training_attention, use_attention
from fluxlab.parallel.distributed import DistInfo
from fluxlab.parallel.float8 import convert_to_float8_training

SHARDED_MODES = ("fsdp", "hsdp")


def resolve_mode(cfg: ParallelConfig, world: int) -> str:
    """``auto`` → DDP under a multi-process launch, nothing for a lone process."""
    if cfg.mode == "auto":
        return "ddp" if world > 1 else "none"
    if cfg.mode == "ddp" and world == 1:
        return "none"  # DDP over one process would only add a copy of the gradients
    return cfg.mode


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the unit of checkpointing, compiling and sharding."""
    found: list[nn.Module] = []
    for name in ("double_blocks", "single_blocks", "blocks"):  # Flux, then DiT
        found.extend(getattr(model, name, None) or [])
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no double_blocks/single_blocks/blocks: parallel.* options "
            "need a model made of transformer blocks (Flux or DiT)"
        )
    return found


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    # Non-reentrant: works with kwargs, torch.compile and FSDP2; keeps gradients of unused inputs.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def wrap_blocks(model: nn.Module, cfg: ParallelConfig) -> nn.Module:
    """Activation checkpointing (every ``checkpoint_every``-th block), then torch.compile, per
    block; parameter names are untouched."""
    for index, block in enumerate(blocks(model)):
        checkpoint = cfg.activation_checkpointing and index % cfg.checkpoint_every == 0
        if not (checkpoint or cfg.compile):
            continue
        forward = block.forward
        if checkpoint:
            forward = functools.partial(_checkpointed, forward)
        if cfg.compile:
            forward = torch.compile(forward, backend=cfg.compile_backend)
        # An instance attribute: nn.Module.__call__ (and FSDP's hooks) still run.
        block.forward = forward
    return model


def _mesh(mode: str, cfg: ParallelConfig, device: torch.device, world: int) -> DeviceMesh:
    if mode == "hsdp":
        cfg.validate(world)
        shape = (cfg.replicate, world // cfg.replicate)
        return init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))


def shard(model: nn.Module, mesh: DeviceMesh, mixed_precision: bool) -> nn.Module:
    """FSDP2 per block, then the root (embedders, final layer); parameters become DTensor shards."""
    # bf16 compute copies gathered from fp32 shards: the shards stay the fp32 master weights the
    # optimizer updates; gradients are reduced in fp32 so averaging over many ranks loses no bits.
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else None
    )
    kwargs: dict[str, Any] = {"mesh": mesh, **({"mp_policy": mp} if mp is not None else {})}
    for block in blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    device: torch.device,
    world: DistInfo,
    mixed_precision: bool = False,
) -> nn.Module:
    """The module the training loop calls: ``model`` itself (in place for FSDP) or a DDP wrapper.

    ``model``'s blocks get the training attention kernel of ``device`` first. ``mixed_precision``
    (bf16 on CUDA) turns on FSDP2's MixedPrecisionPolicy; DDP and single-process runs keep using
    autocast. Parameter names never change, so ``model.state_dict()`` stays the plain format.
    """
    mode = resolve_mode(cfg, world.world)
    cfg.validate(world.world)
    if mode in SHARDED_MODES and world.world == 1 and not dist.is_initialized():
        # FSDP on one device still gives bf16 compute copies of fp32 master weights: a 1-rank group.
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if mode in ("ddp",) + SHARDED_MODES and not dist.is_initialized():
        raise ValueError(
            f"parallel.mode={mode} needs a process group: launch with torchrun "
            "(docs/distributed.md)"
        )
    use_attention(model, training_attention(device))
    if cfg.float8 != "off":  # before AC, compile and FSDP, as torchtitan converts
        convert_to_float8_training(model, cfg.float8, device)
    wrap_blocks(model, cfg)
    if mode in SHARDED_MODES:
        return shard(
            model, _mesh(mode, cfg, device, world.world), mixed_precision and device.type == "cuda"
        )
    if mode == "ddp":
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return model


# fp32 weights, gradients, two AdamW moments (4 + 4 + 8 bytes) and the EMA (4): the lasting state.
TRAINING_BYTES_PER_PARAM = 20


def check_training_memory(
    n_params: int, cfg: ParallelConfig, world: int, gpu_bytes: int, n_frozen: int = 0
) -> None:
    """A clear error, before the first step, when the training state alone cannot fit on each GPU.

    Only the certain case is refused (the per-rank state over the whole GPU): activations, gathered
    blocks and the allocator's slack come on top, so a run that passes can still run out of memory
    at a large batch.
    """
    mode = resolve_mode(cfg, world)
    shards = world if mode == "fsdp" else world // cfg.replicate if mode == "hsdp" else 1
    # ``n_frozen`` more parameters (a LoRA run's base) hold only their fp32 weights.
    need = (n_params * TRAINING_BYTES_PER_PARAM + n_frozen * 4) / shards
    if need <= gpu_bytes:
        return
    # Leave a fifth of each GPU for activations and the gathered blocks.
    gpus = math.ceil(need * shards / (0.8 * gpu_bytes))
    raise ValueError(
        f"{n_params / 1e9:.1f}B parameters need {need / 2**30:.0f} GiB per GPU for fp32 weights, "
        f"gradients, AdamW moments and the EMA with parallel.mode={mode} over {world} "
        f"process(es), more than the {gpu_bytes / 2**30:.0f} GiB of this GPU. Shard them over at "
        f"least {gpus} such GPUs: torchrun --nproc-per-node={gpus} -m fluxlab.cli train ... "
        "--parallel.mode=fsdp --parallel.activation_checkpointing=true (docs/distributed.md)"
    )


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its parameters and buffers on the meta device: structure, no memory.

    Taken before ``parallelize`` (whose per-block forwards are bound to the original blocks), it
    becomes the EMA through ``materialize_like``: no second full copy of the model on the GPU.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo).requires_grad_(False).eval()


@torch.no_grad()
def materialize_like(
    copy_on_meta: nn.Module,
    model: nn.Module,
    cfg: ParallelConfig,
    device: torch.device,
    world: DistInfo,
) -> nn.Module:
    """``copy_on_meta`` (from ``meta_copy(model)``) allocated and sharded exactly like ``model``,
    holding its current values (FSDP/HSDP: the same shards, so the EMA update stays shard-local)."""
    mode = resolve_mode(cfg, world.world)
    if mode in SHARDED_MODES:  # shard on meta first: each rank allocates only its 1/N
        shard(copy_on_meta, _mesh(mode, cfg, device, world.world), mixed_precision=False)
    out = copy_on_meta.to_empty(device=device)
    for mine, theirs in zip(
        (*out.parameters(), *out.buffers()), (*model.parameters(), *model.buffers())
    ):
        local(mine).copy_(local(theirs))
    return out


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing to it writes the DTensor), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def ema_update(
    ema: nn.Module, model: nn.Module, weight: float, sources: list[torch.Tensor] | None = None
) -> None:
    """ema ← ema + weight·(model − ema), shard by shard (sharded like the model: 1/world of it).

    ``sources``: the weights to follow in ``model.parameters()`` order, if not the parameters
    themselves (the fp32 masters of ``MasterWeightAdamW``)."""
    if sources is not None:
        torch._foreach_lerp_([local(p) for p in ema.parameters()], sources, weight)
        return
    # Frozen weights (a LoRA run's base) never move: only the trained ones are followed.
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    torch._foreach_lerp_(
        [local(e) for e, _ in pairs], [local(p.detach()) for _, p in pairs], weight
    )


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ over DTensor gradients returns a replicated DTensor: the plain value."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


@contextlib.contextmanager
def grad_sync(net: nn.Module, enabled: bool) -> Iterator[None]:
    """Skips the gradient all-reduce / reduce-scatter on accumulation micro-steps (not the last)."""
    if enabled:
        yield
    elif hasattr(net, "no_sync"):  # DDP
        with net.no_sync():
            yield
    elif hasattr(net, "set_requires_gradient_sync"):  # FSDP2: local unsharded gradients accumulate
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)
    else:
        yield


# ----------------------------------------------------------------------------------------- state
def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a plain or DDP-replicated model on CPU, on rank 0 (empty elsewhere).

    Sharded models are never gathered: their checkpoints are DCP shards (``save_sharded_weights``).
    """
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}  # replicated: rank 0's copy is the state
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads a full state dict into a plain or sharded model (each rank keeps its shard)."""
    if not is_sharded(model):
        model.load_state_dict(state, strict=True)
        return
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, state, options=options)


# Settings that say how an optimizer runs, not what it computes: a resumed optimizer keeps its own.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state of a plain or DDP-replicated model keyed by parameter name, on rank 0.

    The optimizer must have been built over the model's trainable parameters, in order (names
    follow that order).
    Sharded optimizer state is written as DCP shards instead (``save_sharded_optimizer``).
    """
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's
    sd = optimizer.state_dict()
    return {
        "state": {names[i]: v for i, v in sd["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]
        ],
    }


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Loads name-keyed (or, from older checkpoints, position-keyed) optimizer state into a plain
    or sharded model."""
    keys = [k for g in state["param_groups"] for k in g["params"]]
    by_position = all(isinstance(k, int) for k in keys)
    if is_sharded(model):
        if by_position:
            raise ValueError(
                "this checkpoint's optimizer state is keyed by position: resume it once "
                "without FSDP"
            )
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, copy.deepcopy(state), options=options)
        return
    if not by_position:
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        index = {n: i for i, n in enumerate(trainable)}
        missing = sorted(set(keys) - set(index))
        if missing:
            raise ValueError(
                "the checkpoint's optimizer state names parameters this model lacks: "
                f"{missing[:3]}; resume with the model the checkpoint was trained with"
            )
        state = {
            "state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [
                {**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]
            ],
        }
    # How this optimizer runs (fused or not, ...) is its own; the checkpoint's hyperparameters and
    # moments load (torch AdamW's into MasterWeightAdamW or back, a CPU run's into fused AdamW).
    groups = [
        {**saved, **{k: current[k] for k in IMPLEMENTATION_KEYS if k in current}}
        for saved, current in zip(state["param_groups"], optimizer.param_groups)
    ]
    optimizer.load_state_dict({**state, "param_groups": groups})


# Sharded optimizer state: under FSDP the AdamW moments (twice the parameters) are most of a
# checkpoint; torch.distributed.checkpoint (DCP) writes each rank's shards in parallel, with no
# gather on rank 0, and reshards on load, so a run resumes at any world size (or unsharded).
# The name is the checkpoint's folder of DCP shards and the train state's marker.
SHARDED_OPTIMIZER = "optimizer"


def save_sharded_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path
) -> None:
    """Every rank writes its optimizer shards into ``folder`` (a collective)."""
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder))


def load_sharded_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path
) -> None:
    """Loads DCP optimizer shards into a sharded or plain model's optimizer, resharding them to
    this world size."""
    # The layout to fill (this initialises the moments).
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def save_sharded_weights(model: nn.Module, ema: nn.Module, folder: Path) -> None:
    """Every rank writes its shards of the model and the EMA into ``folder`` (a collective; no
    rank gathers)."""
    dcp.save(
        {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema)},
        checkpoint_id=str(folder),
    )


def load_sharded_weights(model: nn.Module, ema: nn.Module, folder: Path) -> None:
    """Loads DCP weight shards into a sharded or plain model and EMA, resharding to this world
    size."""
    state = {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema)}  # to fill
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    set_model_state_dict(ema, state["ema"])


def reshard(model: nn.Module) -> None:
    """Frees the gathered weights a forward pass without backward left behind (FSDP2's root
    keeps its own gathered until the backward pass it expects; after sampling none comes)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, whole tensor)`` for each parameter, one at a time: under FSDP each is gathered when
    reached (a collective, so every rank must run through the whole iterator) and dropped before
    the next."""
    for name, param in model.named_parameters():
        t = param.detach()
        yield name, t.full_tensor() if isinstance(t, DTensor) else t
