"""Each matmul of a Flux sampling step timed alone (``fluxlab bench --what gemm``): where the GEMM
time goes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fluxlab.bench.transformer import bench_params, time_cuda
from fluxlab.models.flux.model import FluxParams


def sampling_gemms(
    params: FluxParams, img_tokens: int, txt_tokens: int
) -> list[tuple[str, int, int, int, int]]:
    """``(name, M, K, N, count)`` of every matmul in one batch-1 sampling step, as fluxlab runs it
    on CUDA (single blocks' linear1 and linear2 split for the GELU epilogue; modulation as 1-row
    products)."""
    d, h = params.hidden_size, int(params.hidden_size * params.mlp_ratio)
    s, n2, n1 = img_tokens + txt_tokens, params.depth, params.depth_single_blocks
    gemms = []
    for tokens, stream in ((img_tokens, "image"), (txt_tokens, "text")):
        gemms += [
            (f"double {stream} qkv", tokens, d, 3 * d, n2),
            (f"double {stream} proj", tokens, d, d, n2),
            (f"double {stream} mlp in (+GELU)", tokens, d, h, n2),
            (f"double {stream} mlp out", tokens, h, d, n2),
        ]
    gemms += [
        ("single qkv", s, d, 3 * d, n1),
        ("single mlp in (+GELU)", s, d, h, n1),
        ("single linear2, attention part", s, d, d, n1),
        ("single linear2, mlp part (accumulates)", s, h, d, n1),
        ("modulation, double blocks", 1, d, 6 * d, 2 * n2),
        ("modulation, single blocks", 1, d, 3 * d, n1),
    ]
    return gemms


def gemm_call(name: str, m: int, k: int, n: int, device: torch.device) -> Callable[[], Tensor]:
    """One call of the matmul ``name`` (from :func:`sampling_gemms`) on random bf16 operands, in
    the form the sampling path runs it: with the GELU epilogue, accumulating, or as a linear."""
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * k**-0.5
    b = torch.zeros(n, device=device, dtype=torch.bfloat16)
    if "GELU" in name:
        return functools.partial(torch._addmm_activation, b, x, w.t(), use_gelu=True)
    if "accumulates" in name:
        c = torch.zeros(m, n, device=device, dtype=torch.bfloat16)
        return functools.partial(torch.addmm, c, x, w.t())
    return functools.partial(F.linear, x, w, b)


def bench_gemms(
    params: FluxParams | None = None, resolution: int = 1024, txt_tokens: int = 512
) -> list[dict[str, Any]]:
    """Each matmul of a flux-dev sampling step timed alone (bf16, CUDA events): where the GEMM
    time goes."""
    params = params or bench_params("infer")
    device = torch.device("cuda")
    rows = []
    for name, m, k, n, count in sampling_gemms(params, (resolution // 16) ** 2, txt_tokens):
        seconds = time_cuda(gemm_call(name, m, k, n, device), warmup=5, iters=30)
        rows.append(
            {
                "gemm": name,
                "m": m,
                "k": k,
                "n": n,
                "count": count,
                "us": seconds * 1e6,
                "tflops": 2 * m * k * n / seconds / 1e12,
                "gb_per_s": 2 * (m * k + k * n + m * n) / seconds / 1e9,
                "ms_per_step": seconds * count * 1e3,
            }
        )
    return rows
