"""Which attention kernel fluxlab's models run, set on the model from outside it.

Every Flux and DiT module that attends calls its ``attention_fn`` (PyTorch's SDPA by default);
:func:`use_attention` sets it on a whole model. Where FlashAttention-4 is installed on a Hopper or
Blackwell GPU, training and sampling use it (``fluxlab.parallel.flash4``). Otherwise, on Hopper,
training pairs cuDNN's forward with FlashAttention-2's backward
(:func:`cudnn_forward_flash_backward`; cuDNN's own backward crashed Flux training runs,
docs/performance.md) and limits SDPA itself to flash/efficient (:func:`for_training`, around the
loss); sampling keeps PyTorch's default choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fluxlab.models.flux.layers import AttentionFn
from fluxlab.parallel.attention_names import (
    CUDNN_FORWARD,
    FLASH4,
    TRAINING_BACKENDS,
    check_backend_names,
)
from fluxlab.parallel.flash4 import flash4_attention, flash4_available

_SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@contextlib.contextmanager
def sdpa_backends(names: Sequence[str]) -> Iterator[None]:
    """Restricts ``F.scaled_dot_product_attention`` to SDPA's kernels among ``names``.

    ``cudnn-forward`` is allowed in ``names`` but is not SDPA's: a model gets it through
    :func:`attention_function` and :func:`use_attention`.
    """
    check_backend_names(names)
    with sdpa_kernel([_SDPA_KERNELS[n] for n in names if n in _SDPA_KERNELS]):
        yield


def has_cudnn_forward() -> bool:
    """Whether this machine's GPU has cuDNN's fused attention forward (compute capability ≥ 9.0)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def attention_function(names: Sequence[str]) -> AttentionFn:
    """The ``attention_fn`` for fluxlab's models given the kernels ``names``: FA4 or the
    cuDNN/flash pairing when named and the machine has it (in that order), else SDPA (restricted by
    :func:`sdpa_backends`)."""
    check_backend_names(names)
    if FLASH4 in names and flash4_available():
        return flash4_attention
    if CUDNN_FORWARD in names and has_cudnn_forward():
        return cudnn_forward_flash_backward
    return F.scaled_dot_product_attention


def training_attention(device: torch.device) -> AttentionFn:
    """The ``attention_fn`` a training step uses on ``device`` (on CPU: SDPA)."""
    if device.type != "cuda":
        return F.scaled_dot_product_attention
    return attention_function(TRAINING_BACKENDS)


def use_sampling_attention(model: nn.Module) -> nn.Module:
    """FA4 on ``model`` when it sits on a GPU that has it; otherwise the model's kernel stays."""
    if next(model.parameters()).is_cuda and flash4_available():
        use_attention(model, flash4_attention)
    return model


def for_training(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The SDPA kernels a training step may use on ``device`` (on CPU: PyTorch's own choice)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_backends(TRAINING_BACKENDS)


def use_attention(model: nn.Module, attention_fn: AttentionFn) -> nn.Module:
    """Sets ``attention_fn`` on every module of ``model`` that attends; returns ``model``."""
    for module in model.modules():
        if "attention_fn" in vars(module):
            module.attention_fn = attention_fn
    return model


def cudnn_forward_flash_backward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA over [B, H, L, D] whose differentiable bf16/fp16 CUDA calls (head dimension ≤ 128)
    run cuDNN's forward pass and FlashAttention-2's backward pass; other calls go to SDPA."""
    if _pairing_applies(q, k, v):
        return _CudnnForwardFlashBackward.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def _pairing_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return False  # sampling: SDPA picks cuDNN anyway
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if not q.dtype == k.dtype == v.dtype:
        return False
    # Both kernels want [B, H, L, D] with as many key/value heads as query heads.
    if q.dim() != 4 or not q.shape[:2] == k.shape[:2] == v.shape[:2] or k.shape[2] != v.shape[2]:
        return False
    head_dim = q.shape[-1]
    contiguous_rows = (
        q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    )  # the flash backward's input
    return (
        head_dim % 8 == 0
        and head_dim <= 128
        and k.shape[-1] == v.shape[-1] == head_dim
        and contiguous_rows
    )


class _CudnnForwardFlashBackward(torch.autograd.Function):
    """cuDNN's attention forward, differentiated by FlashAttention-2's backward kernel.

    Both define the same log-sum-exp (natural log of Σ exp(scale·q·k) per query row, fp32), which
    is all the flash backward needs besides q, k, v, the output and its gradient.
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
