"""Training throughput: nexttok's fit() against a plain hand-written PyTorch loop, same model, same batches.

Both train the same freshly initialised Llama (the Shakespeare recipe's shape unless overridden) on
the same BlockSource batches; runs are interleaved and repeated, and the medians are compared.

Each side runs twice per repeat, for --short and for --steps optimizer steps, timed over the whole
call. The difference of the two calls is the per-step cost with the fixed costs cancelled out
(fit()'s final checkpoint and loss plot, optimizer creation): that is the loop overhead the target
is about. The fixed costs are printed separately, in seconds, and so is the whole-call ratio.
MFU = achieved training FLOPs / a measured fp32 matmul peak (the faster of MKL and oneDNN).
Last, each optimizer's share of a step: forward+backward and ``optimizer.step()`` timed apart, for AdamW
and for the recipe's Muon, so a slow optimizer shows in the bench and not only in the final figure.

    .venv/bin/python bench/train.py                 # recipe shape, 3 repeats of 5 and 30 steps
    .venv/bin/python bench/train.py --steps 20 --repeats 5 model.layers=2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nexttok.config import load_recipe
from nexttok.data.blocks import BlockSource, prepare, split_documents
from nexttok.data.sources import load_corpus
from nexttok.optim import make_optimizer, step_times
from nexttok.precision import bf16_is_fast
from nexttok.pretrain import build_model, get_tokenizer, model_stats
from nexttok.torchdecode import ONEDNN, onednn_linear
from nexttok.train import TrainConfig, fit

RECIPE = Path(__file__).parents[1] / "recipes" / "shakespeare.yaml"


def plain_loop(model, source, steps: int, batch_size: int, lr: float) -> None:
    """What a user would write by hand: AdamW, forward, shifted cross-entropy, backward, clip, step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    model.train()
    for step in range(steps):
        batch = source.batch(step, batch_size)
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def ours(model, tok, source, steps: int, batch_size: int, lr: float) -> None:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            out_dir=out, max_steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 10, warmup_steps=1,
            eval_every=0, eval_batches=1, save_every=0, log_every=1,
        )  # fmt: skip
        fit(model, tok, source, None, cfg)


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul FLOP/s at this thread count, the faster of MKL (``a @ b``) and oneDNN where
    torch has it (faster on AMD CPUs, where MKL runs a generic kernel): the practical peak for MFU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    kernels = [lambda: a @ b]
    if ONEDNN:
        kernels.append(lambda: onednn_linear(a, b))
    best = 0.0
    for kernel in kernels:
        kernel()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            kernel()
            times.append(time.perf_counter() - t)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="steps of the long call")
    ap.add_argument("--short", type=int, default=5, help="steps of the short call (its difference cancels fixed costs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model.layers=2 train.batch_size=16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # The plain loop is AdamW, so fit() uses AdamW too (the recipe's Muon would compare optimizers, not loops).
    recipe = load_recipe(RECIPE, ["train.optimizer=adamw", *args.overrides])
    corpus = load_corpus(recipe.data.paths)
    train_docs, _ = split_documents(corpus.documents, 0.1, recipe.data.holdout, 0)
    tok = get_tokenizer(recipe, train_docs, resume=False)
    data = prepare(corpus.documents, tok, 0.1, recipe.data.holdout, 0, recipe.data.eos_between_documents)
    source = BlockSource(data.train, None, recipe.model.context, tok)
    init = build_model(recipe, tok)
    stats = model_stats(init, recipe.model.context)
    B, T, lr = recipe.train.batch_size, recipe.model.context, recipe.train.lr
    if not 0 < args.short < args.steps:
        ap.error("--short must be at least 1 and below --steps")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()}); threads {args.threads}")
    print(f"model {stats.parameters:,} params, {stats.flops_per_token / 1e6:.1f} MFLOPs/token; batch {B}x{T}")
    ours(copy.deepcopy(init), tok, source, 2, B, lr)  # warm-up: allocator, kernels
    runners = {
        "fit()": lambda m, n: ours(m, tok, source, n, B, lr),
        "plain loop": lambda m, n: plain_loop(m, source, n, B, lr),
    }
    per_step: dict[str, list[float]] = {name: [] for name in runners}
    fixed: dict[str, list[float]] = {name: [] for name in runners}
    whole: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.repeats):
        for name in list(runners) if r % 2 == 0 else list(runners)[::-1]:
            short, long = (timed(runners[name], init, n) for n in (args.short, args.steps))
            step_s = (long - short) / (args.steps - args.short)
            per_step[name].append(step_s)
            fixed[name].append(short - args.short * step_s)
            whole[name].append(long)
            print(
                f"  repeat {r + 1} {name:>10}: {B * T / step_s:,.0f} tokens/s per step · "
                f"{args.steps} steps {long:.2f} s"
            )
    report(per_step, fixed, whole, B * T, args)
    peak = matmul_peak()
    rate = B * T / statistics.median(per_step["fit()"])
    print(f"MFU: {rate * stats.flops_per_token / peak:.1%} of the measured fp32 matmul peak ({peak / 1e9:.0f} GFLOP/s)")
    for optimizer in ("adamw", "muon"):
        optimizer_share(copy.deepcopy(init), source, recipe.train, optimizer, B, steps=10)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


def optimizer_share(model, source, train: TrainConfig, optimizer: str, batch_size: int, steps: int) -> None:
    """Median forward+backward and optimizer-step times over ``steps`` steps (after one warm-up)."""
    opt = make_optimizer(model, dataclasses.replace(train, optimizer=optimizer))
    a, b = step_times(model, opt, (source.batch(i, batch_size) for i in range(steps + 1)))
    ns = f"; Newton–Schulz in {'bf16' if bf16_is_fast('cpu') else 'fp32'}" if optimizer == "muon" else ""
    print(f"optimizer {optimizer:>5}: forward+backward {a * 1e3:.1f} ms, step {b * 1e3:.1f} ms "
          f"({b / (a + b):.1%} of a training step, median of {steps}){ns}")  # fmt: skip


def timed(run, init, steps: int) -> float:
    model = copy.deepcopy(init)
    t = time.perf_counter()
    run(model, steps)
    return time.perf_counter() - t


def report(per_step, fixed, whole, tokens_per_step: int, args) -> None:
    med = {
        k: {name: statistics.median(v) for name, v in d.items()}
        for k, d in [("step", per_step), ("fixed", fixed), ("whole", whole)]
    }
    a, b = (tokens_per_step / med["step"][name] for name in ("fit()", "plain loop"))
    print(f"per step (calls of {args.short} and {args.steps} steps, median of {args.repeats}):")
    print(f"  fit():      {a:,.0f} tokens/s")
    print(f"  plain loop: {b:,.0f} tokens/s")
    print(f"  ratio fit()/plain = {a / b:.3f}  (overhead {100 * (1 - a / b):+.1f}%)")
    print(
        f"fixed cost per call: fit() {med['fixed']['fit()']:.2f} s (final checkpoint, loss plot), "
        f"plain loop {med['fixed']['plain loop']:.2f} s"
    )
    ratio = med["whole"]["plain loop"] / med["whole"]["fit()"]
    print(f"whole {args.steps}-step call: ratio fit()/plain = {ratio:.3f}")


if __name__ == "__main__":
    main()
