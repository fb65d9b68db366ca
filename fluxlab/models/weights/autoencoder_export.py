"""Writing a FLUX-style autoencoder as a diffusers ``AutoencoderKL`` folder (the ``vae/`` of a
pipeline): the inverse of ``autoencoder_diffusers``' renaming, plus the config that describes it."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from fluxlab.models.autoencoder import GROUPS, AutoEncoderParams
from fluxlab.models.weights import autoencoder_diffusers as load_names

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

# The loader's diffusers → BFL tables, inverted; reversed so that the current diffusers names
# (listed first there) win over the pre-0.14 ones.
_RESNET_PARTS = {b: d for d, b in reversed(load_names.RESNET_PARTS.items())}
_ATTN_PARTS = {b: d for d, b in reversed(load_names.ATTN_PARTS.items())}
_ROOT_PARTS = {b: d for d, b in reversed(load_names.ROOT_PARTS.items())}

_RESNET = re.compile(r"(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)")
_RESAMPLE = re.compile(r"(encoder|decoder)\.(down|up)\.(\d+)\.(down|up)sample\.conv\.(weight|bias)")
_MID_RESNET = re.compile(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)")
_MID_ATTN = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)")
_ROOT = re.compile(r"(encoder|decoder)\.(\w+)\.(weight|bias)")


def _rename(key: str, num_levels: int) -> tuple[str, bool]:
    """diffusers name for one BFL key, and whether it is a 1x1 conv that diffusers keeps as a
    Linear."""
    if m := _RESNET.fullmatch(key):
        side, kind, level, j, part, wb = m.groups()
        # BFL's up[0] is the finest level; diffusers' up_blocks run coarse-to-fine.
        idx = int(level) if kind == "down" else num_levels - 1 - int(level)
        return f"{side}.{kind}_blocks.{idx}.resnets.{j}.{_RESNET_PARTS[part]}.{wb}", False
    if m := _RESAMPLE.fullmatch(key):
        side, kind, level, _, wb = m.groups()
        idx = int(level) if kind == "down" else num_levels - 1 - int(level)
        return f"{side}.{kind}_blocks.{idx}.{kind}samplers.0.conv.{wb}", False
    if m := _MID_RESNET.fullmatch(key):
        side, n, part, wb = m.groups()
        return f"{side}.mid_block.resnets.{int(n) - 1}.{_RESNET_PARTS[part]}.{wb}", False
    if m := _MID_ATTN.fullmatch(key):
        side, part, wb = m.groups()
        linear = part != "norm" and wb == "weight"
        return f"{side}.mid_block.attentions.0.{_ATTN_PARTS[part]}.{wb}", linear
    if m := _ROOT.fullmatch(key):
        side, part, wb = m.groups()
        return f"{side}.{_ROOT_PARTS[part]}.{wb}", False
    raise ValueError(f"unexpected key {key!r} in a FLUX autoencoder state dict")


def bfl_to_diffusers_autoencoder(
    state_dict: Mapping[str, Tensor], params: AutoEncoderParams
) -> dict[str, Tensor]:
    """Renames BFL autoencoder weights to diffusers' ``AutoencoderKL`` names."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new, conv_to_linear = _rename(key, len(params.ch_mult))
        out[new] = value[:, :, 0, 0] if conv_to_linear else value
    return out


def diffusers_autoencoder_config(params: AutoEncoderParams) -> dict:
    """The ``config.json`` of the diffusers ``AutoencoderKL`` equal to ``params``."""
    levels = len(params.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": params.in_channels,
        "out_channels": params.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [params.ch * m for m in params.ch_mult],
        "layers_per_block": params.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": params.z_channels,
        "norm_num_groups": GROUPS,
        "sample_size": params.resolution,
        "scaling_factor": params.scale_factor,
        "shift_factor": params.shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
        "force_upcast": True,
    }


def save_diffusers_autoencoder(
    state_dict: Mapping[str, Tensor], params: AutoEncoderParams, folder: str | Path
) -> Path:
    """Writes ``folder/{config.json, diffusion_pytorch_model.safetensors}``;
    ``AutoencoderKL.from_pretrained(folder)`` (and ``load_autoencoder``) read it back."""
    folder = Path(folder).expanduser()
    weights = {
        k: v.detach().contiguous().cpu()
        for k, v in bfl_to_diffusers_autoencoder(state_dict, params).items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    config = diffusers_autoencoder_config(params)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
