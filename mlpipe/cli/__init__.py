"""The ``mlpipe`` command line: one module per command group, each command parsing its options,
calling one use case and printing the result (``group.py`` has the error handling)."""

from __future__ import annotations

# Importing the command modules registers their commands on the group.
from mlpipe.cli import monitor, predict, registry, run, serve, server, sweep  # noqa: F401
from mlpipe.cli.group import cli

__all__ = ["cli", "main"]


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="mlpipe")
