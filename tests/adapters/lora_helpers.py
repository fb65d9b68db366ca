"""Tiny FLUX pairs for the LoRA tests: a random diffusers FluxTransformer2DModel and the fluxlab
Flux holding the same weights, plus inputs that exercise every term."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fluxlab.adapters.quantize import FrozenQuantLinear
from fluxlab.conditioning.tokens import image_ids, text_ids
from fluxlab.models.flux.model import Flux
from fluxlab.models.weights.flux_diffusers import (
    diffusers_to_bfl,
    flux_params_from_diffusers_config,
)

TOKEN_DIM, CONTEXT_DIM, POOLED_DIM = 16, 24, 12


def tiny_diffusers(guidance: bool = True, single_layers: int = 2) -> Any:
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the oracle (test extra)")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=TOKEN_DIM,
        num_layers=2,
        num_single_layers=single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=CONTEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    with torch.no_grad():  # random everything, so no term hides behind a zero
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def fluxlab_twin(ref: Any) -> Flux:
    model = Flux(flux_params_from_diffusers_config(dict(ref.config))).eval()
    model.load_state_dict(diffusers_to_bfl(ref.state_dict()), strict=True)
    return model


def inputs(seed: int = 1, guidance: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, h, w, l_txt = 2, 3, 4, 5
    return dict(
        img=torch.randn(b, h * w, TOKEN_DIM, generator=g),
        img_ids=image_ids(b, h, w, index=1),
        txt=torch.randn(b, l_txt, CONTEXT_DIM, generator=g),
        txt_ids=text_ids(b, l_txt),
        timesteps=torch.rand(b, generator=g),
        y=torch.randn(b, POOLED_DIM, generator=g),
        guidance=torch.full((b,), 3.5) if guidance else None,
    )


@torch.no_grad()
def run_fluxlab(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**x)


@torch.no_grad()
def run_diffusers(model: Any, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"][0],
        txt_ids=x["txt_ids"][0],
        guidance=x["guidance"],
        return_dict=False,
    )[0]


def randomize_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    """Random A and B (peft starts B at zero), large enough to move the output clearly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def save_debug_base(folder: Path, in_channels: int = 48, guidance: bool = False) -> Path:
    """A released-style FLUX folder (``transformer/`` only) holding a random transformer the size
    of the ``debug`` preset's Flux (hidden 64, one block of each kind, MiniLM's 384-wide text)."""
    diffusers = pytest.importorskip("diffusers", reason="builds the base folder (test extra)")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=384,
        pooled_projection_dim=384,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 14, 14),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder / "transformer"))
    return folder


def dequantized_twin(model: nn.Module) -> nn.Module:
    """The same LoRA with plain Linears holding each quantized layer's dequantized weight."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, FrozenQuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None)
            linear.weight = nn.Parameter(module.dequantized(), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.clone(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin


def loss_and_grads(model: nn.Module, x: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    x = {**x, "img": x["img"].clone().requires_grad_(True)}
    out = model(**x)
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x["img"].grad, grads
