"""Building blocks of the FLUX.1 MM-DiT.

Module and parameter names follow the BFL reference (`double_blocks.0.img_attn.qkv.weight`, ...)
so that its checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from fluxlab.parallel.attention_kernels import scaled_dot_product_attention


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    """Rotation matrices [..., n, dim/2, 2, 2] for positions ``pos`` [..., n] along one axis."""
    if dim % 2:
        raise ValueError(f"each RoPE axis needs an even width, got {dim}")
    # float64 keeps large positions (up to ~128 here) exact enough; MPS has no float64.
    dtype = torch.float32 if pos.device.type == "mps" else torch.float64
    scale = torch.arange(0, dim, 2, dtype=dtype, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    angles = pos.to(dtype)[..., None] * omega
    rot = torch.stack([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], dim=-1)
    return rearrange(rot, "... n d (i j) -> ... n d i j", i=2, j=2).float()


def apply_rope(xq: Tensor, xk: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """Rotates consecutive channel pairs of queries and keys by the position's angles."""
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs[..., 0] * xq_[..., 0] + freqs[..., 1] * xq_[..., 1]
    xk_out = freqs[..., 0] * xk_[..., 0] + freqs[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Joint attention with RoPE; q, k, v are [B, H, L, D], the result [B, L, H*D].

    Heads-major, as in the BFL reference. A tokens-major variant ([B, L, H, D] views, which saves the
    transposing copies) was no faster on an H200 under torch.compile (docs/performance.md), so it was not kept.
    """
    q, k = apply_rope(q, k, pe)
    x = scaled_dot_product_attention(q, k, v)
    return rearrange(x, "B H L D -> B L (H D)")


def timestep_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0
) -> Tensor:
    """Sinusoidal embedding [B, dim] of t ∈ [0, 1] (scaled by ``time_factor``), cos first."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        emb = emb.to(t.dtype)
    return emb


class EmbedND(nn.Module):
    """RoPE over several position axes (FLUX: time/condition index, row, column)."""

    def __init__(self, dim: int, theta: float, axes_dim: list[int]):
        super().__init__()
        if sum(axes_dim) != dim:
            raise ValueError(
                f"RoPE axes {axes_dim} sum to {sum(axes_dim)}, not the head dimension {dim}"
            )
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        emb = torch.cat(
            [rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3
        )
        return emb.unsqueeze(1)  # broadcast over heads


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """The q/k/v projection and output projection of one stream of a double block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised queries and keys and the values, each [B, H, L, D]."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor

    def modulate(self, x: Tensor) -> Tensor:
        return (1 + self.scale) * x + self.shift


class Modulation(nn.Module):
    """adaLN: shift/scale/gate triples from the conditioning vector (two triples when ``double``)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


# Off only to measure what the epilogues buy (``fluxlab bench``'s ``fluxlab-plain`` implementation).
USE_GEMM_EPILOGUES = True


def gemm_epilogues(x: Tensor) -> bool:
    """Whether to fold the MLP's tanh-GELU into its matmul (cuBLASLt's GELU epilogue).

    Only for inference on CUDA: ``torch._addmm_activation`` has no backward, and on CPU it computes the
    exact (erf) GELU instead of FLUX's tanh approximation.
    """
    return USE_GEMM_EPILOGUES and x.is_cuda and not torch.is_grad_enabled()


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """tanh-GELU(x @ weightᵀ + bias) for 2-D ``x``, the GELU in cuBLASLt's epilogue.

    ``_addmm_activation`` is not on autocast's list, so under autocast (fluxlab samples in bf16 autocast on
    CUDA) the operands are cast to its dtype here, as ``F.linear`` would have them cast.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)


def mlp(layers: nn.Sequential, x: Tensor) -> Tensor:
    """``layers`` (Linear → tanh-GELU → Linear) applied to ``x``, the GELU in the first matmul's epilogue when it can."""
    if not gemm_epilogues(x):
        return layers(x)
    first, _, second = layers
    hidden = linear_gelu(x.flatten(0, 1), first.weight, first.bias)
    return second(hidden).view(*x.shape[:-1], -1)


def _mlp(hidden_size: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, mlp_hidden, bias=True),
        nn.GELU(approximate="tanh"),
        nn.Linear(mlp_hidden, hidden_size, bias=True),
    )


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one attention over both."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        assert img_mod2 is not None and txt_mod2 is not None

        img_q, img_k, img_v = self.img_attn.qkv_heads(img_mod1.modulate(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt_mod1.modulate(self.txt_norm1(txt)))

        # Text tokens first: the position ids are concatenated in the same order.
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * mlp(self.img_mlp, img_mod2.modulate(self.img_norm2(img)))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * mlp(self.txt_mlp, txt_mod2.modulate(self.txt_norm2(txt)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Shared weights for all tokens; attention and MLP run in parallel from one projection."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(head_dim)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        mod, _ = self.modulation(vec)
        h = mod.modulate(self.pre_norm(x))
        d = self.hidden_size
        fused = gemm_epilogues(x)
        if fused:
            # Inference on CUDA: the GELU runs in linear1's cuBLAS epilogue, and linear2 is split at the
            # concatenation (attention part, then the MLP part accumulated onto it), so neither the
            # activated MLP half nor the [attention, MLP] concatenation makes a trip through memory.
            w1, b1, w2 = self.linear1.weight, self.linear1.bias, self.linear2.weight
            qkv = F.linear(h, w1[: 3 * d], b1[: 3 * d])
            act = linear_gelu(h.flatten(0, 1), w1[3 * d :], b1[3 * d :])
        else:
            qkv, pre_act = torch.split(self.linear1(h), [3 * d, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe)
        if fused:
            out = torch.addmm(self.linear2.bias, attn.flatten(0, 1), w2[:, :d].t())
            out = torch.addmm(out, act, w2[:, d:].t()).view_as(x)
        else:
            out = self.linear2(torch.cat((attn, self.mlp_act(pre_act)), dim=2))
        return x + mod.gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True)
        )

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)
