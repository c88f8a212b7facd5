"""Benchmark: the decode loop, nexttok ``generate()`` vs Hugging Face ``model.generate`` and llama.cpp on one model.

Default model, 2 threads, a 32-token prompt, 128 new tokens forced (ours: ``ignore_eos``; HF:
``min_new_tokens``; llama.cpp: its token generator, which never stops by itself). Three settings: greedy;
sampling (T 0.8, top_k 50, top_p 0.9); 8 samples of one prompt (ours: one prefill, one batch; HF:
``num_return_sequences=8``; llama.cpp: 8 runs one after another, the prompt's cache kept, since
llama-cpp-python has no batch of one prompt). Interleaved repeats, medians, ratio = ours / peer tokens
per second (> 1 means we are faster). Ours and HF run the model in fp32; llama.cpp (llama-cpp-python, a
CPU build, the same threads) runs the packaged Q4_1 GGUF that the default model is dequantized from,
on the same prompt ids, greedy and with the same sampling settings (its sampler applies the temperature
after top-k/top-p, HF's before; min_p off; seeded). Over our greedy continuation: the KL divergence
KL(ours || llama.cpp) in nats of the two next-token distributions at each step (ours: the HF forward in
fp32, which nexttok's decoder matches to 1e-4; llama.cpp: its logits over the same ids), median and max.
Without ``llama_cpp`` importable, one line says so and the rest runs unchanged.

Also: greedy tokens/s as a fraction of the memory-bandwidth ceiling (fp32 model bytes / read bandwidth
of a 2 GiB buffer, measured in the same run with the same threads, on ordinary and on 2 MiB pages: the
faster). This VM's bandwidth flips between ~30 and ~50 GB/s within seconds, so each repeat reads it
just before and just after its own greedy run and pairs the two; the printed fraction is the median
over repeats. The load average is printed: on a shared machine, read the ratios, not the absolute
numbers.

    .venv/bin/python bench/generate.py [--repeats 3] [--new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import torch

import nexttok
from nexttok.assets import default_gguf
from nexttok.cpu.hugepages import huge_tensor
from nexttok.generate import generate
from nexttok.sampling import SamplingConfig
from nexttok.weights import RELAYOUT_AFTER

SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.9}
SETTINGS = {"greedy": (1, {}), "sampling": (1, SAMPLING), "8 samples": (8, SAMPLING)}


def prompt_ids(lm, n: int = 32) -> list[int]:
    from nexttok.assets import shakespeare_files

    text = shakespeare_files()[0].read_text(encoding="utf-8")[20000:22000]
    return lm.tokenizer.encode(text, add_special_tokens=False)[:n]


def ours(lm, ids: list[int], n: int, kw: dict, new: int, seed: int) -> list[int]:
    config = SamplingConfig(max_new_tokens=new, ignore_eos=True, seed=seed, **(kw or {"temperature": 0}))
    return [s.id for s in generate(lm, ids, config, num_samples=n)]


def peer(lm, ids: list[int], n: int, kw: dict, new: int, seed: int) -> list[int]:
    torch.manual_seed(seed)  # HF draws from the global generator
    x = torch.tensor([ids], device=lm.model.device)
    sample = {"do_sample": True, **kw} if kw else {"do_sample": False}
    out = lm.model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, num_return_sequences=n,
        pad_token_id=lm.tokenizer.pad_token_id or 0, **sample,
    )  # fmt: skip
    return out[:, len(ids) :].flatten().tolist()


def llama_cpp(threads: int, n_ctx: int, logits_all: bool = False):
    """llama.cpp on the packaged Q4_1 GGUF (the file the default model is dequantized from), or the reason
    (a string) it cannot run here."""
    try:
        from llama_cpp import Llama
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or its shared library does not load
        return f"llama_cpp does not import ({type(e).__name__}: {e}); `make bench-generate` builds it"
    return Llama(
        model_path=str(default_gguf()), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
        logits_all=logits_all, verbose=False,
    )  # fmt: skip


def llama_peer(llm):
    """llama.cpp with the signature of ``ours``: n samples are n runs one after another (the binding has no batch
    of one prompt), the prompt's cache kept between them (llama-cpp-python reuses a cached prefix)."""

    def run(lm, ids: list[int], n: int, kw: dict, new: int, seed: int) -> list[int]:
        if kw:
            sample = {"temp": kw["temperature"], "top_k": kw["top_k"], "top_p": kw["top_p"], "min_p": 0.0}
        else:
            sample = {"temp": 0.0}  # greedy
        llm.reset()  # a fresh prefill, as ours and HF have
        out: list[int] = []
        for i in range(n):
            llm.set_seed(1000 * seed + i)
            out += itertools.islice(llm.generate(ids, **sample), new)  # the generator never stops at EOS
        return out

    return run


