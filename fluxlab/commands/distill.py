"""``fluxlab distill``: guidance distillation of a CFG-trained model into a one-pass student.

The student starts as the teacher plus a zero-initialised guidance embedding and learns the
teacher's ``v_u + w·(v_c − v_u)`` with ``w`` drawn per sample from ``objective.train_guidance``
(1–6 by default); it then samples with ``--guidance`` as its input and one pass per step.
"""

from __future__ import annotations

import argparse
import shlex

from fluxlab.commands.train import add_run_folder_flags

ACCEPTS_OVERRIDES = True


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a CFG model into a one-pass, guidance-embedded student",
        description="Train a student on the teacher's classifier-free guided velocity; by default "
        "on the teacher's own data and config, in TEACHER-distilled/. Override any field with "
        "--section.key=value (e.g. --objective.train_guidance=[1,6] --train.max_minutes=20).",
    )
    p.add_argument(
        "--teacher",
        required=True,
        help="a fluxlab run or checkpoint folder (its EMA weights), or a released FLUX folder "
        "with --config",
    )
    p.add_argument(
        "--config",
        default=None,
        help="preset or YAML file for the student's data and training (default: the teacher's)",
    )
    add_run_folder_flags(p)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    # Imported here: every command module loads for `fluxlab --help`, which must stay fast.
    from fluxlab.commands.train import run_trainer
    from fluxlab.tasks.distill import student_config

    cfg = student_config(args.teacher, args.config, overrides)
    config = ["--config", args.config] if args.config else []
    resume_with = shlex.join(
        ["fluxlab", "distill", "--teacher", args.teacher, *config, *overrides, "--resume"]
    )
    return run_trainer(cfg, "distill", args, resume_with)
