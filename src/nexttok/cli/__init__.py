"""The ``nexttok`` command: one thin command per verb; the work is in the library.

Each verb group lives in its own module (``cli/predict.py``, ...) and registers itself on ``app``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import warnings

import typer
from typer.core import TyperGroup

from nexttok import _gc
from nexttok.errors import NexttokError, NexttokNotice


class _Group(TyperGroup):
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
    cls=_Group,
    name="nexttok",
    help="See and use next-token prediction: a language model is a classifier over its vocabulary, run in a loop.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)

# Verb modules register their commands on `app` when imported.
with _gc.paused(freeze=True):  # their imports (datasets, peft, ...): see _gc.py
    from nexttok.cli import finetune as _finetune  # noqa: E402,F401
    from nexttok.cli import generate as _generate  # noqa: E402,F401
    from nexttok.cli import predict as _predict  # noqa: E402,F401
    from nexttok.cli import train as _train  # noqa: E402,F401

# Verbs that load a model, print and write only files they have closed. After them the interpreter's
# own teardown of torch and transformers is skipped: it took ~1 s of a ~5 s `nexttok predict` (measured).
# Training verbs exit the normal way.
QUICK_VERBS = {"predict", "tokenize", "generate", "chat", "compare", "mask-preview"}


def main() -> None:
    """The console script (and ``python -m nexttok``)."""
    _gc.freeze_after_load = True  # this process holds nothing but ours (_gc.py)
    code: int | str | None = 0
    try:
        app()
    except KeyboardInterrupt:
        code = 130
    except SystemExit as e:  # click ends every run with one, the exit code inside
        code = e.code
    if len(sys.argv) > 1 and sys.argv[1] in QUICK_VERBS:
        _leave_now(code)
    sys.exit(code)


def _leave_now(code: int | str | None) -> None:
    """What ``sys.exit(code)`` does, minus tearing the modules down: atexit handlers (logging's flush
    among them) run, stdio is flushed, then the process ends."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away (`| head`), a closed stream
            stream.flush()
    os._exit(code or 0)
