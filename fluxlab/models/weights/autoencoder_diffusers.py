"""Load FLUX autoencoder weights from BFL's `ae.safetensors` or a diffusers `AutoencoderKL` folder.

diffusers names the same tensors differently: `down_blocks.i.resnets.j` for `down.i.block.j`,
`conv_shortcut` for `nin_shortcut`, Linear `to_q` for the 1x1 conv `q`, and its decoder `up_blocks`
run coarse-to-fine while BFL's `up` is indexed fine-to-coarse.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import Tensor

from fluxlab.models.autoencoder import AE_PRESETS, AutoEncoder, AutoEncoderParams

Layout = Literal["bfl", "diffusers"]

# Prefixes under which single-file checkpoints (SD/ComfyUI style) keep the autoencoder.
_PREFIXES = ("first_stage_model.", "vae.")

RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# Current diffusers names first, then the pre-0.14 ones still found in old checkpoints.
ATTN_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
ROOT_PARTS = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}

_RESNET = re.compile(
    r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)"
)
_RESAMPLE = re.compile(
    r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(weight|bias)"
)
_MID_RESNET = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)")
_MID_ATTN = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.([\w.]+)\.(weight|bias)")
_ROOT = re.compile(r"(encoder|decoder)\.(\w+)\.(weight|bias)")


def _rename(key: str, num_levels: int) -> tuple[str, bool]:
    """BFL name for one diffusers key, and whether it is a Linear weight to turn into a 1x1 conv."""
    if m := _RESNET.fullmatch(key):
        side, kind, level, j, part, wb = m.groups()
        if part in RESNET_PARTS:
            # Decoder up_blocks are coarse-to-fine; BFL's up[0] is the finest level.
            idx = int(level) if kind == "down" else num_levels - 1 - int(level)
            return f"{side}.{kind}.{idx}.block.{j}.{RESNET_PARTS[part]}.{wb}", False
    if m := _RESAMPLE.fullmatch(key):
        side, kind, level, _, wb = m.groups()
        idx = int(level) if kind == "down" else num_levels - 1 - int(level)
        return f"{side}.{kind}.{idx}.{kind}sample.conv.{wb}", False
    if m := _MID_RESNET.fullmatch(key):
        side, j, part, wb = m.groups()
        if part in RESNET_PARTS:
            return f"{side}.mid.block_{int(j) + 1}.{RESNET_PARTS[part]}.{wb}", False
    if m := _MID_ATTN.fullmatch(key):
        side, part, wb = m.groups()
        if part in ATTN_PARTS:
            new = ATTN_PARTS[part]
            return f"{side}.mid.attn_1.{new}.{wb}", new != "norm" and wb == "weight"
    if m := _ROOT.fullmatch(key):
        side, part, wb = m.groups()
        if part in ROOT_PARTS:
            return f"{side}.{ROOT_PARTS[part]}.{wb}", False
    raise ValueError(
        f"unexpected key {key!r} in a diffusers AutoencoderKL state dict; is this a FLUX-style VAE?"
    )


def diffusers_to_bfl_autoencoder(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict to BFL's `ae.safetensors` names (no copies)."""
    quant = sorted(k for k in state_dict if k.startswith(("quant_conv.", "post_quant_conv.")))
    if quant:
        raise ValueError(
            f"this VAE has {quant[0].split('.')[0]} weights (an SD-style VAE, "
            "use_quant_conv=True); FLUX's autoencoder has no quant convs, so it cannot be loaded "
            "as an AutoEncoder."
        )
    up_levels = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))
    }
    num_levels = max(up_levels) + 1 if up_levels else 0
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new, linear_to_conv = _rename(key, num_levels)
        out[new] = value[:, :, None, None] if linear_to_conv and value.ndim == 2 else value
    return out


