"""Named training presets (``fluxlab train --config NAME``); each is a partial config over the defaults."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: FLUX architecture, pixel space, OpenMoji at 32², a 2-core CPU in ~10 minutes.
    "openmoji-cpu": {
        "model": {"preset": "flux-tiny"},
        "data": {"dataset": "openmoji", "resolution": 32},
        "encoding": {"space": "pixel", "patch_size": 4, "text_encoder": "minilm", "text_max_length": 16},
        "objective": {"kind": "flow", "t_sampler": "logit_normal"},
        "optim": {"lr": 5e-4, "warmup_steps": 100, "batch_size": 64, "steps": 1500, "ema_decay": 0.995},
        "train": {
            "output_dir": "runs/openmoji-cpu",
            "max_minutes": 10,
            "log_every": 10,
            "sample_every": 500,
            "checkpoint_every": 500,
        },
        "sample": {"steps": 20, "guidance": 3.0},
    },
    # One GPU, 64², ~15 minutes on an H100 (bf16 autocast; time-bound by train.max_minutes).
    "openmoji-gpu": {
        "model": {"preset": "flux-small"},
        "data": {"dataset": "openmoji", "resolution": 64, "num_workers": 6},
        "encoding": {"space": "pixel", "patch_size": 4, "text_encoder": "minilm", "text_max_length": 16},
        "objective": {"kind": "flow", "t_sampler": "logit_normal"},
        "optim": {"lr": 3e-4, "warmup_steps": 500, "batch_size": 256, "steps": 8000, "ema_decay": 0.999},
        "train": {
            "output_dir": "runs/openmoji-gpu",
            "max_minutes": 14,
            "log_every": 50,
            "sample_every": 1000,
            "checkpoint_every": 1000,
        },
        "sample": {"steps": 30, "guidance": 4.0},
    },
    # Seconds on a CPU: the full stack at toy size, for tests and smoke runs.
    "debug": {
        "model": {"preset": "flux-debug"},
        "data": {"dataset": "openmoji", "resolution": 16, "limit": 64},
        "encoding": {"space": "pixel", "patch_size": 4, "text_encoder": "minilm", "text_max_length": 8},
        "optim": {"lr": 1e-3, "batch_size": 8, "steps": 4},
        "train": {"output_dir": "runs/debug", "log_every": 1, "sample_every": 4, "checkpoint_every": 2},
        "sample": {"steps": 2, "prompts": ["red heart", "grinning face"]},
    },
}
