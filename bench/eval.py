"""Benchmark: perplexity of the default model on the Shakespeare held-out split, nexttok.evaluate vs the
Hugging Face perplexity guide's strided loop (https://huggingface.co/docs/transformers/perplexity).

Same token ids, same windows (context 1024, stride 512, no BOS: the guide's), same number asserted to
1e-5. The guide computes logits for every position of each window and the loss over all of them; ours
puts only the scored half through the output layer and also computes ranks, entropy and calibration.
Ratio = the guide's time / ours (> 1: we are faster). Then peak memory (max RSS of a fresh process) of
scoring 100k and 1M tokens with ours, on a 2-layer random model with the default tokenizer (the
default model would take over an hour for 1M tokens on 2 cores): it must not grow with the text.

    .venv/bin/python bench/eval.py [--tokens 100000] [--repeats 1] [--threads 2] [--no-memory] [--no-speed]
        [--device auto|cpu|cuda]

On a GPU (``--device cuda``, or ``auto`` where torch sees one) both run there in float32 without TF32; the
guide scores one window per forward pass as written, ours its default batch of 4096 tokens' windows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

import nexttok
from nexttok.evaluation.pipeline import read_text

CONTEXT, STRIDE = 1024, 512


def guide(model, ids: torch.Tensor) -> tuple[float, int]:
    """The guide's loop as written (summed nats, tokens), with one fix: it counts each window's tokens as
    ``valid - 1`` for the label shift, but only the first window loses a label to it."""
    seq_len, nll_sum, n_tokens, prev_end = ids.size(1), 0.0, 0, 0
    for begin in range(0, seq_len, STRIDE):
        end = min(begin + CONTEXT, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * scored
        n_tokens += scored
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


def speed(n: int, repeats: int, device: str) -> None:
    lm = nexttok.load(device=device)
    ids = read_text(lm, "shakespeare", "heldout", limit=n).ids[0]
    x = torch.from_numpy(ids.astype("int64"))[None].to(lm.model.device)
    print(f"default model on {lm.model.device}, Shakespeare held-out, first {len(ids):,} tokens, "
          f"context {CONTEXT}, stride {STRIDE}")  # fmt: skip
    kwargs = dict(split="heldout", limit_tokens=n, context=CONTEXT, stride=STRIDE, bos=False)
    times: dict[str, list[float]] = {"ours": [], "guide": []}
    for r in range(repeats):  # the order alternates: the VM's speed drifts
        for who in ("ours", "guide") if r % 2 == 0 else ("guide", "ours"):
            t0 = time.perf_counter()
            if who == "ours":
                m = nexttok.evaluate(lm, "shakespeare", **kwargs).metrics
            else:
                total, tokens = guide(lm.model, x)
            times[who].append(time.perf_counter() - t0)
    ppl_guide = math.exp(total / tokens)
    assert m.tokens == tokens, (m.tokens, tokens)
    # Equal to 1e-5 in the loss. (torch's float32 log_softmax on this CPU is ~1.6e-5 nats/token low against
    # float64; ours within ~1e-6: docs/internals/eval.md. Over 100k tokens that moves the perplexity ~2e-5.)
    assert abs(m.loss / (total / tokens) - 1) < 1e-5, (m.loss, total / tokens)
    print(f"loss: ours {m.loss:.6f}, guide {total / tokens:.6f} nats/token (equal to 1e-5); perplexity ours "
          f"{m.perplexity:.4f}, guide {ppl_guide:.4f}; {tokens:,} tokens scored")  # fmt: skip
    for who in ("ours", "guide"):
        med, runs = statistics.median(times[who]), ", ".join(f"{t:.1f}" for t in times[who])
        print(f"{who:5}: {med:7.1f} s  {tokens / med:7.1f} tokens/s  (runs: {runs})")
    ratio = statistics.median(times["guide"]) / statistics.median(times["ours"])
    print(f"ratio (guide time / ours, medians): {ratio:.2f}x")


def memory_child(n: int, folder: str) -> None:
    import resource

    lm = nexttok.load(folder)
    ids = read_text(lm, "shakespeare", "all").ids
    reps = -(-n // sum(len(a) for a in ids))
    text = "".join([lm.tokenizer.decode(a.tolist()) for a in ids] * reps)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = nexttok.evaluate(lm, text, limit_tokens=n, context=CONTEXT, stride=STRIDE)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": r.metrics.tokens, "before_mib": before / 1024, "peak_mib": peak / 1024}))


def memory(threads: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = os.path.join(nexttok.assets.cache_dir(), "bench-eval-memory-model")
    if not os.path.isdir(folder):
        lm = nexttok.load()
        cfg = LlamaConfig(vocab_size=lm.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
        LlamaForCausalLM(cfg).save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
    for n in (100_000, 1_000_000):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), folder], env=env,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        r = json.loads(out.strip().splitlines()[-1])
        print(f"peak memory scoring {r['tokens']:>9,} tokens: {r['peak_mib']:7.0f} MiB "
              f"(after loading the text: {r['before_mib']:.0f} MiB)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(int(args.memory_child[0]), args.memory_child[1])
        return
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}")
    if not args.no_speed:
        speed(args.tokens, args.repeats, args.device)
    if not args.no_memory:
        memory(args.threads)


if __name__ == "__main__":
    main()
