"""Command-line options shared by the commands that sample: true CFG for guidance-embedded
models, LoRAs merged before sampling."""

from __future__ import annotations

import argparse


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """``--true-cfg``, ``--lora FILE`` (repeatable) and ``--lora-scale``, for ``fluxlab sample``
    and ``edit``."""
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
