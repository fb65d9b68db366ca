"""FlashAttention-4 as fluxlab's attention kernel: chosen where installed on a GPU it supports,
SDPA everywhere else, and on the GPU equal to SDPA's flash kernel within bf16 rounding."""

import pytest
import torch
import torch.nn.functional as F

from fluxlab.conditioning.tokens import image_ids, text_ids
from fluxlab.models.flux.model import Flux
from fluxlab.models.flux.presets import flux_params
from fluxlab.parallel.attention_kernels import attention_function, sdpa_backends, use_attention
from fluxlab.parallel.attention_names import check_backend_names
from fluxlab.parallel.flash4 import flash4_applies, flash4_attention, flash4_available

needs_fa4 = pytest.mark.skipif(
    not flash4_available(),
    reason="needs flash-attn-4 (pip install 'fluxlab[fa4]') and a Hopper/Blackwell GPU",
)


def test_fa4_alone_is_refused_and_cpu_falls_back_to_sdpa() -> None:
    with pytest.raises(ValueError, match="no SDPA kernel to fall back on"):
        check_backend_names(["fa4"])
    q, k, v = (torch.randn(2, 3, 17, 64) for _ in range(3))
    assert not flash4_applies(q, k, v)  # CPU fp32
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(flash4_attention(q, k, v), expected, rtol=0, atol=0)
    if not flash4_available():
        assert attention_function(["fa4", "flash"]) is F.scaled_dot_product_attention


@needs_fa4
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(
    "shape",
    [(2, 24, 1280, 128), (1, 4, 333, 64), (1, 24, 8704, 128)],
    ids=["flux-train", "odd-length", "kontext-1024"],
)
def test_fa4_matches_sdpa_flash(shape: tuple[int, ...], compiled: bool) -> None:
    torch.manual_seed(0)
    base = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def run(attention_fn: object) -> list[torch.Tensor]:
        q, k, v = (t.clone().requires_grad_() for t in base)
        fn = torch.compile(attention_fn, fullgraph=True) if compiled else attention_fn
        with sdpa_backends(["flash"]):
            out = fn(q, k, v)
            out.backward(grad)
        return [out.detach(), q.grad, k.grad, v.grad]

    fa4, flash = run(flash4_attention), run(F.scaled_dot_product_attention)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fa4, flash):
        scale = b.float().abs().max().item()
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 2**-6 * scale, f"{name}: max error {err} at scale {scale}"
    assert not torch.equal(fa4[0], flash[0])  # FA4 really ran: the last bits differ


@needs_fa4
def test_compiled_flux_trains_with_fa4() -> None:
    torch.manual_seed(0)
    params = flux_params("flux-small", in_channels=16, context_in_dim=32, vec_in_dim=8)
    grads = []
    for attention_fn in (flash4_attention, F.scaled_dot_product_attention):
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
    fa4, flash = grads
    torch.testing.assert_close(fa4, flash, rtol=0.05, atol=0.05 * flash.abs().max().item())
