"""Named presets (``fluxlab train --config NAME``): partial configs over the defaults."""

from __future__ import annotations

from typing import Any

from fluxlab.config.heldout_presets import heldout_presets
from fluxlab.config.presets_256 import AE_TRAIN_PRESETS_256, PRESETS_256

# Validation prompts of the DreamBooth-style LoRA presets: the trigger word "sks" in new scenes.
_SKS = ["photo of sks", "photo of sks on a beach", "painting of sks", "sks in the snow"]


def _dreambooth_data() -> dict[str, Any]:
    """A few images at 1024² with .txt sidecar captions; every image trains, none is held out."""
    return {
        "dataset": "DATASET_PLACEHOLDER",
        "resolution": 1024,
        "val_fraction": 0.0,
        "caption_dropout": 0.0,  # a guidance-distilled model samples without CFG
        "num_workers": 2,
    }


def _flux_encoding(folder: str) -> dict[str, Any]:
    """FLUX.1's own autoencoder and T5 + CLIP from the released folder."""
    return {
        "space": "latent",
        "autoencoder": folder,
        "patch_size": 2,
        "text_encoder": folder,
        "text_max_length": 512,
    }


def _lora_optim() -> dict[str, Any]:
    return {"lr": 1e-4, "warmup_steps": 10, "batch_size": 1, "steps": 1000, "ema_decay": 0.99}


