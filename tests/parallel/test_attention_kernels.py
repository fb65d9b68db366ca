"""The attention kernels training uses: SDPA limited to flash/efficient on CUDA (cuDNN's backward
crashed on Flux runs), and fluxlab's pairing of cuDNN's forward pass with FlashAttention-2's
backward pass, set on the model from outside it."""

import pytest
import torch
import torch.nn.functional as F

from fluxlab.conditioning.tokens import image_ids, text_ids
from fluxlab.models.dit import DiT, DiTParams
from fluxlab.models.flux.model import Flux
from fluxlab.models.flux.presets import flux_params
from fluxlab.parallel.attention_kernels import (
    attention_function,
    cudnn_forward_flash_backward,
    for_training,
    has_cudnn_forward,
    sdpa_backends,
    training_attention,
    use_attention,
)
from fluxlab.parallel.attention_names import check_backend_names
from fluxlab.parallel.flash4 import flash4_attention, flash4_available

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def test_training_on_cuda_excludes_cudnn_and_restores_the_defaults() -> None:
    before = torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()
    # Only the global SDPA flags change, so this runs without a GPU.
    with for_training(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert not torch.backends.cuda.math_sdp_enabled()
        assert (
            torch.backends.cuda.flash_sdp_enabled()
            and torch.backends.cuda.mem_efficient_sdp_enabled()
        )
    assert (
        torch.backends.cuda.cudnn_sdp_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
    ) == before
    # FA4 where installed; else the pairing needs cuDNN's Hopper kernel; elsewhere SDPA.
    expected = cudnn_forward_flash_backward if HOPPER else F.scaled_dot_product_attention
    expected = flash4_attention if flash4_available() else expected
    assert training_attention(torch.device("cuda")) is expected
    assert training_attention(torch.device("cpu")) is F.scaled_dot_product_attention


def test_pairing_falls_back_to_sdpa_where_it_does_not_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pretend to have a Hopper GPU: the pairing is chosen, but CPU and fp32 tensors still go to
    # plain SDPA.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert has_cudnn_forward()
    monkeypatch.setattr("fluxlab.parallel.attention_kernels.flash4_available", lambda: False)
    attention_fn = attention_function(["cudnn-forward", "math"])
    assert attention_fn is cudnn_forward_flash_backward
    assert attention_function(["flash"]) is F.scaled_dot_product_attention
    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    with sdpa_backends(["cudnn-forward", "math"]):
        out = attention_fn(q, k, v)
        expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert q.grad is not None


def test_cpu_training_keeps_pytorchs_choice() -> None:
    with for_training(torch.device("cpu")):
        assert torch.backends.cuda.math_sdp_enabled()  # untouched: the CPU path may need it
        q = torch.randn(1, 2, 4, 8, requires_grad=True)
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    assert q.grad is not None


def test_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match="fa3"):
        with sdpa_backends(["flash", "fa3"]):
            pass
    with pytest.raises(ValueError, match="flash or efficient"):
        with sdpa_backends(["cudnn-forward"]):
            pass
    with pytest.raises(ValueError, match="fa3"):
        check_backend_names(["fa3"])


def test_use_attention_reaches_every_attending_module_of_one_model_only() -> None:
    calls = []

    def counting_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(q.shape)
        return F.scaled_dot_product_attention(q, k, v)

    params = flux_params("flux-debug", in_channels=4, context_in_dim=8, vec_in_dim=8)
    model, other = Flux(params), Flux(params)
    other.load_state_dict(model.state_dict())
    assert use_attention(model, counting_sdpa) is model
    inputs = dict(
        img=torch.randn(1, 4, 4),
        img_ids=image_ids(1, 2, 2),
        txt=torch.randn(1, 3, 8),
        txt_ids=text_ids(1, 3),
        timesteps=torch.rand(1),
        y=torch.randn(1, 8),
    )
    expected = other(**inputs)
    torch.testing.assert_close(model(**inputs), expected, rtol=0, atol=0)
    assert len(calls) == params.depth + params.depth_single_blocks
    other(**inputs)  # nothing global changed: the other model still runs SDPA
    assert len(calls) == params.depth + params.depth_single_blocks

    dit = DiT(
        DiTParams(input_size=4, patch_size=2, in_channels=3, hidden_size=16, depth=2, num_heads=2)
    )
    use_attention(dit, counting_sdpa)
    dit(torch.randn(1, 3, 4, 4), torch.rand(1), torch.zeros(1, dtype=torch.long))
    assert len(calls) == params.depth + params.depth_single_blocks + 2


@pytest.mark.skipif(
    not HOPPER, reason="needs a CUDA GPU of compute capability 9.0+ (cuDNN's fused attention)"
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(
    "shape", [(2, 24, 1280, 128), (1, 4, 333, 64)], ids=["flux-train", "odd-length"]
)
def test_cudnn_forward_flash_backward_matches_flash(shape: tuple[int, ...], compiled: bool) -> None:
    torch.manual_seed(0)
    base = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def run(names: list[str]) -> list[torch.Tensor]:
        q, k, v = (t.clone().requires_grad_() for t in base)
        attention_fn = attention_function(names)
        fn = torch.compile(attention_fn) if compiled else attention_fn
        with sdpa_backends(names):
            out = fn(q, k, v)
            out.backward(grad)
        return [out.detach(), q.grad, k.grad, v.grad]

    paired, flash = run(["cudnn-forward", "flash"]), run(["flash"])
    for name, a, b in zip(("out", "dq", "dk", "dv"), paired, flash):
        scale = b.float().abs().max().item()
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 2**-6 * scale, f"{name}: max error {err} at scale {scale}"
    # The pairing really ran cuDNN's forward pass: its output differs from flash's in the last bits.
    assert not torch.equal(paired[0], flash[0])


@pytest.mark.skipif(
    not HOPPER, reason="needs a CUDA GPU of compute capability 9.0+ (cuDNN's fused attention)"
)
def test_compiled_flux_block_trains_with_the_pairing() -> None:
    # The attention kernel is a module attribute: a compiled block must trace through it.
    torch.manual_seed(0)
    params = flux_params("flux-small", in_channels=16, context_in_dim=32, vec_in_dim=8)
    grads = []
    for attention_fn in (cudnn_forward_flash_backward, F.scaled_dot_product_attention):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Flux(params)
        use_attention(model, attention_fn)
        for block in (*model.double_blocks, *model.single_blocks):
            block.forward = torch.compile(block.forward, fullgraph=True)
        g = torch.Generator().manual_seed(1)
        inputs = dict(
            img=torch.randn(2, 64, 16, generator=g).cuda(),
            img_ids=image_ids(2, 8, 8).cuda(),
            txt=torch.randn(2, 16, 32, generator=g).cuda(),
            txt_ids=text_ids(2, 16).cuda(),
            timesteps=torch.rand(2, generator=g).cuda(),
            y=torch.randn(2, 8, generator=g).cuda(),
        )
        with sdpa_backends(["flash"]), torch.autocast("cuda", dtype=torch.bfloat16):
            model(**inputs).float().square().mean().backward()
        grads.append(model.double_blocks[0].img_attn.qkv.weight.grad)
    paired, flash = grads
    torch.testing.assert_close(paired, flash, rtol=0.05, atol=0.05 * flash.abs().max().item())
