"""FLUX text-to-image: captions → cached text embeddings → the pipeline's velocity on image tokens.

Trained by rectified flow, or by DDPM (the model's output then stands for ε, v or x0)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fluxlab.conditioning.kontext import ConditionTokens
from fluxlab.conditioning.text_cache import encode_captions_cached
from fluxlab.conditioning.text_encoders import build_text_encoder
from fluxlab.config.schema import Config
from fluxlab.data.common import cache_dir
from fluxlab.diffusion.ddpm import DDPMObjective
from fluxlab.diffusion.flow import Predict
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

VelocityFn = Callable[
    [nn.Module, Tensor, Tensor, TextEmbedding, Tensor | None, ConditionTokens | None], Tensor
]


@dataclass
class FlowInputs:
    """A batch ready for any Flux of the task: clean tokens, text, the empty text and a Kontext
    condition, with ``velocity(model, x_t, t, text, guidance, condition)`` over them (the
    distillation teacher's and student's alike)."""

    x0: Tensor
    text: TextEmbedding
    unconditional: TextEmbedding
    condition: ConditionTokens | None
    velocity: VelocityFn

    def predict(self, model: nn.Module, guidance: Tensor | None) -> Predict:
        """``model``'s conditional velocity ``predict(x_t, t)``."""
        return lambda x_t, t: self.velocity(model, x_t, t, self.text, guidance, self.condition)

    def paired(self, model: nn.Module, guidance: Tensor | None) -> Predict:
        """``model`` over ``[x; x]``: conditional rows first, then unconditional ones (the input
        ``classifier_free_guidance`` takes)."""
        text = TextEmbedding.cat([self.text, self.unconditional])
        g = torch.cat([guidance, guidance]) if guidance is not None else None
        c = self.condition
        c2 = ConditionTokens.cat([c, c]) if c is not None else None
        return lambda x2, t2: self.velocity(model, x2, t2, text, g, c2)


class InputsTask(Protocol):
    cfg: Config
    params: FluxParams
    objective: Any
    device: torch.device

    def flow_inputs(
        self, batch: dict[str, Any], generator: Any, drop: Tensor | None, measure: bool
    ) -> FlowInputs: ...


def batch_size(batch: dict[str, Any]) -> int:
    return len(batch["caption"]) if "caption" in batch else batch["txt"].shape[0]


def flow_matching_loss(
    task: InputsTask,
    model: nn.Module,
    batch: dict[str, Any],
    generator: Any,
    t: Tensor | None,
    noise: Tensor | Callable[[torch.Size], Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """The objective's loss of ``model`` on a task's batch; draws caption dropout (unless ``t``
    makes it a measurement), then a guidance range's strengths, then t and noise."""
    n, device = batch_size(batch), task.device
    drop = None
    if t is None:
        drop = rng.rand(n, generator, device) < task.cfg.data.caption_dropout
    guidance = training_guidance(task.cfg, task.params, n, generator, device)
    inputs = task.flow_inputs(batch, generator, drop, measure=t is not None)
    if callable(noise):
        noise = noise(inputs.x0.shape)
    return task.objective.loss(
        inputs.predict(model, guidance), inputs.x0, generator=generator, t=t, noise=noise
    )


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

    @property
    def device(self) -> torch.device:
        return self.captions.txt.device

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

    def flow_inputs(
        self, batch: dict[str, Any], generator: Any, drop: Tensor | None, measure: bool
    ) -> FlowInputs:
        """The batch as tokens and text (captions in ``drop`` replaced by the empty one)."""
        device = self.captions.txt.device
        images = batch["image"].to(device, non_blocking=True)
        return FlowInputs(
            x0=self.pipe.to_tokens(images),
            text=self.captions.lookup(batch["caption"], drop),
            unconditional=self.captions.lookup([""] * images.shape[0]),
            condition=self.condition(batch, device),
            velocity=self.pipe.velocity,
        )

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
        return flow_matching_loss(self, model, batch, generator, t, noise)

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