def _lora_train(output_dir: str) -> dict[str, Any]:
    return {
        "output_dir": output_dir,
        "mixed_precision": "bf16",
        "log_every": 10,
        "sample_every": 250,
        "checkpoint_every": 250,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: FLUX architecture, pixel space, OpenMoji at 16², ~10 minutes on 2 cores.
    "openmoji-cpu": {
        # 16² with 2×2 patches on the ~2,000 base emoji: a GPU sweep of CPU-sized recipes
        # (docs/openmoji-cpu.md) showed this learns heart/disc shapes and prompt colours within
        # 1,200 steps; 32²/4×4 stayed blocky.
        "model": {"preset": "flux-tiny"},
        "data": {"dataset": "openmoji", "resolution": 16, "openmoji_subset": "base"},
        "encoding": {
            "space": "pixel",
            "patch_size": 2,
            "text_encoder": "minilm",
            "text_max_length": 16,
        },
        "objective": {"kind": "flow", "t_sampler": "logit_normal"},
        "optim": {
            "lr": 1e-3,
            "beta2": 0.99,
            "warmup_steps": 100,
            "batch_size": 32,
            "steps": 1200,
            "ema_decay": 0.995,
        },
        "train": {
            "output_dir": "runs/openmoji-cpu",
            "max_minutes": 9,
            "log_every": 10,
            "sample_every": 500,
            "checkpoint_every": 500,
            # the demo spends its CPU minutes on training; turn on with --train.eval_every=500
            "eval_every": 0,
        },
        "sample": {"steps": 20, "guidance": 3.0},
    },
    # One GPU, 64², ~15 minutes on an H100 (bf16 autocast; time-bound by train.max_minutes).
    "openmoji-gpu": {
        "model": {"preset": "flux-small"},
        "data": {"dataset": "openmoji", "resolution": 64, "num_workers": 6},
        "encoding": {
            "space": "pixel",
            "patch_size": 4,
            "text_encoder": "minilm",
            "text_max_length": 16,
        },
        "objective": {"kind": "flow", "t_sampler": "logit_normal"},
        "optim": {
            "lr": 3e-4,
            "warmup_steps": 500,
            "batch_size": 256,
            "steps": 8000,
            "ema_decay": 0.999,
        },
        "train": {
            "output_dir": "runs/openmoji-gpu",
            "max_minutes": 14,
            "log_every": 50,
            "sample_every": 1000,
            "checkpoint_every": 1000,
            "eval_every": 1000,
        },
        "sample": {"steps": 30, "guidance": 4.0},
    },
    # Kontext-style editing on OpenMoji variant pairs (skin tone, gender, hair, color), 64², one GPU
    # in ≤ 20 minutes: the condition's 256 tokens double the image sequence, so half openmoji-gpu's
    # batch.
    "openmoji-edit-gpu": {
        "model": {"preset": "flux-small"},
        "data": {"dataset": "openmoji", "task": "edit", "resolution": 64, "num_workers": 6},
        "encoding": {
            "space": "pixel",
            "patch_size": 4,
            "text_encoder": "minilm",
            "text_max_length": 16,
        },
        "objective": {"kind": "flow", "t_sampler": "logit_normal"},
        "optim": {
            "lr": 3e-4,
            "warmup_steps": 300,
            "batch_size": 128,
            "steps": 6000,
            "ema_decay": 0.999,
        },
        "train": {
            "output_dir": "runs/openmoji-edit-gpu",
            "max_minutes": 18,
            "log_every": 50,
            "sample_every": 1000,
            "checkpoint_every": 1000,
        },
        "sample": {"steps": 30, "guidance": 2.5},
    },
    # Seconds on a CPU: the edit stack at toy size (the first 64 pairs: a few emoji and their
    # tones).
    "edit-debug": {
        "model": {"preset": "flux-debug"},
        "data": {"dataset": "openmoji", "task": "edit", "resolution": 16, "limit": 64},
        "encoding": {
            "space": "pixel",
            "patch_size": 4,
            "text_encoder": "minilm",
            "text_max_length": 12,
        },
        "optim": {"lr": 1e-3, "batch_size": 8, "steps": 4},
        "train": {
            "output_dir": "runs/edit-debug",
            "log_every": 1,
            "sample_every": 4,
            "checkpoint_every": 2,
        },
        "sample": {"steps": 2},
    },
    # Seconds on a CPU: the full stack at toy size, for tests and smoke runs.
    "debug": {
        "model": {"preset": "flux-debug"},
        "data": {"dataset": "openmoji", "resolution": 16, "limit": 64},
        "encoding": {
            "space": "pixel",
            "patch_size": 4,
            "text_encoder": "minilm",
            "text_max_length": 8,
        },
        "optim": {"lr": 1e-3, "batch_size": 8, "steps": 4},
        "train": {
            "output_dir": "runs/debug",
            "log_every": 1,
            "sample_every": 4,
            "checkpoint_every": 2,
        },
        "sample": {"steps": 2, "prompts": ["red heart", "grinning face"]},
    },
    # Latent space on one GPU (docs/latent.md): the ae-openmoji autoencoder (`fluxlab train-ae
    # --config ae-openmoji`, 4× down, 16 channels) + `fluxlab cache`, so a step runs the transformer
    # only.
    "openmoji-latent-gpu": {
        "model": {"preset": "flux-small"},
        "data": {
            "dataset": "openmoji",
            "resolution": 64,
            "cache_dir": "runs/openmoji-latent-gpu-cache",
        },
        "encoding": {
            "space": "latent",
            "autoencoder": "runs/ae-openmoji",
            "patch_size": 2,
            "text_encoder": "minilm",
            "text_max_length": 16,
        },
        "objective": {"kind": "flow", "t_sampler": "logit_normal"},
        "optim": {
            "lr": 3e-4,
            "warmup_steps": 500,
            "batch_size": 256,
            "steps": 8000,
            "ema_decay": 0.999,
        },
        "train": {
            "output_dir": "runs/openmoji-latent-gpu",
            "mixed_precision": "bf16",
            "max_minutes": 4,
            "log_every": 50,
            "sample_every": 1000,
            "checkpoint_every": 1000,
            "eval_every": 1000,
        },
        "sample": {"steps": 30, "guidance": 4.0},
        "cache": {"latents": "mean", "dtype": "bfloat16", "batch_size": 256, "shard_size": 1024},
    },
    # Fine-tune FLUX.1-dev from a local download (transformer/, vae/, text_encoder*/, tokenizer*/):
    # replace FLUX_DEV_PLACEHOLDER in all three fields, e.g. --model.init_from=/data/FLUX.1-dev
    # (same for the others). All 11.9B weights train, so the state is sharded: `torchrun
    # --nproc-per-node=2` on H200s (~113 GiB per GPU with the EMA), at least 3 H100s 80GB; one GPU
    # is refused with that advice (docs/distributed.md).
    "flux-dev-finetune": {
        "model": {"preset": "flux-dev", "init_from": "FLUX_DEV_PLACEHOLDER"},
        "data": {
            "dataset": "openmoji",
            "resolution": 512,
            "cache_dir": "runs/flux-dev-finetune-cache",
        },
        "encoding": {
            "space": "latent",
            "autoencoder": "FLUX_DEV_PLACEHOLDER",
            "patch_size": 2,
            "text_encoder": "FLUX_DEV_PLACEHOLDER",
            "text_max_length": 512,
        },
        "objective": {"kind": "flow", "t_sampler": "logit_normal", "shift": True},
        "optim": {
            "lr": 1e-5,
            "warmup_steps": 100,
            "batch_size": 4,
            "steps": 2000,
            "ema_decay": 0.999,
            "weight_decay": 0.0,
        },
        "train": {
            "output_dir": "runs/flux-dev-finetune",
            "mixed_precision": "bf16",
            "log_every": 10,
            "sample_every": 500,
            "checkpoint_every": 500,
        },
        "sample": {"steps": 28, "guidance": 1.0, "distilled_guidance": 3.5},
        "cache": {"latents": "sample", "dtype": "bfloat16", "batch_size": 8, "shard_size": 256},
        "parallel": {"mode": "fsdp", "activation_checkpointing": True, "compile": True},
    },
    # LoRA on FLUX.1-dev (docs/lora.md), one GPU: the base frozen in bf16 (24 GB), rank-16 adapters
    # on attention and MLPs. DreamBooth style: a folder of a few images with .txt captions naming a
    # trigger word ("photo of sks dog"); replace the placeholders (the FLUX folder in three fields).
    "flux-dev-lora": {
        "model": {"preset": "flux-dev", "init_from": "FLUX_DEV_PLACEHOLDER"},
        "lora": {"enabled": True, "rank": 16, "base_dtype": "bfloat16"},
        "data": _dreambooth_data(),
        "encoding": _flux_encoding("FLUX_DEV_PLACEHOLDER"),
        # kohya's advice for FLUX.1-dev LoRAs: train at guidance 1, sample at 3.5.
        "objective": {"kind": "flow", "t_sampler": "logit_normal", "shift": True},
        "optim": _lora_optim(),
        "train": _lora_train("runs/flux-dev-lora"),
        "sample": {"steps": 28, "guidance": 1.0, "distilled_guidance": 3.5, "prompts": _SKS},
        "parallel": {"activation_checkpointing": True},
    },
    # The same on FLUX.1-schnell: no guidance input, no schedule shift, 4 sampling steps.
    "flux-schnell-lora": {
        "model": {"preset": "flux-schnell", "init_from": "FLUX_SCHNELL_PLACEHOLDER"},
        "lora": {"enabled": True, "rank": 16, "base_dtype": "bfloat16"},
        "data": _dreambooth_data(),
        "encoding": _flux_encoding("FLUX_SCHNELL_PLACEHOLDER"),
        "objective": {"kind": "flow", "t_sampler": "logit_normal", "shift": False},
        "optim": _lora_optim(),
        "train": _lora_train("runs/flux-schnell-lora"),
        "sample": {"steps": 4, "guidance": 1.0, "shift": False, "prompts": _SKS},
        "parallel": {"activation_checkpointing": True},
    },
    # LoRA on FLUX.1-Kontext-dev for an edit: a folder of (condition, instruction, target) rows in
    # metadata.jsonl (docs/kontext.md); samples edit the folder's pairs.
    "kontext-dev-lora": {
        "model": {"preset": "flux-dev", "init_from": "KONTEXT_DEV_PLACEHOLDER"},
        "lora": {"enabled": True, "rank": 16, "base_dtype": "bfloat16"},
        "data": {**_dreambooth_data(), "task": "edit"},
        "encoding": _flux_encoding("KONTEXT_DEV_PLACEHOLDER"),
        "objective": {"kind": "flow", "t_sampler": "logit_normal", "shift": True},
        "optim": _lora_optim(),
        "train": _lora_train("runs/kontext-dev-lora"),
        "sample": {"steps": 28, "guidance": 1.0, "distilled_guidance": 2.5},
        "parallel": {"activation_checkpointing": True},
    },
    # Seconds on a CPU: latent space end to end (random preset:ae-tiny, 2× down, 4 channels) for the
    # cache tests.
    "latent-debug": {
        "model": {"preset": "flux-debug"},
        "data": {
            "dataset": "openmoji",
            "resolution": 16,
            "limit": 48,
            "val_fraction": 0.1,
            "cache_dir": "runs/latent-debug-cache",
        },
        "encoding": {
            "space": "latent",
            "autoencoder": "preset:ae-tiny",
            "patch_size": 2,
            "text_encoder": "minilm",
            "text_max_length": 8,
        },
        "optim": {"lr": 1e-3, "batch_size": 8, "steps": 3},
        "train": {
            "output_dir": "runs/latent-debug",
            "log_every": 1,
            "sample_every": 3,
            "checkpoint_every": 3,
            "tensorboard": False,
        },
        "sample": {"steps": 2, "prompts": ["red heart", "grinning face"]},
        "cache": {"dtype": "float32", "batch_size": 16, "shard_size": 16},
    },
    # The DDPM baseline: class-conditional DiT (10 OpenMoji groups), DDIM grid (one image per
    # class), sized for a 2-core CPU in about 5 minutes. At this budget the classic ε/linear recipe
    # only gives patch mosaics; v-prediction + cosine betas + min-SNR-5 gives centred emoji-coloured
    # shapes (docs/ddpm-vs-flow.md).
    "dit-openmoji-cpu": {
        # 16² with 2×2 patches on the base emoji, as openmoji-cpu: the earlier 32²/4×4 recipe
        # (dit-tiny) drew patch mosaics in 800 steps; this one draws centred, class-coloured shapes
        # in 1,000 (docs/ddpm-vs-flow.md).
        "model": {"arch": "dit", "preset": "dit-tiny-p2"},
        "data": {
            "dataset": "openmoji",
            "resolution": 16,
            "caption_dropout": 0.1,
            "openmoji_subset": "base",
        },
        "encoding": {"space": "pixel", "patch_size": 2},
        "objective": {
            "kind": "ddpm",
            "beta_schedule": "cosine",
            "prediction": "v",
            "loss": "mse",
            "min_snr_gamma": 5.0,
        },
        "optim": {
            "lr": 1e-3,
            "warmup_steps": 100,
            "batch_size": 32,
            "steps": 1000,
            "ema_decay": 0.995,
        },
        "train": {
            "output_dir": "runs/dit-openmoji-cpu",
            "max_minutes": 6,
            "log_every": 10,
            "sample_every": 400,
            "checkpoint_every": 400,
        },
        "sample": {
            "sampler": "ddim",
            "steps": 50,
            "eta": 0.0,
            "spacing": "trailing",
            "guidance": 3.0,
            "prompts": [],
        },
    },
    # DDPM-DiT for the equal-wall-time comparison with openmoji-gpu (flow, flux-small 40.0M
    # parameters): dit-small has 40.6M at 64², same data, batch, lr, EMA and time budget. Not run on
    # CPU.
    "dit-openmoji-gpu": {
        "model": {"arch": "dit", "preset": "dit-small"},
        "data": {"dataset": "openmoji", "resolution": 64, "num_workers": 6, "caption_dropout": 0.1},
        "encoding": {"space": "pixel", "patch_size": 4},
        "objective": {
            "kind": "ddpm",
            "beta_schedule": "cosine",
            "prediction": "v",
            "loss": "mse",
            "min_snr_gamma": 5.0,
        },
        "optim": {
            "lr": 3e-4,
            "warmup_steps": 500,
            "batch_size": 256,
            "steps": 8000,
            "ema_decay": 0.999,
        },
        "train": {
            "output_dir": "runs/dit-openmoji-gpu",
            "max_minutes": 14,
            "log_every": 50,
            "sample_every": 1000,
            "checkpoint_every": 1000,
        },
        "sample": {
            "sampler": "ddim",
            "steps": 50,
            "eta": 0.0,
            "spacing": "trailing",
            "guidance": 4.0,
            "prompts": [],
        },
    },
    # Seconds on a CPU: DiT + DDPM at toy size, for tests.
    "dit-debug": {
        "model": {"arch": "dit", "preset": "dit-debug"},
        "data": {"dataset": "openmoji", "resolution": 16, "limit": 64},
        "encoding": {"space": "pixel", "patch_size": 2},
        "objective": {"kind": "ddpm"},
        "optim": {"lr": 1e-3, "batch_size": 8, "steps": 4},
        "train": {
            "output_dir": "runs/dit-debug",
            "log_every": 1,
            "sample_every": 4,
            "checkpoint_every": 2,
        },
        "sample": {"sampler": "ddim", "steps": 4, "prompts": []},
    },
}

