"""Which fused kernels ``scaled_dot_product_attention`` may use, and the ones fluxlab trains with.

On Hopper GPUs PyTorch can route attention to cuDNN, FlashAttention-2 ("flash") or the memory-efficient
kernel. cuDNN's is the fastest forward pass, but its backward pass has crashed with illegal memory
accesses in Flux training on this workplace's H100/H200s (diffusers' 2.56B step at 512², batch 8, and a
simulated flux-dev FSDP2 run at 1,536 tokens: docs/performance.md), though not in isolated calls of the same
shapes. Training therefore uses flash/efficient only, where every run has worked; sampling keeps PyTorch's
default choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

TRAINING_BACKENDS = ("flash", "efficient")


@contextlib.contextmanager
def sdpa_backends(names: Sequence[str]) -> Iterator[None]:
    """Restrict scaled_dot_product_attention to the named backends (flash, efficient, cudnn, math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown attention backend(s) {unknown}: choose from {sorted(table)}")
    with sdpa_kernel([table[n] for n in names]):
        yield


def for_training(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The attention kernels a training step may use on ``device`` (on CPU: PyTorch's own choice)."""
    return sdpa_backends(TRAINING_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()
