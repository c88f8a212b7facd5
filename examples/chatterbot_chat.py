"""Worked example, chat format: the chatterbot-corpus conversations as OpenAI-style ``messages``.

Each YAML conversation alternates user and assistant turns (some run several turns), so it becomes
one ``{"messages": [...]}`` record. Then: preview the loss mask, fine-tune briefly with LoRA, and
compare the base and the fine-tuned model on a greeting.

Run: ``python examples/chatterbot_chat.py [--steps 10]``; ``--data-only`` just writes the JSONL.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from nexttok.assets import chatterbot_files


def conversations() -> list[dict]:
    """Every conversation of the English corpus as a ``messages`` record (topic kept for reference)."""
    rows = []
    for path in chatterbot_files():
        for conv in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            turns = [t for t in conv if isinstance(t, str) and t.strip()]
            if len(turns) < 2:
                continue
            roles = (["user", "assistant"] * len(turns))[: len(turns)]
            rows.append(
                {"topic": path.stem, "messages": [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]}
            )
    return rows


def nexttok_cli(*args: str) -> None:
    print("$ nexttok " + " ".join(f"'{a}'" if " " in a else a for a in args), flush=True)
    subprocess.run([sys.executable, "-m", "nexttok", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/chatterbot/chatterbot.jsonl")
    ap.add_argument("--out", default="runs/chatterbot-lora")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--data-only", action="store_true")
    args = ap.parse_args()
    rows = conversations()
    path = Path(args.data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    multi = sum(len(r["messages"]) > 2 for r in rows)
    print(f"wrote {len(rows)} conversations ({multi} with more than one exchange) to {path}")
    if args.data_only:
        return
    nexttok_cli("mask-preview", "--data", str(path), "-n", "1")
    shutil.rmtree(args.out, ignore_errors=True)  # a worked example starts from scratch on every run
    nexttok_cli(
        "finetune", "--data", str(path), "--out", args.out, "--lora", "--steps", str(args.steps),
        "--max-length", "256", "--batch-size", "4", "--bf16",
    )  # fmt: skip
    nexttok_cli("compare", "--model", "default", "--model", args.out, "--chat", "Do you like ice cream?", "-k", "5")


if __name__ == "__main__":
    main()
