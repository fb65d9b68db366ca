"""AdamW stepped block by block during the backward pass, overlapping the optimizer with the GEMMs.

A training step of a large Flux ends with AdamW reading and writing every fp32 parameter and both
moments (28 bytes a parameter, pure memory traffic) while the GPU's tensor cores sit idle. Each
block's gradients are final as soon as the backward pass has left that block, so its update can
start then, on a side CUDA stream, while the backward pass computes the blocks before it. This is
torchtitan's "optimizer in backward" idea, kept to plain ``torch.optim.AdamW`` (fused) per block, so
each update is the same arithmetic as one AdamW over all parameters. What it buys:
docs/performance.md.

It needs every gradient to be final after one backward: no gradient clipping by the global norm
(which needs all gradients first) and no gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class BlockwiseAdamW:
    """One AdamW per parameter group, each stepped as soon as the group's last gradient has arrived.

    Call ``finish()`` after ``loss.backward()``: it makes the default stream wait for the updates
    (the next forward reads the parameters) and re-arms the hooks. ``param_groups`` exposes every
    group's settings so an LR schedule can set ``lr`` on all of them."""

    def __init__(self, groups: list[list[nn.Parameter]], **adamw: Any):
        groups = [g for g in groups if g]
        self.optimizers = [torch.optim.AdamW(g, **adamw) for g in groups]
        cuda = groups[0][0].is_cuda
        self.stream = torch.cuda.Stream(device=groups[0][0].device) if cuda else None
        self._left: list[int] = []
        for i, opt in enumerate(self.optimizers):
            for p in opt.param_groups[0]["params"]:
                p.register_post_accumulate_grad_hook(self._hook(i))
        self._rearm()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def _rearm(self) -> None:
        self._left = [len(opt.param_groups[0]["params"]) for opt in self.optimizers]

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def on_gradient(_: torch.Tensor) -> None:
            self._left[index] -= 1
            if self._left[index] == 0:
                self._step(self.optimizers[index])

        return on_gradient

    def _step(self, opt: torch.optim.Optimizer) -> None:
        params = opt.param_groups[0]["params"]
        if self.stream is None:
            opt.step()
        else:
            # The backward's stream wrote the gradients: the update must see them complete.
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                opt.step()
            for p in params:
                # Freed below while the side stream may still read it: no early reuse.
                p.grad.record_stream(self.stream)
        for p in params:
            p.grad = None

    def finish(self) -> None:
        if any(self._left):
            missing = sum(self._left)
            self._rearm()
            raise RuntimeError(
                f"{missing} parameters got no gradient in this backward pass; BlockwiseAdamW "
                "needs every parameter to take part in every step"
            )
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
        self._rearm()

    def state_dict(self) -> list[dict[str, Any]]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)


def block_groups(blocks: list[nn.Module], model: nn.Module) -> list[list[nn.Parameter]]:
    """One group per block, then one for the parameters outside the blocks (embedders, final
    layer)."""
    groups = [[p for p in b.parameters() if p.requires_grad] for b in blocks]
    in_blocks = {id(p) for g in groups for p in g}
    return [*groups, [p for p in model.parameters() if p.requires_grad and id(p) not in in_blocks]]
