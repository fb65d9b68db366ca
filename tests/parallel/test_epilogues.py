"""The sampling path with GEMM epilogues is swapped into a Flux from outside: where it cannot run
(autograd on, or off CUDA) the model computes exactly as before, and copies stay independent."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fluxlab.conditioning.tokens import image_ids, text_ids
from fluxlab.models.flux.model import Flux
from fluxlab.models.flux.presets import flux_params
from fluxlab.parallel import epilogues
from fluxlab.parallel.epilogues import (
    EpilogueMLP,
    EpilogueSingleStreamBlock,
    use_inference_epilogues,
)

PARAMS = flux_params("flux-debug", in_channels=4, context_in_dim=8, vec_in_dim=8)


def _inputs(device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        img=torch.randn(2, 6, 4, generator=g),
        img_ids=image_ids(2, 2, 3),
        txt=torch.randn(2, 3, 8, generator=g),
        txt_ids=text_ids(2, 3),
        timesteps=torch.rand(2, generator=g),
        y=torch.randn(2, 8, generator=g),
    )
    return {k: v.to(device) for k, v in inputs.items()}


def _randomized(device: str = "cpu") -> Flux:
    torch.manual_seed(0)
    model = Flux(PARAMS).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def test_without_cuda_or_with_autograd_the_model_is_unchanged() -> None:
    plain, swapped = _randomized(), use_inference_epilogues(_randomized())
    x = _inputs()
    torch.testing.assert_close(swapped(**x), plain(**x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(swapped(**x), plain(**x), rtol=0, atol=0)
    swapped(**x).square().mean().backward()
    assert all(p.grad is not None for p in swapped.parameters())


def test_applying_twice_swaps_once_and_state_dict_keys_stay() -> None:
    model = _randomized()
    keys = list(model.state_dict())
    use_inference_epilogues(use_inference_epilogues(model))
    assert all(type(b) is EpilogueSingleStreamBlock for b in model.single_blocks)
    assert all(type(b.img_mlp) is EpilogueMLP for b in model.double_blocks)
    assert "forward" not in vars(model.single_blocks[0])  # the class's forward, not an attribute
    assert list(model.state_dict()) == keys


def test_a_deep_copy_runs_on_its_own_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    # The EMA is a deep copy of the trained model: its swapped forwards must use its own blocks.
    monkeypatch.setattr(epilogues, "epilogues_apply", lambda x: not torch.is_grad_enabled())
    monkeypatch.setattr(
        torch,
        "_addmm_activation",
        lambda bias, a, b, use_gelu: F.gelu(torch.addmm(bias, a, b), approximate="tanh"),
    )
    model = use_inference_epilogues(_randomized())
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        fresh = Flux(PARAMS)
        fresh.load_state_dict(twin.state_dict())
        x = _inputs()
        torch.testing.assert_close(twin(**x), fresh(**x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(twin(**x), model(**x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt's GELU epilogue needs CUDA")
def test_cuda_epilogues_match_the_plain_path() -> None:
    plain = _randomized("cuda")
    swapped = use_inference_epilogues(copy.deepcopy(plain))
    x = _inputs("cuda")
    with torch.no_grad():
        torch.testing.assert_close(swapped(**x), plain(**x), rtol=1e-4, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused, reference = swapped(**x), plain(**x)
    torch.testing.assert_close(fused.float(), reference.float(), rtol=0.02, atol=0.05)


def test_swapped_forwards_compile_into_one_graph() -> None:
    # parallelize and the benchmark compile the blocks' forwards after the swap (fullgraph, as the
    # benchmark asks): the swapped class, its fallback and the attention_fn attribute must trace.
    plain, compiled = _randomized(), use_inference_epilogues(_randomized())
    for block in (*compiled.double_blocks, *compiled.single_blocks):
        block.forward = torch.compile(block.forward, backend="eager", fullgraph=True)
    x = _inputs()
    torch.testing.assert_close(compiled(**x), plain(**x), rtol=1e-6, atol=1e-6)


def test_compiled_blocks_share_one_graph_across_blocks() -> None:
    # Every block runs the same forward code, so one compiled graph per block type serves all of
    # them: more blocks than Dynamo's recompile limit must not fail a fullgraph compile.
    torch._dynamo.reset()
    # config.patch, not monkeypatch: undoing a setattr on Dynamo's config hides the key for good.
    with torch._dynamo.config.patch(recompile_limit=2):
        _compile_every_block_and_compare()
    torch._dynamo.reset()


def _compile_every_block_and_compare() -> None:
    params = flux_params(
        "flux-debug", in_channels=4, context_in_dim=8, vec_in_dim=8, depth=4, depth_single_blocks=4
    )
    torch.manual_seed(0)
    plain = Flux(params)
    compiled = use_inference_epilogues(copy.deepcopy(plain))
    for block in (*compiled.double_blocks, *compiled.single_blocks):
        block.forward = torch.compile(block.forward, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**_inputs()), plain(**_inputs()), rtol=0, atol=0)
