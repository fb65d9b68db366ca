"""Named model presets, from a CPU-sized debug model to the full FLUX.1 transformers.

``in_channels``, ``context_in_dim`` and ``vec_in_dim`` of the small presets are placeholders: the
trainer sets them from the input encoding (pixel patches or latents) and the text encoder.
"""

from __future__ import annotations

from dataclasses import replace

from fluxlab.models.flux.model import FluxParams

FLUX_PRESETS: dict[str, FluxParams] = {
    "flux-dev": FluxParams(guidance_embed=True),
    "flux-schnell": FluxParams(guidance_embed=False),
    # The speed benchmark's 2.56B model: flux-dev's width with 4 double + 8 single blocks.
    "flux-2.56b": FluxParams(depth=4, depth_single_blocks=8, guidance_embed=True),
    "flux-base": FluxParams(
        hidden_size=768, num_heads=12, depth=6, depth_single_blocks=12, axes_dim=[8, 28, 28]
    ),
    "flux-small": FluxParams(
        hidden_size=384, num_heads=6, depth=4, depth_single_blocks=8, axes_dim=[8, 28, 28]
    ),
    "flux-tiny": FluxParams(
        hidden_size=192, num_heads=3, depth=2, depth_single_blocks=4, axes_dim=[8, 28, 28]
    ),
    "flux-debug": FluxParams(
        hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 14, 14]
    ),
}


def flux_params(name: str, **overrides: object) -> FluxParams:
    """A copy of preset ``name`` with ``overrides`` (None values ignored) applied and validated."""
    if name not in FLUX_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(FLUX_PRESETS)}")
    params = replace(FLUX_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    params.validate()
    return params
