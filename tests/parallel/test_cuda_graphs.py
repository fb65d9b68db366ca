"""CUDAGraphed: a graph per input signature that replays what the plain forward computes, with
outputs that survive later calls; the pipeline's switch; the bench's compile specs."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import Tensor

from fluxlab.bench.impls import Impl
from fluxlab.conditioning.tokens import image_ids, text_ids
from fluxlab.models.flux.model import Flux, FluxParams
from fluxlab.models.flux.presets import flux_params
from fluxlab.parallel.cuda_graphs import CUDAGraphed
from fluxlab.parallel.epilogues import use_inference_epilogues
from fluxlab.pipelines.text_to_image import FluxTextToImage, PixelCodec, TextEmbedding

NO_GPU = None if torch.cuda.is_available() else "needs a CUDA GPU (CUDA graphs); none is visible"


def tiny_params() -> FluxParams:
    return flux_params(
        "flux-debug", in_channels=48, context_in_dim=32, vec_in_dim=32, guidance_embed=True
    )


def inputs(params: FluxParams, batch: int, seed: int, device: str = "cpu") -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(batch, 16, params.in_channels, generator=gen).to(device),
        img_ids=image_ids(batch, 4, 4).to(device),
        txt=torch.randn(batch, 5, params.context_in_dim, generator=gen).to(device),
        txt_ids=text_ids(batch, 5).to(device),
        timesteps=torch.rand(batch, generator=gen).to(device),
        y=torch.randn(batch, params.vec_in_dim, generator=gen).to(device),
        guidance=torch.full((batch,), 3.5).to(device),
    )


def test_off_cuda_the_module_runs_as_it_is() -> None:
    torch.manual_seed(0)
    model = Flux(tiny_params()).eval()
    graphed = CUDAGraphed(model)
    x = inputs(model.params, 2, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(graphed(**x), model(**x), rtol=0, atol=0)
    assert graphed.graph_count == 0
    assert next(graphed.parameters()) is next(model.parameters())


@pytest.mark.parametrize("spec", ["bogus", "block+fast", "full+max+graphs", "block+tune+max"])
def test_bench_compile_specs_that_cannot_run_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="compile spec"):
        Impl().compile(Flux(tiny_params()), spec)


def test_bench_cudagraph_spec_wraps_the_whole_forward() -> None:
    model = Flux(tiny_params())
    assert isinstance(Impl().compile(model, "eager+cudagraph"), CUDAGraphed)
    assert Impl().compile(model, "eager") is model


@pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))
@pytest.mark.parametrize("compiled", [False, True])
def test_replays_match_plain_calls_and_earlier_outputs_survive(compiled: bool) -> None:
    torch.manual_seed(0)
    model = Flux(tiny_params()).cuda().eval()  # fp32 weights: autocast casts them on each call
    use_inference_epilogues(model)
    if compiled:  # what fluxlab sample --fp8 captures: per-block compiled forwards
        for block in [*model.double_blocks, *model.single_blocks]:
            block.forward = torch.compile(block.forward)
    graphed = CUDAGraphed(model)
    calls = [inputs(model.params, 2, seed=s, device="cuda") for s in (1, 2)]
    calls.append(inputs(model.params, 4, seed=3, device="cuda"))  # CFG-doubled: a second graph
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = [model(**x).float() for x in calls]
        got = [graphed(**x).float() for x in calls]
        again = graphed(**calls[0]).float()  # a replay after another signature's capture
    assert graphed.graph_count == 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want[0], rtol=1e-5, atol=1e-5)
    assert (got[0] - got[1]).abs().max() > 1e-2  # the second call saw its own inputs


class HostSync(torch.nn.Module):
    """A forward that reads a value back to the host, which no CUDA graph can capture."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 2 if x.sum().item() > 0 else x * 3


@pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))
def test_a_forward_that_cannot_be_captured_runs_as_it_is_after_a_warning() -> None:
    graphed = CUDAGraphed(HostSync())
    x = torch.ones(4, device="cuda")
    with torch.no_grad():
        with pytest.warns(UserWarning, match="no-cuda-graphs"):
            first = graphed(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second attempt, no second warning
            second = graphed(-x)
    assert graphed.graph_count == 0
    torch.testing.assert_close(first, 2 * x)
    torch.testing.assert_close(second, -3 * x)


@pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))
def test_pipeline_samples_the_same_images_with_cuda_graphs() -> None:
    params = dataclasses.replace(tiny_params(), context_in_dim=8, vec_in_dim=6)
    torch.manual_seed(0)
    pipe = FluxTextToImage(Flux(params).cuda().eval(), PixelCodec(), resolution=8, patch_size=4)
    gen = torch.Generator().manual_seed(1)
    text = TextEmbedding(torch.randn(2, 5, 8, generator=gen), torch.randn(2, 6, generator=gen))
    negative = TextEmbedding(torch.randn(1, 5, 8, generator=gen), torch.randn(1, 6, generator=gen))
    plain = pipe.generate(text, negative, steps=4, guidance=3.0, seed=5)
    pipe.cuda_graphs = True
    graphed = pipe.generate(text, negative, steps=4, guidance=3.0, seed=5)
    assert pipe._graphed is not None and pipe._graphed.graph_count == 1  # the CFG pair, batched
    torch.testing.assert_close(graphed, plain, rtol=1e-4, atol=1e-4)
