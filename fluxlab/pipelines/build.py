"""Assembling a run from its config (device, codec, model, pipeline) and rebuilding one from a
checkpoint for sampling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxlab.adapters.lora import add_lora
from fluxlab.adapters.runs import checkpoint_weights, init_weights
from fluxlab.conditioning.text_encoders import TextEncoder, build_text_encoder
from fluxlab.config.loading import config_from_dict
from fluxlab.config.schema import Config
from fluxlab.models.flux.model import Flux, FluxParams
from fluxlab.models.flux.presets import flux_params
from fluxlab.models.weights.autoencoder_spec import load_autoencoder
from fluxlab.models.weights.pretrained import load_flux
from fluxlab.pipelines.text_to_image import FluxTextToImage, LatentCodec, PixelCodec, TextEmbedding
from fluxlab.train.checkpoint import read_description, resolve_checkpoint


def resolve_device(spec: str) -> torch.device:
    """``"auto"``: CUDA, else MPS, else CPU; any other spec as torch reads it (CUDA checked)."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"train.device={spec!r} but no CUDA GPU is visible; use --train.device=cpu"
        )
    return device


def build_codec(cfg: Config, device: torch.device | str = "cpu") -> nn.Module:
    """Pixel patches, or the frozen autoencoder named by encoding.autoencoder (bf16 on CUDA, fp32
    elsewhere)."""
    if cfg.encoding.space == "pixel":
        return PixelCodec().to(device)
    if not cfg.encoding.autoencoder:
        raise ValueError(
            "encoding.space='latent' needs encoding.autoencoder (a train-ae run, "
            "ae.safetensors, ...)"
        )
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ae = (
        load_autoencoder(cfg.encoding.autoencoder, device=device, dtype=dtype)
        .requires_grad_(False)
        .eval()
    )
    f, p, res = ae.downsample_factor, cfg.encoding.patch_size, cfg.data.resolution
    if res % (f * p):
        raise ValueError(
            f"data.resolution={res} is not divisible by {f * p} (the autoencoder's {f}× "
            f"downsampling × encoding.patch_size={p}); pick a resolution that is a multiple of "
            f"{f * p}"
        )
    return LatentCodec(ae)


def token_dim(codec: nn.Module, cfg: Config) -> int:
    """Features per image token: the codec's channels × patch area (48 for 4×4 RGB, 64 for FLUX
    latents)."""
    return int(codec.channels) * cfg.encoding.patch_size**2


def model_params(cfg: Config, token_dim: int, context_dim: int, pooled_dim: int) -> FluxParams:
    """The Flux of ``model.preset`` (with the config's overrides) sized to its inputs."""
    return flux_params(
        cfg.model.preset,
        **cfg.model.flux_overrides(),
        in_channels=token_dim,
        out_channels=token_dim,
        context_in_dim=context_dim,
        vec_in_dim=pooled_dim,
    )


def build_model(cfg: Config, params: FluxParams, device: torch.device) -> Flux:
    """A Flux to train: adaLN-Zero initialised, or the weights of model.init_from (fp32 master
    weights); with ``lora.enabled`` those are frozen and peft adapters train instead."""
    if not cfg.model.init_from:
        with torch.device(device):  # initialised where it trains: big models take minutes on a CPU
            model = Flux(params)
        model.initialize_weights()
        return model
    model = _init_from(cfg, params, device)
    if not cfg.lora.enabled:
        return model
    mp = cfg.train.mixed_precision
    if cfg.lora.base_dtype == "bfloat16" and not (mp == "bf16" or device.type == "cuda"):
        raise ValueError(
            f"lora.base_dtype=bfloat16 computes under bf16 autocast, which "
            f"train.mixed_precision={mp} on {device.type} does not use: set "
            "train.mixed_precision=bf16 or lora.base_dtype=float32"
        )
    return add_lora(model, cfg.lora)


def _init_from(cfg: Config, params: FluxParams, device: torch.device) -> Flux:
    """The Flux of model.init_from, checked against the config's architecture."""
    assert cfg.model.init_from is not None
    loaded, weights = init_weights(cfg.model.init_from, device, torch.float32)

    def fields(p: FluxParams) -> dict:
        return {**p.to_dict(), "out_channels": p.out_channels or p.in_channels}

    if loaded is not None and fields(loaded) != fields(params):
        if fields(dataclasses.replace(loaded, guidance_embed=True)) == fields(params):
            return _with_new_guidance_embedding(params, weights, device)
        diff = {
            k: (v, fields(params)[k]) for k, v in fields(loaded).items() if fields(params)[k] != v
        }
        raise ValueError(
            f"model.init_from={cfg.model.init_from!r} has a different architecture "
            f"(checkpoint, config): {diff}; match model.preset/overrides, encoding (space, "
            "patch_size, autoencoder) and text_encoder to it"
        )
    if isinstance(weights, Flux):
        return weights.train()
    with torch.device("meta"):
        model = Flux(params)
    model.load_state_dict(weights, strict=True, assign=True)
    return model


