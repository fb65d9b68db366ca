"""``fluxlab edit``: edit an image by instruction with a Kontext-style checkpoint.

``--checkpoint`` is a fluxlab run (or one of its checkpoints) trained with ``data.task=edit``, or
a FLUX.1 Kontext-dev folder in the diffusers layout (``transformer/``, ``vae/``, ``tokenizer*/``,
``text_encoder*/``). Kontext-dev is guidance-distilled: there ``--guidance`` is the embedded
guidance (2.5 by default) and classifier-free guidance is off (``--true-cfg`` adds it), as for
fluxlab models with a guidance embedding; for the others ``--guidance`` is the CFG scale.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from fluxlab.commands.sampling_options import add_sampling_options, apply_fp8

if TYPE_CHECKING:
    import torch

ACCEPTS_OVERRIDES = False
KONTEXT_STEPS, KONTEXT_GUIDANCE = 28, 2.5


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("edit", help="edit an image by instruction (Kontext)")
    s.add_argument(
        "--checkpoint",
        required=True,
        help="a fluxlab edit run/checkpoint, or a FLUX.1 Kontext folder",
    )
    s.add_argument("--image", required=True, help="the image to edit")
    s.add_argument(
        "--prompt", required=True, help='the instruction, e.g. "give it a dark skin tone"'
    )
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="CFG scale (distilled guidance for Kontext-dev)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--size",
        type=int,
        default=None,
        help="output side (default: the model's training resolution, 1024 for Kontext-dev)",
    )
    s.add_argument(
        "--condition-size",
        type=int,
        default=None,
        help="side the input is resized to (default: --size)",
    )
    s.add_argument("--device", default="auto")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument(
        "--text-encoder",
        default=None,
        help="Kontext folders only: another text encoder than the folder's",
    )
    add_sampling_options(s)
    s.add_argument("--out", required=True, help="PNG file for the edited image")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    # Imported here, as in every command: `fluxlab --help` should not load torch.
    from fluxlab.adapters.runs import merge_lora_files
    from fluxlab.conditioning.kontext import encode_condition
    from fluxlab.conditioning.text_encoders import build_text_encoder
    from fluxlab.data import load_image, to_pil
    from fluxlab.data.transforms import ImageTransform
    from fluxlab.pipelines.batches import generate_in_batches
    from fluxlab.pipelines.build import (
        encode_prompts,
        is_pretrained_folder,
        load_for_sampling,
        load_pretrained_pipeline,
        resolve_device,
    )
    from fluxlab.pipelines.text_to_image import FluxTextToImage
    from fluxlab.tasks.guidance import sampling_scales
    from fluxlab.train.checkpoint import read_description

    device = resolve_device(args.device)
    source = Path(args.checkpoint).expanduser()
    if is_pretrained_folder(source):
        size = args.size or 1024
        pipe, encoder = load_pretrained_pipeline(
            source, size, device, text_encoder=args.text_encoder
        )
        steps, shift, negative_prompt = (
            args.steps or KONTEXT_STEPS,
            True,
            args.negative_prompt or "",
        )
        cfg_scale = args.true_cfg if args.true_cfg is not None else 1.0
        distilled = args.guidance if args.guidance is not None else KONTEXT_GUIDANCE
    else:
        cfg, pipe, path = load_for_sampling(source, device, ema=not args.no_ema)
        if cfg.data.task != "edit":
            raise ValueError(
                f"{path} was trained for {cfg.data.task}, not editing: train with --data.task=edit"
            )
        if args.size and args.size != pipe.resolution:
            pipe = FluxTextToImage(
                pipe.model, pipe.codec, args.size, pipe.patch_size, pipe.mixed_precision
            )
        encoder = build_text_encoder(
            cfg.encoding.text_encoder, cfg.encoding.text_max_length, device
        )
        s = cfg.sample
        steps, shift = args.steps or s.steps, s.shift
        negative_prompt = (
            args.negative_prompt if args.negative_prompt is not None else s.negative_prompt
        )
        cfg_scale, distilled = sampling_scales(
            cfg,
            pipe.model.params,
            args.guidance,
            args.negative_prompt,
            args.true_cfg,
            "distilled" in read_description(path),
        )
    merge_lora_files(pipe.model, args.lora, args.lora_scale)
    apply_fp8(pipe.model, device, args.fp8)
    pipe.cuda_graphs = not args.no_cuda_graphs
    text = encode_prompts(encoder, [args.prompt])
    negative = encode_prompts(encoder, [negative_prompt])
    del encoder
    cond_size = args.condition_size or pipe.resolution
    image = ImageTransform(cond_size)(load_image(args.image))[None].to(device)
    condition = encode_condition(pipe.codec, image, pipe.patch_size)

    def generate_batch(items: slice, seed: int, progress: bool) -> torch.Tensor:
        return pipe.generate(
            text[items],
            negative,
            steps=steps,
            guidance=cfg_scale,
            distilled_guidance=distilled,
            shift=shift,
            seed=seed,
            progress=progress,
            condition=condition[items],
        )

    edited = generate_in_batches(generate_batch, 1, batch_size=1, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    to_pil(edited[0]).save(out)
    print(f"wrote {out} ({pipe.resolution}×{pipe.resolution}, {steps} steps)")
    return 0
