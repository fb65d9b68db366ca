"""Flux's sampling path with GEMM epilogues, swapped into a model from outside it.

On CUDA without autograd, cuBLASLt can apply the MLP's tanh-GELU inside the matmul that feeds it
(``torch._addmm_activation``), and a single block's ``linear2`` can run as two accumulating matmuls,
one over the attention output and one over the MLP activation. Neither the activation nor the
[attention, MLP] concatenation then makes a trip through memory. :func:`use_inference_epilogues`
swaps these forwards into a model's blocks (by their class, as FSDP2 does); with
autograd on (training, which needs a backward) or off CUDA each falls back to the block's own
forward, so the model computes the same function either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from fluxlab.models.flux.layers import DoubleStreamBlock, SingleStreamBlock, attention
from fluxlab.parallel.float8 import is_plain_weight


def epilogues_apply(x: Tensor) -> bool:
    """Whether the epilogue path may run on ``x``: a CUDA tensor with autograd off.

    ``_addmm_activation`` has no backward, and on CPU it computes the exact (erf) GELU instead of
    FLUX's tanh approximation.
    """
    return x.is_cuda and not torch.is_grad_enabled()


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """tanh-GELU(x @ weightᵀ + bias) for 2-D ``x``, the GELU in cuBLASLt's epilogue.

    ``_addmm_activation`` is not on autocast's list, so under autocast (fluxlab samples in bf16
    autocast on CUDA) the operands are cast here, as ``F.linear``'s would be.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)


class EpilogueMLP(nn.Sequential):
    """A double block's MLP (Linear → tanh-GELU → Linear), the GELU in the first matmul."""

    def forward(self, x: Tensor) -> Tensor:
        first, _, second = self
        if not epilogues_apply(x) or not _plain(first):  # LoRA and fp8 layers run their own
            return super().forward(x)
        hidden = linear_gelu(x.flatten(0, 1), first.weight, first.bias)
        return second(hidden).view(*x.shape[:-1], -1)


class EpilogueSingleStreamBlock(SingleStreamBlock):
    """``SingleStreamBlock``, the GELU in ``linear1``'s epilogue and ``linear2`` split in two."""

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        # Plain Linears only: a LoRA-wrapped one must run its own forward to add the adapter, and
        # an fp8-quantized weight cannot be sliced into cuBLASLt's epilogue call.
        plain = _plain(self.linear1) and _plain(self.linear2)
        if not plain or not epilogues_apply(x):
            return super().forward(x, vec=vec, pe=pe)
        mod, _ = self.modulation(vec)
        x_mod = (1 + mod.scale) * self.pre_norm(x) + mod.shift
        d = self.hidden_size
        w1, b1, w2 = self.linear1.weight, self.linear1.bias, self.linear2.weight
        qkv = F.linear(x_mod, w1[: 3 * d], b1[: 3 * d])
        act = linear_gelu(x_mod.flatten(0, 1), w1[3 * d :], b1[3 * d :])

        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe, self.attention_fn)

        out = torch.addmm(self.linear2.bias, attn.flatten(0, 1), w2[:, :d].t())
        out = torch.addmm(out, act, w2[:, d:].t()).view_as(x)
        return x + mod.gate * out


def _plain(layer: nn.Module) -> bool:
    """An ``nn.Linear`` holding ordinary weights: the epilogue path may read them."""
    return isinstance(layer, nn.Linear) and is_plain_weight(layer.weight)


def _swap_class(module: nn.Module, fused: type[nn.Module]) -> None:
    # The class, not a per-instance forward: every block then shares one forward, so a compiled
    # block's guards hold for all of them (a per-block callable recompiled each block). FSDP2
    # swaps classes the same way; parameters, hooks and state-dict keys stay as they were.
    if type(module) in fused.__bases__:
        module.__class__ = fused


def use_inference_epilogues(model: nn.Module) -> nn.Module:
    """Swaps the epilogue forwards into every Flux block of ``model``; returns ``model``.

    Apply it before ``torch.compile``, so that the compiled graphs hold the epilogue path.
    """
    for module in list(model.modules()):
        if isinstance(module, SingleStreamBlock):
            _swap_class(module, EpilogueSingleStreamBlock)
        elif isinstance(module, DoubleStreamBlock):
            _swap_class(module.img_mlp, EpilogueMLP)
            _swap_class(module.txt_mlp, EpilogueMLP)
    return model
