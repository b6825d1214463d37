"""Command-line entry points. ``zscl.cli.main:main`` dispatches to one module per subcommand."""
