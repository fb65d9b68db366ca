"""FluxTextToImage.generate: CFG against a two-pass reference (with Kontext conditions and
distilled guidance), one forward per step at scale 1, and DDPM models through the dispatch."""

from collections.abc import Iterator

import pytest
import torch

from fluxlab.conditioning.kontext import encode_condition
from fluxlab.diffusion.ddpm import DDPMObjective, DDPMSchedule, ddim_sample
from fluxlab.diffusion.samplers import get_schedule
from fluxlab.models.flux.model import Flux
from fluxlab.models.flux.presets import flux_params
from fluxlab.pipelines.text_to_image import FluxTextToImage, PixelCodec, TextEmbedding


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread hand-offs cost more than the arithmetic
    yield
    torch.set_num_threads(threads)


def _pipe(guidance_embed: bool = False) -> FluxTextToImage:
    params = flux_params(
        "flux-debug",
        in_channels=48,
        context_in_dim=8,
        vec_in_dim=6,
        guidance_embed=guidance_embed,
    )
    model = Flux(params).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised layers too: every term contributes
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return FluxTextToImage(model, PixelCodec(), resolution=8, patch_size=4)  # 2×2 tokens of 48


def _text(n: int, seed: int) -> TextEmbedding:
    gen = torch.Generator().manual_seed(seed)
    return TextEmbedding(torch.randn(n, 5, 8, generator=gen), torch.randn(n, 6, generator=gen))


@pytest.mark.parametrize("kontext", [False, True])
@pytest.mark.parametrize("guidance_embed", [False, True])
def test_cfg_matches_two_separate_passes(guidance_embed: bool, kontext: bool) -> None:
    pipe, b, steps, scale = _pipe(guidance_embed), 2, 3, 3.0
    text, negative = _text(b, 1), _text(1, 2)
    images = torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    condition = encode_condition(pipe.codec, images, pipe.patch_size) if kontext else None
    out = pipe.generate(
        text, negative, steps=steps, guidance=scale, distilled_guidance=2.0, seed=7,
        condition=condition,
    )  # fmt: skip
    # The reference: conditional and unconditional velocities from separate forwards.
    g = torch.full((b,), 2.0) if guidance_embed else None
    x = torch.randn(
        b, pipe.image_seq_len, pipe.token_dim, generator=torch.Generator().manual_seed(7)
    )
    timesteps = get_schedule(steps, pipe.image_seq_len)
    with torch.no_grad():
        for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
            t = torch.full((b,), t_curr)
            cond = pipe.velocity(pipe.model, x, t, text, g, condition=condition)
            uncond = pipe.velocity(pipe.model, x, t, negative.repeat(b), g, condition=condition)
            x = x + (t_prev - t_curr) * (uncond + scale * (cond - uncond))
    torch.testing.assert_close(out, pipe.from_tokens(x), atol=1e-4, rtol=1e-4)


def test_guidance_one_runs_one_forward_of_the_batch_per_step() -> None:
    pipe, b = _pipe(), 3
    rows: list[int] = []
    pipe.model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(
        kwargs["img"].shape[0]), with_kwargs=True)  # fmt: skip
    pipe.generate(_text(b, 1), _text(1, 2), steps=4, guidance=1.0)
    assert rows == [b] * 4
    rows.clear()
    pipe.generate(_text(b, 1), _text(1, 2), steps=4, guidance=2.0)
    assert rows == [2 * b] * 4  # [cond; uncond] in one forward


def test_ddpm_model_samples_ddim_with_the_seeds_stream() -> None:
    # The initial noise and then DDIM's step noise come from one generator seeded by ``seed``.
    pipe, b, scale = _pipe(), 2, 2.0
    objective = DDPMObjective(DDPMSchedule("cosine"), prediction="v")
    text, negative = _text(b, 1), _text(1, 2)
    out = pipe.generate(
        text, negative, steps=4, guidance=scale, sampler="ddim", ddpm=objective, eta=0.7, seed=5
    )

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = pipe.velocity(pipe.model, x, t, text)
        uncond = pipe.velocity(pipe.model, x, t, negative.repeat(b))
        return uncond + scale * (cond - uncond)

    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(b, pipe.image_seq_len, pipe.token_dim, generator=gen)
    with torch.no_grad():
        tokens = ddim_sample(
            guided, noise, 4, 0.7, schedule=objective.schedule, spacing="trailing",
            prediction="v", clip_x0=1.0, generator=gen,
        )  # fmt: skip
    torch.testing.assert_close(out, pipe.from_tokens(tokens), atol=1e-4, rtol=1e-4)


def test_text_embedding_slices_by_prompt() -> None:
    text = _text(4, 0)
    part = text[1:3]
    assert torch.equal(part.txt, text.txt[1:3]) and torch.equal(part.vec, text.vec[1:3])
