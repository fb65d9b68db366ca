import math

import pytest
import torch

from fluxlab.diffusion.ddpm import (
    DDPMObjective,
    DDPMSchedule,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    min_snr_weight,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_tables_match_diffusers(name: str) -> None:
    ours = DDPMSchedule(name)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAME[name])
    torch.testing.assert_close(ours.betas, ref.betas.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), atol=1e-6, rtol=0)


def test_cosine_betas_are_clipped() -> None:
    betas = DDPMSchedule("cosine").betas
    assert betas.max().item() == pytest.approx(0.999)
    assert DDPMSchedule("linear").betas[-1].item() == pytest.approx(0.02)


def test_q_sample_matches_diffusers_add_noise() -> None:
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    ours = DDPMSchedule("cosine").q_sample(x0, t, noise)
    torch.testing.assert_close(ours, ref.add_noise(x0, noise, t), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 50, 333, 1000])
def test_ddim_timesteps_match_diffusers(spacing: str, steps: int) -> None:
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    assert ddim_timesteps(steps, spacing) == ref.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_ddim_step_matches_diffusers(spacing: str, prediction: str) -> None:
    steps = 20
    ref = diffusers.DDIMScheduler(
        beta_schedule="linear",
        timestep_spacing=spacing,
        clip_sample=False,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
    )
    ref.set_timesteps(steps)
    ours = DDPMSchedule("linear")
    gen = torch.Generator().manual_seed(0)
    for t in ref.timesteps.tolist()[::4] + [ref.timesteps[-1].item()]:
        x, out = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
        expected = ref.step(out, t, x, eta=0.0).prev_sample
        # diffusers always steps back by T // steps, whatever the spacing.
        got = ours.ddim_step(out, t, t - 1000 // steps, x, eta=0.0, prediction=prediction)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_ddim_step_with_eta_matches_diffusers() -> None:
    ref = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    ref.set_timesteps(10)
    x, out, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    expected = ref.step(out, 500, x, eta=0.7, variance_noise=noise).prev_sample
    got = DDPMSchedule("cosine").ddim_step(out, 500, 400, x, eta=0.7, noise=noise)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        DDPMSchedule("cosine").ddim_step(out, 500, 400, x, eta=0.7)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("t", [999, 600, 37, 1, 0])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_ddpm_step_matches_diffusers(name: str, t: int, clip: float | None) -> None:
    ref = diffusers.DDPMScheduler(beta_schedule=DIFFUSERS_NAME[name], clip_sample=clip is not None)
    ours = DDPMSchedule(name)
    if t == 1 or (name == "cosine" and t == 999):
        # Two ill-conditioned ends where diffusers' float32 tables, not the formula, set the error:
        # 1 − ᾱ_1 ~ 2e-4 loses ~3e-4 of itself to cancellation, and the cosine β_999 = 0.999
        # rounded to float32 moves ᾱ_999 by 1.3e-5 relative. Hand it our float64 tables to compare
        # the formula.
        ref.alphas_cumprod, ref.one = ours.alphas_cumprod, torch.tensor(1.0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(t)
    x, out = 2 * torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    # diffusers draws variance_noise = randn(shape, generator) on the CPU: draw the same numbers.
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(123))
    expected = ref.step(out, t, x, generator=torch.Generator().manual_seed(123)).prev_sample
    got = ours.ddpm_step(out, t, x, noise, clip_x0=clip)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [0, 250, 999])
def test_prediction_conversions_round_trip(t: int) -> None:
    sched = DDPMSchedule("cosine")
    x0, eps = (
        torch.randn(2, 3, 4, 4, dtype=torch.float64),
        torch.randn(2, 3, 4, 4, dtype=torch.float64),
    )
    tt = torch.full((2,), t)
    x_t = sched.q_sample(x0, tt, eps)
    for prediction in ("epsilon", "v", "x0"):
        target = sched.target(x0, eps, tt, prediction)
        got_x0, got_eps = sched.to_x0_eps(target, tt, x_t, prediction)
        # ᾱ_999 of the cosine schedule is ~1e-9, so recovering x0 from ε divides by ~3e-5.
        atol = 1e-4 if (t == 999 and prediction == "epsilon") else 1e-8
        torch.testing.assert_close(got_x0, x0, atol=atol, rtol=0)
        torch.testing.assert_close(got_eps, eps, atol=1e-8, rtol=0)
    # v is neither ε nor x0 except by accident
    assert not torch.allclose(sched.velocity(x0, eps, tt), eps)


