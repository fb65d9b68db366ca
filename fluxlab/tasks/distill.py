"""Guidance distillation: a student learns in one pass what its teacher gives with CFG in two.

At a noisy ``x_t`` of the training data the frozen teacher's target is ``v_u + w·(v_c − v_u)``
(its two passes as one doubled batch, through the pipelines' own guidance function); the
student, a guidance-embedded Flux started from the teacher, takes ``w`` through its embedding and
regresses that target. ``w`` is drawn per sample from ``objective.train_guidance``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fluxlab.adapters.runs import init_weights
from fluxlab.config.loading import config_data, config_from_dict, deep_merge, parse_overrides
from fluxlab.config.presets import PRESETS
from fluxlab.config.schema import Config
from fluxlab.diffusion.flow import Predict
from fluxlab.diffusion.guidance import classifier_free_guidance
from fluxlab.models.flux.model import Flux, FluxParams
from fluxlab.models.weights.pretrained import is_fluxlab_checkpoint
from fluxlab.tasks.guidance import training_guidance
from fluxlab.tasks.text_to_image import FlowInputs, InputsTask, batch_size
from fluxlab.train.checkpoint import read_description, resolve_checkpoint

DEFAULT_SCALES = [1.0, 6.0]


def student_config(teacher: str, config: str | None, overrides: list[str]) -> Config:
    """The student's run: the teacher's own config (or ``config``, a preset or file), made a
    guidance-embedded Flux started from the teacher that samples in one pass, then
    ``overrides``."""
    teacher_cfg: dict[str, Any] | None = None
    run_dir = Path(teacher).resolve()
    if is_fluxlab_checkpoint(teacher):
        checkpoint = resolve_checkpoint(teacher)
        teacher_cfg = read_description(checkpoint)["config"]
        run_dir = checkpoint.parent.parent  # <run>/checkpoints/step_N
        teacher = str(checkpoint)  # pinned: a resume must not pick up the teacher's later steps
    if config is None and teacher_cfg is None:
        raise ValueError(
            f"--teacher {teacher!r} is not a fluxlab run, so it has no config to follow: "
            "pass --config PRESET"
        )
    if teacher_cfg is not None and teacher_cfg["data"].get("caption_dropout", 0.1) == 0:
        warnings.warn(
            f"--teacher {teacher} trained with data.caption_dropout=0: its unconditional branch "
            "is untrained, so its CFG targets mean little",
            stacklevel=2,
        )
    data = config_data(config, PRESETS) if config is not None else dict(teacher_cfg or {})
    teacher_scale = (teacher_cfg or data).get("sample", {}).get("guidance", 4.0)
    defaults = {
        "model": {"guidance_embed": True, "init_from": teacher},
        "objective": {"train_guidance": DEFAULT_SCALES},
        "data": {"caption_dropout": 0.0},  # the student never sees an unconditional branch
        "sample": {"guidance": 1.0, "distilled_guidance": teacher_scale},
        "lora": {"enabled": False},
        "distill": {"teacher": teacher},
        "train": {"output_dir": f"{run_dir}-distilled"} if config is None else {},
    }
    data = deep_merge(deep_merge(data, defaults), parse_overrides(overrides))
    cfg = config_from_dict(data)
    cfg.validate()
    return cfg


def teacher_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    choice = cfg.distill.teacher_dtype
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if choice == "bfloat16" else torch.float32


def load_teacher(cfg: Config, student: FluxParams, device: torch.device) -> Flux:
    """The frozen teacher of ``distill.teacher``, checked to be the student minus its guidance
    embedding."""
    assert cfg.distill.teacher is not None
    params, weights = init_weights(cfg.distill.teacher, device, teacher_dtype(cfg, device))
    params = params if params is not None else dataclasses.replace(student, guidance_embed=False)
    if params.guidance_embed:
        raise ValueError(
            f"distill.teacher={cfg.distill.teacher!r} already takes guidance as an input (it is "
            "distilled); distil a model that samples with classifier-free guidance"
        )
    expected = dataclasses.replace(student, guidance_embed=False)
    if params != expected:
        diff = {
            k: (v, getattr(expected, k))
            for k, v in params.to_dict().items()
            if getattr(expected, k) != v
        }
        raise ValueError(
            f"distill.teacher={cfg.distill.teacher!r} and the student differ (teacher, student): "
            f"{diff}; keep the teacher's model, encoding and text_encoder settings"
        )
    if isinstance(weights, Flux):
        teacher = weights
    else:
        with torch.device("meta"):
            teacher = Flux(params)
        teacher.load_state_dict(weights, strict=True, assign=True)
    return teacher.to(device).eval().requires_grad_(False)


class DistillTask:
    """A student Flux trained on its teacher's CFG velocity, over a task's data and pipeline
    (text-to-image or Kontext edits, pixels, latents or the latent cache)."""

    def __init__(self, base: Any, teacher: Flux) -> None:
        self.base = base
        self.cfg: Config = base.cfg
        self.model = base.model
        self.params: FluxParams = base.params
        self.objective = base.objective
        self.teacher = teacher
        if hasattr(base, "grid_nrow"):  # an edit task's sample grid layout
            self.grid_nrow = base.grid_nrow

    @property
    def device(self) -> torch.device:
        return self.base.device

    def teacher_velocity(self, inputs: FlowInputs, scale: Tensor) -> Predict:
        """The teacher's guided velocity at ``scale`` [B] per sample (no gradients)."""
        guided = classifier_free_guidance(
            inputs.predict(self.teacher, None), inputs.paired(self.teacher, None), scale
        )

        @torch.no_grad()
        def target(x_t: Tensor, t: Tensor) -> Tensor:
            return guided(x_t, t).float()

        return target

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        generator: Any,
        t: Tensor | None = None,
        noise: Tensor | Callable[[torch.Size], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample MSE to the teacher's guided velocity, and t; draws the scales, then the
        objective's t and noise (``t`` given: a measurement, posterior means)."""
        base: InputsTask = self.base
        scale = training_guidance(self.cfg, self.params, batch_size(batch), generator, self.device)
        assert scale is not None  # the config demands a guidance-embedded student
        inputs = base.flow_inputs(batch, generator, None, measure=t is not None)
        if callable(noise):
            noise = noise(inputs.x0.shape)
        return self.objective.loss(
            inputs.predict(model, scale),
            inputs.x0,
            generator=generator,
            t=t,
            noise=noise,
            teacher=self.teacher_velocity(inputs, scale),
        )

    def sample_images(self, model: nn.Module) -> tuple[Tensor, list[str]]:
        return self.base.sample_images(model)  # one pass: sample.guidance is 1

    def description(self) -> dict[str, Any]:
        return {
            **self.base.description(),
            "distilled": {
                "teacher": self.cfg.distill.teacher,
                "scales": list(self.cfg.objective.guidance_range()),
            },
        }
