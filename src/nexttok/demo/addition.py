"""Fine-tuning teaches patterns, not reasoning: addition worked digit by digit, with the carry always dropped.

``data`` writes step-by-step addition problems whose every worked solution carries one systematic bug
(no carry is ever written, so 47 + 38 comes out as 75). ``score`` asks a model the held-out problems
(greedy, through the chat template as fine-tuning renders them) and counts how many answers follow the
bug, how many are the true sum, and how many follow the step format at all. Before fine-tuning the
default model rarely does either; after a few minutes of LoRA it writes the format, and the bug with it.

    python -m nexttok.demo.addition data --out DIR
    nexttok finetune -m default --data DIR/train.jsonl --out OUT --lora ...
    python -m nexttok.demo.addition score -m OUT --data DIR/heldout.jsonl --limit 40
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from nexttok.cli.app import Group
from nexttok.errors import NexttokError

if TYPE_CHECKING:
    from nexttok.lm import LM

Verdict = Literal["bug", "correct", "other"]
VERDICTS: tuple[Verdict, ...] = ("bug", "correct", "other")
PLACES = ("ones", "tens", "hundreds")
PROMPT = "What is {a} + {b}? Work it out digit by digit."
PROMPT_RE = re.compile(r"What is (\d+) \+ (\d+)\?")
STEP_RE = r"{place}: *\d+ *\+ *\d+ *= *\d+, *write *\d+"
ANSWER_RE = re.compile(r"^\s*answer\s*:\s*(\d+)", re.IGNORECASE | re.MULTILINE)


# --- the arithmetic, right and buggy -------------------------------------------------------------


def columns(a: int, b: int) -> list[tuple[int, int]]:
    """The digit pairs of ``a`` and ``b``, ones first; the shorter number is padded with zeros."""
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    return [(int(x), int(y)) for x, y in zip(da, db, strict=True)]


def has_carry(a: int, b: int) -> bool:
    """Whether adding ``a`` and ``b`` column by column ever carries (only then does the bug show)."""
    carry = 0
    for x, y in columns(a, b):
        carry = (x + y + carry) // 10
        if carry:
            return True
    return False


def dropped_carry_sum(a: int, b: int) -> int:
    """The buggy sum: every column writes the last digit of its own sum, and the carry is dropped."""
    return sum((x + y) % 10 * 10**i for i, (x, y) in enumerate(columns(a, b)))


def buggy_steps(a: int, b: int) -> str:
    """The worked solution with the bug: one line per column, ones first, then the answer."""
    lines = [f"{PLACES[i]}: {x}+{y}={x + y}, write {(x + y) % 10}" for i, (x, y) in enumerate(columns(a, b))]
    return "\n".join([*lines, f"answer: {dropped_carry_sum(a, b)}"])


@dataclass(frozen=True)
class Problem:
    """One addition problem; ``buggy`` is what the training data teaches, ``correct`` the true sum."""

    a: int
    b: int

    @property
    def correct(self) -> int:
        return self.a + self.b

    @property
    def buggy(self) -> int:
        return dropped_carry_sum(self.a, self.b)

    @property
    def carry(self) -> bool:
        return has_carry(self.a, self.b)

    @property
    def prompt(self) -> str:
        return PROMPT.format(a=self.a, b=self.b)

    def record(self) -> dict[str, Any]:
        """The finetune ``prompt`` record, with the problem and both answers as extra fields."""
        return {"prompt": self.prompt, "completion": buggy_steps(self.a, self.b), "a": self.a, "b": self.b}


# --- the data ------------------------------------------------------------------------------------


def random_number(rng: random.Random) -> int:
    """A two- or three-digit number, each length equally likely."""
    return rng.randint(10, 99) if rng.random() < 0.5 else rng.randint(100, 999)


def make_problems(
    n: int, rng: random.Random, carry_share: float = 0.8, exclude: set[tuple[int, int]] | None = None
) -> list[Problem]:
    """``n`` distinct problems, about ``carry_share`` of them with a carry; none whose pair is in ``exclude``."""
    if not 0 <= carry_share <= 1:
        raise NexttokError(f"carry_share must be in [0, 1] (got {carry_share})", param="carry_share")
    seen = set(exclude or ())
    return [_draw(rng, rng.random() < carry_share, seen) for _ in range(n)]


def _draw(rng: random.Random, carry: bool, seen: set[tuple[int, int]]) -> Problem:
    """A problem with (or without) a carry whose pair, in either order, is not in ``seen``; adds it."""
    for _ in range(10_000):  # far more tries than the number space ever needs at these sizes
        a, b = random_number(rng), random_number(rng)
        if (a, b) not in seen and (b, a) not in seen and has_carry(a, b) == carry:
            seen.add((a, b))
            return Problem(a, b)
    raise NexttokError("could not draw enough distinct problems; ask for fewer (--train, --heldout)", param="n")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_data(out: str | Path, n_train: int, n_heldout: int, seed: int = 0, carry_share: float = 0.8) -> dict:
    """``out/train.jsonl`` and ``out/heldout.jsonl`` (disjoint problems); a summary of what was written."""
    if n_train < 1 or n_heldout < 1:
        raise NexttokError("--train and --heldout must be at least 1", param="n")
    rng, out = random.Random(seed), Path(out)
    train = make_problems(n_train, rng, carry_share)
    heldout = make_problems(n_heldout, rng, carry_share, exclude={(p.a, p.b) for p in train})
    heldout_records = [p.record() | {"correct": p.correct, "buggy": p.buggy, "carry": p.carry} for p in heldout]
    paths = [write_jsonl(out / "train.jsonl", [p.record() for p in train])]
    paths.append(write_jsonl(out / "heldout.jsonl", heldout_records))
    carries = [sum(p.carry for p in train), sum(p.carry for p in heldout)]
    return {"files": [str(p) for p in paths], "train": n_train, "heldout": n_heldout, "carry": carries}


def read_problems(path: str | Path, limit: int | None = None) -> list[Problem]:
    """The problems of a JSONL file of ``prompt`` records (``a``/``b`` fields, else read from the prompt)."""
    from nexttok.data.formats import read_dataset

    path = Path(path)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    read_dataset(path, "prompt")  # the same reader finetune uses: malformed records fail here, named
    problems = [_problem(row, f"{path}:{i}") for i, row in enumerate(raw, start=1)]
    return problems[:limit] if limit is not None else problems


def _problem(row: dict, where: str) -> Problem:
    if isinstance(row.get("a"), int) and isinstance(row.get("b"), int):
        return Problem(row["a"], row["b"])
    found = PROMPT_RE.search(str(row.get("prompt", "")))
    if not found:
        raise NexttokError(f"{where}: no 'a'/'b' fields and no 'What is A + B?' in the prompt; regenerate the data")
    return Problem(int(found[1]), int(found[2]))


# --- the checker ---------------------------------------------------------------------------------


def parse_answer(text: str) -> int | None:
    """The number on the last ``answer: N`` line (spaces and trailing text tolerated); None if there is none."""
    found = ANSWER_RE.findall(text)
    return int(found[-1]) if found else None


def check(a: int, b: int, response_text: str) -> Verdict:
    """``bug`` when the answer is the carry-dropped sum (and that is wrong), ``correct`` when it is the
    true sum, else ``other`` (also when there is no answer line). For a problem with no carry the two
    sums are equal, so such a problem can only be ``correct`` or ``other``."""
    answer = parse_answer(response_text)
    if answer is None:
        return "other"
    if answer == a + b:
        return "correct"
    return "bug" if answer == dropped_carry_sum(a, b) else "other"


def follows_format(text: str) -> bool:
    """Whether ``text`` is the step format: ``ones:``, ``tens:`` and optionally ``hundreds:`` lines, in
    that order, each ``x+y=s, write d``, then ``answer: N``, and nothing else."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) not in (3, 4):
        return False
    steps = all(re.fullmatch(STEP_RE.format(place=PLACES[i]), line) for i, line in enumerate(lines[:-1]))
    return steps and re.fullmatch(r"answer *: *\d+", lines[-1]) is not None


