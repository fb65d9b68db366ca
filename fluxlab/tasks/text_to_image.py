"""FLUX text-to-image: captions → cached text embeddings → the pipeline's velocity on image tokens.

Trained by rectified flow, or by DDPM (the model's output then stands for ε, v or x0)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fluxlab.conditioning.kontext import ConditionTokens
from fluxlab.conditioning.text_cache import encode_captions_cached
from fluxlab.conditioning.text_encoders import build_text_encoder
from fluxlab.config.schema import Config
from fluxlab.data.common import cache_dir
from fluxlab.diffusion.ddpm import DDPMObjective
from fluxlab.diffusion.objectives import objective_from_config
from fluxlab.models.flux.model import FluxParams
from fluxlab.pipelines.build import (
    build_codec,
    build_model,
    build_pipeline,
    encode_prompts,
    model_params,
    token_dim,
)
from fluxlab.pipelines.text_to_image import FluxTextToImage, TextEmbedding
from fluxlab.tasks.guidance import guidance_description, sampling_guidance, training_guidance
from fluxlab.train import rng


class CaptionTable:
    """All captions' embeddings, encoded once (cached on disk), looked up by caption string."""

    def __init__(
        self, encoder: Any, captions: list[str], device: torch.device, cache: Path | None = None
    ) -> None:
        unique = sorted(set(captions) | {""})
        txt, vec = encode_captions_cached(encoder, unique, cache or cache_dir() / "text")
        self.index = {c: i for i, c in enumerate(unique)}
        self.txt = txt.float().to(device)
        self.vec = vec.float().to(device)
        self.empty = self.index[""]

    def lookup(self, captions: list[str], drop: Tensor | None = None) -> TextEmbedding:
        idx = torch.tensor([self.index[c] for c in captions], device=self.txt.device)
        if drop is not None:  # caption dropout trains the unconditional branch used by CFG
            idx = torch.where(drop, torch.full_like(idx, self.empty), idx)
        return TextEmbedding(self.txt[idx], self.vec[idx])


def build_flux_parts(
    cfg: Config, captions: list[str], sample_prompts: list[str], device: torch.device
) -> tuple[FluxTextToImage, FluxParams, CaptionTable, TextEmbedding, TextEmbedding]:
    """The pipeline (codec + Flux sized to it and to the text encoder) and every caption encoded
    once; the text encoder is dropped afterwards, as every caption the run will see is in the
    table."""
    encoder = build_text_encoder(cfg.encoding.text_encoder, cfg.encoding.text_max_length, device)
    table = CaptionTable(encoder, captions + list(sample_prompts), device)
    sample_text = encode_prompts(encoder, sample_prompts)
    negative_text = encode_prompts(encoder, [cfg.sample.negative_prompt])
    codec = build_codec(cfg, device)  # a latent run's autoencoder sets the token width
    params = model_params(cfg, token_dim(codec, cfg), encoder.context_dim, encoder.pooled_dim)
    del encoder
    pipe = build_pipeline(cfg, params, device, codec=codec, model=build_model(cfg, params, device))
    return pipe, params, table, sample_text, negative_text


class TextToImageTask:
    """A Flux trained on (image, caption) pairs, through ``FluxTextToImage``."""

    def __init__(
        self,
        cfg: Config,
        pipe: FluxTextToImage,
        params: FluxParams,
        captions: CaptionTable,
        sample_text: TextEmbedding,
        negative_text: TextEmbedding,
    ) -> None:
        self.cfg = cfg
        self.pipe = pipe
        self.model = pipe.model
        self.params = params
        self.captions = captions
        self.sample_text = sample_text
        self.negative_text = negative_text
        self.objective = objective_from_config(cfg)

    @classmethod
    def for_training(
        cls, cfg: Config, dataset: Any, device: torch.device, extra_captions: Sequence[str] = ()
    ) -> TextToImageTask:
        """``extra_captions`` (the validation split's) join the table: validation then needs no
        text encoder."""
        return cls(
            cfg,
            *build_flux_parts(
                cfg, list(dataset.captions) + list(extra_captions), cfg.sample.prompts, device
            ),
        )

    def condition(self, batch: dict[str, Any], device: torch.device) -> ConditionTokens | None:
        """Tokens that ride along with the noisy ones (an edit task's source image); none here."""
        return None

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        generator: torch.Generator | None,
        t: Tensor | None = None,
        noise: Tensor | Callable[[torch.Size], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Training loss; with ``t`` given it is a measurement instead: no caption dropout.
        Draws caption dropout, then a guidance range's strengths, then the objective's t and noise.

        ``noise`` is a tensor shaped like the image tokens, or a function of that shape (so callers
        need not know the token layout).
        """
        device = self.captions.txt.device
        images = batch["image"].to(device, non_blocking=True)
        drop = None
        if t is None:
            drop = rng.rand(images.shape[0], generator, device) < self.cfg.data.caption_dropout
        text = self.captions.lookup(batch["caption"], drop)
        guidance = training_guidance(self.cfg, self.params, images.shape[0], generator, device)
        condition = self.condition(batch, device)
        x0 = self.pipe.to_tokens(images)
        if callable(noise):
            noise = noise(x0.shape)
        return self.objective.loss(
            lambda x_t, t_: self.pipe.velocity(model, x_t, t_, text, guidance, condition),
            x0,
            generator=generator,
            t=t,
            noise=noise,
        )

    def sample_images(self, model: nn.Module) -> tuple[Tensor, list[str]]:
        s = self.cfg.sample
        images = self.pipe.generate(
            self.sample_text,
            self.negative_text,
            steps=s.steps,
            guidance=s.guidance,
            distilled_guidance=sampling_guidance(self.cfg),
            shift=s.shift,
            sampler=s.sampler,
            seed=s.seed,
            model=model,
            ddpm=self.objective if isinstance(self.objective, DDPMObjective) else None,
            eta=s.eta,
            spacing=s.spacing,
        )
        return images, list(s.prompts)

    def description(self) -> dict[str, Any]:
        return {
            "task": "text_to_image",
            "model_params": self.params.to_dict(),
            **guidance_description(self.cfg, self.params),
        }
