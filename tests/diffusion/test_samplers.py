"""Schedules and samplers against diffusers' FlowMatchEulerDiscreteScheduler and closed forms."""

import math

import numpy as np
import pytest
import torch

from fluxlab.diffusion.ddpm import DDPMObjective, DDPMSchedule, ddim_sample, ddpm_sample
from fluxlab.diffusion.flow import RectifiedFlow, resolution_mu, time_shift
from fluxlab.diffusion.samplers import euler, get_schedule, heun, sample

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the numerical oracle (test dependency)"
)


@pytest.mark.parametrize("steps,seq_len", [(4, 256), (28, 1024), (50, 4096), (10, 64)])
def test_schedule_matches_diffusers_dynamic_shift(steps: int, seq_len: int) -> None:
    mu = resolution_mu(seq_len)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    # FluxPipeline passes these sigmas and mu; the scheduler shifts them and appends the final 0.
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = torch.tensor(get_schedule(steps, seq_len), dtype=torch.float64)
    ref = sched.sigmas.double()
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_mu_is_linear_between_the_anchors() -> None:
    assert resolution_mu(256) == pytest.approx(0.5)
    assert resolution_mu(4096) == pytest.approx(1.15)
    assert resolution_mu(2176) == pytest.approx(0.825)


def test_unshifted_schedule_is_linspace() -> None:
    assert get_schedule(4, 4096, shift=False) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_time_shift_endpoints_and_monotone() -> None:
    t = torch.linspace(0, 1, 11)
    s = time_shift(1.0, 1.0, t)
    assert s[0] == 0 and s[-1] == pytest.approx(1.0)
    assert torch.all(s[1:] > s[:-1]) and torch.all(s[1:-1] > t[1:-1])  # more time at high noise


def test_euler_is_exact_for_the_straight_path() -> None:
    # For x_t = (1-t)·x0 + t·ε the true velocity ε - x0 is constant: Euler lands on x0 at any
    # step count.
    x0, eps = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    v = lambda x, t: eps - x0  # noqa: E731
    for sampler in (euler, heun):
        out = sampler(v, eps.clone(), get_schedule(3, 256))
        torch.testing.assert_close(out, x0)


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Any smooth function of (x, t): the dispatch must not change what the samplers compute.
    return torch.sin(3 * x) * t.view(-1, *([1] * (x.ndim - 1))) - 0.5 * x


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("shift", [True, False])
def test_sample_dispatches_flow_samplers_over_the_flux_schedule(name: str, shift: bool) -> None:
    noise = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))
    integrate = {"euler": euler, "heun": heun}[name]
    seen: list[int] = []
    out = sample(
        name, _model, noise, 5, image_seq_len=16, shift=shift, callback=lambda i, x: seen.append(i)
    )
    assert torch.equal(out, integrate(_model, noise, get_schedule(5, 16, shift=shift)))
    assert seen == list(range(5))


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_sample_dispatches_ddim_and_ddpm_with_the_objective(prediction: str) -> None:
    objective = DDPMObjective(DDPMSchedule("cosine"), prediction)  # type: ignore[arg-type]
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    common = dict(schedule=objective.schedule, prediction=prediction, clip_x0=1.0)
    ddim = sample(
        "ddim",
        _model,
        noise,
        6,
        image_seq_len=4,
        ddpm=objective,
        eta=0.5,
        spacing="leading",
        generator=torch.Generator().manual_seed(1),
    )
    ddim_ref = ddim_sample(
        _model,
        noise,
        6,
        0.5,
        spacing="leading",
        generator=torch.Generator().manual_seed(1),
        **common,
    )
    assert torch.equal(ddim, ddim_ref)
    ddpm = sample(
        "ddpm",
        _model,
        noise,
        7,
        image_seq_len=4,
        ddpm=objective,
        generator=torch.Generator().manual_seed(2),
    )
    ddpm_ref = ddpm_sample(
        _model,
        noise,
        steps=7,
        spacing="trailing",
        generator=torch.Generator().manual_seed(2),
        **common,
    )
    assert torch.equal(ddpm, ddpm_ref)
    assert not torch.equal(ddim, ddpm)


def test_sample_refuses_a_sampler_of_the_other_objective() -> None:
    noise = torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match="does not sample a flow model; choose euler or heun"):
        sample("ddim", _model, noise, 2, image_seq_len=4)
    with pytest.raises(ValueError, match="does not sample a DDPM model; choose ddim or ddpm"):
        sample("euler", _model, noise, 2, image_seq_len=4, ddpm=DDPMObjective())


def test_rectified_flow_loss_is_velocity_mse() -> None:
    obj = RectifiedFlow(t_sampler="uniform")
    x0 = torch.randn(4, 6, 3)
    g = torch.Generator().manual_seed(0)
    seen = {}

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    loss, t = obj.loss(predict, x0, generator=g)
    # Recover ε from x_t = (1-t)x0 + tε and check the loss is |ε - x0|² averaged per sample.
    t_ = t.view(-1, 1, 1)
    eps = (seen["x_t"] - (1 - t_) * x0) / t_
    torch.testing.assert_close(loss, (eps - x0).pow(2).mean(dim=(1, 2)), rtol=1e-4, atol=1e-5)
    assert loss.shape == (4,) and torch.all((t > 0) & (t < 1))


def test_logit_normal_sampler_median() -> None:
    obj = RectifiedFlow(t_sampler="logit_normal", logit_mean=1.0, logit_std=0.5)
    t = obj.sample_t(20000, 256, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)


def test_bad_sampler_name() -> None:
    with pytest.raises(ValueError, match="t_sampler"):
        RectifiedFlow(t_sampler="cosine")  # type: ignore[arg-type]
