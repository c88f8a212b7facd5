"""The Typer app every verb registers on, and how it reports bad input and notices."""

from __future__ import annotations

import warnings

import typer
from typer.core import TyperGroup

from nexttok.errors import NexttokError, NexttokNotice


class Group(TyperGroup):
    """Bad input becomes one line on stderr and exit code 2, never a traceback; a notice (something
    asked for that runs another way here) one line ``note: ...``."""

    def invoke(self, ctx):
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except NexttokError as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(2) from None


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, NexttokNotice):
        typer.echo(f"note: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


app = typer.Typer(
    cls=Group,
    name="nexttok",
    help="See and use next-token prediction: a language model is a classifier over its vocabulary, run in a loop.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
