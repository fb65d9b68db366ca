"""AdamW on fp32 master weights for a model that computes with bf16 matmul weights.

Under bf16 autocast, every training step casts each fp32 matmul weight to bf16 in the forward pass and each bf16
weight gradient back to fp32 in the backward pass: 12 bytes of memory traffic a parameter, ~31 GB a step for a
2.56B Flux, on top of the 28 bytes a parameter that AdamW itself reads and writes. ``MasterWeightAdamW`` makes
the bf16 copies the model's own parameters instead (the matmuls get exactly the weights autocast would have made,
and their gradients stay in bf16, as the matmuls produce them), keeps the fp32 master weights and both moments
itself, and updates them in one fused pass per tensor that also rewrites the bf16 copy (compiled on CUDA).

The arithmetic is AdamW's on the same gradients, so a step equals autocast + ``torch.optim.AdamW`` to fp32
rounding. Parameters that autocast leaves in fp32 (RMSNorm scales) stay fp32 and are updated in the same pass.
Apex's "O2" mixed precision and Megatron's distributed optimizer keep master weights the same way.

Gradients must be final after one backward pass: bf16 gradients summed over several micro-batches would lose
precision, so gradient accumulation keeps autocast (the trainer's default).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn


def _adamw_(
    masters: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    copies: list[Tensor | None],
    decay: Tensor,
    step_size: Tensor,
    bias2_sqrt: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """``torch.optim.AdamW``'s update in place, operation for operation, then each master written into its copy.

    ``decay`` (1 - lr·weight_decay), ``step_size`` (lr / bias correction 1) and ``bias2_sqrt`` are 0-d tensors, so
    a compiled version is not recompiled when they change; they are computed in Python floats, as AdamW does.
    """
    for p, g, m, v, copy in zip(masters, grads, exp_avgs, exp_avg_sqs, copies):
        g = g.float()
        p.mul_(decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.sub_(step_size * m / (v.sqrt() / bias2_sqrt + eps))
        if copy is not None:
            copy.copy_(p)


def matmul_parameters(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every trainable ``nn.Linear`` weight and bias by parameter name: what autocast would cast to bf16."""
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, tuple[nn.Module, str]] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for attr in ("weight", "bias"):
                p = getattr(module, attr)
                if p is not None and p.requires_grad and id(p) in names:
                    found.setdefault(names[id(p)], (module, attr))
    return found


class MasterWeightAdamW:
    """AdamW whose fp32 master weights live here while the model computes with bf16 copies.

    Construct it before compiling or wrapping the model: it replaces every ``nn.Linear`` weight and bias by a bf16
    parameter (the forward then needs no casts, autocast or not). ``param_groups`` holds the one group's
    settings so LR schedules can set ``lr``; ``master_state_dict()`` is the model's state dict in fp32.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        compute_dtype: torch.dtype = torch.bfloat16,
    ):
        self.model = model
        matmul = matmul_parameters(model)
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []  # what the model computes with (and gets gradients for)
        self.masters: list[Tensor] = []
        self.copies: list[Tensor | None] = []
        for name, p in list(model.named_parameters()):
            if not p.requires_grad:
                continue
            if p.dtype != torch.float32:
                raise ValueError(f"MasterWeightAdamW needs fp32 parameters to keep as masters; {name} is {p.dtype}")
            if name in matmul:
                module, attr = matmul[name]
                compute = nn.Parameter(p.detach().to(compute_dtype))
                setattr(module, attr, compute)
                self.params.append(compute)
                self.masters.append(p.detach())
                self.copies.append(compute.data)
            else:
                self.params.append(p)
                self.masters.append(p.detach())
                self.copies.append(None)
            self.names.append(name)
        device = self.masters[0].device
        self.exp_avgs = [torch.zeros_like(m) for m in self.masters]
        self.exp_avg_sqs = [torch.zeros_like(m) for m in self.masters]
        self.step_count = 0
        self._scalars = torch.zeros(3, device=device)  # decay, step size, sqrt of bias correction 2
        self.param_groups = [dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)]
        update: Callable[..., None] = _adamw_
        if device.type == "cuda":
            # One fused kernel per tensor: reads master, gradient and moments, writes them and the bf16 copy.
            update = torch.compile(_adamw_, fullgraph=True)
        self._update = update

    @torch.no_grad()
    def step(self) -> None:
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not have:
            return
        group = self.param_groups[0]
        self.step_count += 1
        lr, (beta1, beta2) = group["lr"], group["betas"]
        scalars = [1 - lr * group["weight_decay"], lr / (1 - beta1**self.step_count),
                   (1 - beta2**self.step_count) ** 0.5]
        for slot, value in zip(self._scalars, scalars):
            slot.fill_(value)  # a kernel argument: no host-to-device copy, no synchronisation
        decay, step_size, bias2_sqrt = self._scalars.unbind()
        pick = lambda xs: [xs[i] for i in have]  # noqa: E731
        self._update(pick(self.masters), [self.params[i].grad for i in have], pick(self.exp_avgs),
                     pick(self.exp_avg_sqs), pick(self.copies), decay, step_size, bias2_sqrt,
                     beta1, beta2, group["eps"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def master_state_dict(self) -> dict[str, Tensor]:
        """The model's state dict with the fp32 masters in place of the bf16 copies."""
        state = self.model.state_dict()
        state.update({n: m for n, m in zip(self.names, self.masters)})
        return state

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "param_groups": [dict(g) for g in self.param_groups],
            "exp_avg": dict(zip(self.names, self.exp_avgs)),
            "exp_avg_sq": dict(zip(self.names, self.exp_avg_sqs)),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.names) - set(state["exp_avg"])
        if missing:
            raise KeyError(f"optimizer state has no moments for {sorted(missing)[:3]} ({len(missing)} in all)")
        self.step_count = int(state["step"])
        self.param_groups = [dict(g) for g in state["param_groups"]]
        for n, m, v in zip(self.names, self.exp_avgs, self.exp_avg_sqs):
            m.copy_(state["exp_avg"][n])
            v.copy_(state["exp_avg_sq"][n])
