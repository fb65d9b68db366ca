"""A distilled student against its teacher: the same prompts, seeds and guidance scales, the
teacher with classifier-free guidance (two passes per step), the student with the scale as its
input (one pass); per-image error between them, FID/KID of each, and sampling time."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fluxlab.data import make_grid
from fluxlab.eval.metrics import feature_statistics, frechet_distance, kernel_inception_distance
from fluxlab.pipelines.batches import BatchGenerator, generate_in_batches


@dataclass
class Sampled:
    images: Tensor  # [N, 3, H, W] in [-1, 1]
    seconds: float  # wall time of the whole set, after one warm-up batch


def timed_generation(
    generate_batch: BatchGenerator, count: int, batch_size: int, seed: int, device: torch.device
) -> Sampled:
    """Every image, timed after a warm-up batch (kernel selection and allocator growth would
    otherwise be charged to whichever model runs first)."""
    generate_batch(slice(0, min(batch_size, count)), seed, False)
    _synchronize(device)
    start = time.perf_counter()
    images = generate_in_batches(generate_batch, count, batch_size=batch_size, seed=seed)
    _synchronize(device)
    return Sampled(images, time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pair_errors(teacher: Tensor, student: Tensor) -> dict[str, float]:
    """Per-image mean absolute error and PSNR (pixels in [0, 1]) between images of the same
    prompt and seed, averaged over the set."""
    diff = (teacher.float() - student.float()) / 2  # [-1, 1] → a difference in [0, 1] units
    mse = diff.pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return {
        "mae": diff.abs().flatten(1).mean(1).mean().item(),
        "psnr": (10 * torch.log10(1 / mse)).mean().item(),
    }


def distances(
    generated: np.ndarray, reference: np.ndarray, kid_subset_size: int, seed: int
) -> dict[str, float]:
    """FID and KID (mean, std over 100 subsets) of generated features against the reference."""
    fid = frechet_distance(*feature_statistics(generated), *feature_statistics(reference))
    subset = min(kid_subset_size, generated.shape[0], reference.shape[0])
    kid, kid_std = kernel_inception_distance(
        generated, reference, num_subsets=100, subset_size=subset, seed=seed
    )
    return {"fid": fid, "kid": kid, "kid_std": kid_std}


def comparison_grid(
    columns: list[tuple[str, Tensor]], prompts: list[str], rows: int
) -> Image.Image:
    """One row per prompt (the first ``rows``), one column per (label, images): teacher | student
    at each scale."""
    rows = min(rows, len(prompts))
    tiles = [images[i] for i in range(rows) for _, images in columns]
    captions = [f"{label}: {prompts[i]}" for i in range(rows) for label, _ in columns]
    return make_grid(torch.stack(tiles), nrow=len(columns), captions=captions)


def markdown_table(results: list[dict[str, float]]) -> str:
    """The comparison as a Markdown table, one line per scale."""
    lines = [
        "| w | MAE | PSNR (dB) | FID teacher | FID student | KID teacher | KID student "
        "| s/img teacher | s/img student | time ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['scale']:g} | {r['mae']:.4f} | {r['psnr']:.2f} | {r['teacher_fid']:.2f} "
            f"| {r['student_fid']:.2f} | {r['teacher_kid']:.4f} | {r['student_kid']:.4f} "
            f"| {r['teacher_seconds_per_image']:.5f} | {r['student_seconds_per_image']:.5f} "
            f"| {r['time_ratio']:.3f} |"
        )
    return "\n".join(lines)
