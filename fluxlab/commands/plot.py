"""``fluxlab plot``: the loss curve and loss per t-bin of a run, as a PNG."""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot a run's loss curve and loss per t-bin")
    p.add_argument("--run", required=True, help="a run folder (or its log.jsonl)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--title", default=None)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from fluxlab.eval.plots import plot_run

    print(f"wrote {plot_run(args.run, args.out, args.title)}")
    return 0
