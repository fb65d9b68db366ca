"""``fluxlab plot``: the loss curve and loss per t-bin of a run (or several, overlaid), as a PNG."""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot", help="plot a run's loss curve and loss per t-bin (several runs: overlaid)"
    )
    p.add_argument(
        "--run",
        required=True,
        action="append",
        help="a run folder (or its log.jsonl); repeat to overlay runs, e.g. bf16 against fp8",
    )
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--title", default=None)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from fluxlab.eval.plots import plot_runs

    print(f"wrote {plot_runs(args.run, args.out, args.title)}")
    return 0
