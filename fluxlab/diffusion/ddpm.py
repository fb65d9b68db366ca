"""Discrete-time DDPM: beta schedules, the noise-prediction objective and DDPM / DDIM samplers.

Time convention shared with the flow side: models see ``t_model = t_int / T`` in [0, 1) and scale
it by 1000 inside their timestep embedding, so a DiT here embeds the same integer t as the original
DiT. Schedule tables are kept in float64 (as the original DiT / ADM code does) and only the
per-step coefficients are cast to the sample's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fluxlab.diffusion.flow import Predict
from fluxlab.train import rng

BetaSchedule = Literal["linear", "cosine"]
Prediction = Literal["epsilon", "v", "x0"]
Spacing = Literal["leading", "linspace", "trailing"]
Callback = Callable[[int, Tensor], None]  # callback(step index, x after that step)

_PREDICTIONS = ("epsilon", "v", "x0")


def make_betas(schedule: BetaSchedule, num_timesteps: int = 1000) -> Tensor:
    """float64 betas: ``linear`` (DDPM, 1e-4 -> 0.02) or ``cosine`` (Nichol & Dhariwal)."""
    if schedule == "linear":
        # Ho et al. tuned 1e-4 .. 0.02 for T = 1000; rescaling keeps other T comparable (as ADM).
        scale = 1000 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if schedule == "cosine":

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"Unknown beta schedule {schedule!r}; use 'linear' or 'cosine'.")


def _check_prediction(prediction: str) -> None:
    if prediction not in _PREDICTIONS:
        raise ValueError(
            f"Unknown prediction {prediction!r}; use one of {', '.join(_PREDICTIONS)}."
        )


def _bcast(value: Tensor, like: Tensor) -> Tensor:
    """Per-sample coefficients [B] (or a scalar) -> broadcastable against ``like``, in its dtype."""
    value = value.to(device=like.device, dtype=like.dtype)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim))


class DDPMSchedule(nn.Module):
    """The fixed forward process: betas, alphas_cumprod and everything derived from them.

    An ``nn.Module`` only so ``.to(device)`` moves the tables; the buffers are non-persistent
    because they are a pure function of ``(schedule, num_timesteps)``: not checkpoint material.
    """

    betas: Tensor
    alphas_cumprod: Tensor

    def __init__(self, schedule: BetaSchedule = "linear", num_timesteps: int = 1000) -> None:
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps}.")
        self.schedule = schedule
        self.num_timesteps = num_timesteps
        betas = make_betas(schedule, num_timesteps)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0), persistent=False)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, num_timesteps={self.num_timesteps}"

    def alpha_bar(self, t: Tensor | int) -> Tensor:
        """ᾱ_t in float64; t < 0 is "before the first step", ᾱ = 1 (diffusers' set_alpha_to_one)."""
        table = self.alphas_cumprod
        if isinstance(t, int):
            return table[t] if t >= 0 else table.new_ones(())
        t = t.to(table.device).long()
        return torch.where(t >= 0, table[t.clamp(min=0)], torch.ones_like(table[0]))

    def snr(self, t: Tensor | int) -> Tensor:
        a = self.alpha_bar(t)
        return a / (1 - a)

    def to_model_time(self, t: Tensor) -> Tensor:
        """Integer timesteps -> the float32 t in [0, 1) the models take (they scale it by 1000)."""
        return t.float() / self.num_timesteps

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, with t a LongTensor [B]."""
        a = self.alpha_bar(t)
        return _bcast(a.sqrt(), x0) * x0 + _bcast((1 - a).sqrt(), x0) * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v-prediction target v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0 (Salimans & Ho)."""
        a = self.alpha_bar(t)
        return _bcast(a.sqrt(), x0) * noise - _bcast((1 - a).sqrt(), x0) * x0

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction: Prediction) -> Tensor:
        _check_prediction(prediction)
        if prediction == "epsilon":
            return noise
        if prediction == "x0":
            return x0
        return self.velocity(x0, noise, t)

    def to_x0_eps(
        self, model_output: Tensor, t: Tensor | int, x_t: Tensor, prediction: Prediction
    ) -> tuple[Tensor, Tensor]:
        """Turn any of the three parameterisations into the pair (x0, ε) at x_t."""
        _check_prediction(prediction)
        a = self.alpha_bar(t)
        sa, s1a = _bcast(a.sqrt(), x_t), _bcast((1 - a).sqrt(), x_t)
        if prediction == "epsilon":
            return (x_t - s1a * model_output) / sa, model_output
        if prediction == "x0":
            return model_output, (x_t - sa * model_output) / s1a
        return sa * x_t - s1a * model_output, s1a * x_t + sa * model_output

    def ddpm_step(
        self,
        model_output: Tensor,
        t: int,
        x_t: Tensor,
        noise: Tensor | None = None,
        *,
        t_prev: int | None = None,
        prediction: Prediction = "epsilon",
        clip_x0: float | None = None,
    ) -> Tensor:
        """Ancestral step x_t -> x_{t_prev} from the posterior q(x_prev | x_t, x0) with the
        "fixed_small" variance β̃ = (1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev).
        No noise is added at t = 0."""
        t_prev = t - 1 if t_prev is None else t_prev
        x0, _ = self.to_x0_eps(model_output, t, x_t, prediction)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t
        coef_x0 = a_prev.sqrt() * beta_t / (1 - a_t)
        coef_xt = alpha_t.sqrt() * (1 - a_prev) / (1 - a_t)
        mean = _bcast(coef_x0, x_t) * x0 + _bcast(coef_xt, x_t) * x_t
        if t == 0:
            return mean
        if noise is None:
            raise ValueError(f"ddpm_step at t={t} adds noise; pass `noise` shaped like x_t.")
        var = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
        return mean + _bcast(var.sqrt(), x_t) * noise

    def ddim_step(
        self,
        model_output: Tensor,
        t: int,
        t_prev: int,
        x_t: Tensor,
        eta: float = 0.0,
        noise: Tensor | None = None,
        *,
        prediction: Prediction = "epsilon",
        clip_x0: float | None = None,
    ) -> Tensor:
        """DDIM update (Song et al. eq. 12); eta = 0 is deterministic, eta = 1 has DDPM's variance.
        t_prev < 0 lands on the clean sample (ᾱ = 1)."""
        x0, eps = self.to_x0_eps(model_output, t, x_t, prediction)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt()
        x_prev = _bcast(a_prev.sqrt(), x_t) * x0 + _bcast(direction, x_t) * eps
        if eta > 0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 adds noise; pass `noise` shaped like x_t.")
            x_prev = x_prev + _bcast(sigma, x_t) * noise
        return x_prev