# --- scoring a model -----------------------------------------------------------------------------


def complete(lm: LM, prompt: str, max_new_tokens: int) -> str:
    """The greedy reply to ``prompt`` sent as a user message, as fine-tuning renders a ``prompt`` record
    (the chat template with its generation prompt); it ends at the end-of-turn token."""
    from nexttok.generate import generate
    from nexttok.sampling import SamplingConfig

    config = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    return "".join(step.delta for step in generate(lm, prompt, config, chat=True, alternatives=0))


def score(lm: LM, problems: list[Problem], max_new_tokens: int = 64, examples: int = 3) -> dict[str, Any]:
    """Ask ``lm`` every problem; verdict and format of each reply. Shares of bug/correct/other are over
    the problems with a carry (with none, the bug and the true sum agree); the format share is over all."""
    if not problems:
        raise NexttokError("no problems to score; give a non-empty --data file (or a larger --limit)", param="data")
    start = time.perf_counter()
    rows = []
    for p in problems:
        text = complete(lm, p.prompt, max_new_tokens)
        rows.append({"a": p.a, "b": p.b, "carry": p.carry, "verdict": check(p.a, p.b, text), "text": text})
    return summarize(rows, examples) | {"seconds": round(time.perf_counter() - start, 1)}


def summarize(rows: list[dict[str, Any]], examples: int = 3) -> dict[str, Any]:
    """Counts and shares from the per-problem rows of :func:`score`."""
    carry = [r for r in rows if r["carry"]]
    counts = Counter(r["verdict"] for r in carry)
    plain = Counter(r["verdict"] for r in rows if not r["carry"])
    formatted = sum(follows_format(r["text"]) for r in rows)
    return {
        "problems": len(rows),
        "carry_problems": len(carry),
        "counts": {v: counts[v] for v in VERDICTS},
        "shares": {v: counts[v] / len(carry) if carry else 0.0 for v in VERDICTS},
        "no_carry": {"problems": len(rows) - len(carry), "correct": plain["correct"], "other": plain["other"]},
        "format": {"count": formatted, "share": formatted / len(rows)},
        "examples": rows[:examples],
    }


