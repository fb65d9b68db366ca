"""The attention kernels training may use: flash/efficient on CUDA (cuDNN's backward crashed on Flux runs)."""

import pytest
import torch

from fluxlab.attention_backends import for_training, sdpa_backends


def test_training_on_cuda_excludes_cudnn_and_restores_the_defaults() -> None:
    before = torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()
    # Only the global SDPA flags change, so this runs without a GPU.
    with for_training(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert not torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before


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
