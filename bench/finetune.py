"""Benchmark: fine-tuning throughput, nexttok's fit() vs TRL's SFTTrainer, full and LoRA.

Same model (the packaged default, fp32 weights on CPU), same records (chatterbot-corpus Q/A pairs rendered
once through the chat template; TRL gets the very same ``input_ids`` and ``labels``, so both train on
the completion only), maximum length 128, batch size 8. TRL runs with its defaults otherwise
(``use_cpu=True``; its SFTConfig turns on bf16 autocast and gradient checkpointing by default).
``--precision auto`` (default) runs both sides under bf16 autocast where bf16 matmuls are fast
(``nexttok.precision.bf16_is_fast``: CUDA, CPUs with native bf16) and in fp32 elsewhere, and says which;
``bf16`` forces autocast on both sides (on a CPU without native bf16 a step takes minutes), ``fp32`` neither;
``--trl-checkpointing off`` turns TRL's gradient checkpointing off (faster, more memory).

Ours runs twice: ``pack`` (8 rows of up to 128 tokens, several records per row, block-diagonal
attention) and ``pad`` (8 records per batch, length-bucketed padding). Step time is the wall time
between consecutive steps (every overhead included), median over the steps after the first.
Reported: seconds per step, records per second, non-padding tokens per second (prompt + completion
tokens processed), and the ratio ours / TRL (> 1 means we are faster). Interleaved repeats.

    .venv/bin/python bench/finetune.py [--steps 3] [--repeats 3] [--precision auto|bf16|fp32] [--layouts pad,pack]
"""

from __future__ import annotations

import os

# This machine's 2 cores are shared: spinning OpenMP threads stall badly when cores are oversubscribed,
# sleeping ones do not. Must be set before torch loads (the finetune subprocess inherits it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import statistics
import tempfile
import time
import warnings

import torch
import yaml

from nexttok.assets import chatterbot_files
from nexttok.data.chat import Renderer
from nexttok.data.formats import Record
from nexttok.models import load_model_and_tokenizer
from nexttok.precision import bf16_is_fast, cpu_bf16_ratio

MAX_LEN, BATCH = 128, 8
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["all-linear"]}


def chatterbot_records() -> list[Record]:
    """Every (question, first answer) pair of the English chatterbot corpus."""
    out = []
    for path in chatterbot_files():
        for i, conv in enumerate(yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]):
            if len(conv) >= 2 and all(isinstance(t, str) for t in conv[:2]):
                turns = ({"role": "user", "content": conv[0]}, {"role": "assistant", "content": conv[1]})
                out.append(Record(f"{path.name}:{i}", turns))
    return out


