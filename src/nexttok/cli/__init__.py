"""The ``nexttok`` command: one thin command per verb; the work is in the library.

Each verb group lives in its own module (``cli/predict.py``, ...) and registers itself on ``app``.
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from nexttok.errors import NexttokError


class _Group(TyperGroup):
    """Bad input becomes one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NexttokError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Group,
    name="nexttok",
    help="See and use next-token prediction: a language model is a classifier over its vocabulary, run in a loop.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)

# Verb modules register their commands on `app` when imported.
from nexttok.cli import finetune as _finetune  # noqa: E402,F401
from nexttok.cli import generate as _generate  # noqa: E402,F401
from nexttok.cli import predict as _predict  # noqa: E402,F401
from nexttok.cli import train as _train  # noqa: E402,F401


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
