"""FLUX.1 Kontext editing: the condition image's tokens sit beside the noisy target's tokens.

The condition is encoded and packed exactly like the target; its position ids are (1, row, col) on its
own grid (rows and columns restart at 0, so a condition of another size works), and its tokens are
appended *after* the noisy ones. The transformer sees [txt; noisy; cond] and only the prediction for
the noisy part is kept, in training (the loss) as in sampling (the Euler step). This is the layout of
BFL's ``prepare_kontext`` / ``denoise_kontext`` and of diffusers' ``FluxKontextPipeline``.

Loading a released FLUX.1 Kontext-dev checkpoint needs nothing Kontext-specific: its transformer is a
plain Flux (``fluxlab.pretrained.load_flux``), its autoencoder the FLUX one and its text encoders T5 + CLIP
(``load_pretrained_edit_pipeline``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxlab.latents import image_ids, pack
from fluxlab.models.flux import Flux

CONDITION_INDEX = 1  # first RoPE axis of condition tokens; the target keeps 0


@dataclass
class ConditionTokens:
    """A batch of packed condition images and their position ids."""

    tokens: Tensor  # [B, M, token_dim]
    ids: Tensor  # [B, M, 3]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ConditionTokens":
        return ConditionTokens(self.tokens.to(device, dtype), self.ids.to(device))

    def __getitem__(self, index: slice) -> "ConditionTokens":
        return ConditionTokens(self.tokens[index], self.ids[index])

    @staticmethod
    def cat(items: list["ConditionTokens"]) -> "ConditionTokens":
        return ConditionTokens(torch.cat([i.tokens for i in items]), torch.cat([i.ids for i in items]))


def condition_tokens(latents: Tensor, patch_size: int) -> ConditionTokens:
    """Encoded condition images [B, C, H, W] → tokens packed like the target, ids (1, row, col)."""
    b, _, h, w = latents.shape
    tokens = pack(latents, patch_size)
    ids = image_ids(b, h // patch_size, w // patch_size, index=CONDITION_INDEX, device=latents.device)
    return ConditionTokens(tokens, ids)


@torch.no_grad()
def encode_condition(codec: nn.Module, images: Tensor, patch_size: int) -> ConditionTokens:
    """Condition images [B, 3, H, W] in [-1, 1], any H and W the codec and patch size divide."""
    step = codec.downsample * patch_size
    h, w = images.shape[-2:]
    if h % step or w % step:
        raise ValueError(
            f"condition image of {h}×{w} is not divisible by {step} (autoencoder downsampling × patch size); "
            "resize or crop it"
        )
    return condition_tokens(codec.encode(images), patch_size)


def prepare_edit_inputs(noisy: Tensor, noisy_ids: Tensor, condition: ConditionTokens) -> tuple[Tensor, Tensor]:
    """The image stream the transformer sees: [noisy; condition] tokens and ids along the sequence."""
    if condition.tokens.shape[0] != noisy.shape[0]:
        raise ValueError(
            f"{condition.tokens.shape[0]} condition images for a batch of {noisy.shape[0]}: give one per image"
        )
    if condition.tokens.shape[-1] != noisy.shape[-1]:
        raise ValueError(
            f"condition tokens have {condition.tokens.shape[-1]} features but the target's have {noisy.shape[-1]}: "
            "encode the condition with the target's codec and patch size"
        )
    img = torch.cat([noisy, condition.tokens.to(noisy.dtype)], dim=1)
    ids = torch.cat([noisy_ids, condition.ids.to(noisy_ids.dtype)], dim=1)
    return img, ids


def target_prediction(prediction: Tensor, num_target_tokens: int) -> Tensor:
    """The part of the output that belongs to the noisy tokens (the condition's is discarded)."""
    return prediction[:, :num_target_tokens]


# ---------------------------------------------------------------------------------------------
# Released checkpoints (FLUX.1 Kontext-dev): a plain Flux transformer + the FLUX autoencoder + T5/CLIP.


def load_pretrained_edit_pipeline(
    folder: str | Path,
    resolution: int = 1024,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    text_encoder: str | None = None,
    text_max_length: int = 512,
):
    """(pipeline, text encoder) for a FLUX.1 Kontext-dev folder in the diffusers layout
    (``transformer/``, ``vae/``, ``tokenizer*/``, ``text_encoder*/``); ``text_encoder`` overrides the
    folder's T5 + CLIP. The pipeline works in the autoencoder's latent space with 2×2 patches."""
    from fluxlab.autoencoders import load_autoencoder
    from fluxlab.pipeline import FluxTextToImage, LatentCodec
    from fluxlab.pretrained import load_flux
    from fluxlab.text_encoders import build_text_encoder

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_flux(folder, device, dtype)  # Kontext-dev is a plain Flux: meta-device build, streamed weights
    codec = LatentCodec(load_autoencoder(folder, device=device, dtype=dtype))
    if model.params.in_channels != codec.channels * 4:
        raise ValueError(
            f"the transformer takes {model.params.in_channels} features per token but the autoencoder's "
            f"{codec.channels} channels in 2×2 patches give {codec.channels * 4}"
        )
    encoder = build_text_encoder(text_encoder or str(folder), text_max_length, device)
    return FluxTextToImage(model, codec, resolution, patch_size=2), encoder
