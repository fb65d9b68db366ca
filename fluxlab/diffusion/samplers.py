"""Sampling as plain functions over a velocity callable (k-diffusion style: one signature, a callback)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fluxlab.diffusion.flow import resolution_mu, time_shift

Velocity = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor], None]


def get_schedule(
    num_steps: int,
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift: bool = True,
) -> list[float]:
    """FLUX's times: linspace(1, 0, steps+1), shifted by mu(image_seq_len) unless ``shift`` is False (schnell)."""
    if num_steps < 1:
        raise ValueError(f"sampling needs at least one step, got steps={num_steps}")
    timesteps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        mu = resolution_mu(image_seq_len, y1=base_shift, y2=max_shift)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def euler(
    velocity: Velocity,
    x: Tensor,
    timesteps: list[float],
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Integrates dx/dt = v(x, t) from timesteps[0] (noise) to timesteps[-1] (data)."""
    steps = list(zip(timesteps[:-1], timesteps[1:]))
    for i, (t_curr, t_prev) in enumerate(
        tqdm(steps, desc="sampling", disable=not progress, leave=False)
    ):
        t_vec = torch.full((x.shape[0],), t_curr, dtype=x.dtype, device=x.device)
        x = x + (t_prev - t_curr) * velocity(x, t_vec)
        if callback is not None:
            callback(i, x)
    return x


def heun(
    velocity: Velocity,
    x: Tensor,
    timesteps: list[float],
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Second-order Heun; the last step (to t = 0) is plain Euler, as in k-diffusion."""
    steps = list(zip(timesteps[:-1], timesteps[1:]))
    for i, (t_curr, t_prev) in enumerate(
        tqdm(steps, desc="sampling", disable=not progress, leave=False)
    ):
        t_vec = torch.full((x.shape[0],), t_curr, dtype=x.dtype, device=x.device)
        v = velocity(x, t_vec)
        x_next = x + (t_prev - t_curr) * v
        if t_prev > 0:
            v_next = velocity(x_next, torch.full_like(t_vec, t_prev))
            x_next = x + (t_prev - t_curr) * 0.5 * (v + v_next)
        x = x_next
        if callback is not None:
            callback(i, x)
    return x


def classifier_free_guidance(cond: Velocity, uncond: Velocity, scale: float) -> Velocity:
    """v = v_uncond + scale·(v_cond − v_uncond); scale 1 is the conditional model alone."""
    if scale == 1.0:
        return cond

    def guided(x: Tensor, t: Tensor) -> Tensor:
        v_u = uncond(x, t)
        return v_u + scale * (cond(x, t) - v_u)

    return guided
