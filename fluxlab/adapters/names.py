"""Where a LoRA on a BFL-named Flux Linear lives in diffusers' ``FluxTransformer2DModel``.

Most modules are renames (``double_blocks.0.img_attn.proj`` is diffusers'
``transformer_blocks.0.attn.to_out.0``); BFL's fused projections (``img_attn.qkv``,
``txt_attn.qkv``, the single blocks' ``linear1``) are several diffusers modules, and the final
adaLN output swaps its halves. The tables are the weight converter's
(fluxlab/models/weights/flux_diffusers.py), so both always agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fluxlab.models.weights import flux_diffusers as tables

FINAL_ADALN = "final_layer.adaLN_modulation.1"
_BLOCK = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)")
_DIFFUSERS_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")

# Linear modules by BFL name: inside double blocks, inside single blocks, at the top level.
DOUBLE_LINEARS = [*tables._DOUBLE.values(), *tables._DOUBLE_FUSED]
SINGLE_LINEARS = [*tables._SINGLE.values(), *tables._SINGLE_FUSED]
TOP_LINEARS = [*tables._TOP_LEVEL.values(), FINAL_ADALN]


@dataclass(frozen=True)
class DiffusersTarget:
    """The diffusers module(s) one BFL Linear maps to, and how its output rows map."""

    modules: list[str]  # one for a rename, several for a fused projection (rows split in order)
    rows: Literal["same", "split", "swap_halves"]


def to_diffusers(bfl: str) -> DiffusersTarget:
    """The diffusers modules of BFL Linear ``bfl`` (e.g. ``single_blocks.3.linear1``)."""
    if bfl == FINAL_ADALN:
        return DiffusersTarget(["norm_out.linear"], "swap_halves")
    match = _BLOCK.fullmatch(bfl)
    if match is None:
        renames = {b: d for d, b in tables._TOP_LEVEL.items()}
        if bfl in renames:
            return DiffusersTarget([renames[bfl]], "same")
        raise ValueError(f"{bfl!r} is not a Linear of the FLUX transformer")
    kind, index, inner = match.groups()
    double = kind == "double_blocks"
    prefix = f"transformer_blocks.{index}." if double else f"single_transformer_blocks.{index}."
    renames = {b: d for d, b in (tables._DOUBLE if double else tables._SINGLE).items()}
    fused = tables._DOUBLE_FUSED if double else tables._SINGLE_FUSED
    if inner in renames:
        return DiffusersTarget([prefix + renames[inner]], "same")
    if inner in fused:
        return DiffusersTarget([prefix + part for part in fused[inner]], "split")
    raise ValueError(f"{bfl!r} is not a Linear of the FLUX transformer")


def from_diffusers(module: str) -> tuple[str, int]:
    """(BFL Linear, this part's index among the fused ones or 0) of a diffusers module."""
    if module == "norm_out.linear":
        return FINAL_ADALN, 0
    match = _DIFFUSERS_BLOCK.fullmatch(module)
    if match is None:
        if module in tables._TOP_LEVEL:
            return tables._TOP_LEVEL[module], 0
        raise ValueError(f"{module!r} is not a Linear of diffusers' FluxTransformer2DModel")
    kind, index, inner = match.groups()
    double = kind == "transformer_blocks"
    prefix = f"double_blocks.{index}." if double else f"single_blocks.{index}."
    renames = tables._DOUBLE if double else tables._SINGLE
    if inner in renames:
        return prefix + renames[inner], 0
    for bfl, parts in (tables._DOUBLE_FUSED if double else tables._SINGLE_FUSED).items():
        if inner in parts:
            return prefix + bfl, parts.index(inner)
    raise ValueError(f"{module!r} is not a Linear of diffusers' FluxTransformer2DModel")


def split_sizes(bfl: str, out_features: int, in_features: int) -> list[int]:
    """Output rows of each diffusers part of fused ``bfl``: q, k, v (, mlp) of width ``in``."""
    parts = len(to_diffusers(bfl).modules)
    return [in_features] * 3 + [out_features - 3 * in_features] * (parts - 3)


def from_kohya(name: str) -> str:
    """BFL Linear of a kohya module name (``double_blocks_0_img_attn_qkv``, dots as underscores)."""
    match = re.fullmatch(r"(double_blocks|single_blocks)_(\d+)_(\w+)", name)
    if match:
        kind, index, inner = match.groups()
        inners = DOUBLE_LINEARS if kind == "double_blocks" else SINGLE_LINEARS
        for candidate in inners:
            if candidate.replace(".", "_") == inner:
                return f"{kind}.{index}.{candidate}"
    for candidate in TOP_LINEARS:
        if candidate.replace(".", "_") == name:
            return candidate
    raise ValueError(f"kohya LoRA module {name!r} is not a Linear of the FLUX transformer")


def to_kohya(bfl: str) -> str:
    return bfl.replace(".", "_")
