"""State-dict conversion between diffusers' ``FluxTransformer2DModel`` and BFL's layout (fluxlab's).

diffusers splits the fused projections (q/k/v, and q/k/v/mlp in single blocks) into separate linears
and orders the final adaLN output as (scale, shift) where BFL has (shift, scale); everything else is
a rename.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fluxlab.models.flux.model import FluxParams

# (diffusers suffix, BFL suffix) pairs that are plain renames.
_TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}
_SINGLE_FUSED = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]}


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _block_indices(sd: dict[str, Tensor], prefix: str) -> list[int]:
    return sorted({int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)})


def diffusers_to_bfl(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Converts a diffusers ``FluxTransformer2DModel`` state dict to BFL/fluxlab names."""
    src = dict(sd)
    out: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        if key not in src:
            raise ValueError(
                f"diffusers Flux state dict has no {key!r}: is this a FluxTransformer2DModel?"
            )
        return src.pop(key)

    for d, b in _TOP_LEVEL.items():
        for p in ("weight", "bias"):
            if f"{d}.{p}" in src:
                out[f"{b}.{p}"] = take(f"{d}.{p}")
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap_halves(take(f"norm_out.linear.{p}"))

    for i in _block_indices(src, "transformer_blocks."):
        pre, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for d, b in _DOUBLE.items():
            for p in ("weight", "bias"):
                out[dst + f"{b}.{p}"] = take(pre + f"{d}.{p}")
        for d, b in _DOUBLE_NORMS.items():
            out[dst + b] = take(pre + d)
        for b, parts in _DOUBLE_FUSED.items():
            for p in ("weight", "bias"):
                out[dst + f"{b}.{p}"] = torch.cat(
                    [take(pre + f"{part}.{p}") for part in parts], dim=0
                )

    for i in _block_indices(src, "single_transformer_blocks."):
        pre, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for d, b in _SINGLE.items():
            for p in ("weight", "bias"):
                out[dst + f"{b}.{p}"] = take(pre + f"{d}.{p}")
        for d, b in _SINGLE_NORMS.items():
            out[dst + b] = take(pre + d)
        for b, parts in _SINGLE_FUSED.items():
            for p in ("weight", "bias"):
                out[dst + f"{b}.{p}"] = torch.cat(
                    [take(pre + f"{part}.{p}") for part in parts], dim=0
                )

    if src:
        raise ValueError(f"unconverted diffusers keys: {sorted(src)[:8]}")
    return out


def bfl_to_diffusers(sd: dict[str, Tensor], params: FluxParams) -> dict[str, Tensor]:
    """The inverse of :func:`diffusers_to_bfl` (the benchmark loads the same weights into both)."""
    src = dict(sd)
    out: dict[str, Tensor] = {}
    h = params.hidden_size
    for d, b in _TOP_LEVEL.items():
        for p in ("weight", "bias"):
            if f"{b}.{p}" in src:
                out[f"{d}.{p}"] = src.pop(f"{b}.{p}")
    for p in ("weight", "bias"):
        out[f"norm_out.linear.{p}"] = _swap_halves(src.pop(f"final_layer.adaLN_modulation.1.{p}"))
    for i in range(params.depth):
        pre, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for d, b in _DOUBLE.items():
            for p in ("weight", "bias"):
                out[dst + f"{d}.{p}"] = src.pop(pre + f"{b}.{p}")
        for d, b in _DOUBLE_NORMS.items():
            out[dst + d] = src.pop(pre + b)
        for b, parts in _DOUBLE_FUSED.items():
            for p in ("weight", "bias"):
                for part, chunk in zip(parts, src.pop(pre + f"{b}.{p}").split(h, dim=0)):
                    out[dst + f"{part}.{p}"] = chunk
    for i in range(params.depth_single_blocks):
        pre, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for d, b in _SINGLE.items():
            for p in ("weight", "bias"):
                out[dst + f"{d}.{p}"] = src.pop(pre + f"{b}.{p}")
        for d, b in _SINGLE_NORMS.items():
            out[dst + d] = src.pop(pre + b)
        for b, parts in _SINGLE_FUSED.items():
            sizes = [h, h, h, int(h * params.mlp_ratio)]
            for p in ("weight", "bias"):
                for part, chunk in zip(parts, src.pop(pre + f"{b}.{p}").split(sizes, dim=0)):
                    out[dst + f"{part}.{p}"] = chunk
    if src:
        raise ValueError(f"unconverted fluxlab keys: {sorted(src)[:8]}")
    return out


def flux_params_from_diffusers_config(config: dict) -> FluxParams:
    """FluxParams equivalent to a diffusers ``FluxTransformer2DModel`` config.json."""
    head_dim = config.get("attention_head_dim", 128)
    heads = config.get("num_attention_heads", 24)
    in_ch = config.get("in_channels", 64)
    return FluxParams(
        in_channels=in_ch,
        out_channels=config.get("out_channels") or in_ch,
        vec_in_dim=config.get("pooled_projection_dim", 768),
        context_in_dim=config.get("joint_attention_dim", 4096),
        hidden_size=head_dim * heads,
        num_heads=heads,
        depth=config.get("num_layers", 19),
        depth_single_blocks=config.get("num_single_layers", 38),
        axes_dim=list(config.get("axes_dims_rope", (16, 56, 56))),
        guidance_embed=bool(config.get("guidance_embeds", False)),
    )


def is_diffusers_flux(sd: dict[str, Tensor]) -> bool:
    return any(k.startswith("transformer_blocks.") or k.startswith("x_embedder.") for k in sd)
