"""The run's ``Config``: its sections (``config/sections.py``) and the checks that span them.

A run is fully described by one ``Config``; the resolved config is written beside every run and
inside every checkpoint, so ``fluxlab sample`` and ``--resume`` rebuild exactly what was trained.
``config/loading.py`` builds one from a preset or file and ``--a.b=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxlab.config.adapters import LoraConfig
from fluxlab.config.distill import DistillConfig
from fluxlab.config.model_params import dit_params
from fluxlab.config.sections import (
    AEConfig,
    CacheConfig,
    DataConfig,
    EncodingConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
    SampleConfig,
    TrainConfig,
    check_step_intervals,
)
from fluxlab.data.buckets import check_buckets
from fluxlab.data.openmoji_select import check_selection
from fluxlab.models.flux.presets import flux_params
from fluxlab.models.weights.autoencoder_spec import describe

# Stand-ins for local downloads in the fine-tuning presets; each must be overridden.
FLUX_DEV_PLACEHOLDER = "FLUX_DEV_PLACEHOLDER"
PLACEHOLDERS = {
    FLUX_DEV_PLACEHOLDER: "your local FLUX.1-dev folder",
    "FLUX_SCHNELL_PLACEHOLDER": "your local FLUX.1-schnell folder",
    "KONTEXT_DEV_PLACEHOLDER": "your local FLUX.1-Kontext-dev folder",
    "DATASET_PLACEHOLDER": "your folder of images with .txt captions",
}


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoding: EncodingConfig = field(default_factory=EncodingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    ae: AEConfig = field(
        default_factory=AEConfig
    )  # `fluxlab train-ae` only (fluxlab/config/autoencoder.py checks it)
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def validate(self) -> None:
        """Checks that need several fields; raised before any work starts."""
        self._validate_placeholders()
        self._validate_init_from()
        res, p = self.data.resolution, self.encoding.patch_size
        if res <= 0 or p <= 0:
            raise ValueError("data.resolution and encoding.patch_size must be positive")
        if self.encoding.space == "latent":
            self._validate_latent()
        elif res % p:
            raise ValueError(f"data.resolution={res} is not divisible by encoding.patch_size={p}")
        if not 0 <= self.data.caption_dropout < 1:
            raise ValueError(f"data.caption_dropout={self.data.caption_dropout} must be in [0, 1)")
        if not 0 <= self.data.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.data.val_fraction} must be in [0, 1)")
        if self.optim.batch_size < 1 or self.optim.grad_accum < 1 or self.optim.steps < 1:
            raise ValueError(
                "optim.batch_size, optim.grad_accum and optim.steps must be at least 1"
            )
        if not 0 <= self.optim.ema_decay < 1:
            raise ValueError(f"optim.ema_decay={self.optim.ema_decay} must be in [0, 1)")
        check_step_intervals(self.train, ("log_every", "sample_every", "checkpoint_every"))
        if self.train.eval_every < 0 or (
            self.data.val_limit is not None and self.data.val_limit < 1
        ):
            raise ValueError(
                "train.eval_every must be ≥ 0 (0 = off) and data.val_limit ≥ 1 (or null for all)"
            )
        if self.train.max_nonfinite_steps < 1 or self.train.keep_last < 0:
            raise ValueError(
                "train.max_nonfinite_steps must be ≥ 1 and train.keep_last ≥ 0 "
                "(0 keeps every checkpoint)"
            )
        if self.train.eval_every and self.data.val_fraction == 0:
            raise ValueError(
                "train.eval_every needs a held-out split: set data.val_fraction > 0 (e.g. 0.05)"
            )
        self._validate_numbers()
        self._validate_guidance()
        self.lora.validate(
            self.model.init_from, self.train.mixed_precision, self.model.arch, self.parallel.mode
        )
        if self.parallel.float8 != "off" and self.lora.enabled:
            raise ValueError(
                f"parallel.float8={self.parallel.float8} converts the trained linear layers, but "
                "lora.enabled trains adapters on a frozen base: set parallel.float8=off"
            )
        self.distill.validate(
            self.objective.kind, self.model.arch, self.model.guidance_embed, self.sample.guidance
        )
        if self.data.task == "edit":
            if self.model.arch != "flux" or self.objective.kind != "flow":
                raise ValueError(
                    "data.task='edit' trains a Kontext-style Flux: "
                    "set model.arch=flux, objective.kind=flow"
                )
            if self.data.hflip or self.data.color_jitter > 0 or self.data.crop != "center":
                raise ValueError(
                    "data.task='edit' needs data.hflip=false, data.color_jitter=0 and "
                    "data.crop=center: augmenting the target apart from its condition would teach "
                    "the wrong edit"
                )
        self._validate_selection()
        if self.data.buckets is not None:
            check_buckets(self.data.buckets, "data.buckets")
        if self.cache.shard_size < 1 or self.cache.batch_size < 1:
            raise ValueError("cache.shard_size and cache.batch_size must be at least 1")
        if self.data.cache_dir is not None and (
            self.data.hflip or self.data.color_jitter > 0 or self.data.crop != "center"
        ):
            raise ValueError(
                "data.cache_dir holds latents of un-augmented, center-cropped images: set "
                "data.hflip=false, data.color_jitter=0 and data.crop=center, or train without "
                "data.cache_dir"
            )
        if self.model.arch == "flux":
            # raises on an unknown preset, heads not dividing the width, RoPE axes off
            flux_params(self.model.preset, **self.model.flux_overrides())
        if self.model.arch == "dit":
            # raises on an unknown preset, patch vs resolution, heads vs width
            dit_params(self, num_classes=1).validate()
        flow_samplers, ddpm_samplers = ("euler", "heun"), ("ddim", "ddpm")
        wanted = flow_samplers if self.objective.kind == "flow" else ddpm_samplers
        if self.sample.sampler not in wanted:
            raise ValueError(
                f"sample.sampler={self.sample.sampler!r} does not sample "
                f"objective.kind={self.objective.kind!r}; use one of {list(wanted)}"
            )
        if self.objective.min_snr_gamma is not None and self.objective.min_snr_gamma <= 0:
            raise ValueError(
                f"objective.min_snr_gamma={self.objective.min_snr_gamma} must be positive "
                "(5 is usual)"
            )
        if self.sample.eta < 0:
            raise ValueError(f"sample.eta={self.sample.eta} must be at least 0")
        # the world-free checks; the trainer re-checks with the launch's world size
        self.parallel.validate(world=self.parallel.replicate)

    def _validate_placeholders(self) -> None:
        """Preset stand-ins for local paths must be replaced before anything loads."""
        fields = (
            ("model.init_from", self.model.init_from),
            ("encoding.autoencoder", self.encoding.autoencoder),
            ("encoding.text_encoder", self.encoding.text_encoder),
            ("data.dataset", self.data.dataset),
        )
        by_value: dict[str, list[str]] = {}
        for name, value in fields:
            if value in PLACEHOLDERS:
                by_value.setdefault(value, []).append(name)
        if by_value:
            named = "; ".join(
                f"{', '.join(names)} still say {value}: point them at {PLACEHOLDERS[value]}"
                for value, names in by_value.items()
            )
            raise ValueError(
                f"{named}. A FLUX folder is the diffusers "
                "layout (transformer/, vae/, text_encoder*/, tokenizer*/), e.g. "
                "--model.init_from=/data/FLUX.1-dev --encoding.autoencoder=/data/FLUX.1-dev "
                "--encoding.text_encoder=/data/FLUX.1-dev"
            )

    def _validate_init_from(self) -> None:
        """A missing base is named before the data is rendered and the text encoded."""
        spec = self.model.init_from
        if spec and not Path(spec).expanduser().exists():
            raise ValueError(
                f"model.init_from={spec!r}: no such file or folder; give a fluxlab run folder (or "
                "one of its checkpoints/step_* folders), a diffusers FLUX folder or a BFL "
                "flux1-*.safetensors file (train the base first if it is a run)"
            )

    def _validate_selection(self) -> None:
        d = self.data
        check_selection(d.dataset, d.openmoji_subset, d.include, d.exclude)
        if (d.include is not None or d.exclude is not None) and d.task != "text_to_image":
            raise ValueError(
                f"data.include and data.exclude choose emoji for text-to-image runs, but "
                f"data.task={d.task!r}; remove them"
            )

    def _validate_guidance(self) -> None:
        g = self.objective.train_guidance
        if isinstance(g, list) and (len(g) != 2 or g[0] > g[1]):
            raise ValueError(
                f"objective.train_guidance={g}: give one number or a [low, high] pair, low ≤ high"
            )
        if self.objective.guidance_range()[0] < 0:
            raise ValueError(f"objective.train_guidance={g} must not be negative")

    def _validate_numbers(self) -> None:
        """Values that would otherwise fail late or train on garbage without an error."""
        if not (math.isfinite(self.optim.lr) and self.optim.lr > 0):
            raise ValueError(f"optim.lr={self.optim.lr} must be a positive, finite number")
        if not (math.isfinite(self.optim.grad_clip) and self.optim.grad_clip > 0):
            raise ValueError(
                f"optim.grad_clip={self.optim.grad_clip} must be a positive, finite number: "
                "gradients are rescaled to at most this norm, so 0 would zero them and a negative "
                "value flip them; a large value such as 1e9 leaves them unclipped"
            )
        if self.sample.steps < 1:
            raise ValueError(f"sample.steps={self.sample.steps} must be at least 1")
        limits = (("data.limit", self.data.limit), ("data.max_pixels", self.data.max_pixels))
        for name, value in limits:
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be at least 1, or null for no limit")

    def _validate_latent(self) -> None:
        """encoding.space='latent': an autoencoder is named and its downsampling fits the
        resolution."""
        spec = self.encoding.autoencoder
        if not spec:
            raise ValueError(
                "encoding.space='latent' needs encoding.autoencoder: a `fluxlab train-ae` run "
                "folder, a BFL ae.safetensors, a diffusers FLUX folder, or preset:ae-tiny for a "
                "smoke test"
            )
        if self.model.arch != "flux":
            raise ValueError(
                "encoding.space='latent' is wired for model.arch=flux only; "
                "set encoding.space=pixel"
            )
        f, p, res = describe(spec).downsample_factor, self.encoding.patch_size, self.data.resolution
        if res % (f * p):
            raise ValueError(
                f"data.resolution={res} is not divisible by {f * p} (the autoencoder's {f}× "
                f"downsampling × encoding.patch_size={p}); pick a resolution that is a multiple of "
                f"{f * p}"
            )
