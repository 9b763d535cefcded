"""One module per ``iotcls`` subcommand, each with ``add_arguments(parser)`` and ``run(args)``."""
