"""Benchmark: the corpus index on the Shakespeare corpus with the default model's tokenizer.

1. Index build (tokenize + suffix array + save) time and bytes per token on disk: targets <= 10 s, <= 16.
2. Longest-suffix (infinity-gram) query on contexts cut from the held-out text: target median <= 5 ms.
3. ``generate --corpus`` against ``generate`` alone, 128 greedy tokens from the same prompt, same process,
   interleaved repeats: ratio (generate + verbatim spans) / generate, target <= 1.1.
4. ``memorization`` over 1,000 windows of 64 tokens (k = m = 32): target <= 2 minutes; on the default model
   and, when ``runs/shakespeare`` exists (``make shakespeare``), on that model with its own index.

    .venv/bin/python bench/corpus.py [--repeats 3] [--windows 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import nexttok
from nexttok.corpus import index_corpus, infgram
from nexttok.corpus import memorization as mem
from nexttok.corpus.report import spans_report
from nexttok.evaluation.pipeline import read_text


def build(lm, out: Path):
    t0 = time.perf_counter()
    index = index_corpus(lm, ["shakespeare"], out, show=False)
    seconds = time.perf_counter() - t0
    m = index.manifest
    print(f"index build: {seconds:.2f} s (target <= 10) for {m['tokens']:,} tokens, of which the suffix array "
          f"{m['build_seconds']:.2f} s; {m['bytes_on_disk'] / m['tokens']:.2f} bytes/token (target <= 16)")  # fmt: skip
    return index


def queries(lm, index, n: int = 500) -> None:
    held = read_text(lm, "shakespeare", "heldout").ids[0]
    rng = np.random.default_rng(0)
    infgram(index, held[:10])  # compile (numba caches it on disk)
    times = []
    for _ in range(n):
        end = int(rng.integers(600, len(held)))
        ctx = held[end - int(rng.integers(64, 513)) : end]
        t0 = time.perf_counter()
        infgram(index, ctx)
        times.append(time.perf_counter() - t0)
    print(f"longest-suffix query ({n} contexts of 64-512 held-out tokens): median {1000 * np.median(times):.3f} ms, "
          f"p99 {1000 * np.quantile(times, 0.99):.3f} ms (target median <= 5)")  # fmt: skip


def generation(lm, index, repeats: int) -> None:
    config = nexttok.SamplingConfig(temperature=0, max_new_tokens=128, ignore_eos=True)
    ids = lm.encode("ROMEO.\nBut soft, what light through yonder window breaks?\n")
    warm = [s.id for s in nexttok.generate(lm, ids, config)]  # warm up the decoder
    spans_report(lm, index, warm, 8)  # and load the compiled queries (numba's cache)
    alone, with_corpus = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [s.id for s in nexttok.generate(lm, ids, config)]
        alone.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = [s.id for s in nexttok.generate(lm, ids, config)]
        rep = spans_report(lm, index, out, 8)
        with_corpus.append(time.perf_counter() - t0)
    a, w = statistics.median(alone), statistics.median(with_corpus)
    print(f"generate 128 tokens: alone {a:.2f} s, with --corpus spans {w:.2f} s: ratio {w / a:.3f} (target <= 1.1); "
          f"{len(rep['spans'])} spans cover {rep['coverage']:.0%}")  # fmt: skip


def memorization(name: str, lm, index, windows: int) -> None:
    w = mem.sample_windows(index.tokens, 64, windows, 0)
    t0 = time.perf_counter()
    side = mem.measure([(name, lm)], {"train": w}, index, 32)[0]
    seconds = time.perf_counter() - t0
    print(f"memorization, {name}: {len(w):,} windows of 64 tokens in {seconds:.1f} s (target <= 120); "
          f"extractable {side.extractable:.1%}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}; cpus {os.cpu_count()}")
    lm = nexttok.load(threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        index = build(lm, Path(tmp) / "idx")
        queries(lm, index)
        generation(lm, index, args.repeats)
        memorization("default", lm, index, args.windows)
    if Path("runs/shakespeare/config.json").is_file():
        small = nexttok.load("runs/shakespeare", threads=args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            idx = index_corpus(small, ["shakespeare"], Path(tmp) / "idx", split="train", show=False)
            memorization("runs/shakespeare", small, idx, args.windows)


if __name__ == "__main__":
    main()
