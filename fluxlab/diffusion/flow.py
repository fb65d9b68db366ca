"""Rectified flow: x_t = (1 − t)·x0 + t·ε, the model regresses the velocity ε − x0.

An objective exposes ``loss(predict, x0, generator) -> (per-sample loss [B], t [B])`` where
``predict(x_t, t)`` is the model with its conditioning bound; the DDPM objective has the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fluxlab.train import rng

# predict(x_t, t): the model with its conditioning bound (velocity, or ε/v/x0 under DDPM).
Predict = Callable[[Tensor, Tensor], Tensor]


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """FLUX/SD3 resolution shift: spends more of the schedule at high noise when mu > 0."""
    t = t.double() if t.dtype == torch.float64 else t.float()
    out = math.exp(mu) / (math.exp(mu) + (1.0 / t.clamp_min(1e-30) - 1.0) ** sigma)
    return torch.where(t > 0, out, torch.zeros_like(out))


def resolution_mu(
    image_seq_len: int, x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15
) -> float:
    """The shift mu, linear in the number of image tokens between (256, 0.5) and (4096, 1.15)."""
    slope = (y2 - y1) / (x2 - x1)
    return slope * image_seq_len + (y1 - slope * x1)


@dataclass(kw_only=True)
class RectifiedFlow:
    t_sampler: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: bool = False  # apply the resolution shift to training times (FLUX-dev style)

    def __post_init__(self) -> None:
        if self.t_sampler not in ("uniform", "logit_normal"):
            raise ValueError(
                f"objective.t_sampler={self.t_sampler!r}: choose 'uniform' or 'logit_normal'"
            )
        if self.logit_std <= 0:
            raise ValueError(f"objective.logit_std={self.logit_std} must be positive")

    def sample_t(
        self,
        batch: int,
        seq_len: int,
        device: torch.device,
        generator: torch.Generator | rng.SampleGenerators | None,
    ) -> Tensor:
        if self.t_sampler == "uniform":
            t = rng.rand(batch, generator, device)
        else:
            t = torch.sigmoid(
                self.logit_mean + self.logit_std * rng.randn((batch,), generator, device)
            )
        if self.shift:
            t = time_shift(resolution_mu(seq_len), 1.0, t)
        return t

    @staticmethod
    def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        t_ = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - t_) * x0 + t_ * noise

    def loss(
        self,
        predict: Predict,
        x0: Tensor,
        generator: torch.Generator | rng.SampleGenerators | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        teacher: Predict | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample MSE between the predicted and the true velocity, and t.

        ``t`` [B] and ``noise`` (shaped like x0) are drawn from ``generator`` unless given; giving
        both makes the loss a deterministic measurement (validation at fixed timesteps).
        ``teacher(x_t, t)``, when given, is the target instead of ε − x0 (distillation).
        """
        if t is None:
            seq_len = x0.shape[1] if x0.ndim == 3 else x0[0].numel()
            t = self.sample_t(x0.shape[0], seq_len, x0.device, generator)
        if noise is None:
            noise = rng.randn(x0.shape, generator, x0.device, x0.dtype)
        if t.shape != (x0.shape[0],) or noise.shape != x0.shape:
            raise ValueError(
                f"t must be [{x0.shape[0]}] and noise {tuple(x0.shape)}; got {tuple(t.shape)} and "
                f"{tuple(noise.shape)}"
            )
        t, noise = t.to(x0.device), noise.to(x0.device, x0.dtype)
        x_t = self.interpolate(x0, noise, t)
        target = noise - x0 if teacher is None else teacher(x_t, t)
        pred = predict(x_t, t)
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        return per_sample, t
