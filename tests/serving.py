"""A real nexttok server for tests: uvicorn on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, seconds: float = 120.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{base} did not become healthy in {seconds} s")


@contextlib.contextmanager
def running(load, wait: bool = True, port: int | None = None, **settings):
    """Serve ``load()``'s LM (or a dict of loaders by name) with ``ServeSettings(**settings)`` on ``port`` (default
    a free one); yields (base URL, app); stops it after."""
    import uvicorn

    from nexttok.server.app import ServeSettings, create_app

    app = create_app(load, ServeSettings(**settings))
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 30
        while not server.started and time.monotonic() < end:
            time.sleep(0.02)
        if wait:
            wait_healthy(base)
        yield base, app
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the test server did not stop"
