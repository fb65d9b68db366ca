"""The attention kernels training uses: SDPA limited to flash/efficient on CUDA (cuDNN's backward crashed on
Flux runs), and fluxlab's pairing of cuDNN's forward pass with FlashAttention-2's backward pass."""

import pytest
import torch
import torch.nn.functional as F

from fluxlab.parallel import attention_kernels
from fluxlab.parallel.attention_kernels import (
    for_training,
    scaled_dot_product_attention,
    sdpa_backends,
)

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
        assert attention_kernels._cudnn_forward == HOPPER  # the pairing needs cuDNN's Hopper kernel
    assert (
        torch.backends.cuda.cudnn_sdp_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
    ) == before
    assert attention_kernels._cudnn_forward is False


def test_pairing_falls_back_to_sdpa_where_it_does_not_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pretend to have a Hopper GPU: the switch turns on, but CPU and fp32 tensors still go to plain SDPA.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    with sdpa_backends(["cudnn-forward", "math"]):
        assert attention_kernels._cudnn_forward
        out = scaled_dot_product_attention(q, k, v)
        expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert q.grad is not None and attention_kernels._cudnn_forward is False


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
        fn = (
            torch.compile(scaled_dot_product_attention)
            if compiled
            else scaled_dot_product_attention
        )
        with sdpa_backends(names):
            out = fn(q, k, v)
            out.backward(grad)
        return [out.detach(), q.grad, k.grad, v.grad]

    paired, flash = run(["cudnn-forward", "flash"]), run(["flash"])
    for name, a, b in zip(("out", "dq", "dk", "dv"), paired, flash):
        scale = b.float().abs().max().item()
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 2**-6 * scale, f"{name}: max error {err} at scale {scale}"
    # The pairing really ran cuDNN's forward pass: its output differs from flash's in the last bits somewhere.
    assert not torch.equal(paired[0], flash[0])
