"""Classifier-free guidance: the combination, the batch layout [cond; uncond], scale 1."""

import pytest
import torch

from fluxlab.diffusion.guidance import classifier_free_guidance


def test_combination_is_uncond_plus_scale_times_the_difference() -> None:
    # Conditioned rows predict x + 1, unconditional rows predict x: guided = x + scale.
    def paired(x2: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
        half = x2.shape[0] // 2
        return torch.cat([x2[:half] + 1, x2[half:]])

    x, t = torch.zeros(2, 3), torch.zeros(2)
    guided = classifier_free_guidance(lambda x, t: x + 1, paired, scale=4.0)
    assert torch.equal(guided(x, t), torch.full((2, 3), 4.0))
    # A non-integer scale against hand-computed numbers: cond 5, uncond 2 → 2 + 2.5·3 = 9.5.
    guided = classifier_free_guidance(
        lambda x, t: x, lambda x2, t2: torch.cat([x2[:2] + 5, x2[2:] + 2]), scale=2.5
    )
    assert torch.equal(guided(x, t), torch.full((2, 3), 9.5))


def test_the_doubled_batch_is_cond_then_uncond() -> None:
    seen = {}

    def paired(x2: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
        seen["x2"], seen["t2"] = x2, t2
        return torch.cat([torch.full_like(x2[:2], 10.0), torch.full_like(x2[2:], 4.0)])

    x, t = torch.randn(2, 5), torch.tensor([0.25, 0.75])
    out = classifier_free_guidance(lambda x, t: x, paired, scale=3.0)(x, t)
    assert torch.equal(seen["x2"], torch.cat([x, x])) and torch.equal(seen["t2"], torch.cat([t, t]))
    # 4 + 3·(10 − 4) = 22; the rows swapped (uncond first) would give 10 + 3·(4 − 10) = −8.
    assert torch.equal(out, torch.full((2, 5), 22.0))


def test_scale_one_is_the_conditional_model_in_one_pass() -> None:
    def paired(x2: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
        raise AssertionError("scale 1 must not run the doubled batch")

    def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 2 * x

    assert classifier_free_guidance(conditional, paired, 1.0) is conditional


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_one_doubled_forward_matches_two_separate_forwards(scale: float) -> None:
    # A label-conditioned model whose rows do not interact: one batched pass equals two passes.
    torch.manual_seed(0)
    embed, layer = torch.nn.Embedding(3, 4), torch.nn.Linear(4, 4)

    def model(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return layer(x * t[:, None] + embed(labels))

    x, t = torch.randn(2, 4), torch.tensor([0.3, 0.9])
    y, null = torch.tensor([0, 1]), torch.tensor([2, 2])
    guided = classifier_free_guidance(
        lambda x, t: model(x, t, y), lambda x, t: model(x, t, torch.cat([y, null])), scale
    )
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        torch.testing.assert_close(guided(x, t), uncond + scale * (cond - uncond))
