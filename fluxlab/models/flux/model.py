"""The FLUX.1 MM-DiT (BFL's ``model.py``): double-stream blocks, then single-stream blocks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from fluxlab.models.flux.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)


@dataclass
class FluxParams:
    in_channels: int = 64
    out_channels: int | None = None  # defaults to in_channels
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = False

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}: pick a width that is a multiple of the heads"
            )
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(
                f"model.axes_dim={self.axes_dim} sums to {sum(self.axes_dim)}, but the head "
                f"dimension (hidden_size / num_heads) is {head_dim}; the RoPE axes must cover it "
                "exactly"
            )
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"model.axes_dim={self.axes_dim}: every RoPE axis width must be even")

    def to_dict(self) -> dict:
        return asdict(self)


class Flux(nn.Module):
    """Velocity predictor v(x_t, t | text); BFL's ``Flux`` with the same parameter names."""

    def __init__(self, params: FluxParams):
        super().__init__()
        params.validate()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels or params.in_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(
            params.hidden_size // params.num_heads, params.theta, params.axes_dim
        )
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        self.guidance_in = (
            MLPEmbedder(256, self.hidden_size) if params.guidance_embed else nn.Identity()
        )
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)

    def initialize_weights(self) -> None:
        """Training from scratch: Xavier linears, then adaLN-Zero (modulations and output at zero).

        With zero gates every block starts as the identity and the model predicts zero velocity,
        the DiT recipe that keeps early training stable.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for emb in (self.time_in, self.vector_in, self.guidance_in):
            if isinstance(emb, MLPEmbedder):
                nn.init.normal_(emb.in_layer.weight, std=0.02)
                nn.init.normal_(emb.out_layer.weight, std=0.02)
        for block in self.double_blocks:
            for mod in (block.img_mod, block.txt_mod):
                nn.init.zeros_(mod.lin.weight)
                nn.init.zeros_(mod.lin.bias)
        for block in self.single_blocks:
            nn.init.zeros_(block.modulation.lin.weight)
            nn.init.zeros_(block.modulation.lin.bias)
        final = self.final_layer
        for lin in (final.adaLN_modulation[1], final.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Velocity [B, L_img, out] from img [B, L_img, in], txt [B, L_txt, context],
        ids [B, L, 3], timesteps [B] in [0, 1] and the pooled text vector y [B, vec]."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must be token sequences [batch, length, channels]")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError(
                    "this model was trained with a guidance embedding: pass a guidance strength"
                )
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)

        ids = torch.cat((txt_ids, img_ids), dim=1)
        pe = self.pe_embedder(ids)

        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)

        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec=vec, pe=pe)
        img = img[:, txt.shape[1] :, ...]

        return self.final_layer(img, vec)  # [B, L_img, patch_size² · out_channels]
