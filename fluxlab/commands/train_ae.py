"""``fluxlab train-ae``: train an autoencoder for latent-space runs (``encoding.autoencoder``)."""

from __future__ import annotations

import argparse
import sys

from fluxlab.commands.train import add_run_folder_flags, resume_command, stopped

ACCEPTS_OVERRIDES = True


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-ae",
        help="train an autoencoder for latent-space runs",
        description="Train a KL autoencoder from scratch (an `ae` section + `data`/`train`), then "
        "measure its latent scale/shift and write RUN/ae/{ae.safetensors,ae.json}; override any "
        "field with --section.key=value (e.g. --ae.kl_weight=1e-5 --train.output_dir=runs/ae).",
    )
    p.add_argument(
        "--config",
        required=True,
        help="AE preset (ae-tiny, ae-openmoji, ae-openmoji-256) or a YAML file (base: PRESET)",
    )
    add_run_folder_flags(p)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    # Imported here: every command module loads for `fluxlab --help`, which must stay fast.
    from fluxlab.config.autoencoder import load_ae_config
    from fluxlab.train.autoencoder import AETrainer
    from fluxlab.train.stop_signals import TrainingInterrupted

    cfg = load_ae_config(args.config, overrides)
    resume_with = resume_command("train-ae", args, overrides)
    try:
        trainer = AETrainer(cfg, resume=args.resume, overwrite=args.overwrite)
        folder = trainer.train()
    except TrainingInterrupted as e:
        return stopped("train-ae", e, resume_with)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(f"fluxlab train-ae: interrupted; continue with: {resume_with}", file=sys.stderr)
        return 130
    print(
        f"autoencoder: {folder}   (use it with --encoding.space=latent "
        f"--encoding.autoencoder={trainer.run_dir})"
    )
    print(f"metrics:     {trainer.run_dir / 'metrics.json'}")
    print(f"grids:       {trainer.run_dir / 'samples'}")
    return 0
