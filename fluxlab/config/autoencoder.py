"""Checks and loading for ``fluxlab train-ae`` (its ``ae`` section is ``schema.AEConfig``).

An AE run reuses the ``data`` section (dataset, resolution, val_fraction, limit, ...) and ``train``
(output_dir, seed, device, mixed_precision, log_every, checkpoint_every, keep_last, tensorboard,
threads); everything about the autoencoder and its optimisation lives here, so a Flux run's optim
section is untouched.
"""

from __future__ import annotations

import math

from fluxlab.config.loading import config_data, config_from_dict
from fluxlab.config.presets import AE_TRAIN_PRESETS
from fluxlab.config.schema import Config
from fluxlab.config.sections import check_step_intervals
from fluxlab.models.autoencoder import AutoEncoderParams, ae_params


def ae_params_from_config(cfg: Config) -> AutoEncoderParams:
    """The preset's architecture with the overrides, at data.resolution, scale 1 / shift 0 until
    measured."""
    a = cfg.ae
    base = ae_params(a.preset)
    overrides = {
        k: getattr(a, k)
        for k in ("ch", "ch_mult", "num_res_blocks", "z_channels")
        if getattr(a, k) is not None
    }
    fields = {
        **base.__dict__,
        **overrides,
        "resolution": cfg.data.resolution,
        "scale_factor": 1.0,
        "shift_factor": 0.0,
    }
    try:
        return AutoEncoderParams(**fields)
    except ValueError as err:
        raise ValueError(
            f"ae section (preset {a.preset!r} with overrides {overrides}): {err}"
        ) from None


def validate_ae(cfg: Config) -> None:
    """What train-ae needs; raised before any work starts."""
    a = cfg.ae
    params = ae_params_from_config(
        cfg
    )  # unknown preset, GroupNorm widths, resolution vs downsampling
    check_step_intervals(
        cfg.train, ("log_every", "checkpoint_every")
    )  # train-ae's sampling is ae.eval_every
    if a.kl_weight < 0 or a.perceptual_weight < 0:
        raise ValueError(
            "ae.kl_weight and ae.perceptual_weight must be ≥ 0 (1e-6 and 0 are the defaults)"
        )
    if not math.isfinite(a.lr) or a.lr <= 0 or a.batch_size < 1 or a.steps < 1:
        raise ValueError(
            "ae.lr must be positive and finite, and ae.batch_size, ae.steps at least 1"
        )
    if not (math.isfinite(a.grad_clip) and a.grad_clip > 0):
        raise ValueError(
            f"ae.grad_clip={a.grad_clip} must be a positive, finite number: gradients are rescaled "
            "to at most this norm, so 0 would zero them and a negative value flip them; a large "
            "value such as 1e9 leaves them unclipped"
        )
    if a.eval_every < 0 or a.val_images < 1 or a.stats_images < 1 or a.warmup_steps < 0:
        raise ValueError(
            "ae.eval_every and ae.warmup_steps must be ≥ 0, ae.val_images and ae.stats_images ≥ 1"
        )
    if not 0 < cfg.data.val_fraction < 1:
        raise ValueError(
            f"data.val_fraction={cfg.data.val_fraction}: train-ae measures PSNR on held-out "
            "images; use e.g. 0.05"
        )
    if cfg.data.task != "text_to_image":
        raise ValueError("train-ae reads plain images: set data.task=text_to_image")
    if cfg.data.resolution % params.downsample_factor:
        raise ValueError(
            f"data.resolution={cfg.data.resolution} must be a multiple of "
            f"{params.downsample_factor}"
        )


def load_ae_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """An AE preset (``ae-tiny``, ``ae-openmoji``, ``ae-openmoji-256``) or a YAML file (``base:``
    may name one), then overrides."""
    data = config_data(name_or_path, AE_TRAIN_PRESETS, overrides)
    cfg = config_from_dict(data)
    validate_ae(cfg)
    return cfg
