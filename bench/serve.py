"""Benchmark: ``nexttok serve`` under concurrent streaming clients, against ``generate()`` in one process and
llama-cpp-python's own OpenAI server on the same GGUF.

Every client asks 128 new tokens (temperature 0.8, its own seed, the end-of-sequence token banned through
``logit_bias`` so every answer is 128 tokens) after its own 32-token prompt, streaming. For 1, 4, 8 and 16
concurrent clients it prints aggregate tokens/s, p50/p99 time to first token and p50/p99 inter-token latency;
then the same requests one after another through ``generate()`` in this process. Targets (2-core VM):

- 1 client: the server's tokens/s >= 0.9x ``generate()`` (HTTP and scheduling overhead <= 10%), the two
  interleaved request by request;
- 8 clients: aggregate tokens/s >= 2.5x serving them one by one (the 1-client run);
- 16 clients against ``--max-batch 8 --max-queue 4``: nothing lost or failed but 429s, each 429 retried after
  its Retry-After succeeds; and the server's RSS after a soak of ``--soak`` s within 5% of the RSS at its half.

Servers listen on 127.0.0.1 only; every run is bounded in requests and seconds.

    .venv/bin/python bench/serve.py [--threads 2] [--soak 120] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from serving import free_port, wait_healthy  # noqa: E402

import nexttok  # noqa: E402
from nexttok.assets import default_gguf, shakespeare_files  # noqa: E402
from nexttok.generate import generate  # noqa: E402
from nexttok.sampling import SamplingConfig  # noqa: E402
from nexttok.weights import RELAYOUT_AFTER  # noqa: E402

NEW = 128
LEVELS = (1, 4, 8, 16)


def prompts(lm, count: int, length: int = 32) -> list[str]:
    """``count`` different texts of ``length`` tokens each (decoded from the packaged Shakespeare)."""
    ids = lm.tokenizer.encode(shakespeare_files()[0].read_text(encoding="utf-8")[30000:90000], add_special_tokens=False)
    return [lm.tokenizer.decode(ids[i * length : (i + 1) * length]) for i in range(count)]


def body(model: str, prompt: str, seed: int, eos: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": NEW, "temperature": 0.8, "seed": seed,
            "logit_bias": {str(eos): -100}, "stream": True}  # fmt: skip


_clients = threading.local()


def _http() -> httpx.Client:
    # One client per thread, as an SDK keeps one: its connection is reused, and building a client (an SSL
    # context among other things, ~20 ms) is not counted against the server on every request.
    if not hasattr(_clients, "client"):
        _clients.client = httpx.Client(timeout=300)
    return _clients.client


def one_request(base: str, req: dict, retries: int = 50) -> dict:
    """Stream one completion; its tokens, time to first token, gaps between tokens, and 429s met."""
    busy = 0
    for _ in range(retries):
        t0 = time.perf_counter()
        times: list[float] = []
        with _http().stream("POST", f"{base}/v1/completions", json=req) as r:
            if r.status_code == 429:
                busy += 1
                time.sleep(float(r.headers.get("retry-after", "1")))
                continue
            if r.status_code != 200:
                return {"error": f"{r.status_code}: {r.read()[:200]!r}", "busy": busy}
            for line in r.iter_lines():
                choices = json.loads(line[6:])["choices"] if line.startswith("data: {") else []
                # A token per chunk; llama-cpp-python ends with one more chunk, empty, to say why it stopped.
                if choices and not (choices[0]["finish_reason"] and not choices[0]["text"]):
                    times.append(time.perf_counter())
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return {"tokens": len(times), "ttft": times[0] - t0 if times else None, "gaps": gaps, "busy": busy}
    return {"error": "still 429 after retries", "busy": busy}


def load_level(base: str, reqs: list[dict], clients: int, rounds: int) -> dict:
    """``clients`` threads, each sending its ``rounds`` requests one after another."""
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for k in range(rounds):
            out = one_request(base, reqs[(i * rounds + k) % len(reqs)])
            with lock:
                results.append(out)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return summarize(results, clients, time.perf_counter() - t0)


def summarize(results: list[dict], clients: int, seconds: float) -> dict:
    """A level's record from its requests' results: counts, tokens/s over ``seconds``, sorted latencies."""
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    return {
        "clients": clients, "requests": len(results), "errors": [r["error"] for r in results if "error" in r],
        "busy": sum(r["busy"] for r in results), "tokens": tokens, "tok_s": tokens / seconds,
        "ttft": ttft, "gaps": sorted(g for r in ok for g in r["gaps"]),
    }  # fmt: skip


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def row(name: str, r: dict) -> str:
    return (
        f"{name:<34} {r['clients']:>3} {r['tok_s']:>8.1f} {pct(r['ttft'], 0.5):>8.0f} {pct(r['ttft'], 0.99):>8.0f} "
        f"{pct(r['gaps'], 0.5):>7.1f} {pct(r['gaps'], 0.99):>7.1f}  {r['requests']} req, {r['busy']} x 429, "
        f"{len(r['errors'])} errors, {r['tokens']}/{NEW * r['requests']} tokens"
    )


def spawn(cmd: list[str]) -> subprocess.Popen:
    # The server's log goes to a file: a pipe nobody reads fills up and stalls a chatty server (llama.cpp's).
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def tail(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()[-2000:]


def start(cmd: list[str], base: str, seconds: float = 300) -> subprocess.Popen:
    proc = spawn(cmd)
    try:
        wait_healthy(base, seconds)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"{cmd[:4]} did not start: {tail(proc)}") from None
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def nexttok_server(threads: int, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "nexttok", "serve", "--port", str(port), "--threads", str(threads),
           "--log-level", "warning", *extra]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    return start(cmd, base), base


def llama_server(threads: int) -> tuple[subprocess.Popen, str] | str:
    try:
        import llama_cpp.server  # noqa: F401
    except Exception as e:  # not built, or its server extras missing
        return f"llama_cpp.server does not import ({type(e).__name__}: {e}); `make bench-serve` installs it"
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf()), "--host", "127.0.0.1",
           "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048",
           "--model_alias", "default", "--interrupt_requests", "False"]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    proc = spawn(cmd)
    end = time.monotonic() + 300
    while time.monotonic() < end:  # llama-cpp-python's server has no /health: its model list answers when up
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    return f"llama_cpp.server did not start in 300 s: {tail(proc)}"


def interleaved(base: str, lm, reqs: list[dict], texts: list[str], count: int) -> tuple[dict, float]:
    """One client: ``count`` requests one after another through the server, each followed by the same request
    through generate() in this process (interleaved, so a drift in the machine's speed hits both alike).
    The server's level record, and generate()'s tokens/s."""
    bias = {lm.tokenizer.eos_token_id: -100.0}
    # Warm as the server is: past weights.RELAYOUT_AFTER steps, after which the weights are relaid out.
    warm = SamplingConfig(max_new_tokens=RELAYOUT_AFTER + 88, temperature=0.8, seed=0, logit_bias=bias)
    list(generate(lm, texts[0], warm))
    served, spent, tokens = [], 0.0, 0
    t_served = 0.0
    for i in range(count):
        t0 = time.perf_counter()
        served.append(one_request(base, reqs[i]))
        t_served += time.perf_counter() - t0
        config = SamplingConfig(max_new_tokens=NEW, temperature=0.8, seed=i, logit_bias=bias)
        t0 = time.perf_counter()
        tokens += sum(1 for _ in generate(lm, texts[i], config))
        spent += time.perf_counter() - t0
    return summarize(served, 1, t_served), tokens / spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # llama-cpp-python's server is started with --interrupt_requests False: by default a new request cuts off
    # the one streaming, so under load most answers would stop early.
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--soak", type=float, default=120.0, help="seconds of 16-client load for the RSS check")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--llama-only", action="store_true", help="only the llama-cpp-python server (no ratio)")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPUs; threads {args.threads}")
    lm = nexttok.load(threads=args.threads)
    eos = lm.tokenizer.eos_token_id
    texts = prompts(lm, 32)
    reqs = [body("default", t, i, eos) for i, t in enumerate(texts)]
    if args.llama_only:
        return peer(reqs, args.threads, None)

    proc, base = nexttok_server(args.threads, "--max-batch", "16", "--max-queue", "64")
    try:
        one_request(base, {**reqs[0], "max_tokens": RELAYOUT_AFTER + 88})  # warm-up past the weights' relayout
        ours, direct = {}, 0.0
        ours[1], direct = interleaved(base, lm, reqs, texts, 4 * args.rounds)
        ours.update({c: load_level(base, reqs, c, args.rounds) for c in LEVELS[1:]})
    finally:
        stop(proc)

    print(f"\n{'':<34} {'cl':>3} {'tok/s':>8} {'ttft50':>8} {'ttft99':>8} {'itl50':>7} {'itl99':>7}   (ms)")
    for c in LEVELS:
        print(row("nexttok serve", ours[c]))
    print(f"{'generate(), one after another':<34} {1:>3} {direct:>8.1f}   (interleaved with the 1-client requests)")
    print(f"1 client: server / generate() = {ours[1]['tok_s'] / direct:.2f}x (target >= 0.9)")
    print(f"8 clients: aggregate / one by one = {ours[8]['tok_s'] / ours[1]['tok_s']:.2f}x (target >= 2.5)")
    print(f"16 clients: aggregate / one by one = {ours[16]['tok_s'] / ours[1]['tok_s']:.2f}x")

    proc, base = nexttok_server(args.threads, "--max-batch", "8", "--max-queue", "4")
    try:
        one_request(base, {**reqs[0], "max_tokens": RELAYOUT_AFTER + 88})
        burst = load_level(base, reqs, 16, args.rounds)
        print(row("serve --max-batch 8 --max-queue 4", burst))
        lost = 16 * args.rounds - burst["requests"] + len(burst["errors"])
        print(f"  lost or failed requests: {lost} (target 0); 429s met and retried: {burst['busy']}")
        soak(base, reqs, proc.pid, args.soak, args.rounds)
    finally:
        stop(proc)

    if not args.no_llama:
        peer(reqs, args.threads, ours)


def soak(base: str, reqs: list[dict], pid: int, seconds: float, rounds: int) -> None:
    end, marks, start_at = time.monotonic() + seconds, {}, time.monotonic()
    while time.monotonic() < end:
        load_level(base, reqs, 16, 1)
        elapsed = time.monotonic() - start_at
        marks.setdefault("half" if elapsed >= seconds / 2 else "early", rss(pid))
    final = rss(pid)
    half = marks.get("half", final)
    print(f"  soak {seconds:.0f} s of 16 clients: RSS {half / 2**20:.0f} MiB at the half, {final / 2**20:.0f} MiB "
          f"at the end: {100 * (final - half) / half:+.1f}% (target within 5%)")  # fmt: skip


def peer(reqs: list[dict], threads: int, ours: dict | None) -> None:
    started = llama_server(threads)
    if isinstance(started, str):
        print(f"llama.cpp's server not measured: {started}")
        return
    proc, base = started
    try:
        one_request(base, reqs[0])  # warm
        theirs = {c: load_level(base, reqs, c, 1 if c > 1 else 2) for c in (1, 8)}
    finally:
        stop(proc)
    for c, r in theirs.items():
        print(row("llama-cpp-python server (Q4_1)", r))
        if ours:
            print(f"  {c} clients: nexttok / llama-cpp-python server = {ours[c]['tok_s'] / r['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
