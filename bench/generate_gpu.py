"""Benchmark on a CUDA GPU: the decode loop, nexttok ``generate()`` vs Hugging Face ``model.generate``.

The same three settings as bench/generate.py (greedy; sampling T 0.8, top_k 50, top_p 0.9; 8 samples of
one prompt against ``num_return_sequences=8``), a 32-token prompt, 128 new tokens forced, interleaved
repeats, medians, ratio = ours / HF tokens per second. Also greedy tokens/s as a fraction of the GPU's
memory-bandwidth ceiling (model bytes / the read bandwidth of a 4 GiB buffer on the GPU, this run): at
batch 1 a small model is bound by kernel launches, not by memory, and the fraction shows how far.

    python bench/generate_gpu.py [--model default] [--dtype float32] [--repeats 5] [--new-tokens 128]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from generate import SETTINGS, ours, peer  # bench/generate.py: the same runs, the same peer

import nexttok

PROMPT = (
    "The history of the printing press begins in the middle of the fifteenth century, when a goldsmith in "
    "Mainz combined movable metal type, oil-based ink and a wooden press adapted from those used for wine"
)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args) -> float:
    sync()
    t = time.perf_counter()
    fn(*args)
    sync()
    return time.perf_counter() - t


def bandwidth(device: torch.device, repeats: int = 20) -> float:
    """Read bandwidth of the GPU's memory in bytes/s: the sum of a 4 GiB fp32 buffer, median of repeats."""
    buf = torch.ones(2**30, device=device)
    buf.sum()
    rate = buf.numel() * 4 / statistics.median([timed(buf.sum) for _ in range(repeats)])
    del buf
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    lm = nexttok.load(args.model, dtype=args.dtype, device=args.device)
    ids = lm.tokenizer.encode(PROMPT, add_special_tokens=False)[:32]
    new = args.new_tokens
    for n, kw in SETTINGS.values():  # warm-up: CUDA's and cuBLAS's one-time costs, both sides
        ours(lm, ids, n, kw, 8, 0), peer(lm, ids, n, kw, 8, 0)
    agree = sum(a == b for a, b in zip(ours(lm, ids, 1, {}, new, 0), peer(lm, ids, 1, {}, new, 0), strict=True))
    where = torch.cuda.get_device_name() if lm.model.device.type == "cuda" else str(lm.model.device)
    print(f"{where} · {args.model} {args.dtype} · prompt {len(ids)} tokens, {new} new")
    print(f"greedy: ours and HF agree on {agree}/{new} tokens")
    times: dict[str, dict[str, list[float]]] = {k: {"ours": [], "hf": []} for k in SETTINGS}
    for r in range(args.repeats):  # interleaved: drift hits both sides alike
        for name, (n, kw) in SETTINGS.items():
            pair = [("ours", ours), ("hf", peer)]
            for side, fn in pair if r % 2 == 0 else pair[::-1]:
                times[name][side].append(timed(fn, lm, ids, n, kw, new, r))
    print(f"{'setting':<12}{'ours tok/s':>12}{'HF tok/s':>12}{'ours/HF':>10}")
    for name, (n, _) in SETTINGS.items():
        o = n * new / statistics.median(times[name]["ours"])
        h = n * new / statistics.median(times[name]["hf"])
        print(f"{name:<12}{o:>12.1f}{h:>12.1f}{o / h:>9.2f}x")
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    bw = bandwidth(lm.model.device)
    greedy = new / statistics.median(times["greedy"]["ours"])
    print(
        f"GPU read bandwidth {bw / 1e12:.2f} TB/s · model {model_bytes / 1e6:.0f} MB · ceiling "
        f"{bw / model_bytes:.0f} tok/s · greedy at {greedy * model_bytes / bw:.3f} of it"
    )


if __name__ == "__main__":
    main()
