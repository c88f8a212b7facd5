"""Worked example: teach the default model "Which play is this line from?" with LoRA on a CPU.

1. Build an instruction dataset from the packaged Shakespeare corpus: two consecutive lines of a
   speech -> the play's title. Each play is cut into 20 stretches; stretches 4, 9, 14 and 19 give
   the held-out lines, the others the training lines, so no held-out line shares a passage with a
   training line.
2. Measure exact-match accuracy on the held-out set with the base model.
3. Fine-tune with LoRA through ``nexttok finetune`` (the same fit() as pretraining), bf16 autocast.
4. Measure again, and ``nexttok compare`` base vs fine-tuned on one held-out prompt.

Exact match is judged the way greedy decoding would answer: the reply is right when, token by token,
the model's most likely next token is the title's token and then the end-of-turn token. That takes
one forward pass per question instead of a decode loop, and gives the same verdict as greedy decoding.

Run: ``python examples/shakespeare_plays.py`` (``make finetune-demo``); ``--help`` for the knobs.
"""

from __future__ import annotations

import os

# This machine's 2 cores are shared: spinning OpenMP threads stall badly when cores are oversubscribed,
# sleeping ones do not. Must be set before torch loads (the finetune subprocess inherits it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import nexttok
from nexttok.assets import shakespeare_files

PLAYS = {
    "hamlet": "Hamlet",
    "macbeth": "Macbeth",
    "romeo_and_juliet": "Romeo and Juliet",
    "othello": "Othello",
    "lear": "King Lear",
    "julius_caesar": "Julius Caesar",
    "midsummer_nights_dream": "A Midsummer Night's Dream",
    "tempest": "The Tempest",
}
QUESTION = "Which Shakespeare play is this line from? Answer with the title only.\n\n"
SPEAKER = re.compile(r"^[A-Z][A-Za-z .']{0,24}\.?$")  # "Hor.", "First Witch.", "HERMIA"
STAGE = re.compile(r"^(\[|Enter|Exit|Exeunt|Re-enter|ACT|Act|SCENE|Scene)")


def speech_lines(text: str) -> list[str]:
    """Dialogue lines (no speaker tags, stage directions or headings), in order, with their speeches
    kept apart by empty strings."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if len(lines) < 2 or not SPEAKER.match(lines[0]):
            continue
        out += [ln for ln in lines[1:] if ln and not STAGE.match(ln)] + [""]
    return out


def couplets(lines: list[str]) -> list[str]:
    """Two consecutive lines of one speech, long enough to carry some style."""
    pairs = [f"{a} {b}" for a, b in zip(lines, lines[1:], strict=False) if a and b]
    return [p for p in pairs if 50 <= len(p) <= 160][::2]  # every other pair: no shared lines


def build(train_per_play: int, test_per_play: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train, test = [], []
    files = {p.name.removesuffix("_gut.txt"): p for p in shakespeare_files()}
    for key, title in PLAYS.items():
        pairs = couplets(speech_lines(files[key].read_text(encoding="utf-8", errors="replace")))
        stretch = len(pairs) / 20
        held = [p for i, p in enumerate(pairs) if int(i / stretch) % 5 == 4]
        kept = [p for i, p in enumerate(pairs) if int(i / stretch) % 5 != 4]
        record = lambda line, title=title: {"prompt": QUESTION + line, "completion": title}  # noqa: E731
        train += [record(p) for p in rng.sample(kept, min(train_per_play, len(kept)))]
        test += [record(p) for p in rng.sample(held, min(test_per_play, len(held)))]
    rng.shuffle(train)
    return train, test


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@torch.inference_mode()
def exact_match(lm: nexttok.LM, rows: list[dict], batch: int = 16) -> float:
    """Share of questions whose greedy reply would be exactly the title (then end of turn)."""
    end = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pairs = [
        (lm.encode_chat([{"role": "user", "content": r["prompt"]}]),
         lm.tokenizer.encode(r["completion"], add_special_tokens=False) + [end])
        for r in rows
    ]  # fmt: skip
    right = 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        seqs = [p + a[:-1] for p, a in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [end] * (width - len(s)) for s in seqs])  # (B, T), right-padded
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])  # (B, T)
        guess = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.argmax(-1)  # (B, T)
        for b, (p, a) in enumerate(chunk):
            # the logits at position t predict token t+1: the answer is predicted from len(p)-1 on
            right += guess[b, len(p) - 1 : len(p) - 1 + len(a)].tolist() == a
    return right / len(rows)


def nexttok_cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "nexttok", *args]
    print("$ nexttok " + " ".join(f"'{a}'" if " " in a or "\n" in a else a for a in args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/plays-lora")
    ap.add_argument("--data-dir", default="runs/plays-data")
    ap.add_argument("--train-per-play", type=int, default=150)
    ap.add_argument("--test-per-play", type=int, default=25)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-seconds", type=float, default=360.0, help="cap on training time")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    start = time.perf_counter()
    train, test = build(args.train_per_play, args.test_per_play, args.seed)
    data = Path(args.data_dir)
    write_jsonl(train, data / "train.jsonl")
    write_jsonl(test, data / "test.jsonl")
    print(f"{len(train)} training and {len(test)} held-out questions over {len(PLAYS)} plays in {data}/")
    before = exact_match(nexttok.load("default"), test)
    print(f"exact match before fine-tuning: {before:.1%}", flush=True)
    shutil.rmtree(args.out, ignore_errors=True)  # a worked example starts from scratch on every run
    nexttok_cli(
        "finetune", "--model", "default", "--data", str(data / "train.jsonl"), "--out", args.out,
        "--lora", "--lora-r", "8", "--lr", "1e-3", "--epochs", str(args.epochs), "--max-length", "256",
        "--batch-size", "4", "--eval-fraction", "0.02", "--max-seconds", str(args.max_seconds),
        "--seed", str(args.seed), "--bf16",
    )  # fmt: skip
    after = exact_match(nexttok.load(args.out), test)
    print(f"exact match on {len(test)} held-out lines: before {before:.1%} -> after {after:.1%}")
    nexttok_cli("compare", "--model", "default", "--model", args.out, "--chat", test[0]["prompt"], "-k", "5")
    print(f"(answer: {test[0]['completion']}) · total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
