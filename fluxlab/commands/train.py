"""``fluxlab train``: train from a preset or YAML file with ``--section.key=value`` overrides."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fluxlab.config.schema import Config
    from fluxlab.train.stop_signals import TrainingInterrupted

ACCEPTS_OVERRIDES = True


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model",
        description="Train from a preset or a YAML file; override any field with "
        "--section.key=value (e.g. --optim.lr=3e-4 --train.output_dir=runs/x).",
    )
    p.add_argument(
        "--config",
        required=True,
        help="preset name (openmoji-cpu, openmoji-gpu, debug) or a YAML file",
    )
    add_run_folder_flags(p)
    p.add_argument(
        "--simulate-world",
        type=int,
        default=None,
        metavar="N",
        help="size a job before renting its GPUs: run as rank 0 of N on this one GPU (fake process "
        "group: no communication, real allocations) for --optim.steps steps and a sample grid, "
        "then print the peak memory one GPU of the N needs; writes no checkpoint, and its losses "
        "mean nothing",
    )
    p.add_argument(
        "--estimate-memory",
        action="store_true",
        help="print the GPU memory a LoRA run of this config needs (weights, adapters, optimizer "
        "state, activations with and without checkpointing) for each lora.base_quant, and exit; "
        "reads no file, so the presets' placeholders may stay",
    )


def add_run_folder_flags(parser: argparse.ArgumentParser) -> None:
    """--resume and --overwrite: what to do with a train.output_dir that holds a run."""
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint in train.output_dir",
    )
    what.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a train.output_dir that holds a run: its checkpoints, log, samples, "
        "TensorBoard events and config are removed once the data and model load (without "
        "--resume or --overwrite such a folder is refused)",
    )


def resume_command(command: str, args: argparse.Namespace, overrides: list[str]) -> str:
    """The command line that continues this run: the same config and overrides, with --resume."""
    words = ["fluxlab", command, "--config", args.config, *overrides, "--resume"]
    return shlex.join(words)


def stopped(command: str, interrupted: TrainingInterrupted, resume_with: str) -> int:
    """Reports a run stopped by a signal in one line; returns its exit code (128 + signal)."""
    print(f"fluxlab {command}: {interrupted.summary(resume_with)}", file=sys.stderr)
    return interrupted.exit_code


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    # Imported here: every command module loads for `fluxlab --help`, which must stay fast.
    from fluxlab.config.loading import load_config

    if args.estimate_memory:
        return _estimate_memory(args.config, overrides)
    cfg = load_config(args.config, overrides)
    if args.simulate_world is not None:
        if args.resume:
            raise ValueError("--simulate-world neither reads nor writes checkpoints: drop --resume")
        return _simulate(cfg, args.simulate_world, args.overwrite)
    return run_trainer(cfg, "train", args, resume_command("train", args, overrides))


def run_trainer(cfg: Config, command: str, args: argparse.Namespace, resume_with: str) -> int:
    """Trains ``cfg`` (``args.resume``/``args.overwrite``) and prints where the results are;
    returns the exit code (a diagnosis or a stop by signal, not a traceback)."""
    from fluxlab.train.stop_signals import TrainingInterrupted
    from fluxlab.train.trainer import NonFiniteLossError, Trainer

    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
        path = trainer.train()
    except NonFiniteLossError as e:
        print(f"fluxlab {command}: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        return stopped(command, e, resume_with)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(f"fluxlab {command}: interrupted; continue with: {resume_with}", file=sys.stderr)
        return 130
    if not trainer.dist.is_main:
        return 0
    print(f"checkpoint: {path}")
    print(f"samples:    {trainer.run_dir / 'samples'}")
    print(f"tensorboard --logdir {trainer.run_dir / 'tb'}")
    return 0


def _simulate(cfg: Config, world: int, overwrite: bool) -> int:
    """Trains as rank 0 of a fake ``world``-process group and prints the peak memory of one GPU."""
    # Imported here: every command module loads for `fluxlab --help`, which must stay fast.
    import torch.distributed as dist

    from fluxlab.parallel import distributed
    from fluxlab.pipelines.build import resolve_device
    from fluxlab.train.trainer import Trainer

    info = distributed.simulate(world, resolve_device(cfg.train.device))
    try:
        trainer = Trainer(cfg, simulated=info, overwrite=overwrite)
        trainer.train()
    finally:
        dist.destroy_process_group()
    if not trainer.memory.peaks:
        print(
            f"simulated {world} processes on {trainer.device}: no GPU, so no memory figure "
            "(run it on one GPU)"
        )
        return 0
    print(
        f"peak memory of one GPU of {world} ({cfg.parallel.mode}, {trainer.device}): "
        f"{trainer.memory.summary()}"
    )
    return 0


def _estimate_memory(config: str, overrides: list[str]) -> int:
    """The memory report of ``adapters/memory.py`` for the config's model, resolution and LoRA."""
    from fluxlab.adapters.memory import estimate, report
    from fluxlab.config.loading import config_data, config_from_dict
    from fluxlab.config.presets import PRESETS
    from fluxlab.models.flux.presets import flux_params

    # Not load_config: its checks want the placeholders replaced, and nothing is read here.
    cfg = config_from_dict(config_data(config, PRESETS, overrides))
    if cfg.model.arch != "flux":
        raise ValueError("--estimate-memory sizes a Flux LoRA run: set model.arch=flux")
    if cfg.lora.kind != "lora":  # the activation trace injects LoRA layers
        raise ValueError(
            "--estimate-memory models LoRA adapters only: set lora.kind=lora for an estimate "
            "(a LoKr of the same rank has fewer parameters and the same base)"
        )
    cfg.lora.validate("base", "bf16", "flux")
    params = flux_params(cfg.model.preset, **cfg.model.flux_overrides())
    enc = cfg.encoding
    # Latent space: FLUX's 8× autoencoder; pixel space: patches of the image itself.
    side = cfg.data.resolution // ((8 if enc.space == "latent" else 1) * enc.patch_size)
    title = (
        f"{cfg.model.preset}, {cfg.data.resolution}² ({side * side} image + "
        f"{enc.text_max_length} text tokens), batch {cfg.optim.batch_size}, LoRA rank "
        f"{cfg.lora.rank} on {len(cfg.lora.targets)} targets, bf16 compute"
    )
    every = cfg.parallel.checkpoint_every
    if every > 1:
        title += f"; checkpointing one block in {every} (parallel.checkpoint_every)"
    rows = estimate(
        params,
        cfg.lora,
        side * side,
        enc.text_max_length,
        cfg.optim.batch_size,
        checkpoint_every=every,
    )
    print(report(rows, title))
    return 0
