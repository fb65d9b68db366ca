"""Command-line options shared by the commands that sample: true CFG for guidance-embedded
models, LoRAs merged before sampling, fp8 matmuls, CUDA graphs."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """``--true-cfg``, ``--lora FILE`` (repeatable), ``--lora-scale`` and ``--fp8``, for
    ``fluxlab sample`` and ``edit``."""
    parser.add_argument(
        "--true-cfg",
        type=float,
        default=None,
        metavar="SCALE",
        help="guidance-embedded models (FLUX.1-dev style): classifier-free guidance against "
        "--negative-prompt on top of the embedded --guidance (two passes per step); not for a "
        "distilled student",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        help="a LoRA to merge before sampling: a diffusers, BFL/ComfyUI or kohya .safetensors, "
        "or a fluxlab LoRA run; repeat for several",
    )
    parser.add_argument(
        "--lora-scale",
        type=float,
        action="append",
        default=None,
        help="strength of each --lora (1 = as trained); one value applies to all",
    )
    add_fp8_option(parser)
    add_cuda_graphs_option(parser)


def add_cuda_graphs_option(parser: argparse.ArgumentParser) -> None:
    """``--no-cuda-graphs``: call the transformer step by step instead of replaying its graph."""
    parser.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on CUDA, run each step's transformer call as it is instead of capturing it once "
        "per batch shape as a CUDA graph and replaying it (the default; it removes the GPU's "
        "waits on Python between kernels, for a little memory per batch shape)",
    )


def add_fp8_option(parser: argparse.ArgumentParser) -> None:
    """``--fp8``: fp8 weights and dynamic fp8 activations in the transformer blocks' linears."""
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="fp8 weights and row-wise dynamic fp8 activations (torchao) in the transformer "
        "blocks' attention and MLP linears; needs a GPU of compute capability 8.9+ and "
        "pip install 'fluxlab[quant]'",
    )


def apply_fp8(model: nn.Module, device: torch.device, enabled: bool) -> None:
    """Quantizes ``model`` for fp8 sampling when ``--fp8`` asked for it (after any LoRA merge:
    the merged weights are what gets quantized), and compiles its blocks."""
    if not enabled:
        return
    import torch  # not at --help

    from fluxlab.parallel.float8 import quantize_for_sampling
    from fluxlab.parallel.fp8_gelu import use_fused_fp8_gelu
    from fluxlab.parallel.parallelize import blocks

    quantize_for_sampling(model, device)
    # Each MLP's GELU and its fp8 quantisation in one Triton pass: 0.0959 → 0.0890 s a flux-dev
    # step on an H100 (docs/performance.md).
    use_fused_fp8_gelu(model)
    # Dynamic activation quantization beats bf16 only with its casts fused by the compiler (eager
    # fp8 was slower than bf16), and coordinate-descent tuning of those fused kernels took 3% off
    # the step for ~20 s more of first-call compile (docs/performance.md). Lazy: the first call
    # compiles, after the pipeline has set the sampling attention kernel.
    for block in blocks(model):
        block.forward = torch.compile(block.forward, options={"coordinate_descent_tuning": True})
