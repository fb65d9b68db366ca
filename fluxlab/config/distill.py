"""The ``distill`` config section: guidance distillation of a CFG teacher into a one-pass student.

The student is a guidance-embedded Flux; the scales it learns are ``objective.train_guidance``
(a [low, high] range drawn per sample, fed through its guidance embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class DistillConfig:
    # A fluxlab run/checkpoint folder (EMA weights) or a released FLUX folder; None = no
    # distillation.
    teacher: str | None = None
    # The frozen teacher's weights; "auto" is bfloat16 on CUDA (half the memory, and its two CFG
    # passes run as one batch under bf16 autocast anyway), float32 elsewhere.
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    def validate(
        self, objective_kind: str, arch: str, guidance_embed: bool | None, cfg_scale: float
    ) -> None:
        if self.teacher is None:
            return
        if objective_kind != "flow" or arch != "flux":
            raise ValueError(
                "distill.teacher distils a rectified-flow Flux: set objective.kind=flow and "
                f"model.arch=flux (got {objective_kind!r}, {arch!r})"
            )
        if guidance_embed is False:
            raise ValueError(
                "distill.teacher trains a student that takes the guidance scale as an input: "
                "model.guidance_embed must be true"
            )
        if cfg_scale != 1.0:
            raise ValueError(
                f"sample.guidance={cfg_scale}: a distilled student samples in one pass, so "
                "classifier-free guidance must stay off (1); its scale is sample.distilled_guidance"
            )
        if self.teacher_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(
                f"distill.teacher_dtype={self.teacher_dtype!r}: choose auto, float32 or bfloat16"
            )
