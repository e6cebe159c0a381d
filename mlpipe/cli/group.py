"""The ``mlpipe`` group and the one place where errors become messages and exit codes.

Only click and ``mlpipe.core.errors`` are imported at module level, here and in every command
module; each command imports its use case inside its body, so ``mlpipe --help`` starts without
mlflow, torch or monai (``tests/test_cli.py`` guards this).
"""

from __future__ import annotations

import sys
import traceback

import click

from mlpipe import __version__
from mlpipe.core.errors import MlpipeError


class MlpipeGroup(click.Group):
    """Turns ``MlpipeError`` into ``Error: <message>`` and its exit code; Ctrl-C into 130.

    Anything else keeps its traceback: a bug should look like a bug. ``--debug`` prints the
    traceback of a user error too, and keeps its exit code (scripts test it).
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MlpipeError as exc:
            # --debug changes what is printed (the traceback too), never the exit code.
            if ctx.meta.get("mlpipe.debug"):
                traceback.print_exc()
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            if ctx.meta.get("mlpipe.debug"):
                traceback.print_exc()
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=MlpipeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="mlpipe")
@click.option("--debug", is_flag=True, help="Also print tracebacks (exit codes stay the same).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """mlpipe: MLflow done right for medical-imaging ML teams.

    Runs MLflow projects reproducibly and checked, tags every run with the data and
    preprocessing it used, and promotes models to production behind gates.
    """
    ctx.meta["mlpipe.debug"] = debug


TRACKING_URI_HELP = (
    "Tracking URI [default: $MLFLOW_TRACKING_URI, then mlpipe.yaml, then sqlite:///mlruns.db here]."
)


def confirm(question: str, yes: bool) -> None:
    """Ask only on an interactive terminal; never wait for input when stdin is not a TTY."""
    if yes or not sys.stdin.isatty():
        return
    if not click.confirm(question, default=False):
        raise click.Abort()
