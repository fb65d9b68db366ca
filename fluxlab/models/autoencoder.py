"""FLUX's 16-channel KL autoencoder.

Parameter names follow BFL's `ae.safetensors` exactly (`encoder.down.0.block.0.norm1.weight`,
`decoder.mid.attn_1.q.weight`, ...), so that file loads with `strict=True` and no renaming.
The latent handed to the diffusion model is `scale_factor * (z - shift_factor)`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

GROUPS = 32
# Same bounds as the original LDM posterior: keeps exp(logvar) finite early in KL training.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass(kw_only=True)
class AutoEncoderParams:
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        self.ch_mult = list(self.ch_mult)
        self.validate()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(
                f"ch_mult must be a non-empty list of positive ints, got {self.ch_mult}."
            )
        for name in ("in_channels", "out_ch", "ch", "num_res_blocks", "z_channels", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"AutoEncoderParams.{name} must be >= 1, got {getattr(self, name)}."
                )
        widths = [self.ch * m for m in self.ch_mult]
        bad = [w for w in widths if w % GROUPS]
        if bad:
            raise ValueError(
                f"every width ch*ch_mult must be divisible by {GROUPS} (GroupNorm groups); "
                f"ch={self.ch}, ch_mult={self.ch_mult} gives {widths}. Use e.g. ch=32 or ch=64."
            )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} must be divisible by the downsample factor "
                f"{self.downsample_factor} (2 ** (len(ch_mult) - 1))."
            )
        if self.scale_factor == 0:
            raise ValueError("scale_factor must be non-zero: decode divides by it.")


AE_PRESETS: dict[str, AutoEncoderParams] = {
    # BFL's pretrained FLUX.1 autoencoder (ae.safetensors), ~83.8M parameters.
    "flux": AutoEncoderParams(),
    # Trained from scratch on 64x64 OpenMoji: 8x down to 8x8x16. Its latent statistics are unknown
    # until trained, so scale/shift start as identity; re-estimate them (1/std, mean) afterwards.
    "ae-small": AutoEncoderParams(
        resolution=64,
        ch=64,
        ch_mult=[1, 2, 2, 4],
        num_res_blocks=1,
        scale_factor=1.0,
        shift_factor=0.0,
    ),
    # Trained by `fluxlab train-ae --config ae-openmoji` (64x64 OpenMoji, ~4 min on one H100/H200):
    # 4x down to 16x16x16, so patch 2 gives Flux 64 tokens of 64 features, like FLUX.1 at 128².
    "ae-openmoji": AutoEncoderParams(
        resolution=64,
        ch=64,
        ch_mult=[1, 2, 4],
        num_res_blocks=2,
        scale_factor=1.0,
        shift_factor=0.0,
    ),
    # Trained by `fluxlab train-ae --config ae-openmoji-256` (256² OpenMoji, ~7 min on one H200):
    # FLUX's own geometry, 8x down to 32x32x16, so patch 2 gives 256 tokens of 64 features. BFL's
    # layout at half its width with one res block per level (15.6M parameters, ~490 GFLOP per
    # 256² image forward + backward, a fifth of the 84M FLUX autoencoder's), to fit the budget.
    "ae-openmoji-256": AutoEncoderParams(
        resolution=256,
        ch=64,
        ch_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        scale_factor=1.0,
        shift_factor=0.0,
    ),
    # Tests only (seconds on a CPU): 2x down to 4 channels; `preset:ae-tiny` is its seed-0 init.
    "ae-tiny": AutoEncoderParams(
        resolution=16,
        ch=32,
        ch_mult=[1, 2],
        num_res_blocks=1,
        z_channels=4,
        scale_factor=1.0,
        shift_factor=0.0,
    ),
    # Tests only: random weights, still 8x down with 16 channels, so it plugs into Flux debug
    # presets.
    "ae-debug": AutoEncoderParams(resolution=32, ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1),
}


def ae_params(name: str) -> AutoEncoderParams:
    """A fresh copy of a preset, so callers can edit it without touching `AE_PRESETS`."""
    if name not in AE_PRESETS:
        raise ValueError(
            f"unknown autoencoder preset {name!r}; choose one of {sorted(AE_PRESETS)}."
        )
    return copy.deepcopy(AE_PRESETS[name])


def sample_posterior(
    mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over channels and pixels."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Identity has no parameters, so the state dict only has nin_shortcut where widths change.
        self.nin_shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs, as in BFL's
    weights."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        q, k, v = (
            rearrange(proj(h), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # The pretrained weights expect zero padding on the right/bottom only (conv padding is
        # symmetric).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        if downsample:
            self.downsample = Downsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x) if hasattr(self, "downsample") else x


class UpLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        if upsample:
            self.upsample = Upsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x) if hasattr(self, "upsample") else x


class Encoder(nn.Module):
    """Image -> 2*z_channels moments (mean, logvar) at 1/downsample_factor resolution."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        ins = [p.ch] + widths[:-1]
        self.down = nn.ModuleList(
            DownLevel(ins[i], widths[i], p.num_res_blocks, downsample=i != last)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * p.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z -> image. `up[0]` is the full-resolution level, so `up` runs in reverse order."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # Each level takes the width of the coarser level below it (the mid width for the coarsest)
        # and gets one more resnet than the encoder, as in the pretrained weights.
        ins = widths[1:] + [widths[-1]]
        self.up = nn.ModuleList(
            UpLevel(ins[i], widths[i], p.num_res_blocks + 1, upsample=i != 0)
            for i in range(len(widths))
        )
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        params.validate()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    @property
    def scale_factor(self) -> float:
        return self.params.scale_factor

    @property
    def shift_factor(self) -> float:
        return self.params.shift_factor

    @property
    def downsample_factor(self) -> int:
        return self.params.downsample_factor

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unscaled posterior (mean, logvar) of images `x` in [-1, 1]; what KL training needs."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.params.in_channels:
            raise ValueError(
                f"expected images shaped (B, {self.params.in_channels}, H, W), got "
                f"{tuple(x.shape)}."
            )
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"image height and width must be multiples of {f}, got {tuple(x.shape[-2:])}; "
                "crop or resize before encoding."
            )
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def encode(
        self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images in [-1, 1] -> diffusion latents scale*(z - shift); z is the posterior mean unless
        `sample`."""
        mean, logvar = self.encode_moments(x)
        z = sample_posterior(mean, logvar, generator) if sample else mean
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Diffusion latents (as returned by `encode`) -> images, roughly in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.params.z_channels:
            raise ValueError(
                f"expected latents shaped (B, {self.params.z_channels}, h, w), got "
                f"{tuple(z.shape)}."
            )
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(
        self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        return self.decode(self.encode(x, sample=sample, generator=generator))
