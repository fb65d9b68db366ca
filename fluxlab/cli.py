"""``fluxlab`` command line: train, sample."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from fluxlab.config import load_config
    from fluxlab.trainer import Trainer

    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, resume=args.resume)
    path = trainer.train()
    print(f"checkpoint: {path}")
    print(f"samples:    {trainer.run_dir / 'samples'}")
    print(f"tensorboard --logdir {trainer.run_dir / 'tb'}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from fluxlab.build import encode_prompts, load_for_sampling, resolve_device
    from fluxlab.data import make_grid
    from fluxlab.text_encoders import build_text_encoder

    device = resolve_device(args.device)
    cfg, pipe, path = load_for_sampling(args.checkpoint, device, ema=not args.no_ema)
    prompts = [p for p in args.prompt for _ in range(args.num)]
    encoder = build_text_encoder(cfg.encoding.text_encoder, cfg.encoding.text_max_length, device)
    text = encode_prompts(encoder, prompts)
    negative = encode_prompts(encoder, [args.negative_prompt if args.negative_prompt is not None else cfg.sample.negative_prompt])
    del encoder
    s = cfg.sample
    images = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = slice(start, start + args.batch_size)
        from fluxlab.pipeline import TextEmbedding

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
            )
        )
    grid = make_grid(torch.cat(images), nrow=args.nrow or args.num if args.num > 1 else min(8, len(prompts)), captions=prompts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"wrote {out} ({len(prompts)} images from {path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxlab", description="Train and sample FLUX.1-style rectified-flow transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a model",
        description="Train from a preset or a YAML file; override any field with --section.key=value "
        "(e.g. --optim.lr=3e-4 --train.output_dir=runs/x).",
    )
    t.add_argument("--config", required=True, help="preset name (openmoji-cpu, openmoji-gpu, debug) or a YAML file")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")

    s = sub.add_parser("sample", help="generate images from a checkpoint")
    s.add_argument("--checkpoint", required=True, help="a run folder or one of its checkpoints/step_* folders")
    s.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--sampler", choices=["euler", "heun"], default=None)
    s.add_argument("--shift", action=argparse.BooleanOptionalAction, default=None, help="FLUX resolution shift")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num", type=int, default=1, help="images per prompt")
    s.add_argument("--nrow", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", default="auto")
    s.add_argument("--no-ema", action="store_true", help="sample the raw weights instead of the EMA")
    s.add_argument("--out", required=True, help="PNG file for the grid")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        bad = [e for e in extra if not (e.startswith("--") and "=" in e)]
        if bad:
            parser.error(f"unrecognised arguments {bad}; overrides look like --section.key=value")
    elif extra:
        parser.error(f"unrecognised arguments {extra}")
    try:
        if args.command == "train":
            return _train(args, extra)
        return _sample(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"fluxlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
