"""FlashAttention-4 (``pip install 'fluxlab[fa4]'``, CuTe DSL kernels for Hopper and Blackwell) as
an ``attention_fn`` over fluxlab's [B, H, L, D] tensors.

Its forward and backward kernels are wrapped as two ``torch.library`` custom ops with fake
(shape-only) implementations and an autograd formula, so ``torch.compile`` traces through them
with ``fullgraph=True`` instead of breaking the graph at every attention call.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Hopper (9.x) and Blackwell (10.x-12.x) are the architectures FA4 builds kernels for.
_ARCHES = (9, 10, 11, 12)
_HEAD_DIMS = (64, 96, 128)


@functools.cache
def flash4_available() -> bool:
    """Whether ``flash-attn-4`` is installed and this machine's GPU is one it has kernels for."""
    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        return False
    if torch.cuda.get_device_capability()[0] not in _ARCHES:
        return False
    return importlib.util.find_spec("flash_attn.cute") is not None


def _interface() -> Any:
    # Imported on first use: the package is an optional extra, and importing it loads CUTLASS.
    from flash_attn.cute import interface

    return interface


@torch.library.custom_op("fluxlab::flash4_forward", mutates_args=(), device_types="cuda")
def _flash4_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """[B, L, H, D] in; the output [B, L, H, D] and the log-sum-exp [B, H, L] (fp32) out."""
    out, lse = _interface()._flash_attn_fwd(q, k, v, return_lse=True)[:2]
    return out, lse


@_flash4_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    b, length, h, _ = q.shape
    out = q.new_empty((b, length, h, v.shape[-1]))
    return out, q.new_empty((b, h, length), dtype=torch.float32)


@torch.library.custom_op("fluxlab::flash4_backward", mutates_args=(), device_types="cuda")
def _flash4_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _interface()._flash_attn_bwd(q, k, v, out, grad_out, lse)[:3]
    return dq, dk, dv


@_flash4_backward.register_fake
def _(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_for_backward(ctx: Any, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor | None) -> tuple[Tensor, ...]:
    q, k, v, out, lse = ctx.saved_tensors
    return _flash4_backward(grad_out.contiguous(), q, k, v, out, lse)


torch.library.register_autograd(
    "fluxlab::flash4_forward", _backward, setup_context=_save_for_backward
)


def flash4_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether FA4 takes these [B, H, L, D] tensors: CUDA bf16/fp16, one head count for q/k/v,
    a head dimension it has kernels for."""
    return (
        q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.dtype == k.dtype == v.dtype
        and q.dim() == 4
        and q.shape[:2] == k.shape[:2] == v.shape[:2]
        and q.shape[-1] == k.shape[-1] == v.shape[-1]
        and q.shape[-1] in _HEAD_DIMS
    )


def flash4_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Non-causal attention over [B, H, L, D], by FA4 where it applies and SDPA elsewhere."""
    if not flash4_applies(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)
    # FA4 reads [B, L, H, D]; the transposes are views (it accepts any strides with unit last one).
    out, _ = _flash4_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
