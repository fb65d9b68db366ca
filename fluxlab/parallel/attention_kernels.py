"""Which fused attention kernels fluxlab's models use, in training and in sampling.

On Hopper GPUs PyTorch can route attention to cuDNN, FlashAttention-2 ("flash") or the memory-efficient
kernel. cuDNN's is the fastest forward pass (~550 TFLOP/s against FlashAttention-2's ~310 at Flux shapes on an
H200), but its backward pass has crashed with illegal memory accesses in Flux training on this workplace's
H100/H200s (diffusers' 2.56B step at 512², batch 8, and a simulated flux-dev FSDP2 run at 1,536 tokens:
docs/performance.md), though not in isolated calls of the same shapes. So SDPA itself is limited to
flash/efficient while training, and fluxlab's own models take the fast half of each: cuDNN's forward pass,
whose output and log-sum-exp FlashAttention-2's backward pass then differentiates
(:func:`scaled_dot_product_attention`, "cudnn-forward"). Sampling keeps PyTorch's default choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# "cudnn-forward" is fluxlab's pairing (cuDNN forward, FlashAttention-2 backward); the other names are SDPA's.
TRAINING_BACKENDS = ("cudnn-forward", "flash", "efficient")
BACKEND_NAMES = ("flash", "efficient", "cudnn", "math", "cudnn-forward")

# Set by sdpa_backends(); read by scaled_dot_product_attention while torch.compile traces, which guards on it.
_cudnn_forward = False


def check_backend_names(names: Sequence[str]) -> None:
    """A clear error for an unknown name, or for a set with no SDPA kernel for what the pairing does not cover."""
    unknown = [n for n in names if n not in BACKEND_NAMES]
    if unknown:
        raise ValueError(
            f"unknown attention backend(s) {unknown}: choose from {sorted(BACKEND_NAMES)}"
        )
    if all(n == "cudnn-forward" for n in names):
        raise ValueError(
            f"attention backends {list(names)} name no SDPA kernel to fall back on: add flash or efficient"
        )


@contextlib.contextmanager
def sdpa_backends(names: Sequence[str]) -> Iterator[None]:
    """Restrict attention to the named backends: SDPA's flash, efficient, cudnn, math, and "cudnn-forward".

    "cudnn-forward" applies to fluxlab's models only (:func:`scaled_dot_product_attention`); other code,
    such as diffusers' models, gets the SDPA backends named beside it.
    """
    global _cudnn_forward
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    check_backend_names(names)
    sdpa = [table[n] for n in names if n in table]
    # Decided here, not per call, so that torch.compile traces no device query.
    pairing = (
        "cudnn-forward" in names
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= (9, 0)
    )
    before, _cudnn_forward = _cudnn_forward, pairing
    try:
        with sdpa_kernel(sdpa):
            yield
    finally:
        _cudnn_forward = before


def for_training(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The attention kernels a training step may use on ``device`` (on CPU: PyTorch's own choice)."""
    return sdpa_backends(TRAINING_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention over [B, H, L, D] queries, keys and values, through the kernels chosen by :func:`sdpa_backends`.

    With "cudnn-forward" chosen on a Hopper-or-later GPU (cuDNN's fused kernel), a differentiable bf16/fp16
    call with head dimension ≤ 128 runs cuDNN's forward pass and FlashAttention-2's backward pass; everything
    else goes to ``F.scaled_dot_product_attention``.
    """
    if _cudnn_forward and _pairing_applies(q, k, v):
        return _CudnnForwardFlashBackward.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def _pairing_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return False  # sampling: SDPA picks cuDNN anyway
    if (
        not q.is_cuda
        or q.dtype not in (torch.bfloat16, torch.float16)
        or not q.dtype == k.dtype == v.dtype
    ):
        return False
    if q.dim() != 4 or not q.shape[:2] == k.shape[:2] == v.shape[:2] or k.shape[2] != v.shape[2]:
        return (
            False  # both kernels here want [B, H, L, D] with as many key/value heads as query heads
        )
    head_dim = q.shape[-1]
    contiguous_rows = (
        q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    )  # what the flash backward reads
    return (
        head_dim % 8 == 0
        and head_dim <= 128
        and k.shape[-1] == v.shape[-1] == head_dim
        and contiguous_rows
    )


class _CudnnForwardFlashBackward(torch.autograd.Function):
    """cuDNN's attention forward, differentiated by FlashAttention-2's backward kernel.

    Both define the same log-sum-exp (natural log of Σ exp(scale·q·k) per query row, fp32), which is all the
    flash backward pass needs besides q, k, v, the output and its gradient; on Flux shapes the gradients agree
    with an all-flash call to bf16 rounding (tests/parallel/test_attention_kernels.py, on a GPU).
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
        lse = lse.reshape(q.shape[:-1])  # cuDNN: [B, H, L, 1]; flash: [B, H, L]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        # Dense batches and no dropout: no variable-length offsets, and the RNG state is never read.
        rng = q.new_empty((), dtype=torch.int64)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            None,
            None,
            q.shape[2],
            k.shape[2],
            0.0,
            False,
            rng,
            rng,
        )
        return dq, dk, dv
