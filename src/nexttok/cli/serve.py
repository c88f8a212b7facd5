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
from nexttok.cli.common import DeviceOpt, DtypeOpt, ModelOpt, ThreadsOpt
from nexttok.errors import NexttokError


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="NEXTTOK_API_KEY", help="Require 'Authorization: Bearer KEY'.", show_default=False
        ),
    ] = None,
    served_model_name: Annotated[
        str, typer.Option("--served-model-name", help="The name clients ask for.")
    ] = "default",
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
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API that shows the whole distribution."""
    from nexttok.lm import load
    from nexttok.server.app import ServeSettings, create_app

    for name, value, low in [("--max-n", max_n, 1), ("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0),
                             ("--max-body", max_body, 1), ("--max-logprobs", max_logprobs, -1)]:  # fmt: skip
        if value < low:
            raise NexttokError(f"{name} must be at least {low} (got {value})", param=name)
    if not 0 <= port < 65536:
        raise NexttokError(f"--port must be in 0..65535 (got {port})", param="port")
    if not _loopback(host):
        typer.echo(f"warning: listening on {host}: anyone who reaches this machine can use the model; "
                   "set --api-key, or keep the default 127.0.0.1", err=True)  # fmt: skip
    settings = ServeSettings(
        served_model_name=served_model_name, api_key=api_key or None, max_logprobs=max_logprobs, max_n=max_n,
        max_batch=max_batch, max_queue=max_queue, max_body=max_body,
    )  # fmt: skip
    app_ = create_app(lambda: load(model, dtype=dtype, threads=threads, device=device), settings)
    _run(app_, host, port, log_level, shutdown_timeout)


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
    model: ModelOpt = None,
    port: Annotated[int, typer.Option("--port", help="TCP port (0: a free one).")] = 0,
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open the page in the browser.")] = True,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Watch and steer next-token prediction in the browser: `nexttok serve` on loopback, and its page."""
    from nexttok.lm import load
    from nexttok.server.app import create_app

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

    app_ = create_app(lambda: load(model, dtype=dtype, threads=threads, device=device))
    _run(app_, "127.0.0.1", port, "warning", 5.0, on_ready=ready)