def _with_new_guidance_embedding(
    params: FluxParams, weights: dict[str, Tensor] | Flux, device: torch.device
) -> Flux:
    """A guidance-embedded Flux holding the weights of one without the embedding (a distillation
    student): the new embedding's output layer starts at zero, so until it trains the model
    computes exactly what ``weights`` did, at every guidance."""
    state = weights.state_dict() if isinstance(weights, Flux) else weights
    with torch.device(device):
        model = Flux(params)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("guidance_in.") for k in missing):
        raise ValueError(f"model.init_from: unexpected {unexpected}, missing {missing}")
    embedder = model.guidance_in
    nn.init.normal_(embedder.in_layer.weight, std=0.02)  # nonzero, or no gradient reaches it
    for tensor in (embedder.in_layer.bias, embedder.out_layer.weight, embedder.out_layer.bias):
        nn.init.zeros_(tensor)
    return model.train()


def build_pipeline(
    cfg: Config,
    params: FluxParams,
    device: torch.device,
    codec: nn.Module | None = None,
    model: Flux | None = None,
) -> FluxTextToImage:
    """The model on ``device`` with its codec; pass ``codec``/``model`` when already built (each
    loads once)."""
    model = model if model is not None else Flux(params).to(device)
    codec = codec if codec is not None else build_codec(cfg, device)
    return FluxTextToImage(
        model,
        codec,
        cfg.data.resolution,
        cfg.encoding.patch_size,
        mixed_precision=cfg.train.mixed_precision,
    )


def encode_prompts(encoder: TextEncoder, prompts: list[str]) -> TextEmbedding:
    """Prompts → float32 embeddings on the CPU (moved to the model's device when sampling)."""
    txt, vec = encoder.encode(list(prompts))
    return TextEmbedding(txt.float().cpu(), vec.float().cpu())


def load_for_sampling(
    checkpoint: str | Path, device: torch.device, ema: bool = True
) -> tuple[Config, FluxTextToImage, Path]:
    """Rebuilds the trained pipeline from a checkpoint (or run) folder, EMA weights by default; a
    LoRA run's adapter is merged into its base (``model.init_from``)."""
    path = resolve_checkpoint(checkpoint)
    desc = read_description(path)
    cfg = config_from_dict(desc["config"])
    params, weights = checkpoint_weights(path, ema=ema)
    cfg.train.mixed_precision = "auto"
    with torch.device("meta"):  # every weight is assigned below
        model = Flux(params)
    model.load_state_dict(weights, strict=True, assign=True)
    pipe = build_pipeline(cfg, params, device, model=model.to(device))
    pipe.model.eval()
    return cfg, pipe, path


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a released FLUX.1 folder in the diffusers layout."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / "transformer").is_dir() and (p / "vae").is_dir()


def load_pretrained_pipeline(
    folder: str | Path,
    resolution: int = 1024,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    text_encoder: str | None = None,
    text_max_length: int = 512,
) -> tuple[FluxTextToImage, TextEncoder]:
    """(pipeline, text encoder) for a released FLUX.1 folder (dev, schnell, Kontext-dev) in the
    diffusers layout (``transformer/``, ``vae/``, ``tokenizer*/``, ``text_encoder*/``);
    ``text_encoder`` overrides the folder's T5 + CLIP. Text-to-image and Kontext edits share one
    plain Flux, in the autoencoder's latent space with 2×2 patches."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_flux(folder, device, dtype)  # a meta-device build, weights streamed in
    codec = LatentCodec(load_autoencoder(folder, device=device, dtype=dtype))
    if model.params.in_channels != codec.channels * 4:
        raise ValueError(
            f"the transformer takes {model.params.in_channels} features per token but the "
            f"autoencoder's {codec.channels} channels in 2×2 patches give {codec.channels * 4}"
        )
    encoder = build_text_encoder(text_encoder or str(folder), text_max_length, device)
    return FluxTextToImage(model, codec, resolution, patch_size=2), encoder