def strip_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keeps only the autoencoder of a single-file checkpoint (keys under `vae.` or
    `first_stage_model.`)."""
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def detect_layout(keys: Iterable[str]) -> Layout:
    keys = list(keys)
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in keys):
        return "diffusers"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in keys):
        return "bfl"
    sample = ", ".join(keys[:3]) or "no keys"
    raise ValueError(
        f"not an autoencoder checkpoint in BFL or diffusers layout (first keys: {sample})."
    )


def autoencoder_params_from_diffusers_config(config: Mapping[str, Any]) -> AutoEncoderParams:
    """AutoEncoderParams from a diffusers `AutoencoderKL` config.json, rejecting what FLUX's
    autoencoder lacks."""
    if config.get("use_quant_conv", True) or config.get("use_post_quant_conv", True):
        raise ValueError(
            "this diffusers VAE uses quant_conv/post_quant_conv (an SD-style VAE); FLUX's "
            "autoencoder has none. Only configs with use_quant_conv=false and "
            "use_post_quant_conv=false can be loaded."
        )
    checks = {"norm_num_groups": 32, "act_fn": "silu", "mid_block_add_attention": True}
    for name, want in checks.items():
        if config.get(name, want) != want:
            raise ValueError(
                f"diffusers VAE config has {name}={config[name]!r}; fluxlab's AutoEncoder "
                f"needs {want!r}."
            )
    for name, want in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        if any(t != want for t in config.get(name, [want])):
            raise ValueError(
                f"diffusers VAE config has {name}={config[name]}; only {want} blocks are supported."
            )
    widths = [int(w) for w in config["block_out_channels"]]
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(
            f"block_out_channels {widths} must all be multiples of the first width {ch}."
        )
    size = config.get("sample_size", 256)
    shift = config.get("shift_factor")
    return AutoEncoderParams(
        resolution=int(size[0] if isinstance(size, (list, tuple)) else size),
        in_channels=int(config.get("in_channels", 3)),
        out_ch=int(config.get("out_channels", 3)),
        ch=ch,
        ch_mult=[w // ch for w in widths],
        num_res_blocks=int(config.get("layers_per_block", 1)),
        z_channels=int(config.get("latent_channels", 4)),
        scale_factor=float(config.get("scaling_factor", 1.0)),
        shift_factor=float(shift) if shift is not None else 0.0,
    )


def autoencoder_params_from_bfl_state_dict(
    state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> AutoEncoderParams:
    """Architecture from tensor shapes; scale/shift from safetensors metadata, else FLUX's if it is
    FLUX's autoencoder."""
    ch, in_channels = state_dict["encoder.conv_in.weight"].shape[:2]
    levels = sorted(
        {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))}
    )
    blocks = {
        int(m.group(1))
        for k in state_dict
        if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))
    }
    widths = [state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    arch: dict[str, Any] = dict(
        in_channels=int(in_channels),
        ch=int(ch),
        out_ch=int(state_dict["decoder.conv_out.weight"].shape[0]),
        ch_mult=[int(w) // int(ch) for w in widths],
        num_res_blocks=len(blocks),
        z_channels=int(state_dict["decoder.conv_in.weight"].shape[1]),
    )
    meta = metadata or {}
    if "scale_factor" in meta and "shift_factor" in meta:
        return AutoEncoderParams(
            **arch,
            resolution=int(meta.get("resolution", 256)),
            scale_factor=float(meta["scale_factor"]),
            shift_factor=float(meta["shift_factor"]),
        )
    flux = AE_PRESETS["flux"]
    if all(getattr(flux, k) == v for k, v in arch.items()):
        return AutoEncoderParams(**arch, resolution=flux.resolution)
    raise ValueError(
        f"cannot tell the latent scale/shift of this non-FLUX autoencoder ({arch}); pass params= "
        "explicitly or save scale_factor/shift_factor in the safetensors metadata."
    )


def _read_safetensors(path: Path, device: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt", device=device) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _diffusers_weights(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder} has config.json but no diffusion_pytorch_model.safetensors.")


def load_autoencoder_weights(
    path: str | os.PathLike[str],
    params: AutoEncoderParams | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoEncoder:
    """An AutoEncoder (in eval mode) from the weights in BFL's `ae.safetensors`, any safetensors
    file in BFL or diffusers naming, or a diffusers `vae/` folder (or a pipeline folder containing
    one). ``autoencoder_spec.load_autoencoder`` resolves the other kinds of spec.

    `params` overrides what is inferred from the config or tensor shapes.
    """
    path = Path(path)
    device = str(device)
    if (
        path.is_dir()
        and not (path / "config.json").is_file()
        and (path / "vae" / "config.json").is_file()
    ):
        path = path / "vae"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is a folder without config.json; point at a diffusers vae/ folder or a "
                ".safetensors file."
            )
        config = json.loads((path / "config.json").read_text())
        inferred = autoencoder_params_from_diffusers_config(config) if params is None else params
        state_dict, metadata = _read_safetensors(_diffusers_weights(path), device)
    elif path.is_file():
        state_dict, metadata = _read_safetensors(path, device)
        inferred = params
    else:
        raise ValueError(f"autoencoder weights not found at {path}.")

    state_dict = strip_prefix(state_dict)
    if detect_layout(state_dict) == "diffusers":
        state_dict = diffusers_to_bfl_autoencoder(state_dict)
    if inferred is None:
        inferred = autoencoder_params_from_bfl_state_dict(state_dict, metadata)
    for key in list(state_dict):
        # One tensor at a time, so at most one extra tensor exists while casting.
        state_dict[key] = state_dict[key].to(dtype)

    # Meta init skips allocating random weights that would be overwritten at once.
    with torch.device("meta"):
        model = AutoEncoder(inferred)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"weights at {path} do not fit AutoEncoder({inferred}): {err}") from err
    return model.eval()
