"""The 256² presets (docs/openmoji-256.md): the founding pipeline at its own resolution.

An 8×-down, 16-channel autoencoder trained on OpenMoji at 256² (``ae-openmoji-256``), a latent
FLUX on 2×2 patches of its 32×32×16 latents (``openmoji-256-gpu``: 256 tokens of 64 features,
FLUX.1's own setup) and the pixel-space variant of the founding sketch (``openmoji-256-pixel-gpu``:
8×8 RGB patches, 1024 tokens of 192 features) at the same GPU time. Every stage is time-bound by
``max_minutes`` (as openmoji-gpu is); ``steps`` is only a ceiling. Registered into ``PRESETS`` and
``AE_TRAIN_PRESETS`` by ``fluxlab.config.presets``.
"""

from __future__ import annotations

from typing import Any

RESOLUTION = 256
# Where `fluxlab train-ae --config ae-openmoji-256` writes; the latent preset reads it from there.
AE_RUN = "runs/ae-openmoji-256"
# Both transformers train for this long on one GPU: equal GPU time is the comparison. With the
# autoencoder's 4.5 minutes, the whole comparison (both trainings, grids and FID) fits one
# 30-minute GPU lease.
TRAIN_MINUTES = 6.0


def _data(**extra: Any) -> dict[str, Any]:
    """Every OpenMoji emoji at 256², with the default split (seed 0, 5 % of emoji held out), so the
    autoencoder's held-out PSNR and the transformers' FID are measured on the same unseen emoji."""
    return {"dataset": "openmoji", "resolution": RESOLUTION, "val_fraction": 0.05, **extra}


def _text() -> dict[str, Any]:
    return {"text_encoder": "minilm", "text_max_length": 16}


# FLUX trains with t shifted by the image's token count as it samples (mu 0.5 at 256 tokens, 0.63
# at 1024): a noise level hides less of a 256² image than of a 64² one (neighbours average it
# away), so the shift moves training towards the high noise where the layout is decided.
def _objective() -> dict[str, Any]:
    return {"kind": "flow", "t_sampler": "logit_normal", "shift": True}


def _sample() -> dict[str, Any]:
    return {"steps": 30, "guidance": 4.0}


# flux-small's steps are launch-bound on one GPU: per-block compile ran the latent preset at 12.5
# steps/s against 4.6 eager on an H100, after ~1 min of compiling (docs/openmoji-256.md).
def _compiled() -> dict[str, Any]:
    return {"compile": True}


PRESETS_256: dict[str, dict[str, Any]] = {
    # Latent FLUX at 256² from the cache (`fluxlab cache --config openmoji-256-gpu` first):
    # flux-small at batch 256 on 256 tokens is openmoji-gpu's model, batch and token count (12.5 min
    # → recognisable 64² emoji there), and the cache keeps the autoencoder out of the step, so the
    # 256² image costs the transformer what a 64² pixel image did. 6 min on one GPU.
    "openmoji-256-gpu": {
        "model": {"preset": "flux-small"},
        "data": _data(cache_dir="runs/openmoji-256-gpu-cache"),
        "encoding": {"space": "latent", "autoencoder": AE_RUN, "patch_size": 2, **_text()},
        "objective": _objective(),
        "optim": {
            "lr": 3e-4,
            "warmup_steps": 500,
            "batch_size": 256,
            "steps": 12000,  # a ceiling: compiled, ~3,900 fit in 6 min on an H100
            "ema_decay": 0.999,
        },
        "train": {
            "output_dir": "runs/openmoji-256-gpu",
            "max_minutes": TRAIN_MINUTES,
            "log_every": 50,
            "sample_every": 1000,
            "checkpoint_every": 1000,
            "eval_every": 1000,
        },
        "sample": _sample(),
        "parallel": _compiled(),
        # The posterior mean at bf16: 32 KiB per emoji, the whole set in ~150 MB.
        "cache": {"latents": "mean", "dtype": "bfloat16", "batch_size": 64, "shard_size": 1024},
    },
    # The founding sketch's pixel space at the same GPU time: 8×8 patches → 1024 tokens of 192
    # features. Four times the tokens cost flux-small 3.8× the FLOPs per image (133 against 35
    # GFLOP forward + backward), so half the latent batch keeps the number of updates from
    # collapsing (about half the latent run's); warm-up, EMA, sampling and evaluation are shortened
    # to match.
    "openmoji-256-pixel-gpu": {
        "model": {"preset": "flux-small"},
        # From a pixel cache too (`fluxlab cache --config openmoji-256-pixel-gpu`): the set at 256²
        # in float32 (3.5 GB) sits on the GPU, so no loader has to feed ~1,000 images a second
        # and both variants read their data the same way.
        "data": _data(cache_dir="runs/openmoji-256-pixel-gpu-cache", num_workers=8),
        "encoding": {"space": "pixel", "patch_size": 8, **_text()},
        "objective": _objective(),
        "optim": {
            "lr": 3e-4,
            "warmup_steps": 250,
            "batch_size": 128,
            "steps": 8000,
            "ema_decay": 0.998,
        },
        "train": {
            "output_dir": "runs/openmoji-256-pixel-gpu",
            "max_minutes": TRAIN_MINUTES,
            "log_every": 25,
            "sample_every": 500,
            "checkpoint_every": 500,
            "eval_every": 500,
        },
        "sample": _sample(),
        "parallel": _compiled(),
        "cache": {"latents": "mean", "dtype": "float32", "batch_size": 64, "shard_size": 256},
    },
}

AE_TRAIN_PRESETS_256: dict[str, dict[str, Any]] = {
    # One GPU, OpenMoji at 256² → 32×32×16 latents (the ae-openmoji-256 architecture), bf16
    # autocast, time-bound at 4.5 minutes (~1,800 steps, 32.8–33.7 dB held-out PSNR on an H100).
    # Batch 32 rather than ae-openmoji's 64: a 256² image is 16 of its 64² ones, so each step
    # still sees twice its pixels and the budget keeps more steps.
    "ae-openmoji-256": {
        "data": _data(num_workers=8),
        "ae": {
            "preset": "ae-openmoji-256",
            "batch_size": 32,
            "steps": 6000,
            "lr": 3e-4,
            "warmup_steps": 200,
            "max_minutes": 4.5,
            "eval_every": 500,
            "val_images": 256,
            "stats_images": 2048,
        },
        "train": {"output_dir": AE_RUN, "log_every": 50, "checkpoint_every": 500},
    },
}
