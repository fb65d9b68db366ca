"""``fluxlab sample``: a captioned grid of images from a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

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
        help="a prompt, or a class name for a class-conditional (DiT) checkpoint; repeat for several "
        "(a class model without --prompt draws every class)",
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
        help="euler/heun for flow checkpoints, ddim/ddpm for DDPM ones (ddpm --steps 1000 = full chain)",
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
    import torch

    from fluxlab.conditioning.text_encoders import build_text_encoder
    from fluxlab.data import make_grid
    from fluxlab.diffusion.objectives import objective_from_config
    from fluxlab.pipelines.build import encode_prompts, load_for_sampling, resolve_device
    from fluxlab.pipelines.text_to_image import TextEmbedding

    if args.num < 1 or args.batch_size < 1:
        raise ValueError("--num and --batch-size must be at least 1")
    device = resolve_device(args.device)
    if _task_of(args.checkpoint) == "class_to_image":
        return _sample_classes(args, device)
    if not args.prompt:
        raise ValueError("--prompt is required for a text-to-image checkpoint")
    cfg, pipe, path = load_for_sampling(args.checkpoint, device, ema=not args.no_ema)
    prompts = [p for p in args.prompt for _ in range(args.num)]
    encoder = build_text_encoder(cfg.encoding.text_encoder, cfg.encoding.text_max_length, device)
    text = encode_prompts(encoder, prompts)
    negative_prompt = (
        args.negative_prompt if args.negative_prompt is not None else cfg.sample.negative_prompt
    )
    negative = encode_prompts(encoder, [negative_prompt])
    del encoder
    s = cfg.sample
    images = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = slice(start, start + args.batch_size)
        images.append(
            pipe.generate(
                TextEmbedding(text.txt[chunk], text.vec[chunk]),
                negative,
                steps=args.steps or s.steps,
                guidance=args.guidance if args.guidance is not None else s.guidance,
                distilled_guidance=s.distilled_guidance,
                shift=s.shift if args.shift is None else args.shift,
                sampler=args.sampler or s.sampler,
                seed=args.seed + start,
                progress=True,
                ddpm=objective_from_config(cfg) if cfg.objective.kind == "ddpm" else None,
                eta=args.eta if args.eta is not None else s.eta,
                spacing=args.spacing or s.spacing,
            )
        )
    nrow = args.nrow or (args.num if args.num > 1 else min(8, len(prompts)))
    grid = make_grid(torch.cat(images), nrow=nrow, captions=prompts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"wrote {out} ({len(prompts)} images from {path})")
    return 0


def _task_of(checkpoint: str) -> str:
    from fluxlab.train.checkpoint import read_description, resolve_checkpoint

    return read_description(resolve_checkpoint(checkpoint)).get("task", "text_to_image")


def _sample_classes(args: argparse.Namespace, device) -> int:
    """A class-conditional checkpoint: --prompt names classes; DDIM/DDPM or Euler/Heun by its objective."""
    import torch

    from fluxlab.data import make_grid
    from fluxlab.tasks.class_to_image import ClassToImageTask, class_indices

    task, path = ClassToImageTask.from_checkpoint(args.checkpoint, device, ema=not args.no_ema)
    names = args.prompt or task.classes
    labels = [i for i in class_indices(names, task.classes) for _ in range(args.num)]
    s = task.cfg.sample
    images = [
        task.generate(
            labels[start : start + args.batch_size],
            steps=args.steps or s.steps,
            guidance=args.guidance if args.guidance is not None else s.guidance,
            sampler=args.sampler or s.sampler,
            eta=args.eta if args.eta is not None else s.eta,
            spacing=args.spacing or s.spacing,
            shift=s.shift if args.shift is None else args.shift,
            seed=args.seed + start,
            progress=True,
        )
        for start in range(0, len(labels), args.batch_size)
    ]
    nrow = args.nrow or (args.num if args.num > 1 else min(8, len(labels)))
    grid = make_grid(torch.cat(images), nrow=nrow, captions=[task.classes[i] for i in labels])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"wrote {out} ({len(labels)} images from {path})")
    return 0
