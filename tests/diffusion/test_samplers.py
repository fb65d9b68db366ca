"""Schedules and samplers against diffusers' FlowMatchEulerDiscreteScheduler and closed forms."""

import math

import numpy as np
import pytest
import torch

from fluxlab.diffusion.flow import RectifiedFlow, resolution_mu, time_shift
from fluxlab.diffusion.samplers import classifier_free_guidance, euler, get_schedule, heun

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
    # For x_t = (1-t)·x0 + t·ε the true velocity is ε - x0, constant: Euler lands on x0 at any step count.
    x0, eps = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    v = lambda x, t: eps - x0  # noqa: E731
    for sampler in (euler, heun):
        out = sampler(v, eps.clone(), get_schedule(3, 256))
        torch.testing.assert_close(out, x0)


def test_cfg_combination() -> None:
    cond = lambda x, t: torch.ones_like(x)  # noqa: E731
    uncond = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x = torch.zeros(2)
    assert torch.equal(classifier_free_guidance(cond, uncond, 4.0)(x, x), torch.full((2,), 4.0))
    assert classifier_free_guidance(cond, uncond, 1.0) is cond


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
