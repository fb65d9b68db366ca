"""One string names an autoencoder: ``encoding.autoencoder`` → a frozen ``AutoEncoder``.

Accepted specs, tried in this order:

* ``preset:NAME`` — a randomly initialised ``AE_PRESETS`` entry (seed 0, so every load gives the
  same weights: a latent run trained on it samples through the same decoder). For tests and smoke
  runs.
* a fluxlab AE folder written by ``fluxlab train-ae`` (``ae.safetensors`` + ``ae.json``), the run
  folder whose ``ae/`` holds them, or that ``ae.safetensors`` itself (its ``ae.json`` beside it is
  used).
* a BFL ``ae.safetensors`` (FLUX.1's params, scale 0.3611, shift 0.1159).
* a diffusers FLUX folder (its ``vae/``) or an ``AutoencoderKL`` folder (config.json + weights).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fluxlab.models.autoencoder import AutoEncoder, AutoEncoderParams, ae_params
from fluxlab.models.weights.autoencoder_diffusers import (
    autoencoder_params_from_bfl_state_dict,
    autoencoder_params_from_diffusers_config,
    detect_layout,
    load_autoencoder_weights,
    strip_prefix,
)

PRESET_PREFIX = "preset:"
AE_WEIGHTS = "ae.safetensors"
AE_JSON = "ae.json"
AE_SUBDIR = "ae"


def params_from_json(info: dict[str, Any], where: str | Path) -> AutoEncoderParams:
    """``ae.json`` → params; the top-level scale/shift (measured after training) win over the
    params'."""
    raw = info.get("params")
    if not isinstance(raw, dict):
        raise ValueError(
            f"{where} has no 'params' mapping; it should be written by `fluxlab train-ae`."
        )
    known = {f.name for f in fields(AutoEncoderParams)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(
            f"{where}: unknown autoencoder param {unknown[0]!r}; known: {sorted(known)}."
        )
    merged = dict(raw)
    for key in ("scale_factor", "shift_factor"):
        if info.get(key) is not None:
            merged[key] = float(info[key])
    return AutoEncoderParams(**merged)


def _fluxlab_folder(path: Path) -> Path | None:
    """The folder holding ae.safetensors + ae.json for ``path`` (that folder, its ``ae/``, or the
    file's)."""
    candidates = (
        [path.parent] if path.is_file() and path.name == AE_WEIGHTS else [path, path / AE_SUBDIR]
    )
    for folder in candidates:
        if (folder / AE_WEIGHTS).is_file() and (folder / AE_JSON).is_file():
            return folder
    return None


def describe(spec: str) -> AutoEncoderParams:
    """The params of ``spec`` from small JSON files only (no weights read): lets config validation
    check the resolution against the downsample factor before any work starts."""
    if spec.startswith(PRESET_PREFIX):
        return ae_params(spec[len(PRESET_PREFIX) :])
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(
            f"encoding.autoencoder={spec!r}: no such file or folder; give a `fluxlab train-ae` "
            "output folder, a BFL ae.safetensors, a diffusers FLUX/AutoencoderKL folder, or "
            "preset:NAME."
        )
    folder = _fluxlab_folder(path)
    if folder is not None:
        return params_from_json(json.loads((folder / AE_JSON).read_text()), folder / AE_JSON)
    if path.is_dir():
        vae = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if (vae / "config.json").is_file():
            return autoencoder_params_from_diffusers_config(
                json.loads((vae / "config.json").read_text())
            )
        raise ValueError(
            f"encoding.autoencoder={spec!r} is a folder without ae.safetensors + ae.json, ae/, "
            "vae/config.json or config.json; point at a `fluxlab train-ae` run, its ae/ folder, or "
            "a diffusers FLUX/VAE folder."
        )
    # A bare safetensors file: its architecture is known from the tensors alone; read their shapes.
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        meta = dict(f.metadata() or {})
        if detect_layout(strip_prefix(dict.fromkeys(keys))) != "bfl":  # type: ignore[arg-type]
            # Rare (diffusers names in one file): load it fully.
            return load_autoencoder(spec).params
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in keys}
    views = strip_prefix(shapes)
    return autoencoder_params_from_bfl_state_dict(views, meta)


def load_autoencoder(
    spec: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoEncoder:
    """The autoencoder named by ``spec`` (see the module docstring), in eval mode on
    ``device``/``dtype``."""
    spec = str(spec)
    if spec.startswith(PRESET_PREFIX):
        params = ae_params(spec[len(PRESET_PREFIX) :])
        # A private RNG: the same weights every time, and the caller's random stream is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoEncoder(params)
        return model.to(device=device, dtype=dtype).eval()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(
            f"autoencoder {spec!r} not found: give a `fluxlab train-ae` output folder, a BFL "
            "ae.safetensors, a diffusers FLUX/AutoencoderKL folder, or preset:NAME (e.g. "
            "preset:ae-tiny)."
        )
    folder = _fluxlab_folder(path)
    if folder is not None:
        params = params_from_json(json.loads((folder / AE_JSON).read_text()), folder / AE_JSON)
        return load_autoencoder_weights(
            folder / AE_WEIGHTS, params=params, device=device, dtype=dtype
        )
    if path.is_dir() and not (
        (path / "config.json").is_file() or (path / "vae" / "config.json").is_file()
    ):
        raise ValueError(
            f"{path} holds no autoencoder: expected ae.safetensors + ae.json (fluxlab train-ae), "
            "an ae/ folder, a diffusers vae/ folder or an AutoencoderKL folder with config.json."
        )
    return load_autoencoder_weights(path, device=device, dtype=dtype)


def save_autoencoder(
    model: AutoEncoder, folder: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Writes ``folder/ae.safetensors`` + ``folder/ae.json`` (what ``load_autoencoder`` reads back).

    scale/shift also go into the safetensors metadata, so the weights file alone loads with them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = model.params
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "scale_factor": repr(p.scale_factor),
        "shift_factor": repr(p.shift_factor),
        "resolution": str(p.resolution),
        "format": "fluxlab-ae-v1",
    }
    tmp = folder / f".{AE_WEIGHTS}.tmp"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, folder / AE_WEIGHTS)
    info = {
        "params": asdict(p),
        "scale_factor": p.scale_factor,
        "shift_factor": p.shift_factor,
        **(extra or {}),
    }
    (folder / AE_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return folder
