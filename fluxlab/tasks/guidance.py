"""The guidance strength a guidance-embedded Flux (FLUX.1-dev, Kontext-dev) is trained and
sampled with.

Such a model takes the distilled-guidance strength as an input beside t. Training feeds
``objective.train_guidance``, a constant or a per-sample draw from a range (through the
per-sample generators, so any world size draws the same); sampling feeds
``sample.distilled_guidance``, by default what the model was trained with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fluxlab.config.schema import Config
from fluxlab.models.flux.model import FluxParams
from fluxlab.train import rng
from fluxlab.train.rng import SampleGenerators


def training_guidance(
    cfg: Config,
    params: FluxParams,
    n: int,
    generator: torch.Generator | SampleGenerators | None,
    device: torch.device,
) -> Tensor | None:
    """Guidance strengths [n] for a training batch; None for a model without the embedding.

    Only a range draws from ``generator``, so constant-guidance and guidance-free runs keep the
    random streams they had."""
    if not params.guidance_embed:
        return None
    low, high = cfg.objective.guidance_range()
    if low == high:
        return torch.full((n,), low, device=device)
    return low + (high - low) * rng.rand(n, generator, device)


def sampling_guidance(cfg: Config) -> float:
    """``sample.distilled_guidance``, else the training guidance (a range's midpoint)."""
    if cfg.sample.distilled_guidance is not None:
        return cfg.sample.distilled_guidance
    low, high = cfg.objective.guidance_range()
    return (low + high) / 2


def guidance_description(cfg: Config, params: FluxParams) -> dict[str, Any]:
    """What a checkpoint records about guidance: the training range of an embedded model."""
    if not params.guidance_embed:
        return {}
    return {"train_guidance": list(cfg.objective.guidance_range())}
