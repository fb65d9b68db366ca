"""One module per ``fluxlab`` subcommand; each defines ``add_parser(subparsers)`` and ``run(args, extra)``."""
