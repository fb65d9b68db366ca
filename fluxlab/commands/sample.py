"""``fluxlab sample``: a captioned grid of images from a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from fluxlab.pipelines.batches import BatchGenerator

ACCEPTS_OVERRIDES = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sample", help="generate images from a checkpoint")
    s.add_argument(
        "--checkpoint", required=True, help="a run folder or one of its checkpoints/step_* folders"
    )
    s.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="a prompt, or a class name for a class-conditional (DiT) checkpoint; repeat for "
        "several (a class model without --prompt draws every class)",
    )
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)"
    )
    s.add_argument(
        "--sampler",
        choices=["euler", "heun", "ddim", "ddpm"],
        default=None,
        help="euler/heun for flow checkpoints, ddim/ddpm for DDPM ones "
        "(ddpm --steps 1000 = full chain)",
    )
    s.add_argument(
        "--eta", type=float, default=None, help="DDIM noise: 0 deterministic, 1 DDPM-like"
    )
    s.add_argument(
        "--spacing",
        choices=["leading", "linspace", "trailing"],
        default=None,
        help="DDIM/DDPM timesteps",
    )
    s.add_argument(
        "--shift", action=argparse.BooleanOptionalAction, default=None, help="FLUX resolution shift"
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num", type=int, default=1, help="images per prompt")
    s.add_argument("--nrow", type=int, default=None, help="tiles per row of the grid")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", default="auto")
    s.add_argument(
        "--no-ema", action="store_true", help="sample the raw weights instead of the EMA"
    )
    s.add_argument("--out", required=True, help="PNG file for the grid")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    # Imported here, as in every command: `fluxlab --help` should not load torch.
    from fluxlab.data import make_grid
    from fluxlab.pipelines.batches import generate_in_batches
    from fluxlab.pipelines.build import resolve_device
    from fluxlab.train.checkpoint import read_description, resolve_checkpoint

    if args.num < 1 or args.batch_size < 1:
        raise ValueError("--num and --batch-size must be at least 1")
    device = resolve_device(args.device)
    task = read_description(resolve_checkpoint(args.checkpoint)).get("task", "text_to_image")
    batches = _class_batches if task == "class_to_image" else _prompt_batches
    generate_batch, captions, path = batches(args, device)
    images = generate_in_batches(
        generate_batch, len(captions), batch_size=args.batch_size, seed=args.seed
    )
    nrow = args.nrow or (args.num if args.num > 1 else min(8, len(captions)))
    grid = make_grid(images, nrow=nrow, captions=captions)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"wrote {out} ({len(captions)} images from {path})")
    return 0


def _prompt_batches(
    args: argparse.Namespace, device: torch.device
) -> tuple[BatchGenerator, list[str], Path]:
    """A text-to-image checkpoint: (batch generator, one caption per image, checkpoint)."""
    from fluxlab.conditioning.text_encoders import build_text_encoder  # imported here: see run()
    from fluxlab.diffusion.ddpm import DDPMObjective
    from fluxlab.diffusion.objectives import objective_from_config
    from fluxlab.pipelines.build import encode_prompts, load_for_sampling

    if not args.prompt:
        raise ValueError("--prompt is required for a text-to-image checkpoint")
    cfg, pipe, path = load_for_sampling(args.checkpoint, device, ema=not args.no_ema)
    s = cfg.sample
    prompts = [p for p in args.prompt for _ in range(args.num)]
    encoder = build_text_encoder(cfg.encoding.text_encoder, cfg.encoding.text_max_length, device)
    text = encode_prompts(encoder, prompts)
    negative_prompt = (
        args.negative_prompt if args.negative_prompt is not None else s.negative_prompt
    )
    negative = encode_prompts(encoder, [negative_prompt])
    del encoder  # every prompt is encoded: free its memory before sampling
    objective = objective_from_config(cfg)

    def generate_batch(items: slice, seed: int, progress: bool) -> torch.Tensor:
        return pipe.generate(
            text[items],
            negative,
            steps=args.steps or s.steps,
            guidance=args.guidance if args.guidance is not None else s.guidance,
            distilled_guidance=s.distilled_guidance,
            shift=s.shift if args.shift is None else args.shift,
            sampler=args.sampler or s.sampler,
            seed=seed,
            progress=progress,
            ddpm=objective if isinstance(objective, DDPMObjective) else None,
            eta=args.eta if args.eta is not None else s.eta,
            spacing=args.spacing or s.spacing,
        )

    return generate_batch, prompts, path


def _class_batches(
    args: argparse.Namespace, device: torch.device
) -> tuple[BatchGenerator, list[str], Path]:
    """A class-conditional checkpoint: --prompt names classes (none: every class); DDIM/DDPM or
    Euler/Heun by its objective."""
    from fluxlab.tasks.class_to_image import ClassToImageTask, class_indices  # see run()

    task, path = ClassToImageTask.from_checkpoint(args.checkpoint, device, ema=not args.no_ema)
    names = args.prompt or task.classes
    labels = [i for i in class_indices(names, task.classes) for _ in range(args.num)]
    s = task.cfg.sample

    def generate_batch(items: slice, seed: int, progress: bool) -> torch.Tensor:
        return task.generate(
            labels[items],
            steps=args.steps or s.steps,
            guidance=args.guidance if args.guidance is not None else s.guidance,
            sampler=args.sampler or s.sampler,
            eta=args.eta if args.eta is not None else s.eta,
            spacing=args.spacing or s.spacing,
            shift=s.shift if args.shift is None else args.shift,
            seed=seed,
            progress=progress,
        )

    return generate_batch, [task.classes[i] for i in labels], path