def _alpha_bar_by_hand(t: int) -> float:
    return math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(t + 1))


@pytest.mark.parametrize("t", [10, 200, 900])
def test_min_snr_weights_by_hand(t: int) -> None:
    a = _alpha_bar_by_hand(t)
    snr, gamma = a / (1 - a), 5.0
    objective = DDPMObjective(DDPMSchedule("linear"), prediction="epsilon", min_snr_gamma=gamma)
    assert objective.weight(torch.tensor([t])).item() == pytest.approx(
        min(snr, gamma) / snr, rel=1e-6
    )
    snr_t = torch.tensor([snr], dtype=torch.float64)
    assert min_snr_weight(snr_t, gamma, "v").item() == pytest.approx(
        min(snr, gamma) / (snr + 1), rel=1e-9
    )
    assert min_snr_weight(snr_t, gamma, "x0").item() == pytest.approx(min(snr, gamma), rel=1e-9)


def test_min_snr_clips_only_high_snr() -> None:
    sched = DDPMSchedule("linear")
    w = min_snr_weight(sched.snr(torch.tensor([10, 999])), 5.0, "epsilon")
    assert w[0] < 0.1  # t = 10: SNR ~ 1e3 is clipped to 5
    assert w[1].item() == 1.0  # t = 999: SNR ~ 4e-5 is kept


def test_objective_loss_shapes_and_targets() -> None:
    sched = DDPMSchedule("linear")
    objective = DDPMObjective(sched, prediction="v", loss="l1")
    x0 = torch.randn(5, 3, 4, 4)
    seen = {}

    def predict(x_t: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        seen["x_t"], seen["t"] = x_t, t_model
        return torch.zeros_like(x_t)

    loss, t_model = objective.loss(predict, x0, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (5,) and t_model.shape == (5,)
    assert t_model.dtype == torch.float32 and (t_model >= 0).all() and (t_model < 1).all()
    assert torch.equal(seen["t"], t_model)
    # Replay the draws: t first, then the noise, from the same generator.
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (5,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    torch.testing.assert_close(t_model, t / 1000)
    torch.testing.assert_close(seen["x_t"], sched.q_sample(x0, t, noise))
    expected = sched.velocity(x0, noise, t).abs().flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)


def test_objective_rejects_learn_sigma_outputs_and_bad_options() -> None:
    objective = DDPMObjective()
    with pytest.raises(ValueError, match="learn_sigma"):
        objective.loss(lambda x, t: torch.cat([x, x], dim=1), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="prediction"):
        DDPMObjective(prediction="score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss"):
        DDPMObjective(loss="huber")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta schedule"):
        DDPMSchedule("sigmoid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(1001)


def test_samplers_recover_a_known_x0() -> None:
    # With the exact ε of a single known x0, DDIM (η = 0) and DDPM both land on x0.
    sched = DDPMSchedule("linear")
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64) - 0.5

    def oracle(x_t: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        a = sched.alpha_bar((t_model * 1000).round().long())[:, None, None, None]
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    steps_seen: list[int] = []
    out = ddim_sample(
        oracle,
        x_T,
        10,
        spacing="trailing",
        schedule=sched,
        callback=lambda i, x: steps_seen.append(i),
    )
    assert steps_seen == list(range(10))
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)
    out = ddpm_sample(oracle, x_T, schedule=sched, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_respaced_ddpm_recovers_x0_and_full_chain_is_the_default(spacing: str) -> None:
    sched = DDPMSchedule("cosine")
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64) - 0.5

    def oracle(x_t: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        a = sched.alpha_bar((t_model * 1000).round().long())[:, None, None, None]
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen: list[int] = []
    out = ddpm_sample(
        oracle,
        x_T,
        steps=20,
        spacing=spacing,
        schedule=sched,
        callback=lambda i, x: seen.append(i),
        generator=torch.Generator().manual_seed(2),
    )
    assert seen == list(range(20))
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)
    # a noisy (non-oracle) model: steps=1000 is exactly the default full chain, and respacing
    # changes it
    noisy = lambda x, t: 0.5 * x  # noqa: E731
    runs = [
        ddpm_sample(noisy, x_T, steps=s, schedule=sched, generator=torch.Generator().manual_seed(3))
        for s in (None, 1000, 50)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
