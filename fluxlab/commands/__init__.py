"""One module per ``fluxlab`` subcommand: ``add_parser(subparsers)`` and ``run(args, extra)``.

Each ``run`` imports what it needs inside the function, so that ``fluxlab --help`` (which imports
every command module) does not load torch, transformers or the models.
"""
