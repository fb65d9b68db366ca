"""FLUX.1 Kontext editing: the condition image's tokens sit beside the noisy target's tokens.

The condition is encoded and packed exactly like the target; its position ids are (1, row, col)
on its own grid (rows and columns restart at 0, so a condition of another size works), and its
tokens are appended *after* the noisy ones. The transformer sees [txt; noisy; cond] and only the
prediction for the noisy part is kept, in training (the loss) as in sampling (the Euler step). This
is the layout of BFL's ``prepare_kontext`` / ``denoise_kontext`` and of diffusers'
``FluxKontextPipeline``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fluxlab.conditioning.tokens import image_ids, pack

CONDITION_INDEX = 1  # first RoPE axis of condition tokens; the target keeps 0


@dataclass
class ConditionTokens:
    """A batch of packed condition images and their position ids."""

    tokens: Tensor  # [B, M, token_dim]
    ids: Tensor  # [B, M, 3]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ConditionTokens:
        return ConditionTokens(self.tokens.to(device, dtype), self.ids.to(device))

    def __getitem__(self, index: slice) -> ConditionTokens:
        return ConditionTokens(self.tokens[index], self.ids[index])

    @staticmethod
    def cat(items: list[ConditionTokens]) -> ConditionTokens:
        return ConditionTokens(
            torch.cat([i.tokens for i in items]), torch.cat([i.ids for i in items])
        )


def condition_tokens(latents: Tensor, patch_size: int) -> ConditionTokens:
    """Encoded condition images [B, C, H, W] → tokens packed like the target, ids (1, row, col)."""
    b, _, h, w = latents.shape
    tokens = pack(latents, patch_size)
    ids = image_ids(
        b, h // patch_size, w // patch_size, index=CONDITION_INDEX, device=latents.device
    )
    return ConditionTokens(tokens, ids)


@torch.no_grad()
def encode_condition(codec: nn.Module, images: Tensor, patch_size: int) -> ConditionTokens:
    """Condition images [B, 3, H, W] in [-1, 1], any H and W the codec and patch size divide."""
    step = codec.downsample * patch_size
    h, w = images.shape[-2:]
    if h % step or w % step:
        raise ValueError(
            f"condition image of {h}×{w} is not divisible by {step} (autoencoder downsampling × "
            "patch size); resize or crop it"
        )
    return condition_tokens(codec.encode(images), patch_size)


def prepare_edit_inputs(
    noisy: Tensor, noisy_ids: Tensor, condition: ConditionTokens
) -> tuple[Tensor, Tensor]:
    """The image stream the transformer sees: [noisy; condition] tokens and ids, in sequence."""
    if condition.tokens.shape[0] != noisy.shape[0]:
        raise ValueError(
            f"{condition.tokens.shape[0]} condition images for a batch of {noisy.shape[0]}: "
            "give one per image"
        )
    if condition.tokens.shape[-1] != noisy.shape[-1]:
        raise ValueError(
            f"condition tokens have {condition.tokens.shape[-1]} features but the target's have "
            f"{noisy.shape[-1]}: encode the condition with the target's codec and patch size"
        )
    img = torch.cat([noisy, condition.tokens.to(noisy.dtype)], dim=1)
    ids = torch.cat([noisy_ids, condition.ids.to(noisy_ids.dtype)], dim=1)
    return img, ids


def target_prediction(prediction: Tensor, num_target_tokens: int) -> Tensor:
    """The part of the output that belongs to the noisy tokens (the condition's is discarded)."""
    return prediction[:, :num_target_tokens]
