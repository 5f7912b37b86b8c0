"""One module per ``hekitrace`` subcommand, each with ``add_parser`` and ``run``."""