# The held-out LoRA experiment (docs/lora.md): openmoji-gpu without HELDOUT_50, then a LoRA on them.
PRESETS.update(heldout_presets(PRESETS["openmoji-gpu"]))

# `fluxlab train-ae --config NAME`: partial configs whose `ae` section names the autoencoder.
AE_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: the whole train-ae path (loss, PSNR, grid, checkpoint, scale/shift, ae.json)
    # at toy size.
    "ae-tiny": {
        "data": {"dataset": "openmoji", "resolution": 16, "limit": 48, "val_fraction": 0.25},
        "ae": {
            "preset": "ae-tiny",
            "batch_size": 4,
            "steps": 4,
            "warmup_steps": 0,
            "eval_every": 2,
            "val_images": 8,
            "stats_images": 16,
            "lr": 1e-3,
        },
        "train": {
            "output_dir": "runs/ae-tiny",
            "log_every": 1,
            "checkpoint_every": 2,
            "tensorboard": False,
        },
    },
    # One GPU, OpenMoji at 64², 4× down to 16×16×16 latents, bf16 autocast, ~4 minutes (time-bound).
    "ae-openmoji": {
        "data": {"dataset": "openmoji", "resolution": 64, "num_workers": 6, "val_fraction": 0.05},
        "ae": {
            "preset": "ae-openmoji",
            "batch_size": 64,
            "steps": 6000,
            "lr": 4e-4,
            "warmup_steps": 200,
            "max_minutes": 4.0,
            "eval_every": 1000,
            "val_images": 256,
            "stats_images": 2048,
        },
        "train": {"output_dir": "runs/ae-openmoji", "log_every": 50, "checkpoint_every": 1000},
    },
}

# Presets that live in their own modules, registered under their names here.
PRESETS.update(PRESETS_256)
AE_TRAIN_PRESETS.update(AE_TRAIN_PRESETS_256)
