"""Writing a Flux's weights where other tools read them: a diffusers ``transformer/`` folder or a
BFL single ``.safetensors`` file.

diffusers' ``FluxTransformer2DModel`` fixes what fluxlab leaves open (MLP ratio 4, q/k/v biases,
RoPE θ = 10,000), so only models within those export to it; the BFL file takes any fluxlab Flux
and records its params in the metadata, where ``load_flux`` finds them.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from fluxlab.models.flux.model import FluxParams
from fluxlab.models.weights.flux_diffusers import bfl_to_diffusers

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def diffusers_config(params: FluxParams) -> dict:
    """The ``config.json`` of a diffusers ``FluxTransformer2DModel`` equal to ``params``."""
    fixed = {"mlp_ratio": (params.mlp_ratio, 4.0), "qkv_bias": (params.qkv_bias, True)}
    fixed["theta"] = (params.theta, 10_000)
    differ = {name: ours for name, (ours, theirs) in fixed.items() if ours != theirs}
    if differ:
        raise ValueError(
            f"diffusers' FluxTransformer2DModel cannot hold this model ({differ}: diffusers fixes "
            "mlp_ratio=4, qkv_bias=true, theta=10000); export it as a BFL file instead"
        )
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,  # FLUX packs 2×2 latent patches outside the transformer
        "in_channels": params.in_channels,
        "out_channels": params.out_channels or params.in_channels,
        "num_layers": params.depth,
        "num_single_layers": params.depth_single_blocks,
        "attention_head_dim": params.hidden_size // params.num_heads,
        "num_attention_heads": params.num_heads,
        "joint_attention_dim": params.context_in_dim,
        "pooled_projection_dim": params.vec_in_dim,
        "guidance_embeds": params.guidance_embed,
        "axes_dims_rope": list(params.axes_dim),
    }


def _cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_diffusers_transformer(
    state: dict[str, Tensor], params: FluxParams, folder: str | Path
) -> Path:
    """Writes ``folder/{config.json, diffusion_pytorch_model.safetensors}`` from BFL weights;
    ``FluxTransformer2DModel.from_pretrained(folder)`` (and ``load_flux``) read it back."""
    folder = Path(folder).expanduser()
    config = diffusers_config(params)
    folder.mkdir(parents=True, exist_ok=True)
    weights = bfl_to_diffusers(_cpu(state), params)
    save_file(weights, str(folder / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def save_bfl_transformer(state: dict[str, Tensor], params: FluxParams, path: str | Path) -> Path:
    """Writes BFL-named weights to one ``.safetensors`` file (ComfyUI's and BFL's layout)."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a BFL transformer is one .safetensors file; name it so")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "fluxlab_params": json.dumps(params.to_dict())}
    save_file(_cpu(state), str(path), metadata=metadata)
    return path