def kl_per_step(lm, llm_all, ids: list[int], greedy: list[int]) -> list[float]:
    """KL(ours || llama.cpp) in nats at each step of ``greedy``: the two full next-token distributions at the
    positions that predicted it, ours by the HF forward in fp32 over the same ids."""
    seq = ids + greedy[:-1]
    llm_all.reset()
    llm_all.eval(seq)
    theirs = torch.from_numpy(llm_all.scores[len(ids) - 1 : len(seq)].copy()).double()  # [new, vocab]
    with torch.no_grad():
        mine = lm.model(torch.tensor([seq])).logits[0, len(ids) - 1 :].double()  # [new, vocab]
    p, q = mine.log_softmax(-1), theirs.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).tolist()


def compare_llama(lm, ids: list[int], greedy: list[int], llm, threads: int) -> None:
    """llama.cpp's greedy run against ours, and the KL divergence over ours."""
    new = len(greedy)
    theirs = llama_peer(llm)(lm, ids, 1, {}, new, 0)
    same = next((i for i, (a, b) in enumerate(zip(greedy, theirs, strict=True)) if a != b), new)
    print(f"greedy: ours and llama.cpp (Q4_1) agree on the first {same}/{new} tokens")
    llm_all = llama_cpp(threads, len(ids) + new, logits_all=True)
    if llm_all.n_vocab() != lm.model.config.vocab_size:
        print(f"KL not computed: llama.cpp's vocab is {llm_all.n_vocab()}, ours {lm.model.config.vocab_size}")
        return
    kl = kl_per_step(lm, llm_all, ids, greedy)
    print(
        f"KL(ours || llama.cpp) over our greedy run, per step (vocab {llm_all.n_vocab()} both): "
        f"median {statistics.median(kl):.2e}, max {max(kl):.2e} nats"
    )


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


_BUFFERS: list[torch.Tensor] = []
_READS: list[tuple[float, float]] = []  # (ordinary pages, huge pages) per bandwidth() call