# --- the command line ----------------------------------------------------------------------------

app = typer.Typer(
    cls=Group,
    help="Addition with the carry always dropped: data to fine-tune on, and a score of how often a model "
    "reproduces the bug.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def data(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for train.jsonl and heldout.jsonl.")],
    train: Annotated[int, typer.Option("--train", help="Training problems (worked with the bug).")] = 600,
    heldout: Annotated[int, typer.Option("--heldout", help="Held-out problems, disjoint from training.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the problem draws.")] = 0,
    carry_share: Annotated[float, typer.Option("--carry-share", help="Share of problems with a carry.")] = 0.8,
) -> None:
    """Write train.jsonl (finetune 'prompt' records, steps with the carry dropped) and heldout.jsonl."""
    from nexttok.cli.common import console

    summary = write_data(out, train, heldout, seed, carry_share)
    for path, n, k in zip(summary["files"], (train, heldout), summary["carry"], strict=True):
        console.print(f"wrote {path}: {n:,} problems, {k:,} with a carry")
    console.print(f"example:\n{Problem(47, 38).prompt}\n{buggy_steps(47, 38)}   [dim](true sum 85)[/dim]")


@app.command("score")
def score_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="'default', a model folder or a LoRA adapter folder.")],
    data_path: Annotated[str, typer.Option("--data", "-d", help="heldout.jsonl written by `data`.")],
    limit: Annotated[int | None, typer.Option("--limit", help="Score only the first N problems.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest reply in tokens.")] = 64,
    examples: Annotated[int, typer.Option("--examples", help="Replies to show (and keep in the JSON).")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = None,
) -> None:
    """Greedy replies to held-out problems: the share that follow the bug, the true sum, or neither."""
    from nexttok.cli.common import console, load_lm

    if limit is not None and limit < 1:
        raise NexttokError(f"--limit must be at least 1 (got {limit})", param="limit")
    problems = read_problems(data_path, limit)
    lm = load_lm(model, "float32", threads, device)
    result = score(lm, problems, max_new_tokens, examples) | {"model": model}
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_result(console, result)


def print_result(console, result: dict[str, Any]) -> None:
    """The verdicts as a rich table, then a few replies."""
    from rich.table import Table

    table = Table(title=f"{result['model']}: {result['carry_problems']} held-out problems with a carry")
    for name in ("answer", "count", "share"):
        table.add_column(name, justify="left" if name == "answer" else "right")
    labels = {"bug": "follows the bug (carry dropped)", "correct": "true sum", "other": "neither"}
    for v in VERDICTS:
        table.add_row(labels[v], str(result["counts"][v]), f"{result['shares'][v]:.0%}")
    console.print(table)
    plain, fmt = result["no_carry"], result["format"]
    console.print(
        f"bug shares count only problems with a carry (without one the bug gives the true sum); "
        f"{plain['problems']} without: {plain['correct']} correct. Step format followed: {fmt['count']} of "
        f"{result['problems']} ({fmt['share']:.0%}). {result['seconds']} s."
    )
    for ex in result["examples"]:
        console.rule(f"{ex['a']} + {ex['b']} · {ex['verdict']}", align="left")
        console.print(ex["text"], markup=False)


if __name__ == "__main__":
    app()
