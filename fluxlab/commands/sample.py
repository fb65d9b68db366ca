"""``fluxlab sample``: a captioned grid of images from a checkpoint or a released FLUX.1 folder.

A released folder (diffusers layout: ``transformer/``, ``vae/``, ``tokenizer*/``,
``text_encoder*/``) samples as BFL does: FLUX.1-dev with its embedded guidance (``--guidance``,
3.5 by default) and CFG off in 28 steps, schnell without guidance or schedule shift in 4.
``--before-after BASE`` puts BASE's image beside each one, drawn at the same seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from fluxlab.commands.sample_compare import (
    add_compare_options,
    pairs_per_row,
    read_prompts_file,
    side_by_side,
)
from fluxlab.commands.sampling_options import add_sampling_options, apply_fp8

if TYPE_CHECKING:
    import torch

    from fluxlab.pipelines.batches import BatchGenerator

ACCEPTS_OVERRIDES = False
# Released FLUX.1 folders: (steps, embedded guidance) of dev-style and of schnell-style models.
DEV_STEPS, DEV_GUIDANCE, SCHNELL_STEPS = 28, 3.5, 4


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sample", help="generate images from a checkpoint or a FLUX.1 folder")
    s.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder, one of its checkpoints/step_* folders, or a released FLUX.1 folder",
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
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (1 = off); the embedded guidance for FLUX.1 folders",
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
    s.add_argument("--size", type=int, default=None, help="FLUX.1 folders only: image side (1024)")
    s.add_argument(
        "--text-encoder",
        default=None,
        help="FLUX.1 folders only: another text encoder than the folder's",
    )
    add_sampling_options(s)
    add_compare_options(s)
    s.add_argument("--out", required=True, help="PNG file for the grid")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    # Imported here, as in every command: `fluxlab --help` should not load torch.
    from fluxlab.data import make_grid
    from fluxlab.pipelines.build import resolve_device

    if args.num < 1 or args.batch_size < 1:
        raise ValueError("--num and --batch-size must be at least 1")
    if args.prompts_file is not None:
        args.prompt = [*(args.prompt or []), *read_prompts_file(args.prompts_file)]
    device = resolve_device(args.device)
    if args.before_after is None:
        images, captions, path = _sample(args, device)
        nrow = args.nrow or (args.num if args.num > 1 else min(8, len(captions)))
    else:
        pairs_per_row(args.nrow, args.num, 1)  # an odd --nrow is refused before any work
        # the base first, so its model is freed before the other one loads
        base = argparse.Namespace(
            **{**vars(args), "checkpoint": args.before_after, "lora": [], "lora_scale": None}
        )
        before, captions, _ = _sample(base, device)
        after, after_captions, path = _sample(args, device)
        nrow = pairs_per_row(args.nrow, args.num, len(captions))
        images, captions = side_by_side(before, after, captions, after_captions)
    grid = make_grid(images, nrow=nrow, captions=captions)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"wrote {out} ({len(captions)} images from {path})")
    return 0


def _sample(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, list[str], Path]:
    """(images, one caption per image, checkpoint) of ``args.checkpoint``; the batch that starts
    at item k is drawn with seed ``args.seed + k``, so two models get the same noise."""
    from fluxlab.pipelines.batches import generate_in_batches  # imported here: see run()
    from fluxlab.pipelines.build import is_pretrained_folder
    from fluxlab.train.checkpoint import read_description, resolve_checkpoint

    if is_pretrained_folder(args.checkpoint):
        batches = _pretrained_batches
    else:
        desc = read_description(resolve_checkpoint(args.checkpoint))
        batches = _class_batches if desc.get("task") == "class_to_image" else _prompt_batches
    generate_batch, captions, path = batches(args, device)
    images = generate_in_batches(
        generate_batch, len(captions), batch_size=args.batch_size, seed=args.seed
    )
    return images, captions, path


def _prompt_batches(
    args: argparse.Namespace, device: torch.device
) -> tuple[BatchGenerator, list[str], Path]:
    """A text-to-image checkpoint: (batch generator, one caption per image, checkpoint)."""
    from fluxlab.adapters.runs import merge_lora_files
    from fluxlab.conditioning.text_encoders import build_text_encoder  # imported here: see run()
    from fluxlab.diffusion.ddpm import DDPMObjective
    from fluxlab.diffusion.objectives import objective_from_config
    from fluxlab.pipelines.build import encode_prompts, load_for_sampling
    from fluxlab.tasks.guidance import sampling_scales
    from fluxlab.train.checkpoint import read_description

    if not args.prompt:
        raise ValueError("--prompt is required for a text-to-image checkpoint")
    cfg, pipe, path = load_for_sampling(args.checkpoint, device, ema=not args.no_ema)
    merge_lora_files(pipe.model, args.lora, args.lora_scale)
    apply_fp8(pipe.model, device, args.fp8)
    pipe.cuda_graphs = not args.no_cuda_graphs
    s = cfg.sample
    prompts = [p for p in args.prompt for _ in range(args.num)]
    encoder = build_text_encoder(cfg.encoding.text_encoder, cfg.encoding.text_max_length, device)
    text = encode_prompts(encoder, prompts)
    negative_prompt = (
        args.negative_prompt if args.negative_prompt is not None else s.negative_prompt
    )
    negative = encode_prompts(encoder, [negative_prompt])
    del encoder  # every prompt is encoded: free its memory before sampling
    distilled = "distilled" in read_description(path)
    cfg_scale, embedded = sampling_scales(
        cfg, pipe.model.params, args.guidance, args.negative_prompt, args.true_cfg, distilled
    )
    objective = objective_from_config(cfg)

    def generate_batch(items: slice, seed: int, progress: bool) -> torch.Tensor:
        return pipe.generate(
            text[items],
            negative,
            steps=args.steps or s.steps,
            guidance=cfg_scale,
            distilled_guidance=embedded,
            shift=s.shift if args.shift is None else args.shift,
            sampler=args.sampler or s.sampler,
            seed=seed,
            progress=progress,
            ddpm=objective if isinstance(objective, DDPMObjective) else None,
            eta=args.eta if args.eta is not None else s.eta,
            spacing=args.spacing or s.spacing,
        )

    return generate_batch, prompts, path


def _pretrained_batches(
    args: argparse.Namespace, device: torch.device
) -> tuple[BatchGenerator, list[str], Path]:
    """A released FLUX.1 folder: distilled guidance, CFG off (see the module doc)."""
    from fluxlab.adapters.runs import merge_lora_files  # imported here: see run()
    from fluxlab.pipelines.build import encode_prompts, load_pretrained_pipeline

    if not args.prompt:
        raise ValueError("--prompt is required for a FLUX.1 folder")
    pipe, encoder = load_pretrained_pipeline(
        args.checkpoint, args.size or 1024, device, text_encoder=args.text_encoder
    )
    merge_lora_files(pipe.model, args.lora, args.lora_scale)
    apply_fp8(pipe.model, device, args.fp8)
    pipe.cuda_graphs = not args.no_cuda_graphs
    prompts = [p for p in args.prompt for _ in range(args.num)]
    text = encode_prompts(encoder, prompts)
    negative = encode_prompts(encoder, [args.negative_prompt or ""])
    del encoder
    distilled = pipe.model.params.guidance_embed  # dev-style; schnell has no guidance input
    steps = args.steps or (DEV_STEPS if distilled else SCHNELL_STEPS)
    # --guidance is the embedded strength of a dev-style model (CFG off), else the CFG scale.
    embedded = args.guidance if args.guidance is not None and distilled else DEV_GUIDANCE
    cfg_scale = args.guidance if args.guidance is not None and not distilled else 1.0
    if distilled and args.true_cfg is not None:  # diffusers' true_cfg_scale
        cfg_scale = args.true_cfg

    def generate_batch(items: slice, seed: int, progress: bool) -> torch.Tensor:
        return pipe.generate(
            text[items],
            negative,
            steps=steps,
            guidance=cfg_scale,
            distilled_guidance=embedded,
            shift=distilled if args.shift is None else args.shift,
            sampler=args.sampler or "euler",
            seed=seed,
            progress=progress,
        )

    return generate_batch, prompts, Path(args.checkpoint)


def _class_batches(
    args: argparse.Namespace, device: torch.device
) -> tuple[BatchGenerator, list[str], Path]:
    """A class-conditional checkpoint: --prompt names classes (none: every class); DDIM/DDPM or
    Euler/Heun by its objective."""
    from fluxlab.tasks.class_to_image import ClassToImageTask, class_indices  # see run()

    if args.fp8:
        raise ValueError("--fp8 applies to Flux checkpoints; sample this DiT without it")
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