def min_snr_weight(snr: Tensor, gamma: float, prediction: Prediction) -> Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), expressed for each parameterisation so that
    all three equal min(SNR, γ)·‖x0 error‖²."""
    _check_prediction(prediction)
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


def _randn(
    shape: torch.Size, like: Tensor, generator: torch.Generator | rng.SampleGenerators | None
) -> Tensor:
    """Gaussian noise drawn on the generator's device: a CPU generator reproduces on any device."""
    return rng.randn(shape, generator, like.device, like.dtype)


class DDPMObjective:
    """Noise-prediction training loss: integer t ~ U{0..T-1}, noise x0, regress the target."""

    def __init__(
        self,
        schedule: DDPMSchedule | None = None,
        prediction: Prediction = "epsilon",
        loss: Literal["mse", "l1"] = "mse",
        min_snr_gamma: float | None = None,
    ) -> None:
        _check_prediction(prediction)
        if loss not in ("mse", "l1"):
            raise ValueError(f"Unknown loss {loss!r}; use 'mse' or 'l1'.")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(
                f"min_snr_gamma must be positive (5.0 is the paper's choice), got {min_snr_gamma}."
            )
        self.schedule = schedule if schedule is not None else DDPMSchedule()
        self.prediction: Prediction = prediction
        self.loss_type = loss
        self.min_snr_gamma = min_snr_gamma

    def sample_t(
        self,
        batch: int,
        device: torch.device,
        generator: torch.Generator | rng.SampleGenerators | None = None,
    ) -> Tensor:
        return rng.randint(self.schedule.num_timesteps, batch, generator, device)

    def weight(self, t: Tensor) -> Tensor:
        """Per-sample loss weights [B] (all ones without min-SNR)."""
        if self.min_snr_gamma is None:
            return torch.ones(
                t.shape, dtype=torch.float64, device=self.schedule.alphas_cumprod.device
            )
        return min_snr_weight(self.schedule.snr(t), self.min_snr_gamma, self.prediction)

    def loss(
        self,
        predict: Predict,
        x0: Tensor,
        generator: torch.Generator | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample loss [B] (mean over non-batch dims, float32) and the model time t_int / T [B].

        A given ``t`` is model time in [0, 1] (as returned), floored to an integer step; with
        ``noise`` too the loss is deterministic (validation at fixed timesteps).
        """
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        else:
            steps = self.schedule.num_timesteps
            t = (t.to(x0.device).double() * steps).long().clamp(0, steps - 1)
        noise = _randn(x0.shape, x0, generator) if noise is None else noise.to(x0.device, x0.dtype)
        self.schedule.to(x0.device)
        x_t = self.schedule.q_sample(x0, t, noise)
        t_model = self.schedule.to_model_time(t)
        out = predict(x_t, t_model)
        if out.shape != x0.shape:
            raise ValueError(
                f"The model returned {tuple(out.shape)} but the data is {tuple(x0.shape)}; "
                "DDPMObjective trains a fixed-variance model, so build the DiT with "
                "learn_sigma=False."
            )
        err = out.float() - self.schedule.target(x0, noise, t, self.prediction).float()
        err = err.square() if self.loss_type == "mse" else err.abs()
        per_sample = err.flatten(1).mean(dim=1) * self.weight(t).to(err)
        return per_sample, t_model


def ddim_timesteps(
    steps: int, spacing: Spacing = "leading", num_timesteps: int = 1000, steps_offset: int = 0
) -> list[int]:
    """Descending integer timesteps, the lists of diffusers' ``DDIMScheduler.set_timesteps``
    (Lin et al. 2023, table 2): 'leading' = 0, k, 2k..; 'trailing' ends at T−1; 'linspace' spans
    both ends."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(
            f"steps must be between 1 and {num_timesteps} (the training timesteps), got {steps}."
        )
    if spacing == "leading":
        ts = np.arange(steps) * (num_timesteps // steps) + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, num_timesteps - 1, steps).round()
    elif spacing == "trailing":
        ts = (np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)) - 1)[::-1]
    else:
        raise ValueError(
            f"Unknown timestep spacing {spacing!r}; use 'leading', 'linspace' or 'trailing'."
        )
    return [int(v) for v in ts.astype(np.int64)[::-1]]


