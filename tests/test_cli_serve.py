"""``nexttok serve`` as a process: it serves, drains on SIGTERM and exits 0; its options are checked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
from serving import free_port, wait_healthy
from typer.testing import CliRunner

from nexttok.cli import app


def test_sigterm_finishes_requests_in_flight_then_exits_0(tiny_model_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "nexttok", "serve", "--model", str(tiny_model_dir), "--port", str(port),
           "--served-model-name", "tiny", "--shutdown-timeout", "20", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "NEXTTOK_API_KEY": ""}
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, 180)
        body = {"model": "tiny", "prompt": "To be", "max_tokens": 200, "stream": True, "nexttok": {"ignore_eos": True}}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        chunks = [line for line in rest if line.startswith("data: {")]
        assert rest[-1] == "data: [DONE]" and len(chunks) >= 150  # the request in flight finished
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--port", "70000"], "--port must be in 0..65535"),
        (["-m", "default", "-m", "default"], "would both be served as ['default', 'default']"),
        (["--served-model-name", "a", "--served-model-name", "b"], "2 --served-model-name for 1 --model"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(args, message):
    r = CliRunner().invoke(app, ["serve", *args])
    assert r.exit_code == 2 and message in r.stderr


def test_another_host_than_loopback_warns(monkeypatch, tiny_model_dir):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: served.append(self.config.host))  # nothing listens
    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0"])
    assert r.exit_code == 0 and served == ["0.0.0.0"]
    assert r.stderr.count("\n") == 1 and "warning: listening on 0.0.0.0" in r.stderr
    quiet = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir)])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr


def test_playground_serves_the_page_on_a_free_loopback_port_and_prints_its_url(tiny_model_dir):
    cmd = [sys.executable, "-m", "nexttok", "playground", "--model", str(tiny_model_dir), "--no-open"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith("nexttok playground: http://127.0.0.1:")
        url = line.split()[2]
        wait_healthy(url.rstrip("/"), 180)
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200 and "nexttok playground" in page.text
        assert httpx.get(url + "web/playground.js", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_two_models_are_served_by_name_and_compared(tiny_model_dir, tmp_path):
    from conftest import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=1)
    port = free_port()
    cmd = [sys.executable, "-m", "nexttok", "serve", "-m", str(tiny_model_dir), "-m", str(other), "--port", str(port),
           "--served-model-name", "base", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, 180)
        assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["base", str(other)]
        r = httpx.post(f"{base}/v1/compare", json={"prompt": "To be"}, timeout=60).json()
        assert (r["a"], r["b"]) == ("base", str(other)) and r["kl_ab_nats"] > 0
        body = {"model": str(other), "prompt": "To be", "max_tokens": 3, "temperature": 0}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()["model"] == str(other)
    finally:
        proc.terminate()
        proc.wait(60)
