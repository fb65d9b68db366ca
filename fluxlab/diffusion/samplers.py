"""Samplers as plain functions over a ``predict(x, t)`` callable (k-diffusion style), and
``sample``, the one dispatch from a sampler's name that every pipeline and task calls."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fluxlab.diffusion.ddpm import Callback, DDPMObjective, Spacing, ddim_sample, ddpm_sample
from fluxlab.diffusion.flow import Predict, resolution_mu, time_shift


def get_schedule(
    num_steps: int,
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift: bool = True,
) -> list[float]:
    """FLUX's times: linspace(1, 0, steps + 1), shifted by mu(image_seq_len) unless ``shift`` is
    False (schnell)."""
    if num_steps < 1:
        raise ValueError(f"sampling needs at least one step, got steps={num_steps}")
    timesteps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        mu = resolution_mu(image_seq_len, y1=base_shift, y2=max_shift)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def euler(
    velocity: Predict,
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
    velocity: Predict,
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


def sample(
    sampler: str,
    predict: Predict,
    noise: Tensor,
    steps: int,
    *,
    image_seq_len: int,
    shift: bool = True,
    ddpm: DDPMObjective | None = None,
    eta: float = 0.0,
    spacing: Spacing = "trailing",
    clip_x0: float | None = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """The sample that ``sampler`` reaches from ``noise`` in ``steps`` steps of ``predict``.

    A velocity model (``ddpm`` None) takes "euler" or "heun" over FLUX's schedule for
    ``image_seq_len`` tokens (resolution-shifted when ``shift``). A model trained by ``ddpm``
    (its ε/v/x0 output) takes "ddim" (noise ``eta``) or "ddpm" over timesteps of ``spacing``, with
    x0 clipped to ±``clip_x0`` (1: pixels live in [-1, 1], as ADM's clip_denoised) and sampler
    noise drawn from ``generator``. ``callback(i, x)`` sees x after step i.
    """
    if ddpm is None:
        integrate = {"euler": euler, "heun": heun}.get(sampler)
        if integrate is None:
            raise ValueError(
                f"sampler {sampler!r} does not sample a flow model; choose euler or heun"
            )
        timesteps = get_schedule(steps, image_seq_len, shift=shift)
        return integrate(predict, noise, timesteps, callback=callback, progress=progress)
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler {sampler!r} does not sample a DDPM model; choose ddim or ddpm")
    common = dict(
        schedule=ddpm.schedule.to(noise.device),
        spacing=spacing,
        prediction=ddpm.prediction,
        clip_x0=clip_x0,
        callback=callback,
        generator=generator,
        progress=progress,
    )
    if sampler == "ddim":
        return ddim_sample(predict, noise, steps, eta, **common)
    return ddpm_sample(predict, noise, steps=steps, **common)
