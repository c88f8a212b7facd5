"""`nexttok generate` and `nexttok chat` end to end on the tiny model; every bad input is one line, exit 2."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from nexttok.cli import app
from nexttok.generate import generate
from nexttok.sampling import SamplingConfig

runner = CliRunner()
PROMPT = "the king"


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_generate_streams_the_same_text_as_the_library(tiny_model_dir, tiny_lm):
    r = run("generate", PROMPT, "--model", tiny_model_dir, "-n", 12, "--seed", 3, "--ignore-eos")
    assert r.exit_code == 0, r.output
    config = SamplingConfig(seed=3, max_new_tokens=12, ignore_eos=True)
    text = "".join(s.delta for s in generate(tiny_lm, PROMPT, config))
    assert r.stdout == text + "\n"
    assert "12 tokens" in r.stderr and "seed 3" in r.stderr


def test_seed_reproduces_and_greedy_is_deterministic(tiny_model_dir):
    a = run("generate", PROMPT, "--model", tiny_model_dir, "-n", 10, "--seed", 1, "--ignore-eos")
    b = run("generate", PROMPT, "--model", tiny_model_dir, "-n", 10, "--seed", 1, "--ignore-eos")
    c = run("generate", PROMPT, "--model", tiny_model_dir, "-n", 10, "--seed", 2, "--ignore-eos")
    assert a.stdout == b.stdout != c.stdout


def test_trace_table_and_json(tiny_model_dir, tiny_lm, tmp_path):
    out = tmp_path / "trace.jsonl"
    args = ["-T", 0, "-n", 5, "--ignore-eos", "--trace", "--trace-json", out, "--stages", "--top-k", 3]
    r = run("generate", PROMPT, "--model", tiny_model_dir, *args)
    assert r.exit_code == 0, r.output
    assert "the loop, one token per step" in r.stdout and "top 3 alternatives" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and [row["index"] for row in rows] == list(range(5))
    first = tiny_lm.distribution(PROMPT).top(3)
    assert rows[0]["id"] == first[0].id and rows[0]["prob"] == pytest.approx(first[0].prob, abs=1e-5)
    assert [a["id"] for a in rows[0]["alternatives"]] == [r.id for r in first]
    assert rows[-1]["finish_reason"] == "length" and rows[0]["stages"][0]["name"] == "model"


def test_num_samples_side_by_side(tiny_model_dir):
    r = run("generate", PROMPT, "--model", tiny_model_dir, "-n", 8, "-N", 3, "--seed", 5, "--ignore-eos", "--trace")
    assert r.exit_code == 0, r.output
    assert "sample 3: the loop, one token per step" in r.stdout
    assert "3 samples of one prompt" in r.stdout and "distinct completions out of 3" in r.stdout
    for seed in (5, 6, 7):
        assert re.search(rf"│\s+{seed}\s+│", r.stdout), f"seed {seed} missing"


def test_chat_flag_stops_at_end_of_turn(tiny_model_dir):
    r = run("generate", "hello", "--model", tiny_model_dir, "--chat", "--logit-bias", "<|im_end|>=100", "--seed", 0)
    assert r.exit_code == 0, r.output
    assert r.stdout == "\n" and "finish: eos" in r.stderr


def test_stop_string_is_not_printed(tiny_model_dir, tiny_lm):
    text = "".join(s.delta for s in generate(tiny_lm, PROMPT, SamplingConfig(temperature=0, max_new_tokens=12)))
    stop = text[3:5]
    r = run("generate", PROMPT, "--model", tiny_model_dir, "-T", 0, "-n", 12, "--stop", stop)
    assert r.exit_code == 0, r.output
    assert r.stdout == text[: text.find(stop)] + "\n" and "finish: stop" in r.stderr


def test_chat_session_keeps_history_and_takes_commands(tiny_model_dir):
    lines = "hello there\n/temperature 0\n/top-p 2\nand again\n/reset\n/quit\nnever read\n"
    r = run("chat", "--model", tiny_model_dir, "-n", 4, "--seed", 1, input=lines)
    assert r.exit_code == 0, r.output
    assert "T=0 " in r.stderr  # /temperature 0 took effect
    assert "error: top_p must be in (0, 1]" in r.stderr  # a bad value is refused, the session goes on
    assert "conversation cleared" in r.stderr
    assert r.stdout.count("\n") == 2  # two replies, none after /quit


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-T", -1], "temperature must be >= 0"),
        (["--top-p", 0], "top_p must be in (0, 1]"),
        (["--top-p", 1.5], "top_p must be in (0, 1]"),
        (["--top-k", -1], "top_k must be an integer >= 0"),
        (["--min-p", 1], "min_p must be in [0, 1)"),
        (["--typical-p", 0], "typical_p must be in (0, 1]"),
        (["--repetition-penalty", 0], "repetition_penalty must be > 0"),
        (["--logit-bias", "zzqqxxjj=1"], "logit bias token 'zzqqxxjj' is"),
        (["--logit-bias", "oops"], "--logit-bias wants TOKEN=BIAS"),
        (["-N", 0], "--num-samples must be at least 1"),
        (["-n", 0], "max_new_tokens must be at least 1"),
        (["-n", 300], "more than the model's context of 256"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_model_dir, args, message):
    r = run("generate", PROMPT, "--model", tiny_model_dir, *args)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


STAGE_ARGS = ["--stages", "--temperature", 0.7, "--top-k", 50, "--top-p", 0.9, "--min-p", 0.05]


def test_predict_stages_table_matches_the_library(tiny_model_dir, tiny_lm):
    from nexttok.generate import stage_records

    r = run("predict", PROMPT, "--model", tiny_model_dir, *STAGE_ARGS)
    assert r.exit_code == 0, r.output
    records = stage_records(tiny_lm, PROMPT, SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05))
    assert [x.name for x in records] == ["model", "temperature", "top_k", "top_p", "min_p"]
    for rec in records:
        assert re.search(rf"{rec.name}\s+│\s+{rec.survivors:,}\s+│", r.stdout), rec.name
    assert f"{records[3].mass_removed:.1%}" in r.stdout


def test_predict_stages_json(tiny_model_dir, tiny_lm):
    r = run("predict", PROMPT, "--model", tiny_model_dir, *STAGE_ARGS, "--json")
    assert r.exit_code == 0, r.output
    stages = json.loads(r.stdout)["stages"]
    assert [s["name"] for s in stages] == ["model", "temperature", "top_k", "top_p", "min_p"]
    assert stages[2]["survivors"] == 50 and stages[0]["survivors"] == tiny_lm.vocab_size
    assert stages[-1]["top"][0]["text"] == tiny_lm.token_text(stages[-1]["top"][0]["id"])


def test_predict_stages_bad_input(tiny_model_dir):
    r = run("predict", PROMPT, "--model", tiny_model_dir, "--stages", "--top-p", 2)
    assert r.exit_code == 2 and r.stderr.startswith("error: top_p must be in (0, 1]")


def test_samples_that_cannot_fit_in_memory_are_one_line_and_exit_2(tiny_model_dir):
    r = run("generate", PROMPT, "--model", tiny_model_dir, "-N", 10**9, "-n", 200)
    assert r.exit_code == 2
    assert r.stderr.startswith("error: 1000000000 samples of ") and "fewer samples" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
