"""The ``nexttok`` command: one thin command per verb; the work is in the library.

Each verb group lives in its own module (``cli/predict.py``, ...) and registers itself on ``app``.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys

from nexttok import gc_pause
from nexttok.cli.app import app

# Verb modules register their commands on `app` when imported.
with gc_pause.paused():  # their imports (datasets, peft, ...): see gc_pause.py
    from nexttok.cli import corpus as _corpus  # noqa: E402,F401
    from nexttok.cli import evaluate as _evaluate  # noqa: E402,F401
    from nexttok.cli import finetune as _finetune  # noqa: E402,F401
    from nexttok.cli import generate as _generate  # noqa: E402,F401
    from nexttok.cli import patterns as _patterns  # noqa: E402,F401
    from nexttok.cli import predict as _predict  # noqa: E402,F401
    from nexttok.cli import serve as _serve  # noqa: E402,F401
    from nexttok.cli import train as _train  # noqa: E402,F401

# Verbs that load a model, print and write only files they have closed. After them the interpreter's
# own teardown of torch and transformers is skipped: it took ~1 s of a ~5 s `nexttok predict` (measured).
# Training verbs exit the normal way.
QUICK_VERBS = {"predict", "tokenize", "generate", "chat", "compare", "mask-preview", "eval", "corpus", "patterns"}
QUICK_VERBS |= {"memorization"}


def main() -> None:
    """The console script (and ``python -m nexttok``)."""
    # This process holds nothing but ours (gc_pause.py): what the imports brought moves to the permanent
    # generation now, and a loaded model's objects after loading.
    gc.freeze()
    gc_pause.freeze_after_load = True
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
