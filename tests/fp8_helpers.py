"""Shared by the fp8 tests: what this torch build's CPU fp8 matmul can do."""

from __future__ import annotations

import torch


def cpu_scaled_mm_takes_row_scales() -> bool:
    """Whether the CPU ``torch._scaled_mm`` takes row-wise scales (torch ≥ 2.13)."""
    a = torch.ones(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16))
    except RuntimeError:
        return False
    return True
