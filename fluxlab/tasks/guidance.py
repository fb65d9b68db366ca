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


def sampling_scales(
    cfg: Config,
    params: FluxParams,
    guidance: float | None,
    negative_prompt: str | None,
    true_cfg: float | None,
    distilled: bool,
) -> tuple[float, float]:
    """(CFG scale, embedded guidance) for sampling a checkpoint with ``--guidance``,
    ``--negative-prompt`` and ``--true-cfg``.

    A guidance-embedded model takes ``--guidance`` through its embedding, one pass per step; only
    ``--true-cfg`` adds a second, unconditional pass. Otherwise ``--guidance`` is the CFG scale.
    """
    if not params.guidance_embed:
        if true_cfg is not None:
            raise ValueError(
                "--true-cfg is for guidance-embedded models; this one has no guidance input, so "
                "--guidance is its classifier-free guidance scale"
            )
        return (guidance if guidance is not None else cfg.sample.guidance), sampling_guidance(cfg)
    embedded = guidance if guidance is not None else sampling_guidance(cfg)
    if distilled and (negative_prompt or true_cfg is not None):
        raise ValueError(
            "this checkpoint was distilled from its teacher's classifier-free guidance: it takes "
            "--guidance through its embedding in one pass per step and never learned an "
            "unconditional branch, so --negative-prompt and --true-cfg have nothing to act on; "
            "drop them (sample the teacher for true CFG)"
        )
    if negative_prompt and true_cfg is None:
        raise ValueError(
            "--negative-prompt acts through classifier-free guidance, which a guidance-embedded "
            "model does not run by default: add --true-cfg SCALE (two passes per step)"
        )
    return (true_cfg if true_cfg is not None else 1.0), embedded
