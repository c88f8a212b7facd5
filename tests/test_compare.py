"""compare: two next-token distributions side by side, divergences, gains and losses, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model
from typer.testing import CliRunner

from nexttok.cli import app
from nexttok.compare import compare, compare_distributions, js_divergence, kl_divergence
from nexttok.errors import NexttokError

PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-other"), seed=1)


@pytest.fixture(scope="module")
def other_lm(other_dir):
    import nexttok

    return nexttok.load(str(other_dir))


def test_identical_models_do_not_differ(tiny_lm):
    c = compare(tiny_lm, tiny_lm, PROMPT)
    assert c.kl_ab == pytest.approx(0, abs=1e-6) and c.js == pytest.approx(0, abs=1e-6)
    assert c.b_top_rank_under_a == 1
    assert all(r.prob_a == r.prob_b for r in c.rows)


def test_divergences_match_independent_formulas(tiny_lm, other_lm):
    a, b = tiny_lm.distribution(PROMPT), other_lm.distribution(PROMPT)
    c = compare_distributions(a, b)
    # F.kl_div(input=log q, target=log p, log_target) is KL(p || q)
    expected = float(F.kl_div(b.logprobs, a.logprobs, log_target=True, reduction="sum"))
    assert c.kl_ab == pytest.approx(expected, rel=1e-4)
    m = (a.probs + b.probs) / 2
    js = 0.5 * float((a.probs * (a.probs / m).log()).sum()) + 0.5 * float((b.probs * (b.probs / m).log()).sum())
    assert c.js == pytest.approx(js, rel=1e-4, abs=1e-7)
    assert 0 < c.js_bits <= 1
    assert js_divergence(a.logprobs, b.logprobs) == pytest.approx(js_divergence(b.logprobs, a.logprobs), rel=1e-5)
    assert kl_divergence(a.logprobs, b.logprobs) != pytest.approx(kl_divergence(b.logprobs, a.logprobs), rel=1e-3)


def test_rows_gains_losses_and_rank(tiny_lm, other_lm):
    a, b = tiny_lm.distribution(PROMPT), other_lm.distribution(PROMPT)
    c = compare_distributions(a, b, top=5, moves=3)
    b_top = int(b.probs.argmax())
    assert c.rows[0].id == b_top
    assert c.b_top_rank_under_a == int((a.probs > a.probs[b_top]).sum()) + 1
    assert {r.id for r in c.rows} == {r.id for r in a.top(5)} | {r.id for r in b.top(5)}
    delta = b.probs - a.probs
    assert c.gains[0].id == int(delta.argmax()) and c.losses[0].id == int(delta.argmin())
    assert [g.delta for g in c.gains] == sorted((g.delta for g in c.gains), reverse=True)
    assert all(g.delta > 0 for g in c.gains) and all(x.delta < 0 for x in c.losses)
    assert c.entropy_a == pytest.approx(a.entropy) and not math.isclose(c.entropy_a, c.entropy_b)


def test_different_vocabularies_are_refused(tiny_lm):
    a = tiny_lm.distribution(PROMPT)

    class Short:
        vocab_size = a.vocab_size - 1

    with pytest.raises(NexttokError, match="vocabularies differ"):
        compare_distributions(a, Short())  # type: ignore[arg-type]


def test_cli_compare_json_and_plot(tiny_model_dir, other_dir, tmp_path):
    png = tmp_path / "cmp.png"
    args = ["compare", PROMPT, "-m", str(tiny_model_dir), "-m", str(other_dir), "--json", "-k", "3", "--plot", str(png)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model_b"] == str(other_dir) and report["kl_ab_bits"] > 0
    assert 3 <= len(report["candidates"]) <= 6
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_compare_table(tiny_model_dir, other_dir):
    result = CliRunner().invoke(app, ["compare", PROMPT, "-m", str(tiny_model_dir), "-m", str(other_dir)])
    assert result.exit_code == 0, result.output
    assert "KL(A‖B)" in result.output and "largest gains" in result.output and "rank" in result.output


def test_cli_compare_needs_two_models(tiny_model_dir):
    result = CliRunner().invoke(app, ["compare", PROMPT, "-m", str(tiny_model_dir)])
    assert result.exit_code == 2
    assert "error: give --model exactly twice" in result.output


def test_chat_prompt_compares_the_rendered_prompt(tiny_lm, other_lm):
    c = compare(tiny_lm, other_lm, PROMPT, chat=True)
    assert c.context_ids == tiny_lm.encode(PROMPT, chat=True)
    assert torch.isfinite(torch.tensor(c.kl_ab))
