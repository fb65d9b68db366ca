"""Tasks: what is trained (model, inputs, objective, how to sample), apart from the trainer.

A task exposes ``model``, ``loss(model, batch, generator) -> (per-sample loss, t)``,
``sample_images(model) -> (images, captions)`` and ``description()`` (saved in every checkpoint so
the task can be rebuilt for sampling). The trainer only ever talks to this interface, so DDPM/DiT,
Kontext editing or latent-space training plug in without touching the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fluxlab.config.schema import Config
from fluxlab.tasks.cached import CachedTextToImageTask
from fluxlab.tasks.class_to_image import ClassToImageTask
from fluxlab.tasks.distill import DistillTask, load_teacher
from fluxlab.tasks.edit import EditTask
from fluxlab.tasks.text_to_image import TextToImageTask


class Task(Protocol):
    model: nn.Module

    # ``generator`` is a torch.Generator or per-sample fluxlab.train.rng.SampleGenerators; draw
    # through fluxlab.train.rng.
    def loss(
        self, model: nn.Module, batch: dict[str, Any], generator: Any
    ) -> tuple[Tensor, Tensor]: ...

    def sample_images(self, model: nn.Module) -> tuple[Tensor, list[str]]: ...

    def description(self) -> dict[str, Any]: ...


def build_task(
    cfg: Config, dataset: Any, device: torch.device, extra_captions: Sequence[str] = ()
) -> Task:
    """The task for a config, built for training on ``dataset`` (and validating on
    ``extra_captions`` too); with ``distill.teacher`` its student learns the teacher's CFG."""
    task = _base_task(cfg, dataset, device, extra_captions)
    if cfg.distill.teacher is None:
        return task
    return DistillTask(task, load_teacher(cfg, task.params, device))


def _base_task(
    cfg: Config, dataset: Any, device: torch.device, extra_captions: Sequence[str]
) -> Any:
    if cfg.data.cache_dir is not None:  # latents + text embeddings from `fluxlab cache`
        if cfg.model.arch != "flux" or cfg.data.task != "text_to_image":
            raise ValueError(
                "data.cache_dir trains text-to-image Flux models; unset it for DiT or edit runs"
            )
        return CachedTextToImageTask.for_training(cfg, dataset, device, extra_captions)
    if cfg.data.task == "edit":
        return EditTask.for_training(cfg, dataset, device, extra_captions)
    if cfg.model.arch == "flux":  # text-to-image, under either objective
        return TextToImageTask.for_training(cfg, dataset, device, extra_captions)
    if cfg.model.arch == "dit":  # class-conditional, under either objective
        return ClassToImageTask.for_training(cfg, dataset, device)
    raise ValueError(
        f"model.arch={cfg.model.arch!r} with objective.kind={cfg.objective.kind!r} is not wired "
        "into the trainer; use model.arch=flux or dit"
    )
