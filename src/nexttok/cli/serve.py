"""``nexttok serve``: the OpenAI-compatible server (docs/serve.md)."""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import threading
from typing import Annotated

import typer

from nexttok.cli.app import app
from nexttok.cli.common import DeviceOpt, DtypeOpt, ThreadsOpt, check_min_span
from nexttok.errors import NexttokError

ModelsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        "-m",
        help="'default' (packaged SmolLM2-135M-Instruct), a model folder, a .gguf file, or a hub id; give it again "
        "to serve several (the first is the default; the playground compares two). Env: NEXTTOK_MODEL.",
        show_default=False,
    ),
]


def _served(models: list[str] | None, names: list[str] | None) -> dict[str, str | None]:
    """Each model by the name clients ask for: ``--served-model-name`` in order, else "default" for one model
    and the ``--model`` text for several."""
    models, names = models or [None], list(names or [])
    if len(names) > len(models):
        raise NexttokError(f"{len(names)} --served-model-name for {len(models)} --model", param="served-model-name")
    names += [("default" if len(models) == 1 else m or "default") for m in models[len(names) :]]
    if len(set(names)) < len(names):
        raise NexttokError(f"two models would both be served as {names!r}; name each with --served-model-name",
                           param="served-model-name")  # fmt: skip
    return dict(zip(names, models, strict=True))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


CorpusOpt = Annotated[
    str | None,
    typer.Option(
        "--corpus", help="A corpus index: each answer carries its verbatim spans (nexttok.corpus).", show_default=False
    ),
]
MinSpanOpt = Annotated[int, typer.Option("--min-span", help="Shortest verbatim span reported, in tokens.")]


def _check_corpus(corpus: str | None, min_span: int) -> None:
    check_min_span(min_span)
    if corpus is not None:
        from nexttok.corpus import CorpusIndex

        CorpusIndex(corpus)  # a folder that is not an index: one line now, not a failed load later


@app.command()
def serve(
    model: ModelsOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="NEXTTOK_API_KEY", help="Require 'Authorization: Bearer KEY'.", show_default=False
        ),
    ] = None,
    served_model_name: Annotated[
        list[str] | None,
        typer.Option("--served-model-name", help="The name clients ask for (once per --model).", show_default=False),
    ] = None,
    max_logprobs: Annotated[
        int, typer.Option("--max-logprobs", help="Alternatives per token at most; -1: whole vocabulary.")
    ] = 20,
    max_n: Annotated[int, typer.Option("--max-n", help="Samples per request at most.")] = 16,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Rows decoding at once.")] = 16,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests waiting for room; past it, 429.")] = 64,
    max_body: Annotated[int, typer.Option("--max-body", help="Largest request body in bytes; past it, 413.")] = 4
    * 2**20,
    shutdown_timeout: Annotated[
        float, typer.Option("--shutdown-timeout", help="Seconds SIGTERM waits for requests in flight.")
    ] = 30.0,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn's log level.")] = "info",
    corpus: CorpusOpt = None,
    min_span: MinSpanOpt = 8,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API that shows the whole distribution."""
    from nexttok.server.app import ServeSettings, create_app

    for name, value, low in [("--max-n", max_n, 1), ("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0),
                             ("--max-body", max_body, 1), ("--max-logprobs", max_logprobs, -1)]:  # fmt: skip
        if value < low:
            raise NexttokError(f"{name} must be at least {low} (got {value})", param=name)
    _check_corpus(corpus, min_span)
    if not 0 <= port < 65536:
        raise NexttokError(f"--port must be in 0..65535 (got {port})", param="port")
    if not _loopback(host):
        typer.echo(f"warning: listening on {host}: anyone who reaches this machine can use the model; "
                   "set --api-key, or keep the default 127.0.0.1", err=True)  # fmt: skip
    served = _served(model, served_model_name)
    settings = ServeSettings(
        served_model_name=next(iter(served)), api_key=api_key or None, max_logprobs=max_logprobs, max_n=max_n,
        max_batch=max_batch, max_queue=max_queue, max_body=max_body, corpus=corpus, min_span=min_span,
    )  # fmt: skip
    app_ = create_app(_loaders(served, dtype, threads, device), settings)
    _run(app_, host, port, log_level, shutdown_timeout)


def _loaders(served: dict[str, str | None], dtype: str, threads: int | None, device: str | None) -> dict:
    from nexttok.lm import load

    return {name: (lambda m=m: load(m, dtype=dtype, threads=threads, device=device)) for name, m in served.items()}


def _run(app_, host: str, port: int, log_level: str, shutdown_timeout: float, on_ready=None) -> None:
    import uvicorn

    config = uvicorn.Config(app_, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    # uvicorn drains on SIGTERM, then raises the signal again to whatever handler was there before it: this
    # one, so that a drained server exits 0 rather than dying of the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    if on_ready:
        threading.Thread(target=on_ready, daemon=True).start()
    uvicorn.Server(config).run()


@app.command()
def playground(
    model: ModelsOpt = None,
    port: Annotated[int, typer.Option("--port", help="TCP port (0: a free one).")] = 0,
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open the page in the browser.")] = True,
    corpus: CorpusOpt = None,
    min_span: MinSpanOpt = 8,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Watch and steer next-token prediction in the browser: `nexttok serve` on loopback, and its page."""
    from nexttok.server.app import ServeSettings, create_app

    _check_corpus(corpus, min_span)
    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"

    def ready() -> None:
        import time
        import webbrowser

        for _ in range(600):  # until uvicorn listens (the page then says when the model is still loading)
            with socket.socket() as s, contextlib.suppress(OSError):
                s.connect(("127.0.0.1", port))
                break
            time.sleep(0.1)
        typer.echo(f"nexttok playground: {url} (Ctrl+C stops it)", err=True)
        if not (open_browser and webbrowser.open(url)):
            typer.echo(f"open {url} in a browser", err=True)

    served = _served(model, None)
    settings = ServeSettings(served_model_name=next(iter(served)), corpus=corpus, min_span=min_span)
    app_ = create_app(_loaders(served, dtype, threads, device), settings)
    _run(app_, "127.0.0.1", port, "warning", 5.0, on_ready=ready)
