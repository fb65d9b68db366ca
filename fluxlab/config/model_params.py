"""Model parameters from a config: the named size with the config's overrides, checked against the
data."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from fluxlab.models.dit import DIT_PRESETS, DiTParams

if TYPE_CHECKING:  # types only: the schema imports this module to validate
    from fluxlab.config.schema import Config

_FLUX_ONLY = ("depth_single_blocks", "axes_dim", "guidance_embed")


def dit_params(cfg: Config, num_classes: int) -> DiTParams:
    """The DiT for a config: ``model.preset`` from DIT_PRESETS, sized to the data, with model
    overrides."""
    m = cfg.model
    if m.preset not in DIT_PRESETS:
        raise ValueError(
            f"model.preset={m.preset!r} is not a DiT preset; choose one of {sorted(DIT_PRESETS)}"
        )
    if cfg.encoding.space != "pixel":
        raise ValueError("model.arch='dit' trains on pixels here; set encoding.space=pixel")
    base = DIT_PRESETS[m.preset]
    if cfg.encoding.patch_size != base.patch_size:
        raise ValueError(
            f"model.preset={m.preset!r} uses {base.patch_size}×{base.patch_size} patches but "
            f"encoding.patch_size={cfg.encoding.patch_size}; set "
            f"--encoding.patch_size={base.patch_size} "
            "or pick the DiT preset with the patch you want (e.g. DiT-S/4)"
        )
    flux_only = [k for k in _FLUX_ONLY if getattr(m, k) is not None]
    if flux_only:
        raise ValueError(f"model.{flux_only[0]} is a Flux setting; a DiT has no such field")
    sizes = {
        "hidden_size": m.hidden_size,
        "num_heads": m.num_heads,
        "depth": m.depth,
        "mlp_ratio": m.mlp_ratio,
    }
    return dataclasses.replace(
        base,
        input_size=cfg.data.resolution,
        in_channels=3,
        num_classes=num_classes,
        class_dropout_prob=0.0,  # the task drops labels itself, with the trainer's generator
        learn_sigma=False,
        **{k: v for k, v in sizes.items() if v is not None},
    )
