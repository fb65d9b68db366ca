"""``fluxlab sample`` options for many prompts and for comparing two models: ``--prompts-file``
and ``--before-after BASE`` (a base and the model of ``--checkpoint`` side by side per prompt, at
the same seeds)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

BEFORE, AFTER = "before", "after"


def add_compare_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE",
        help="a text file of prompts, one per line (blank lines skipped), after any --prompt",
    )
    parser.add_argument(
        "--before-after",
        default=None,
        metavar="BASE",
        help="also sample BASE (a run, checkpoint or FLUX.1 folder) at the same seeds and put its "
        "image beside --checkpoint's for each prompt, captioned 'before:'/'after:'; --lora "
        "applies to --checkpoint only",
    )


def read_prompts_file(path: str | Path) -> list[str]:
    """The non-blank lines of ``path``, stripped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--prompts-file {str(path)!r}: no such file")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"--prompts-file {str(path)!r} holds no prompt (one per line)")
    return prompts


def pairs_per_row(nrow: int | None, num: int, count: int) -> int:
    """Tiles per row of a before/after grid: ``--nrow`` (even, so no pair is split over two rows),
    else one prompt's ``num`` pairs, else 5 pairs."""
    if nrow is not None:
        if nrow < 2 or nrow % 2:
            raise ValueError(
                f"--nrow {nrow} with --before-after must be even: each before/after pair shares "
                "a row"
            )
        return nrow
    return 2 * (num if num > 1 else min(5, count))


def side_by_side(
    before: Tensor, after: Tensor, captions: list[str], after_captions: list[str]
) -> tuple[Tensor, list[str]]:
    """Images [2N, 3, H, W] alternating before/after, and their captions."""
    import torch  # imported here, as in every command: `fluxlab --help` should not load torch

    if before.shape != after.shape or captions != after_captions:
        raise ValueError(
            f"--before-after: the base gives {len(captions)} images of {tuple(before.shape[1:])} "
            f"but --checkpoint {len(after_captions)} of {tuple(after.shape[1:])}; compare models "
            "of the same resolution and kind (both text-to-image or both class-conditional)"
        )
    images = torch.stack([before, after], dim=1).flatten(0, 1)
    labels = [f"{side}: {c}" for c in captions for side in (BEFORE, AFTER)]
    return images, labels
