"""The Inception-v3 used for FID/KID, in plain torch (no torchvision).

This is the network behind TensorFlow's original FID code (the 2015-12-05 graph), as ported by
pytorch-fid and torch-fidelity. It differs from torchvision's ImageNet Inception-v3 in three ways
that change the numbers: the average pools in the A, C and first E blocks ignore padded zeros
(TensorFlow's SAME pooling), the last E block pools its side branch with a max instead of an
average, and the classifier has 1008 classes.

Attribute names (``Conv2d_1a_3x3``, ``Mixed_5b.branch5x5_1.conv`` ...) match the published weight
files so that ``load_state_dict(..., strict=True)`` accepts them unchanged; they are the only reason
for the odd names.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008

_Size = int | tuple[int, int]


class BasicConv2d(nn.Module):
    """Convolution without bias, then BatchNorm (TensorFlow's epsilon 1e-3), then ReLU."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: _Size, stride: int = 1, padding: _Size = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool_same(x: Tensor, kind: Literal["avg", "max"]) -> Tensor:
    # A 3x3 stride-1 pool that keeps the size. TensorFlow's average excludes the zero padding from
    # the divisor; torchvision's default includes it, one reason its Inception gives other FIDs.
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches (64 + 64 + 96 + pool_ch channels)."""

    def __init__(self, in_ch: int, pool_ch: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_pool_same(x, "avg"))
        return torch.cat([self.branch1x1(x), b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: strided 3x3, strided double 3x3 and a max pool (384 + 96 + in_ch
    channels)."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1) over `mid_ch` channels; 768
    channels out."""

    def __init__(self, in_ch: int, mid_ch: int) -> None:
        super().__init__()
        row, col = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, mid_ch, 1)
        self.branch7x7_2 = BasicConv2d(mid_ch, mid_ch, **row)
        self.branch7x7_3 = BasicConv2d(mid_ch, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(in_ch, mid_ch, 1)
        self.branch7x7dbl_2 = BasicConv2d(mid_ch, mid_ch, **col)
        self.branch7x7dbl_3 = BasicConv2d(mid_ch, mid_ch, **row)
        self.branch7x7dbl_4 = BasicConv2d(mid_ch, mid_ch, **col)
        self.branch7x7dbl_5 = BasicConv2d(mid_ch, 192, **row)
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d = layer(d)
        bp = self.branch_pool(_pool_same(x, "avg"))
        return torch.cat([self.branch1x1(x), b7, d, bp], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 320 + 192 + in_ch channels out."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """8x8 block whose 3x3 branches split into parallel 1x3 and 3x1 halves; 2048 channels out.

    `pool` is "avg" for Mixed_7b and "max" for Mixed_7c: the TensorFlow graph the FID weights come
    from has a max pool there, and matching it matters more than matching the paper.
    """

    def __init__(self, in_ch: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        self.pool: Literal["avg", "max"] = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        parts = [
            self.branch1x1(x),
            self.branch3x3_2a(s),
            self.branch3x3_2b(s),
            self.branch3x3dbl_3a(d),
            self.branch3x3dbl_3b(d),
            self.branch_pool(_pool_same(x, self.pool)),
        ]
        return torch.cat(parts, dim=1)


class FIDInceptionV3(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] (or [0, 1] with ``zero_one_input``) -> pool3 features
    [B, 2048].

    Inputs of any size are resized to 299x299 with bilinear interpolation (align_corners=False, no
    antialias), as pytorch-fid does, so FIDs match pytorch-fid's. ``fc`` is never used in
    ``forward``; it exists so that the weight files load strictly. Built in eval mode with gradients
    off: BatchNorm must use its running statistics.
    """

    def __init__(self, *, resize_input: bool = True, zero_one_input: bool = False) -> None:
        super().__init__()
        self.resize_input = resize_input
        self.zero_one_input = zero_one_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_ch=32)
        self.Mixed_5c = InceptionA(256, pool_ch=64)
        self.Mixed_5d = InceptionA(288, pool_ch=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, mid_ch=128)
        self.Mixed_6c = InceptionC(768, mid_ch=160)
        self.Mixed_6d = InceptionC(768, mid_ch=160)
        self.Mixed_6e = InceptionC(768, mid_ch=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"FIDInceptionV3 expects RGB images shaped [B, 3, H, W]; got {tuple(images.shape)}."
            )
        x = images.float()
        if self.zero_one_input:
            x = 2.0 * x - 1.0
        if self.resize_input and x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(
                x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False
            )
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean(dim=(2, 3))
