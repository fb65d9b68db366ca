"""The Flux text-to-image pipeline: images ⇄ tokens, the velocity of a conditioned Flux, generation.

Training tasks and ``fluxlab sample`` / ``edit`` / ``eval`` share this pipeline, so the velocity
that is trained is the one that is sampled.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fluxlab.conditioning.kontext import ConditionTokens, prepare_edit_inputs, target_prediction
from fluxlab.conditioning.tokens import image_ids, pack, text_ids, unpack
from fluxlab.diffusion.ddpm import DDPMObjective, Spacing
from fluxlab.diffusion.guidance import classifier_free_guidance
from fluxlab.diffusion.samplers import sample
from fluxlab.models.flux.model import Flux
from fluxlab.parallel.attention_kernels import use_sampling_attention
from fluxlab.parallel.cuda_graphs import CUDAGraphed
from fluxlab.parallel.epilogues import use_inference_epilogues


class PixelCodec(nn.Module):
    """Pixel space: the "latent" is the image itself, in [-1, 1]."""

    channels = 3
    downsample = 1

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return latents.clamp(-1, 1)


class LatentCodec(nn.Module):
    """Latent space through a FLUX autoencoder: scale·(z − shift), 16 channels at 1/8 the side."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder
        self.channels = autoencoder.params.z_channels
        self.downsample = autoencoder.downsample_factor

    def _dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    def encode(self, images: Tensor) -> Tensor:
        return self.autoencoder.encode(images.to(self._dtype())).float()

    def decode(self, latents: Tensor) -> Tensor:
        return self.autoencoder.decode(latents.to(self._dtype())).float().clamp(-1, 1)


@dataclass
class TextEmbedding:
    """A batch of text conditioning: the token sequence and the pooled vector."""

    txt: Tensor  # [B, L, context_dim]
    vec: Tensor  # [B, pooled_dim]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextEmbedding:
        return TextEmbedding(self.txt.to(device, dtype), self.vec.to(device, dtype))

    def __getitem__(self, index: slice) -> TextEmbedding:
        return TextEmbedding(self.txt[index], self.vec[index])

    def repeat(self, n: int) -> TextEmbedding:
        return TextEmbedding(self.txt.expand(n, -1, -1), self.vec.expand(n, -1))

    @staticmethod
    def cat(items: list[TextEmbedding]) -> TextEmbedding:
        return TextEmbedding(torch.cat([i.txt for i in items]), torch.cat([i.vec for i in items]))


def autocast_for(device: torch.device, mixed_precision: str) -> AbstractContextManager:
    """bf16 autocast on CUDA by default; none on CPU, where fp32 is exact and bf16 is not faster."""
    use_bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


