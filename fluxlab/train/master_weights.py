"""AdamW on fp32 master weights for a model that computes with bf16 matmul weights.

Under bf16 autocast, every training step casts each fp32 matmul weight to bf16 in the forward pass
and each bf16 weight gradient back to fp32 in the backward pass: 12 bytes of memory traffic a
parameter, on top of the 28 that AdamW itself reads and writes. ``MasterWeightAdamW`` makes the bf16
copies the model's own parameters instead (the matmuls get exactly the weights autocast would have
made, and their gradients stay in bf16, as the matmuls produce them), keeps the fp32 master weights
and both moments itself, and updates them in one fused pass per tensor that also rewrites the bf16
copy (compiled on CUDA). What it buys: docs/performance.md.

The arithmetic is AdamW's on the same gradients, so a step equals autocast + ``torch.optim.AdamW``
to fp32 rounding. Parameters that autocast leaves in fp32 (RMSNorm scales) stay fp32 and are updated
in the same pass. Apex's "O2" mixed precision and Megatron's distributed optimizer keep master
weights the same way.

With gradient accumulation (``accumulate_fp32=True``) each micro-batch's bf16 gradient is added into
an fp32 sum as soon as it is produced, as autocast's fp32 ``.grad`` would have summed it, so the
update sees the same numbers; without it the gradients must be final after one backward pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def _adamw_tensor_(
    master: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    copy: Tensor | None,
    decay: Tensor,
    step_size: Tensor,
    bias2_sqrt: Tensor,
    clip: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """``torch.optim.AdamW``'s update of one tensor in place, operation for operation, then the
    master written into its compute copy.

    ``decay`` (1 - lr·weight_decay), ``step_size`` (lr / bias correction 1) and ``bias2_sqrt`` are
    0-d tensors, so a compiled version is not recompiled when they change; they are computed in
    Python floats, as AdamW does. ``clip`` scales the gradient first, as ``clip_grad_norm_`` would
    have in place.
    """
    g = grad.float() * clip
    master.mul_(decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    master.sub_(step_size * exp_avg / (exp_avg_sq.sqrt() / bias2_sqrt + eps))
    if copy is not None:
        copy.copy_(master)


def _flat(t: Tensor) -> Tensor:
    """A 1-D view for the update (one compiled kernel serves every length); a non-contiguous tensor,
    which no view can flatten, is passed as it is and gets a kernel of its own."""
    return t.view(-1) if t.is_contiguous() else t


def swap_in_compute_weights(model: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """Replaces every ``nn.Linear`` weight and bias (what autocast casts) by a ``dtype`` copy;
    returns the originals (fp32, the masters) by parameter name. A parameter shared by several
    layers stays shared."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for attr in ("weight", "bias"):
                p = getattr(module, attr)
                if p is not None:
                    holders.setdefault(id(p), []).append((module, attr))
    originals: dict[str, Tensor] = {}
    for name, p in list(model.named_parameters()):
        if id(p) not in holders:
            continue
        compute = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        for module, attr in holders[id(p)]:
            setattr(module, attr, compute)
        originals[name] = p.detach()
    return originals


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW whose fp32 master weights live here while the model computes with bf16 copies.

    Construct it before the model's first forward (after wrapping or compiling is fine:
    compilation is lazy). It replaces every ``nn.Linear`` weight and bias by a bf16 parameter, so
    the forward needs no casts. Its state dict has ``torch.optim.AdamW``'s layout over
    ``model.parameters()``, so checkpoints move freely between the two; ``master_state_dict()`` is
    the model's state dict in fp32.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        compute_dtype: torch.dtype = torch.bfloat16,
        accumulate_fp32: bool = False,
    ):
        self.model = model
        for name, p in model.named_parameters():
            if p.dtype != torch.float32:
                raise ValueError(
                    "MasterWeightAdamW needs fp32 parameters to keep as masters; "
                    f"{name} is {p.dtype}"
                )
        originals = swap_in_compute_weights(model, compute_dtype)
        self.names: list[str] = []
        self.masters: list[Tensor] = []
        self.copies: list[Tensor | None] = []
        params: list[nn.Parameter] = []  # what the model computes with (and gets gradients for)
        for name, p in model.named_parameters():
            params.append(p)
            self.names.append(name)
            self.masters.append(originals.get(name, p.detach()))
            self.copies.append(p.data if name in originals else None)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        device = self.masters[0].device
        self.exp_avgs = [torch.zeros_like(m) for m in self.masters]
        self.exp_avg_sqs = [torch.zeros_like(m) for m in self.masters]
        # What the update reads and writes besides the gradient, as flat views made once: these
        # tensors live as long as the optimizer (checkpoints are copied into them), so the training
        # step builds none.
        self._flat_state = [
            (_flat(p), _flat(m), _flat(v), None if c is None else _flat(c))
            for p, m, v, c in zip(self.masters, self.exp_avgs, self.exp_avg_sqs, self.copies)
        ]
        self.step_count = 0
        # Decay, step size, square root of bias correction 2, clip factor.
        self._scalars = torch.ones(4, device=device)
        # fp32 sums of the bf16 gradients of a step's micro-batches (accumulate_fp32), from hooks.
        self._sums: list[Tensor | None] = [None] * len(params)
        if accumulate_fp32:
            for i, (p, copy) in enumerate(zip(params, self.copies)):
                if copy is not None and p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._summer(i))
        self._update: Callable[..., None] = _adamw_tensor_
        if device.type == "cuda":
            # One fused kernel per tensor: reads master, gradient and moments, writes them and the
            # bf16 copy. Compiled for 1-D tensors of any length (step passes flat views), so a model
            # compiles about three variants (dynamo tells flat views of 1-D and 2-D tensors apart,
            # and tensors with and without a copy) whatever its number of tensors.
            self._update = torch.compile(_adamw_tensor_, fullgraph=True, dynamic=True)

    @property
    def params(self) -> list[nn.Parameter]:
        return self.param_groups[0]["params"]

    def _summer(self, i: int) -> Callable[[Tensor], None]:
        def add_to_sum(p: Tensor) -> None:
            assert p.grad is not None
            with torch.no_grad():
                if self._sums[i] is None:
                    self._sums[i] = p.grad.float()
                else:
                    self._sums[i].add_(p.grad)  # type: ignore[union-attr]
            p.grad = None

        return add_to_sum

    def _gradients(self) -> dict[int, Tensor]:
        """Each parameter's gradient for this step by position: its fp32 sum, or its ``.grad``."""
        grads = {}
        for i, p in enumerate(self.params):
            g = self._sums[i] if self._sums[i] is not None else p.grad
            if g is not None:
                grads[i] = g
        return grads

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_``'s global norm, in fp32; the scaling happens inside the
        next ``step``."""
        grads = list(self._gradients().values())
        if not grads:
            return torch.zeros((), device=self._scalars.device)
        total = torch.linalg.vector_norm(
            torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32))
        )
        self._scalars[3].copy_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        grads = self._gradients()
        if not grads:
            return
        group = self.param_groups[0]
        self.step_count += 1
        lr, (beta1, beta2) = group["lr"], group["betas"]
        scalars = [
            1 - lr * group["weight_decay"],
            lr / (1 - beta1**self.step_count),
            (1 - beta2**self.step_count) ** 0.5,
        ]
        for slot, value in zip(self._scalars, scalars):
            slot.fill_(value)  # a kernel argument: no host-to-device copy, no synchronisation
        decay, step_size, bias2_sqrt, clip = self._scalars.unbind()
        constants = (decay, step_size, bias2_sqrt, clip, beta1, beta2, group["eps"])
        for i, grad in grads.items():
            master, exp_avg, exp_avg_sq, copy = self._flat_state[i]
            flat = (master, _flat(grad), exp_avg, exp_avg_sq, copy)
            try:
                self._update(*flat, *constants)
            # Compilation failed (no Triton for this GPU, ...): this tensor is still untouched.
            except Exception as err:
                if self._update is _adamw_tensor_:
                    raise
                warnings.warn(
                    f"MasterWeightAdamW: torch.compile of the update failed ({type(err).__name__}: "
                    f"{err}); running it uncompiled, which is slower",
                    stacklevel=2,
                )
                self._update = _adamw_tensor_
                self._update(*flat, *constants)
        self._scalars[3].fill_(1.0)  # a clip factor holds for one step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._scalars[3].fill_(1.0)  # a clip factor of a skipped step must not reach the next one
        self._sums = [None] * len(self._sums)
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def master_state_dict(self) -> dict[str, Tensor]:
        """The model's state dict with the fp32 masters in place of the bf16 copies."""
        state = self.model.state_dict()
        state.update(zip(self.names, self.masters))
        return state

    @torch.no_grad()
    def load_master_state_dict(self, state: dict[str, Tensor]) -> None:
        """Loads fp32 weights into the masters, and into the model as the masters rounded."""
        self.model.load_state_dict(state, strict=True)
        for name, master in zip(self.names, self.masters):
            master.copy_(state[name])

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``torch.optim.AdamW``'s layout: per-parameter state by position in
        ``model.parameters()``."""
        step = torch.tensor(float(self.step_count))
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        state = (
            {
                i: {"step": step.clone(), "exp_avg": m, "exp_avg_sq": v}
                for i, (m, v) in enumerate(zip(self.exp_avgs, self.exp_avg_sqs))
            }
            if self.step_count
            else {}
        )
        return {
            "state": state,
            "param_groups": [{**group, "params": list(range(len(self.params)))}],
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        (saved,) = state_dict["param_groups"]
        if len(saved["params"]) != len(self.params):
            raise ValueError(
                f"optimizer state for {len(saved['params'])} parameters, this model has "
                f"{len(self.params)}"
            )
        group = self.param_groups[0]
        group.update(
            {
                k: v
                for k, v in saved.items()
                if k in ("lr", "betas", "eps", "weight_decay", "initial_lr")
            }
        )
        self.step_count = 0
        for position, i in enumerate(saved["params"]):
            s = state_dict["state"].get(i)
            if s:
                self.exp_avgs[position].copy_(s["exp_avg"])
                self.exp_avg_sqs[position].copy_(s["exp_avg_sq"])
                self.step_count = int(s["step"])
