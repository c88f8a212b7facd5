"""Options shared by every command, and small helpers for reading input."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Annotated

import typer
from rich.console import Console

from nexttok.errors import NexttokError

console = Console(highlight=False)

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="'default' (packaged SmolLM2-135M-Instruct), a model folder, a .gguf file, or a hub id. "
        "Env: NEXTTOK_MODEL.",
        show_default=False,
    ),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 or bfloat16.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads for torch.", show_default=False)]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="auto (the CUDA GPU when torch sees one, else the CPU), cpu, cuda, cuda:N or mps. Env: NEXTTOK_DEVICE.",
        show_default=False,
    ),
]


def check_min_span(min_span: int) -> None:
    """``--min-span`` before the model loads (``nexttok.corpus.spans`` checks it too, for library callers)."""
    if min_span < 1:
        raise NexttokError(f"--min-span must be at least 1 (got {min_span})", param="min_span")


def read_prompt(prompt: str) -> str:
    """The prompt argument; '-' reads it from stdin (UTF-8)."""
    if prompt != "-":
        return prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NexttokError(
            f"stdin is not valid UTF-8 (bad byte at offset {e.start}); convert it first, "
            "e.g. `iconv -f latin1 -t utf-8`",
            param="prompt",
        ) from None


def load_lm(model: str | None, dtype: str, threads: int | None, device: str | None = None):
    from nexttok.lm import load

    with console.status("loading model…", spinner="dots") if console.is_terminal else nullcontext():
        return load(model, dtype=dtype, threads=threads, device=device)
