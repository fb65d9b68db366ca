"""The optimizer of a diffusion run, AdamW on the model's parameters or on fp32 master weights, and
the schedules of its learning rate (linear warm-up, then constant or cosine) and of the EMA's
decay."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fluxlab.config.schema import Config
from fluxlab.parallel import parallelize
from fluxlab.train.master_weights import MasterWeightAdamW


def lr_factor(step: int, cfg: Config) -> float:
    """The learning rate of ``step`` as a fraction of ``optim.lr``."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        progress = (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def ema_decay(step: int, max_decay: float) -> float:
    """The EMA's decay after ``step`` steps, warmed up (as in k-diffusion/timm) so that the earliest
    weights are forgotten quickly."""
    return min(max_decay, (1 + step) / (10 + step))


def use_master_weights(cfg: Config, bf16: bool, device: torch.device, mode: str) -> bool:
    """Whether ``optim.master_weights`` applies: bf16 compute and a single process without DDP/FSDP
    (which reduce and shard the model's own parameters; FSDP has its own mixed precision)."""
    missing = []
    if not bf16:
        missing.append(
            f"bf16 mixed precision (train.mixed_precision={cfg.train.mixed_precision} on "
            f"{device.type})"
        )
    if mode != "none":
        missing.append(f"a single process without DDP/FSDP (parallel.mode resolves to {mode})")
    if cfg.lora.enabled:  # the masters would copy the frozen base in fp32
        missing.append("a full fine-tune (lora.enabled trains float32 adapters)")
    choice = cfg.optim.master_weights
    if choice == "on" and missing:
        raise ValueError(
            "optim.master_weights=on needs " + "; ".join(missing) + ". Use auto or off"
        )
    return choice == "on" or (choice == "auto" and not missing)


def build_optimizer(
    model: nn.Module, cfg: Config, master_weights: bool, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW with ``optim``'s settings; with ``master_weights`` a ``MasterWeightAdamW``, which swaps
    bf16 copies into the model's matmuls (compiled forwards trace lazily, so it may follow
    ``parallelize``)."""
    o = cfg.optim
    adamw = dict(lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps)
    if master_weights:
        return MasterWeightAdamW(model, **adamw, accumulate_fp32=o.grad_accum > 1)
    trainable = [p for p in model.parameters() if p.requires_grad]  # a LoRA's adapters only
    return torch.optim.AdamW(trainable, **adamw, fused=device.type == "cuda")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` as a per-step schedule."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


def clip_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
    """Clips the gradients to ``max_norm`` by their global norm; returns the norm before that."""
    if isinstance(optimizer, MasterWeightAdamW):
        # The norm in fp32; the scaling is folded into the optimizer's next update.
        return optimizer.clip_grad_norm_(max_norm)
    # Under FSDP the gradients are DTensor shards; clip_grad_norm_ still computes the global norm.
    return parallelize.full_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
