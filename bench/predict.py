"""Benchmark: the next-token distribution, nexttok vs what a user writes with transformers.

Peer: ``model(ids).logits.softmax(-1)`` over every position, then ``topk`` at the last one.
Ours: ``lm.distribution(prompt).top(10)`` (logits for the last position only).
Interleaved repeats, medians, ratio = peer time / our time (> 1 means we are faster).
Also: whole-process wall time of ``nexttok predict`` with a warm cache, and of a process that only
imports torch, then torch and transformers' Llama classes (the floor under it).

    .venv/bin/python bench/predict.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

import nexttok


def peer(model, tokenizer, text: str):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        probs = model(ids).logits.softmax(-1)  # (1, T, V): every position
    return probs[0, -1].topk(10)


def ours(lm, text: str):
    return lm.distribution(text).top(10)


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def long_prompt(lm, n: int) -> str:
    from nexttok.assets import shakespeare_files

    text = shakespeare_files()[0].read_text(encoding="utf-8")[20000:40000]
    ids = lm.tokenizer.encode(text, add_special_tokens=False)[:n]
    text = lm.tokenizer.decode(ids)
    assert len(lm.encode(text)) == n, "prompt does not round-trip to the same length"
    return text


def compare(lm, text: str, repeats: int) -> tuple[float, float]:
    a = ours(lm, text)
    b = peer(lm.model, lm.tokenizer, text)
    assert [r.id for r in a] == b.indices.tolist(), "ours and the peer disagree on the top 10"
    for _ in range(2):  # warm-up
        timed(ours, lm, text), timed(peer, lm.model, lm.tokenizer, text)
    t_ours, t_peer = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        t_ours.append(timed(ours, lm, text))
        t_peer.append(timed(peer, lm.model, lm.tokenizer, text))
    return statistics.median(t_ours), statistics.median(t_peer)


def process_time(cmd: list[str], repeats: int) -> float:
    subprocess.run(cmd, capture_output=True, check=True)  # warm the cache and the page cache
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# The whole `nexttok predict` process, and the imports it cannot avoid, timed as processes of their own.
PROCESSES = [
    ("nexttok predict", ["-m", "nexttok", "predict", "The capital of France is"]),
    ("python -c 'import torch'", ["-c", "import torch"]),
    ("... + transformers' Llama", ["-c", "import torch; from transformers import LlamaForCausalLM"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--process-repeats", type=int, default=5)
    args = ap.parse_args()
    lm = nexttok.load("default", threads=args.threads, device="cpu")  # the CPU benchmark, also on a GPU machine
    print(f"model: default (SmolLM2-135M-Instruct, fp32), threads {torch.get_num_threads()}, repeats {args.repeats}")
    print(f"{'prompt':>12} {'ours ms':>9} {'transformers ms':>16} {'ratio':>7}")
    for label, text in [("5 tokens", "The capital of France is"), ("512 tokens", long_prompt(lm, 512))]:
        t_ours, t_peer = compare(lm, text, args.repeats)
        print(f"{label:>12} {t_ours * 1e3:9.1f} {t_peer * 1e3:16.1f} {t_peer / t_ours:7.2f}x")
    for label, argv in PROCESSES:
        seconds = process_time([sys.executable, *argv], args.process_repeats)
        print(f"whole process, {label}: {seconds:.2f} s median")


if __name__ == "__main__":
    main()
