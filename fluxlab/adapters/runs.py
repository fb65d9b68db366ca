"""The whole transformer of any fluxlab checkpoint, LoRA runs included.

A LoRA run's checkpoints hold only its adapter; its weights are the base named by the run's
``model.init_from`` (itself possibly a LoRA run) with the adapter merged in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fluxlab.adapters.formats import (
    AdapterWeights,
    merge_into_model,
    merge_into_state_dict,
    read_lora,
)
from fluxlab.adapters.lora import lora_weights
from fluxlab.config.loading import config_from_dict
from fluxlab.models.flux.model import Flux, FluxParams
from fluxlab.models.weights.pretrained import is_fluxlab_checkpoint, load_init_weights
from fluxlab.train.checkpoint import load_weights, read_description, resolve_checkpoint


def is_lora_run(description: dict[str, Any]) -> bool:
    return bool(description.get("config", {}).get("lora", {}).get("enabled"))


def checkpoint_lora(path: str | Path, ema: bool = True) -> AdapterWeights:
    """The adapter of a LoRA (or LoKr) run's checkpoint (or of a run folder's newest one)."""
    ckpt = resolve_checkpoint(path)
    desc = read_description(ckpt)
    if not is_lora_run(desc):
        raise ValueError(f"{ckpt} is not a LoRA run (its config has lora.enabled=false)")
    return lora_weights(load_weights(ckpt, ema=ema), config_from_dict(desc["config"]).lora)


def checkpoint_weights(
    path: str | Path,
    ema: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[FluxParams, dict[str, Tensor]]:
    """(params, BFL-named weights) of a fluxlab checkpoint; a LoRA run's merged into its base."""
    ckpt = resolve_checkpoint(path)
    desc = read_description(ckpt)
    params = FluxParams(**desc["model_params"])
    if not is_lora_run(desc):
        return params, {k: v.to(device, dtype) for k, v in load_weights(ckpt, ema=ema).items()}
    base_spec = config_from_dict(desc["config"]).model.init_from
    if not base_spec:
        raise ValueError(f"{ckpt} is a LoRA run without model.init_from: its base is unknown")
    _, base = init_weights(base_spec, device, dtype)
    weights = dict(base.state_dict()) if isinstance(base, Flux) else base
    merge_into_state_dict(weights, checkpoint_lora(ckpt, ema))
    return params, weights


def init_weights(
    spec: str, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> tuple[FluxParams | None, dict[str, Tensor] | Flux]:
    """``model.init_from`` as ``load_init_weights`` reads it, a LoRA run's base + adapter too."""
    if is_fluxlab_checkpoint(spec) and is_lora_run(read_description(resolve_checkpoint(spec))):
        return checkpoint_weights(spec, ema=True, device=device, dtype=dtype)
    return load_init_weights(spec, device, dtype)


def read_any_lora(spec: str | Path, mlp_ratio: float = 4.0) -> AdapterWeights:
    """A LoRA file in any layout ``formats`` reads, or a fluxlab LoRA run (its EMA adapter)."""
    if is_fluxlab_checkpoint(spec):
        return checkpoint_lora(spec)
    return read_lora(spec, mlp_ratio)


def merge_lora_files(
    model: nn.Module, specs: list[str], scales: list[float] | None = None
) -> nn.Module:
    """Merges each LoRA of ``specs`` into a plain Flux, at its scale (one scale serves all)."""
    if not specs:
        return model
    scales = list(scales or [1.0])
    if len(scales) == 1:
        scales *= len(specs)
    if len(scales) != len(specs):
        raise ValueError(f"{len(specs)} --lora files but {len(scales)} --lora-scale values")
    mlp_ratio = getattr(getattr(model, "params", None), "mlp_ratio", 4.0)
    for spec, scale in zip(specs, scales):
        merge_into_model(model, read_any_lora(spec, mlp_ratio), scale)
    return model