def bandwidth(repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the sum of a 2 GiB fp32 buffer (far larger than any CPU cache), median of
    repeats, on ordinary pages and on 2 MiB pages (where our decode keeps the model's large weights,
    nexttok/cpu/hugepages.py); the faster of the two, so the ceiling is the best read either page size gives."""
    if not _BUFFERS:
        _BUFFERS.append(torch.ones(2**29))
        on_huge = huge_tensor(_BUFFERS[0], 2**31)
        _BUFFERS.append(on_huge.fill_(1.0))
    rates = []
    for buf in _BUFFERS:
        buf.sum()
        rates.append(buf.numel() * 4 / statistics.median([timed(buf.sum) for _ in range(repeats)]))
    _READS.append((rates[0], rates[1]))
    return max(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    lm = nexttok.load("default", threads=args.threads, device="cpu")  # the CPU benchmark, also on a GPU machine
    ids = prompt_ids(lm)
    new = args.new_tokens
    # Warm-up, untimed: the one-time costs (numba's compiled code; the move of the weights onto huge pages
    # and their packed copy once RELAYOUT_AFTER tokens are decoded) are paid before any timed run, as in a
    # chat or a server (a run is new - 1 kernel steps: its first token comes from the prefill). The greedy
    # check then compares the code the timed runs use.
    for _ in range(-(-RELAYOUT_AFTER // (new - 1))):
        ours(lm, ids, 1, {}, new, 0)
    greedy_ours, greedy_peer = ours(lm, ids, 1, {}, new, 0), peer(lm, ids, 1, {}, new, 0)
    agree = sum(a == b for a, b in zip(greedy_ours, greedy_peer, strict=True))
    print(f"load average before: {os.getloadavg()[0]:.2f} · threads {torch.get_num_threads()} · prompt {len(ids)}")
    print(f"greedy: ours and HF agree on {agree}/{new} tokens")
    sides = [("ours", ours), ("hf", peer)]
    llm = llama_cpp(args.threads, len(ids) + new)
    if isinstance(llm, str):
        print(f"llama.cpp not measured: {llm}")
    else:
        compare_llama(lm, ids, greedy_ours, llm, args.threads)
        sides.append(("llama.cpp", llama_peer(llm)))
    times, bws = timed_runs(lm, ids, new, args.repeats, sides)
    report(lm, times, bws, new)


def timed_runs(lm, ids: list[int], new: int, repeats: int, sides: list) -> tuple[dict, list]:
    """Per setting and side, the seconds of each repeat; and the bandwidth read around each of our greedy runs."""
    times: dict[str, dict[str, list[float]]] = {k: {side: [] for side, _ in sides} for k in SETTINGS}
    bws: list[tuple[float, float]] = []  # (just before, just after) our greedy run, per repeat
    for r in range(repeats):  # interleaved: load drift hits every side alike
        for name, (n, kw) in SETTINGS.items():
            for side, fn in sides if r % 2 == 0 else sides[::-1]:
                paired = (name, side) == ("greedy", "ours")  # the run the ceiling fraction is about
                before = bandwidth() if paired else 0.0
                times[name][side].append(timed(fn, lm, ids, n, kw, new, r))
                if paired:
                    bws.append((before, bandwidth()))
    return times, bws


def report(lm, times: dict, bws: list[tuple[float, float]], new: int) -> None:
    llama = "llama.cpp" in times["greedy"]
    extra = f"{'llama.cpp tok/s':>17}{'ours/llama.cpp':>16}" if llama else ""
    print(f"{'setting':<12}{'ours tok/s':>12}{'HF tok/s':>12}{'ours/HF':>10}{extra}")
    for name, (n, _) in SETTINGS.items():
        o, h = (n * new / statistics.median(times[name][side]) for side in ("ours", "hf"))
        row = f"{name:<12}{o:>12.2f}{h:>12.2f}{o / h:>9.2f}x"
        if llama:
            c = n * new / statistics.median(times[name]["llama.cpp"])
            row += f"{c:>17.2f}{o / c:>15.2f}x"
        print(row)
    if llama:
        print("  (llama.cpp: the Q4_1 GGUF; its 8 samples are 8 runs one after another, the prompt's cache kept)")
    ceiling(lm, times, bws, new)


def ceiling(lm, times: dict, bws: list[tuple[float, float]], new: int) -> None:
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    # Per repeat: our greedy tokens/s over the ceiling at the bandwidth read around that very run.
    fractions = [new / t * model_bytes / ((a + b) / 2) for t, (a, b) in zip(times["greedy"]["ours"], bws, strict=True)]
    reads = [x for pair in bws for x in pair]
    bw = statistics.median(reads)
    print(
        f"read bandwidth {bw / 1e9:.1f} GB/s (median; {min(reads) / 1e9:.0f}-{max(reads) / 1e9:.0f}) · "
        f"fp32 model {model_bytes / 1e6:.0f} MB · ceiling {bw / model_bytes:.1f} tok/s"
    )
    ordinary, huge = (statistics.median(r[i] for r in _READS) / 1e9 for i in (0, 1))
    print(f"  (the faster of: ordinary pages {ordinary:.1f} GB/s, 2 MiB pages {huge:.1f} GB/s; medians)")
    print(
        f"greedy at {statistics.median(fractions):.2f} of the ceiling (median; per repeat, against the bandwidth "
        f"read just before and after it: {', '.join(f'{f:.2f}' for f in fractions)})"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f} (2 cores; above ~2 means other work shared the CPU)")


if __name__ == "__main__":
    main()
