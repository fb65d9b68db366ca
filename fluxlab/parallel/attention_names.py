"""Names of the attention kernels a run can choose (no torch import: ``fluxlab --help`` reads them).

SDPA's kernels are ``flash``, ``efficient``, ``cudnn`` and ``math``. fluxlab's own, for its models:
``fa4`` (FlashAttention-4 where installed, ``fluxlab.parallel.flash4``) and ``cudnn-forward``
(cuDNN's forward pass with FlashAttention-2's backward pass,
``fluxlab.parallel.attention_kernels``).
"""

from __future__ import annotations

from collections.abc import Sequence

SDPA_NAMES = ("flash", "efficient", "cudnn", "math")
CUDNN_FORWARD = "cudnn-forward"
FLASH4 = "fa4"
MODEL_KERNELS = (FLASH4, CUDNN_FORWARD)  # set on fluxlab's models, not SDPA's
BACKEND_NAMES = (*SDPA_NAMES, *MODEL_KERNELS)
# The first of the model kernels that this machine has wins. cuDNN's own backward pass crashed Flux
# training (docs/performance.md): never SDPA's "cudnn" here.
TRAINING_BACKENDS = (FLASH4, CUDNN_FORWARD, "flash", "efficient")


def check_backend_names(names: Sequence[str]) -> None:
    """A clear error for an unknown name, or for a set without an SDPA kernel to fall back on."""
    unknown = [n for n in names if n not in BACKEND_NAMES]
    if unknown:
        raise ValueError(
            f"unknown attention backend(s) {unknown}: choose from {sorted(BACKEND_NAMES)}"
        )
    if all(n in MODEL_KERNELS for n in names):
        raise ValueError(
            f"attention backends {list(names)} name no SDPA kernel to fall back on: "
            "add flash or efficient"
        )