class Clock:
    """Wall-clock and process CPU-time stamps at each step boundary; step times are their differences.
    CPU time (all threads of this process) is the work a step took, whatever else the machine runs."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def tick(self) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))

    def step_times(self) -> list[tuple[float, float]]:
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


class TimedSource:
    """Wraps our BatchSource: stamps the clock when the loop asks for a batch, i.e. when a step begins."""

    def __init__(self, inner, clock: Clock):
        self.inner, self.clock = inner, clock

    def batch(self, index: int, batch_size: int):
        self.clock.tick()
        return self.inner.batch(index, batch_size)

    def eval_batches(self, batch_size: int, limit: int):
        return iter(())


def ours_run(examples, layout: str, lora: bool, steps: int, pad_id: int, bf16: bool) -> dict:
    from nexttok.data.batches import FinetuneBatches
    from nexttok.finetune import LoraOptions, apply_lora, use_block_mask_attention
    from nexttok.train import TrainConfig, fit

    model, tok, _ = load_model_and_tokenizer("default", device="cpu")
    if layout == "pack":
        use_block_mask_attention(model)
    net = apply_lora(model, LoraOptions(**LORA)) if lora else model
    source = FinetuneBatches(examples, pad_id, layout, MAX_LEN, seed=0)
    clock = Clock()
    timed = TimedSource(source, clock)
    out = tempfile.mkdtemp(prefix="bench-ft-")
    lr = 2e-4 if lora else 2e-5
    config = TrainConfig(out_dir=out, max_steps=steps + 2, batch_size=BATCH, lr=lr, min_lr=lr, warmup_steps=0,
                         eval_every=0, eval_batches=1, save_every=0, log_every=1000, weight_decay=0.0,
                         bf16=bf16)  # fmt: skip
    fit(net, tok, timed, None, config)
    shutil.rmtree(out, ignore_errors=True)
    # Steps are timed start to start (the last step has no end stamp), the first one dropped as warm-up.
    times = clock.step_times()[1:]
    counts = [_real_counts(source, i) for i in range(len(clock.stamps))]
    return summarize(times, [c[0] for c in counts[1:-1]], [c[1] for c in counts[1:-1]])


def _real_counts(source, index: int) -> tuple[int, int]:
    """(records, non-padding tokens) of micro-batch ``index``."""
    epoch, i = source.locate(index, BATCH)
    rows = source.epoch(epoch, BATCH)[i]
    ids = [j for row in rows for j in row]
    return len(ids), sum(source.lengths[j] for j in ids)


def trl_run(examples, lora: bool, steps: int, bf16: bool, checkpointing: bool = True) -> dict:
    import datasets
    from datasets import Dataset
    from transformers import TrainerCallback

    datasets.disable_progress_bars()
    from trl import SFTConfig, SFTTrainer

    model, tok, _ = load_model_and_tokenizer("default", device="cpu")
    data = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    clock = Clock()

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.tick()

    out = tempfile.mkdtemp(prefix="bench-trl-")
    args = SFTConfig(output_dir=out, max_steps=steps + 2, per_device_train_batch_size=BATCH, max_length=MAX_LEN,
                     completion_only_loss=True, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000,
                     learning_rate=2e-4 if lora else 2e-5, disable_tqdm=True, dataloader_num_workers=0,
                     bf16=bf16, gradient_checkpointing=checkpointing)  # fmt: skip
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config)
    trainer.add_callback(Stamp())
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    times = clock.step_times()[:steps]  # end to end of steps 2..n: the first step is dropped as warm-up
    mean_len = statistics.mean(len(e) for e in examples)
    return summarize(times, [BATCH] * len(times), [BATCH * mean_len] * len(times))


def summarize(times: list[tuple[float, float]], records: list[float], tokens: list[float]) -> dict:
    """Medians over steps: wall and CPU seconds per step, and throughput by each."""
    n = min(len(times), len(records))
    wall, cpu = [t[0] for t in times[:n]], [t[1] for t in times[:n]]
    rate = lambda counts, secs: statistics.median(c / t for c, t in zip(counts[:n], secs, strict=True))  # noqa: E731
    return {
        "s_per_step": statistics.median(wall),
        "cpu_s_per_step": statistics.median(cpu),
        "records_per_s": rate(records, wall),
        "tokens_per_s": rate(tokens, wall),
        "records_per_cpu_s": rate(records, cpu),
        "tokens_per_cpu_s": rate(tokens, cpu),
        "tokens_per_step": statistics.median(tokens[:n]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 where it is fast, else fp32; bf16: autocast on both sides (TRL's default); "
                         "fp32: autocast off on both")  # fmt: skip
    ap.add_argument("--layouts", default="pad,pack", help="our batch layouts to measure")
    ap.add_argument("--trl-checkpointing", choices=["on", "off"], default="on",
                    help="TRL's gradient checkpointing (SFTConfig's default: on)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.precision == "auto":
        args.precision = "bf16" if bf16_is_fast("cpu") else "fp32"
        print(f"precision auto: {args.precision} (bf16 matmul / fp32 matmul here: {cpu_bf16_ratio():.2f}x)")
    elif args.precision == "bf16":
        os.environ["NEXTTOK_BF16"] = "fast"  # as asked, even where bf16 is emulated (TRL's side has no check)
    _, tok, _ = load_model_and_tokenizer("default", device="cpu")
    rendered = Renderer(tok, "completion", MAX_LEN).render_all(chatterbot_records())
    examples = rendered.examples
    pad_id = tok.pad_token_id
    print(f"{len(examples)} chatterbot records, mean {statistics.mean(len(e) for e in examples):.1f} tokens; "
          f"batch {BATCH}, max length {MAX_LEN}, {args.precision}, "
          f"TRL gradient checkpointing {args.trl_checkpointing}, "
          f"{args.steps} timed steps x {args.repeats} repeats")  # fmt: skip
    bf16, trl_gc = args.precision == "bf16", args.trl_checkpointing == "on"
    runs = {}
    for mode, lora in [("full", False), ("LoRA r=8", True)]:
        runs[(mode, "TRL")] = lambda lora=lora: trl_run(examples, lora, args.steps, bf16, trl_gc)
        for layout in args.layouts.split(","):
            runs[(mode, f"ours {layout}")] = lambda lora=lora, lay=layout: ours_run(
                examples, lay, lora, args.steps, pad_id, bf16
            )
    results: dict = {k: [] for k in runs}
    for r in range(args.repeats):
        for key, run in runs.items():
            res = run()
            results[key].append(res)
            line = f"{res['s_per_step']:.2f} s/step ({res['cpu_s_per_step']:.2f} CPU s)"
            line += f" {res['records_per_s']:.2f} rec/s"
            print(f"  round {r + 1} {key[0]:>9} {key[1]:<9} {line} {res['tokens_per_s']:.0f} tok/s", flush=True)
    report(results, args.json)


def report(results: dict, path: str | None) -> None:
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items()}
    head = f"{'mode':<9} {'trainer':<10} {'s/step':>7} {'cpu s':>6} {'tok/step':>8} {'rec/s':>6} {'tok/s':>6}"
    print(f"\n{head} {'ratio rec/s':>11} {'tok/s':>6} {'by CPU time':>11}")
    for (mode, who), m in med.items():
        peer = med[(mode, "TRL")]
        r = m["records_per_s"] / peer["records_per_s"]
        t = m["tokens_per_s"] / peer["tokens_per_s"]
        c = m["tokens_per_cpu_s"] / peer["tokens_per_cpu_s"]
        print(f"{mode:<9} {who:<10} {m['s_per_step']:>7.2f} {m['cpu_s_per_step']:>6.2f} {m['tokens_per_step']:>8.0f} "
              f"{m['records_per_s']:>6.2f} {m['tokens_per_s']:>6.1f} {r:>10.2f}x {t:>5.2f}x {c:>10.2f}x")  # fmt: skip
    print("ratio = ours / TRL (> 1: ours is faster); 'by CPU time' divides the tokens by the process CPU seconds")
    if path:
        with open(path, "w") as f:
            json.dump({f"{k[0]} / {k[1]}": v for k, v in med.items()}, f, indent=2)


if __name__ == "__main__":
    main()
