"""Kontext-style image editing: (condition image, instruction) → target, by rectified flow.

The same Flux, caption table and pipeline as text-to-image; the condition image's tokens ride
along in every forward (``FluxTextToImage.velocity(..., condition=...)``) and the loss covers the
target's tokens only. Caption dropout drops the instruction but never the condition, so
classifier-free guidance at sampling time strengthens the instruction while both branches see the
source image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxlab.conditioning.kontext import ConditionTokens, encode_condition
from fluxlab.config.schema import Config
from fluxlab.data.edit_pairs import build_edit_dataset
from fluxlab.models.flux.model import FluxParams
from fluxlab.pipelines.text_to_image import FluxTextToImage, TextEmbedding
from fluxlab.tasks.guidance import guidance_description, sampling_guidance
from fluxlab.tasks.text_to_image import CaptionTable, TextToImageTask, build_flux_parts

logger = logging.getLogger(__name__)

MAX_SAMPLES = 8


def edit_triplets(
    condition: Tensor, output: Tensor, target: Tensor | None = None, gap: int = 2
) -> Tensor:
    """Side-by-side tiles condition | output | target [B, 3, H, 3W + 2·gap], white between; a
    condition of another size is resized to the output's for display."""
    h, w = output.shape[-2:]
    if condition.shape[-2:] != (h, w):
        condition = F.interpolate(condition.float(), size=(h, w), mode="nearest")
    parts = [condition.float().cpu(), output.float().cpu()] + (
        [target.float().cpu()] if target is not None else []
    )
    white = torch.ones(output.shape[0], 3, h, gap)
    tiles = [parts[0]]
    for part in parts[1:]:
        tiles += [white, part]
    return torch.cat(tiles, dim=-1)


def sample_examples(cfg: Config, fallback: Any) -> list[dict[str, Any]]:
    """Up to MAX_SAMPLES pairs spread over the held-out split (the training set when nothing is
    held out)."""
    d = cfg.data
    dataset = fallback
    if d.val_fraction > 0:
        try:
            dataset = build_edit_dataset(
                d.dataset, d.resolution, "val", d.val_fraction, cfg.train.seed, limit=d.limit
            )
        except ValueError as err:  # tiny or limited sets may hold nothing out
            logger.warning("sample grid uses training pairs: %s", err)
    n = min(MAX_SAMPLES, len(dataset))
    picks = [round(i * (len(dataset) - 1) / max(1, n - 1)) for i in range(n)]
    items = [dataset[i] for i in picks]
    return [item for item in items if item is not None]


class EditTask(TextToImageTask):
    """Kontext-style editing: the text-to-image task with a condition image beside the target."""

    grid_nrow = 4  # triplets per row of the sample grid

    def __init__(
        self,
        cfg: Config,
        pipe: FluxTextToImage,
        params: FluxParams,
        captions: CaptionTable,
        sample_text: TextEmbedding,
        negative_text: TextEmbedding,
        sample_conditions: Tensor,
        sample_targets: Tensor,
        sample_instructions: list[str],
    ) -> None:
        super().__init__(cfg, pipe, params, captions, sample_text, negative_text)
        self.sample_conditions = sample_conditions
        self.sample_targets = sample_targets
        self.sample_instructions = sample_instructions

    @classmethod
    def for_training(
        cls, cfg: Config, dataset: Any, device: torch.device, extra_captions: Sequence[str] = ()
    ) -> EditTask:
        """``extra_captions`` (the validation split's instructions) join the caption table."""
        examples = sample_examples(cfg, dataset)
        if not examples:
            raise ValueError(
                f"data.dataset={cfg.data.dataset!r} has no readable edit pair to draw samples from"
            )
        instructions = [e["caption"] for e in examples]
        parts = build_flux_parts(
            cfg, list(dataset.captions) + list(extra_captions), instructions, device
        )
        conditions = torch.stack([e["condition"] for e in examples])
        targets = torch.stack([e["image"] for e in examples])
        return cls(cfg, *parts, conditions, targets, instructions)

    def condition(self, batch: dict[str, Any], device: torch.device) -> ConditionTokens:
        """The source image's tokens; the loss then covers the target's tokens only."""
        cond_images = batch["condition"].to(device, non_blocking=True)
        return encode_condition(self.pipe.codec, cond_images, self.pipe.patch_size)

    def sample_images(self, model: nn.Module) -> tuple[Tensor, list[str]]:
        s = self.cfg.sample
        device = next(model.parameters()).device
        condition = encode_condition(
            self.pipe.codec, self.sample_conditions.to(device), self.pipe.patch_size
        )
        outputs = self.pipe.generate(
            self.sample_text,
            self.negative_text,
            steps=s.steps,
            guidance=s.guidance,
            distilled_guidance=sampling_guidance(self.cfg),
            shift=s.shift,
            sampler=s.sampler,
            seed=s.seed,
            model=model,
            condition=condition,
        )
        return edit_triplets(self.sample_conditions, outputs, self.sample_targets), list(
            self.sample_instructions
        )

    def description(self) -> dict[str, Any]:
        return {
            "task": "edit",
            "model_params": self.params.to_dict(),
            **guidance_description(self.cfg, self.params),
        }
