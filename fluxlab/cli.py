"""``fluxlab`` command line; each subcommand lives in ``fluxlab/commands/<name>.py``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order of `fluxlab --help`.
COMMANDS = [
    "train",
    "train-ae",
    "distill",
    "compare-distill",
    "sample",
    "edit",
    "export",
    "eval",
    "plot",
    "shard",
    "cache",
    "bench-data",
    "bench-cache",
    "bench",
    "bench-scale",
]


def _modules() -> dict:
    return {
        name: importlib.import_module(f"fluxlab.commands.{name.replace('-', '_')}")
        for name in COMMANDS
    }


def build_parser(modules: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluxlab", description="Train and sample FLUX.1-style rectified-flow transformers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in modules.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    modules = _modules()
    parser = build_parser(modules)
    args, extra = parser.parse_known_args(argv)
    module = modules[args.command]
    if getattr(module, "ACCEPTS_OVERRIDES", False):
        bad = [e for e in extra if not (e.startswith("--") and "=" in e)]
        if bad:
            parser.error(f"unrecognised arguments {bad}; overrides look like --section.key=value")
    elif extra:
        parser.error(f"unrecognised arguments {extra}")
    try:
        return module.run(args, extra)
    except (ValueError, FileNotFoundError) as e:
        print(f"fluxlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
