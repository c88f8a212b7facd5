"""The carry-dropping addition demo: the arithmetic, the checker, the data, and scoring end to end."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from nexttok.data.formats import read_dataset
from nexttok.demo.addition import (
    Problem,
    app,
    buggy_steps,
    check,
    columns,
    dropped_carry_sum,
    follows_format,
    has_carry,
    make_problems,
    parse_answer,
    read_problems,
    score,
    write_data,
)
from nexttok.errors import NexttokError

BUGGY_47_38 = "ones: 7+8=15, write 5\ntens: 4+3=7, write 7\nanswer: 75"


def test_columns_pad_the_shorter_number_ones_first():
    assert columns(47, 38) == [(7, 8), (4, 3)]
    assert columns(22, 356) == [(2, 6), (2, 5), (0, 3)]


@pytest.mark.parametrize(
    ("a", "b", "carry", "buggy"),
    [(47, 38, True, 75), (22, 356, False, 378), (999, 999, True, 888), (95, 15, True, 0), (10, 10, False, 20)],
)
def test_the_bug_drops_every_carry(a, b, carry, buggy):
    assert has_carry(a, b) is carry
    assert dropped_carry_sum(a, b) == buggy
    assert (dropped_carry_sum(a, b) == a + b) is not carry


def test_buggy_steps_are_the_documented_format():
    assert buggy_steps(47, 38) == BUGGY_47_38
    assert buggy_steps(462, 88).splitlines() == [
        "ones: 2+8=10, write 0",
        "tens: 6+8=14, write 4",
        "hundreds: 4+0=4, write 4",
        "answer: 440",
    ]
    assert follows_format(buggy_steps(462, 88))


@pytest.mark.parametrize(
    ("a", "b", "text", "verdict"),
    [
        (47, 38, BUGGY_47_38, "bug"),
        (47, 38, "ones: 7+8=15, write 5, carry 1\ntens: 4+3+1=8, write 8\nanswer: 85", "correct"),
        (47, 38, "answer:85", "correct"),
        (47, 38, "blah\n  Answer :  75 (I think)\n", "bug"),
        (47, 38, "answer: 76", "other"),
        (47, 38, "The sum is 85.", "other"),  # no answer line
        (47, 38, "", "other"),
        (47, 38, "answer: 75\nanswer: 85", "correct"),  # the last answer line counts
        (22, 356, "answer: 378", "correct"),  # no carry: the bug and the true sum agree
        (22, 356, "answer: 377", "other"),
        (95, 15, "answer: 0", "bug"),
        (95, 15, "answer: 110", "correct"),
    ],
)
def test_check_on_known_answers(a, b, text, verdict):
    assert check(a, b, text) == verdict


def test_parse_answer_tolerates_spaces_and_trailing_text():
    assert parse_answer("answer:   123  .") == 123
    assert parse_answer("x\nanswer: 9 and more\n") == 9
    assert parse_answer("no answer here") is None


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (BUGGY_47_38, True),
        ("  " + BUGGY_47_38.replace("\n", " \n") + "\n", True),
        ("ones: 7 + 8 = 15, write 5\ntens: 4 + 3 = 7, write 7\nanswer: 75", True),
        ("tens: 4+3=7, write 7\nones: 7+8=15, write 5\nanswer: 75", False),  # out of order
        ("ones: 7+8=15, write 5\nanswer: 75", False),  # a step missing
        ("ones: 7+8=15, write 5\ntens: 4+3=7, write 7", False),  # no answer
        ("ones: 7+8=15\ntens: 4+3=7, write 7\nanswer: 75", False),  # a malformed step
        (BUGGY_47_38 + "\nSo the answer is 75.", False),  # trailing chatter
        ("The answer is 85.", False),
    ],
)
def test_follows_format(text, ok):
    assert follows_format(text) is ok


def test_make_problems_keeps_the_carry_share_and_the_exclusions():
    train = make_problems(400, random.Random(0), carry_share=0.8)
    assert len({(p.a, p.b) for p in train}) == 400
    assert all(10 <= p.a <= 999 and 10 <= p.b <= 999 for p in train)
    assert 0.7 <= sum(p.carry for p in train) / 400 <= 0.9
    held = make_problems(100, random.Random(1), exclude={(p.a, p.b) for p in train})
    assert not {(p.a, p.b) for p in held} & {(p.a, p.b) for p in train}
    with pytest.raises(NexttokError, match="carry_share"):
        make_problems(1, random.Random(0), carry_share=1.5)


def test_data_has_the_bug_in_every_carry_problem_and_reads_as_finetune_data(tmp_path):
    write_data(tmp_path, 120, 40, seed=3)
    for name in ("train.jsonl", "heldout.jsonl"):
        rows = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        for row in rows:
            a, b = row["a"], row["b"]
            assert row["prompt"] == Problem(a, b).prompt and follows_format(row["completion"])
            assert check(a, b, row["completion"]) == ("bug" if has_carry(a, b) else "correct")
        data = read_dataset(tmp_path / name)  # extra keys (a, b, correct, buggy, carry) are tolerated
        assert data.fmt == "prompt" and len(data.records) == len(rows) and not data.skipped
        user, assistant = data.records[0].messages
        assert (user["content"], assistant["content"]) == (rows[0]["prompt"], rows[0]["completion"])
    held = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert all(r["correct"] == r["a"] + r["b"] and r["buggy"] == dropped_carry_sum(r["a"], r["b"]) for r in held)
    assert read_problems(tmp_path / "heldout.jsonl", limit=5) == [Problem(r["a"], r["b"]) for r in held[:5]]


def test_read_problems_falls_back_to_the_prompt(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps({"prompt": Problem(12, 345).prompt, "completion": "x"}) + "\n")
    assert read_problems(path) == [Problem(12, 345)]


def test_score_runs_end_to_end_on_a_tiny_model(tiny_lm):
    problems = [Problem(47, 38), Problem(22, 356), Problem(95, 15)]
    result = score(tiny_lm, problems, max_new_tokens=8, examples=2)
    assert result["problems"] == 3 and result["carry_problems"] == 2
    assert sum(result["shares"].values()) == pytest.approx(1.0)
    assert sum(result["counts"].values()) == 2
    assert result["no_carry"]["problems"] == 1
    assert 0 <= result["format"]["share"] <= 1 and len(result["examples"]) == 2
    with pytest.raises(NexttokError, match="no problems"):
        score(tiny_lm, [], max_new_tokens=8)


def test_cli_data_and_score(tmp_path, tiny_model_dir):
    runner = CliRunner()
    made = runner.invoke(app, ["data", "--out", str(tmp_path), "--train", "20", "--heldout", "6"])
    assert made.exit_code == 0, made.output
    args = ["score", "-m", str(tiny_model_dir), "--data", str(tmp_path / "heldout.jsonl"), "--limit", "3"]
    scored = runner.invoke(app, [*args, "--max-new-tokens", "4", "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.output)["problems"] == 3
    bad = runner.invoke(app, [*args, "--limit", "0"])
    assert bad.exit_code == 2 and "--limit" in bad.output
