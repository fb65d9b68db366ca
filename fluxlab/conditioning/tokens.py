"""Turning images or latents into token sequences and back, with FLUX's position ids.

Pixel space patchifies RGB in p×p patches (3·p² features per token); latent space packs 2×2
patches of C-channel latents (4·C features). Both are the same operation with a different patch
size, and both order features as (channel, patch row, patch column), the layout of BFL's and
diffusers' packing.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor


def pack(x: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] → [B, (H/p)(W/p), C·p·p]."""
    _, _, h, w = x.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image of {h}×{w} is not divisible by the patch size {patch_size}")
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=patch_size, pw=patch_size)


def unpack(tokens: Tensor, height: int, width: int, patch_size: int) -> Tensor:
    """Inverse of :func:`pack` for an image of ``height``×``width`` (pixels or latent cells)."""
    return rearrange(
        tokens,
        "b (h w) (c ph pw) -> b c (h ph) (w pw)",
        h=height // patch_size,
        w=width // patch_size,
        ph=patch_size,
        pw=patch_size,
    )


def image_ids(
    batch: int, grid_h: int, grid_w: int, index: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """Position ids [B, h·w, 3] = (index, row, col); index 0 for the image being generated, 1 for
    a Kontext condition."""
    ids = torch.zeros(grid_h, grid_w, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(grid_h, device=device)[:, None]
    ids[..., 2] = torch.arange(grid_w, device=device)[None, :]
    return repeat(ids, "h w c -> b (h w) c", b=batch)


def text_ids(batch: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """Text tokens all sit at position (0, 0, 0): FLUX gives them no spatial position."""
    return torch.zeros(batch, length, 3, device=device)
