"""Text-to-image from the latent cache (``data.cache_dir``): latents and text embeddings come
straight from the shards, so a training step runs the transformer only; no autoencoder or text
encoder is built.

The autoencoder's decoder (and, for prompts that were not cached, the text encoder) load on the
first sample grid. Checkpoints describe the same task as on-the-fly training, so ``fluxlab sample``
and ``fluxlab eval`` rebuild them with the autoencoder named in the config.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fluxlab.conditioning.kontext import ConditionTokens
from fluxlab.conditioning.text_encoders import build_text_encoder
from fluxlab.conditioning.tokens import image_ids, pack, text_ids
from fluxlab.config.schema import Config
from fluxlab.data.cache import CachedLatents, check_cache, load_text_table
from fluxlab.diffusion.ddpm import DDPMObjective
from fluxlab.diffusion.objectives import objective_from_config
from fluxlab.models.flux.model import Flux, FluxParams
from fluxlab.pipelines.build import build_codec, build_model, build_pipeline, model_params
from fluxlab.pipelines.text_to_image import FluxTextToImage, TextEmbedding, autocast_for
from fluxlab.tasks.guidance import guidance_description, sampling_guidance
from fluxlab.tasks.text_to_image import FlowInputs, flow_matching_loss
from fluxlab.train import rng
from fluxlab.train.rng import SampleGenerators


class CachedTextToImageTask:
    """Text-to-image Flux training on cached latents and text embeddings (no encoders)."""

    def __init__(self, cfg: Config, model: Flux, params: FluxParams, device: torch.device) -> None:
        self.cfg, self.model, self.params, self.device = cfg, model, params, device
        self.objective = objective_from_config(cfg)
        self.text = load_text_table(cfg.data.cache_dir or "")
        empty_txt, empty_vec = self.text[""]
        self.empty = TextEmbedding(empty_txt[None].to(device), empty_vec[None].to(device))
        self._pipe: FluxTextToImage | None = None

    @classmethod
    def for_training(
        cls,
        cfg: Config,
        dataset: CachedLatents,
        device: torch.device,
        extra_captions: Sequence[str] = (),
    ) -> CachedTextToImageTask:
        index = check_cache(cfg)
        token_dim = index["latent"]["channels"] * cfg.encoding.patch_size**2
        params = model_params(
            cfg, token_dim, index["text"]["context_dim"], index["text"]["pooled_dim"]
        )
        # build_model starts from scratch or from model.init_from
        return cls(cfg, build_model(cfg, params, device), params, device)

    # ------------------------------------------------------------------------------------------
    def velocity(
        self,
        model: nn.Module,
        x_t: Tensor,
        t: Tensor,
        text: TextEmbedding,
        grid: tuple[int, int],
        guidance: Tensor | None = None,
    ) -> Tensor:
        """v(x_t, t) for tokens of a ``grid`` (rows, columns) of latent patches: the batch's
        bucket; ``guidance`` feeds a guidance-embedded model."""
        b, device = x_t.shape[0], x_t.device
        with autocast_for(device, self.cfg.train.mixed_precision):
            out = model(
                img=x_t,
                img_ids=image_ids(b, *grid, device=device),
                txt=text.txt,
                txt_ids=text_ids(b, text.txt.shape[1], device=device),
                timesteps=t,
                y=text.vec,
                guidance=guidance,
            )
        return out.float()

    def latents(
        self,
        batch: dict[str, Any],
        generator: torch.Generator | SampleGenerators | None,
        measure: bool,
    ) -> Tensor:
        """The batch's latents [B, C, h, w]; with stored posteriors a fresh sample (the mean when
        measuring)."""
        if "latent" in batch:
            return batch["latent"].to(self.device, torch.float32, non_blocking=True)
        mean = batch["mean"].to(self.device, torch.float32, non_blocking=True)
        if measure:
            return mean
        std = batch["logvar"].to(self.device, torch.float32, non_blocking=True).mul(0.5).exp()
        return mean + std * rng.randn(mean.shape, generator, self.device)

    def flow_inputs(
        self,
        batch: dict[str, Any],
        generator: torch.Generator | SampleGenerators | None,
        drop: Tensor | None,
        measure: bool,
    ) -> FlowInputs:
        """The cached batch as tokens and text (captions in ``drop`` replaced by the empty one);
        with stored posteriors a fresh latent sample, the mean when ``measure``."""
        device = self.device
        txt = batch["txt"].to(device, torch.float32, non_blocking=True)
        vec = batch["vec"].to(device, torch.float32, non_blocking=True)
        if drop is not None:
            txt = torch.where(drop[:, None, None], self.empty.txt, txt)
            vec = torch.where(drop[:, None], self.empty.vec, vec)
        latents = self.latents(batch, generator, measure)
        p = self.cfg.encoding.patch_size
        grid = (latents.shape[-2] // p, latents.shape[-1] // p)

        def velocity(
            model: nn.Module,
            x_t: Tensor,
            t: Tensor,
            text: TextEmbedding,
            guidance: Tensor | None,
            condition: ConditionTokens | None,
        ) -> Tensor:
            return self.velocity(model, x_t, t, text, grid, guidance)

        return FlowInputs(
            x0=pack(latents, p),
            text=TextEmbedding(txt, vec),
            unconditional=self.empty.repeat(txt.shape[0]),
            condition=None,
            velocity=velocity,
        )

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        generator: torch.Generator | SampleGenerators | None,
        t: Tensor | None = None,
        noise: Tensor | Callable[[torch.Size], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Training loss; with ``t`` given a measurement (no caption dropout, posterior means).
        Draws from ``generator`` in the on-the-fly task's order (dropout, a guidance range's
        strengths, then the objective's t and noise)."""
        return flow_matching_loss(self, model, batch, generator, t, noise)

    # ------------------------------------------------------------------------------------------
    @property
    def pipe(self) -> FluxTextToImage:
        """The sampling pipeline, its autoencoder loaded on first use (sample grids only)."""
        if self._pipe is None:
            codec = build_codec(self.cfg, self.device)
            self._pipe = build_pipeline(self.cfg, self.params, self.device, codec, self.model)
        return self._pipe

    def embed(self, prompts: list[str]) -> TextEmbedding:
        """Cached embeddings of ``prompts``; ones the cache lacks (the config's prompts changed
        since) are encoded."""
        missing = [p for p in prompts if p not in self.text]
        if missing:
            warnings.warn(
                f"{len(missing)} sample prompt(s) are not in the cache (e.g. {missing[0]!r}); "
                "loading the text encoder to embed them",
                stacklevel=2,
            )
            encoder = build_text_encoder(
                self.cfg.encoding.text_encoder, self.cfg.encoding.text_max_length, self.device
            )
            txt, vec = encoder.encode(missing)
            self.text.update(
                {p: (txt[i].float().cpu(), vec[i].float().cpu()) for i, p in enumerate(missing)}
            )
            del encoder
        return TextEmbedding(
            torch.stack([self.text[p][0] for p in prompts]),
            torch.stack([self.text[p][1] for p in prompts]),
        )

    def sample_images(self, model: nn.Module) -> tuple[Tensor, list[str]]:
        s = self.cfg.sample
        images = self.pipe.generate(
            self.embed(list(s.prompts)),
            self.embed([s.negative_prompt]),
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
