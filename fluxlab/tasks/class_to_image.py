"""Class-conditional generation: a DiT (adaLN-Zero) on class labels, by DDPM or rectified flow.

The class label is dropped to the DiT's null class with probability ``data.caption_dropout`` (the
one condition-dropout knob shared with text-to-image), drawn from the trainer's seeded generator so
a resumed run replays the same drops; the DiT's own ``class_dropout_prob`` is therefore built as 0.
Sampling is classifier-free guided with that null class, by DDIM/DDPM (``objective.kind=ddpm``) or
Euler/Heun over the FLUX schedule (``objective.kind=flow``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fluxlab.config.loading import config_from_dict
from fluxlab.config.model_params import dit_params
from fluxlab.config.schema import Config
from fluxlab.diffusion.ddpm import DDPMObjective, Spacing
from fluxlab.diffusion.guidance import classifier_free_guidance
from fluxlab.diffusion.objectives import objective_from_config
from fluxlab.diffusion.samplers import sample
from fluxlab.models.dit import DiT, DiTParams
from fluxlab.pipelines.text_to_image import autocast_for
from fluxlab.train import rng
from fluxlab.train.checkpoint import load_weights, read_description, resolve_checkpoint


def class_indices(names: list[str], classes: list[str]) -> list[int]:
    """Class names → label indices; an unknown name raises listing the valid ones."""
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ValueError(
            f"unknown class {unknown[0]!r}: this model was trained on the classes "
            + ", ".join(repr(c) for c in classes)
        )
    return [classes.index(n) for n in names]


class ClassToImageTask:
    """A DiT trained on class labels; sampling draws ``sample.prompts`` as class names."""

    def __init__(self, cfg: Config, model: DiT, classes: list[str]) -> None:
        self.cfg = cfg
        self.model = model
        self.params = model.params
        self.classes = list(classes)
        self.objective = objective_from_config(cfg)
        self.null_class = self.params.num_classes
        prompts = list(cfg.sample.prompts)
        # sample.prompts name the grid's classes; prompts naming none (the text-to-image
        # defaults, or an empty list) mean one image per class.
        known = [p for p in prompts if p in self.classes]
        self.sample_classes = (
            class_indices(prompts, self.classes) if known else list(range(len(self.classes)))
        )

    @classmethod
    def for_training(cls, cfg: Config, dataset: Any, device: torch.device) -> ClassToImageTask:
        classes = getattr(dataset, "classes", None)
        if not classes:
            raise ValueError(
                f"data.dataset={cfg.data.dataset!r} has no classes; class_to_image needs "
                "labelled data"
            )
        model = DiT(dit_params(cfg, len(classes))).to(device)
        return cls(cfg, model, list(classes))

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path, device: torch.device, ema: bool = True
    ) -> tuple[ClassToImageTask, Path]:
        """Rebuilds the trained task from a run or checkpoint folder (EMA weights by default)."""
        path = resolve_checkpoint(checkpoint)
        desc = read_description(path)
        cfg = config_from_dict(desc["config"])
        cfg.train.mixed_precision = "auto"
        model = DiT(DiTParams(**desc["model_params"])).to(device)
        model.load_state_dict(load_weights(path, ema=ema), strict=True)
        return cls(cfg, model.eval(), desc["classes"]), path

    def _predict(self, model: nn.Module, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        with autocast_for(x.device, self.cfg.train.mixed_precision):
            return model(x, t, labels).float()

    def loss(
        self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        device = next(model.parameters()).device
        x0 = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device)
        drop = rng.rand(labels.shape[0], generator, device) < self.cfg.data.caption_dropout
        labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.objective.loss(
            lambda x_t, t: self._predict(model, x_t, t, labels), x0, generator=generator
        )

    @torch.no_grad()
    def generate(
        self,
        labels: list[int],
        *,
        steps: int,
        guidance: float,
        sampler: str,
        eta: float = 0.0,
        spacing: Spacing = "trailing",
        shift: bool = True,
        seed: int = 0,
        model: nn.Module | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1], one per label; one seed → the same noise and sampler
        noise. ``guidance`` is the CFG scale against the null class (1 = off)."""
        model = model if model is not None else self.model
        device = next(model.parameters()).device
        p = self.params
        b = len(labels)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(b, p.in_channels, p.input_size, p.input_size, generator=gen).to(device)
        y = torch.tensor(labels, device=device)
        y_paired = torch.cat([y, torch.full_like(y, self.null_class)])
        predict = classifier_free_guidance(
            lambda x, t: self._predict(model, x, t, y),
            lambda x, t: self._predict(model, x, t, y_paired),
            guidance,
        )
        x = sample(
            sampler,
            predict,
            noise,
            steps,
            image_seq_len=p.grid_size**2,
            shift=shift,
            ddpm=self.objective if isinstance(self.objective, DDPMObjective) else None,
            eta=eta,
            spacing=spacing,
            generator=gen,
            progress=progress,
        )
        return x.clamp(-1, 1).float().cpu()

    def sample_images(self, model: nn.Module) -> tuple[Tensor, list[str]]:
        s = self.cfg.sample
        images = self.generate(
            self.sample_classes,
            steps=s.steps,
            guidance=s.guidance,
            sampler=s.sampler,
            eta=s.eta,
            spacing=s.spacing,
            shift=s.shift,
            seed=s.seed,
            model=model,
        )
        return images, [self.classes[i] for i in self.sample_classes]

    def description(self) -> dict[str, Any]:
        return {
            "task": "class_to_image",
            "model_params": dataclasses.asdict(self.params),
            "classes": self.classes,
        }
