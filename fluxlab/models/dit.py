"""Class-conditional DiT with adaLN-Zero (Peebles & Xie, "Scalable Diffusion Models with
Transformers").

Written from the paper and the reference layout so original checkpoints can be mapped 1:1 (same
module names and qkv packing). Differences from the original, on purpose:
  * time arrives as t in [0, 1] and is multiplied by 1000 before the sinusoidal embedding (the
    fluxlab convention shared with Flux); with the DDPM objective's t_int / 1000 this is exactly the
    original integer-t embedding.
  * ``learn_sigma`` defaults to False: the DDPM objective here trains a fixed-variance ε model.
    Set it True to load original checkpoints (output = [ε, variance] channels); samplers use the
    ε half.

Attention runs through each ``Attention`` module's ``attention_fn`` (PyTorch's SDPA unless a caller
sets another kernel, as ``fluxlab.parallel.attention_kernels.use_attention`` does for training).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

FREQUENCY_EMBEDDING_SIZE = 256


@dataclass(kw_only=True)
class DiTParams:
    """Defaults are DiT-XL/2 on 32×32×4 latents (256² images through the SD VAE)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    pos_embed: Literal["sincos", "learned"] = "sincos"

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    def validate(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}; "
                "pick a patch size that divides the input."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "choose a width that is a multiple of the head count."
            )
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise ValueError(
                "The 2-D sin-cos position embedding needs hidden_size divisible by 4, got "
                f"{self.hidden_size}; change the width or use pos_embed='learned'."
            )
        if self.pos_embed not in ("sincos", "learned"):
            raise ValueError(f"Unknown pos_embed {self.pos_embed!r}; use 'sincos' or 'learned'.")
        if self.num_classes < 1:
            raise ValueError(
                "num_classes must be at least 1 (use 1 for an unconditional model), got "
                f"{self.num_classes}."
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(
                f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}."
            )


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[sin, cos] features of positions -> [N, dim] (float64, MAE/DiT layout)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = positions.double().reshape(-1, 1) * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D position table [grid², dim]: half the channels encode the column, half the row,
    with tokens in row-major order (the order the patch embedding flattens them)."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    # The reference meshgrids (w, h), so its first half encodes the column index; keep that order
    # so original checkpoints see the table they were trained with.
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """Sinusoidal features [cos, sin] of t (any real scale) -> [B, dim], computed in float32."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: Tensor) -> Tensor:
        # Scale in float32: in half precision t·1000 would miss the DDPM path's integer timesteps.
        freq = self.timestep_embedding(t.float() * 1000, FREQUENCY_EMBEDDING_SIZE)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, index ``num_classes``, for the "no label" of CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: Tensor) -> Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_fn: Callable[[Tensor, Tensor, Tensor], Tensor] = (
            F.scaled_dot_product_attention
        )

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (k h d) -> k b h n d", k=3, h=self.num_heads)
        out = self.attention_fn(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, params: DiTParams) -> None:
        super().__init__()
        params.validate()
        self.params = params
        p, hidden = params.patch_size, params.hidden_size
        self.x_embedder = nn.Conv2d(params.in_channels, hidden, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(params.num_classes, hidden, params.class_dropout_prob)
        self.pos_embed = nn.Parameter(
            torch.zeros(1, params.grid_size**2, hidden), requires_grad=params.pos_embed == "learned"
        )
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, params.num_heads, params.mlp_ratio) for _ in range(params.depth)
        )
        self.final_layer = FinalLayer(hidden, p, params.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The conv is a linear map over flattened patches; initialise it as one.
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.params.pos_embed == "sincos":
            if self.pos_embed.device.type != "meta":
                self.pos_embed.copy_(
                    sincos_2d(self.params.hidden_size, self.params.grid_size)[None]
                )
        else:
            nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start closed, so a fresh DiT is the
        # zero function and each block starts as the identity.
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x [B, C, H, W], t [B] in [0, 1], y [B] long (``num_classes`` = no label)
        -> [B, C_out, H, W]."""
        prm = self.params
        if (
            x.ndim != 4
            or x.shape[1] != prm.in_channels
            or x.shape[2:] != (prm.input_size, prm.input_size)
        ):
            raise ValueError(
                f"DiT expects images [B, {prm.in_channels}, {prm.input_size}, {prm.input_size}], "
                f"got {tuple(x.shape)}; resize the data or build the model with matching "
                "input_size/in_channels."
            )
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(
                f"t and y must have shape [B] = [{x.shape[0]}], got {tuple(t.shape)} and "
                f"{tuple(y.shape)}."
            )
        tokens = rearrange(self.x_embedder(x), "b d h w -> b (h w) d") + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final_layer(tokens, c)
        return rearrange(
            out,
            "b (h w) (p q c) -> b c (h p) (w q)",
            h=prm.grid_size,
            p=prm.patch_size,
            q=prm.patch_size,
        )


def _preset(name: str, depth: int, hidden: int, heads: int, patch: int) -> tuple[str, DiTParams]:
    return f"DiT-{name}/{patch}", DiTParams(
        depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch
    )


DIT_PRESETS: dict[str, DiTParams] = dict(
    _preset(name, depth, hidden, heads, patch)
    for name, depth, hidden, heads in [
        ("S", 12, 384, 6),
        ("B", 12, 768, 12),
        ("L", 24, 1024, 16),
        ("XL", 28, 1152, 16),
    ]
    for patch in (2, 4, 8)
)
DIT_PRESETS["dit-seed"] = DiTParams(
    # The seed's DiT: 256² RGB pixels, 4×4 patches, 3 blocks, 6 heads, one label, learned positions.
    # Its width 64 does not split into 6 heads; 60 (head dim 10) is the nearest width that does and
    # also keeps the 2-D sin-cos table usable (needs width % 4 == 0, which rules out 66).
    input_size=256,
    patch_size=4,
    in_channels=3,
    hidden_size=60,
    depth=3,
    num_heads=6,
    num_classes=1,
    pos_embed="learned",
)
DIT_PRESETS["dit-debug"] = DiTParams(
    input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10
)
# Pixel-space sizes for OpenMoji (input size, channels and classes are set from the data when
# training): dit-tiny is sized for a 2-core CPU; dit-small has 40.6M parameters at 64², matching
# flux-small's 40.0M on the same data, so the DDPM-DiT vs flow-Flux comparison is between models of
# equal size.
DIT_PRESETS["dit-tiny"] = DiTParams(
    input_size=32,
    patch_size=4,
    in_channels=3,
    hidden_size=192,
    depth=6,
    num_heads=3,
    num_classes=10,
)
DIT_PRESETS["dit-small"] = DiTParams(
    input_size=64,
    patch_size=4,
    in_channels=3,
    hidden_size=384,
    depth=15,
    num_heads=6,
    num_classes=10,
)
# dit-tiny with 2×2 patches, for 16² on a CPU: the same 64 tokens as 32² with 4×4 patches, but each
# token predicts 12 values instead of 48 (the flow openmoji-cpu preset found that 16² with 2×2
# patches learns shapes that 32² with 4×4 does not).
DIT_PRESETS["dit-tiny-p2"] = replace(DIT_PRESETS["dit-tiny"], input_size=16, patch_size=2)