class FluxTextToImage:
    """A Flux on image tokens from ``codec`` (pixels or autoencoder latents) in ``patch_size``
    patches, conditioned on text (and, for Kontext edits, on a condition image's tokens)."""

    def __init__(
        self,
        model: Flux,
        codec: nn.Module,
        resolution: int,
        patch_size: int,
        mixed_precision: str = "auto",
    ):
        self.model = model
        self.codec = codec
        self.resolution = resolution
        self.patch_size = patch_size
        self.mixed_precision = mixed_precision
        self.latent_size = resolution // codec.downsample
        if self.latent_size % patch_size:
            raise ValueError(
                f"latent size {self.latent_size} is not divisible by the patch size {patch_size}"
            )
        self.grid = self.latent_size // patch_size
        # Replay each step's transformer call as one CUDA graph (fluxlab sample/edit/eval turn it
        # on; training previews keep it off: their weights are swapped and sharded between calls).
        self.cuda_graphs = False
        self._graphed: CUDAGraphed | None = None

    def _graphed_model(self, model: nn.Module) -> CUDAGraphed:
        """``model`` behind a CUDA-graph wrapper kept across calls, so each batch shape is
        captured once per pipeline."""
        if self._graphed is None or self._graphed.module is not model:
            self._graphed = CUDAGraphed(model)
        return self._graphed

    @property
    def token_dim(self) -> int:
        return self.codec.channels * self.patch_size**2

    @property
    def image_seq_len(self) -> int:
        return self.grid * self.grid

    def to_tokens(self, images: Tensor) -> Tensor:
        return pack(self.codec.encode(images), self.patch_size)

    def from_tokens(self, tokens: Tensor) -> Tensor:
        return self.codec.decode(
            unpack(tokens, self.latent_size, self.latent_size, self.patch_size)
        )

    def velocity(
        self,
        model: nn.Module,
        x_t: Tensor,
        t: Tensor,
        text: TextEmbedding,
        guidance: Tensor | None = None,
        condition: ConditionTokens | None = None,
    ) -> Tensor:
        """v(x_t, t); a Kontext ``condition``'s tokens ride along, only x_t's part is returned."""
        b = x_t.shape[0]
        device = x_t.device
        img, ids = x_t, image_ids(b, self.grid, self.grid, device=device)
        if condition is not None:
            img, ids = prepare_edit_inputs(x_t, ids, condition)
        with autocast_for(device, self.mixed_precision):
            out = model(
                img=img,
                img_ids=ids,
                txt=text.txt,
                txt_ids=text_ids(b, text.txt.shape[1], device=device),
                timesteps=t,
                y=text.vec,
                guidance=guidance,
            )
        return target_prediction(out, x_t.shape[1]).float()

    @torch.no_grad()
    def generate(
        self,
        text: TextEmbedding,
        negative: TextEmbedding,
        steps: int = 30,
        guidance: float = 4.0,
        distilled_guidance: float = 3.5,
        shift: bool = True,
        sampler: str = "euler",
        seed: int = 0,
        model: nn.Module | None = None,
        progress: bool = False,
        condition: ConditionTokens | None = None,
        ddpm: DDPMObjective | None = None,
        eta: float = 0.0,
        spacing: Spacing = "trailing",
    ) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] for a batch of prompt embeddings; one seed → one noise.

        ``guidance`` is the CFG scale against ``negative`` (1 = off); ``distilled_guidance`` feeds
        a guidance-distilled model's embedding. A model trained by ``ddpm`` (ε/v/x0 output) samples
        with "ddim" (``eta``) or "ddpm" over ``steps`` timesteps of ``spacing``. ``condition``
        (one per prompt) makes it a Kontext edit; both CFG branches see it.
        """
        # The GEMM-epilogue sampling path on CUDA (idempotent; the same function elsewhere).
        model = use_inference_epilogues(model if model is not None else self.model)
        use_sampling_attention(model)
        if self.cuda_graphs:
            model = self._graphed_model(model)
        device = next(model.parameters()).device
        b = text.txt.shape[0]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(b, self.image_seq_len, self.token_dim, generator=gen).to(device)
        g_vec = (
            torch.full((b,), distilled_guidance, device=device)
            if self.model.params.guidance_embed
            else None
        )
        text = text.to(device)
        condition = condition.to(device) if condition is not None else None

        def conditional(x: Tensor, t: Tensor) -> Tensor:
            return self.velocity(model, x, t, text, g_vec, condition)

        @functools.cache  # built on first use: with CFG off the doubled batch is never needed
        def doubled() -> tuple[TextEmbedding, Tensor | None, ConditionTokens | None]:
            return (
                TextEmbedding.cat([text, negative.to(device).repeat(b)]),
                torch.cat([g_vec, g_vec]) if g_vec is not None else None,
                ConditionTokens.cat([condition, condition]) if condition is not None else None,
            )

        def paired(x: Tensor, t: Tensor) -> Tensor:
            return self.velocity(model, x, t, *doubled())

        tokens = sample(
            sampler,
            classifier_free_guidance(conditional, paired, guidance),
            noise,
            steps,
            image_seq_len=self.image_seq_len,
            shift=shift,
            ddpm=ddpm,
            eta=eta,
            spacing=spacing,
            generator=gen,
            progress=progress,
        )
        return self.from_tokens(tokens).float().cpu()
