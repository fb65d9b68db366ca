"""The training objective a config names (``objective.kind``): rectified flow or DDPM."""

from __future__ import annotations

from fluxlab.config.schema import Config
from fluxlab.diffusion.ddpm import DDPMObjective, DDPMSchedule
from fluxlab.diffusion.flow import RectifiedFlow

Objective = RectifiedFlow | DDPMObjective


def objective_from_config(cfg: Config) -> Objective:
    """``objective.kind="flow"`` → RectifiedFlow, otherwise the DDPM noise-prediction objective."""
    o = cfg.objective
    if o.kind == "flow":
        return RectifiedFlow(
            t_sampler=o.t_sampler, logit_mean=o.logit_mean, logit_std=o.logit_std, shift=o.shift
        )
    return DDPMObjective(DDPMSchedule(o.beta_schedule), o.prediction, o.loss, o.min_snr_gamma)
