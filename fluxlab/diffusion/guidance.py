"""Classifier-free guidance (Ho & Salimans): ``v = v_uncond + scale · (v_cond − v_uncond)``.

The one guidance function of every pipeline and task. Both predictions come from a single
forward over a doubled batch ``[x; x]`` whose first half is conditioned and second half
unconditional (empty prompt, null class): one model call per step instead of two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fluxlab.diffusion.flow import Predict


def classifier_free_guidance(
    conditional: Predict, paired: Predict, scale: float | Tensor
) -> Predict:
    """The guided ``predict(x, t)``; ``scale`` 1 is ``conditional`` itself (one pass, no doubling).
    A tensor ``scale`` [B] guides each sample by its own scale (guidance distillation's targets).

    ``conditional(x, t)`` is the model with the condition bound. ``paired(x2, t2)`` is the model
    over ``x2 = [x; x]``, ``t2 = [t; t]`` with rows ``[:B]`` conditioned, ``[B:]`` unconditional.
    """
    if not isinstance(scale, Tensor) and scale == 1.0:
        return conditional

    def guided(x: Tensor, t: Tensor) -> Tensor:
        cond, uncond = paired(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        s = scale.view(-1, *[1] * (cond.ndim - 1)) if isinstance(scale, Tensor) else scale
        return uncond + s * (cond - uncond)

    return guided