def _eps_channels(out: Tensor, x: Tensor) -> Tensor:
    # A learn_sigma model (e.g. an original DiT checkpoint) returns [mean, variance] channels; the
    # fixed-variance samplers here only use the mean half.
    if out.shape[1] == 2 * x.shape[1]:
        return out[:, : x.shape[1]]
    if out.shape != x.shape:
        raise ValueError(
            f"The model returned {tuple(out.shape)} for a sample of {tuple(x.shape)}; it must "
            "return the sample's shape (or twice its channels for a learn_sigma model)."
        )
    return out


def _model_time(t: int, x: Tensor, schedule: DDPMSchedule) -> Tensor:
    return torch.full(
        (x.shape[0],), t / schedule.num_timesteps, device=x.device, dtype=torch.float32
    )


@torch.no_grad()
def ddpm_sample(
    predict: Predict,
    x_T: Tensor,
    *,
    steps: int | None = None,
    spacing: Spacing = "trailing",
    schedule: DDPMSchedule | None = None,
    prediction: Prediction = "epsilon",
    clip_x0: float | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling through all T steps (``steps`` None or T), or through ``steps``
    timesteps of ``ddim_timesteps(steps, spacing)`` with the posterior between consecutive kept
    timesteps (the respacing of Nichol & Dhariwal §4). ``callback(i, x)`` sees x after step i."""
    schedule = schedule if schedule is not None else DDPMSchedule()
    n = schedule.num_timesteps
    ts = (
        list(range(n - 1, -1, -1))
        if steps is None or steps == n
        else ddim_timesteps(steps, spacing, n)
    )
    x = x_T
    for i, t in enumerate(tqdm(ts, desc="sampling", disable=not progress, leave=False)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        out = _eps_channels(predict(x, _model_time(t, x, schedule)), x)
        noise = _randn(x.shape, x, generator) if t > 0 else None
        x = schedule.ddpm_step(
            out, t, x, noise, t_prev=t_prev, prediction=prediction, clip_x0=clip_x0
        )
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def ddim_sample(
    predict: Predict,
    x_T: Tensor,
    steps: int = 50,
    eta: float = 0.0,
    *,
    schedule: DDPMSchedule | None = None,
    spacing: Spacing = "leading",
    prediction: Prediction = "epsilon",
    clip_x0: float | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM over ``ddim_timesteps(steps, spacing)``.

    Each step jumps to the next timestep of the list (the last one to ᾱ = 1). diffusers instead
    always jumps by T // steps: the same for 'leading', and for 'trailing' when T % steps == 0.
    """
    schedule = schedule if schedule is not None else DDPMSchedule()
    ts = ddim_timesteps(steps, spacing, schedule.num_timesteps)
    x = x_T
    for i, t in enumerate(tqdm(ts, desc="sampling", disable=not progress, leave=False)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        out = _eps_channels(predict(x, _model_time(t, x, schedule)), x)
        noise = _randn(x.shape, x, generator) if eta > 0 else None
        x = schedule.ddim_step(
            out, t, t_prev, x, eta, noise, prediction=prediction, clip_x0=clip_x0
        )
        if callback is not None:
            callback(i, x)
    return x
