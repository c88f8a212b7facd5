"""nexttok.evaluate: perplexity against a direct transformers computation, lm-eval's formulas, the
windows, calibration, the temperature fit."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_corpus

import nexttok
from nexttok.errors import NexttokError
from nexttok.evaluation import evaluate
from nexttok.evaluation.metrics import brier, ece, fit_temperature
from nexttok.evaluation.windows import plan

TEXT = tiny_corpus(3000)


def direct_nll(lm, ids: list[int], windows) -> tuple[float, int]:
    """The Hugging Face perplexity guide's loop: a full forward per window, labels -100 on the context,
    shifted cross-entropy over all logits; summed nats and tokens."""
    total, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            row = ([lm.tokenizer.bos_token_id] if w.bos else []) + ids[w.start : w.stop]
            x = torch.tensor([row])
            target = x.clone()
            target[:, : w.scored_from - w.start + int(w.bos)] = -100
            logits = lm.model(x).logits[0, :-1].float()
            labels = target[0, 1:]
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            n += int((labels != -100).sum())
    return total, n


@pytest.mark.parametrize(
    ("mode", "stride", "bos"), [("disjoint", None, False), ("strided", 24, False), ("strided", 32, True)]
)
def test_perplexity_equals_a_direct_transformers_computation(tiny_lm, mode, stride, bos):
    ids = tiny_lm.tokenizer.encode(TEXT, add_special_tokens=False)
    result = evaluate(tiny_lm, TEXT, context=64, stride=stride, windows=mode, bos=bos)
    total, n = direct_nll(tiny_lm, ids, plan(len(ids), 64, stride, mode, bos))
    assert result.metrics.tokens == n == len(ids) - (0 if bos else 1)
    assert result.metrics.perplexity == pytest.approx(math.exp(total / n), rel=1e-5)


def test_every_token_is_scored_once_with_the_promised_context():
    for n, ctx, stride, bos in [(1000, 64, 16, True), (1000, 64, 48, False), (65, 64, 32, False), (7, 64, 32, True)]:
        ws = plan(n, ctx, stride, "strided", bos)
        scored = np.concatenate([np.arange(w.scored_from, w.stop) for w in ws])
        assert scored.tolist() == list(range(0 if bos else 1, n))
        for w in ws[1:]:
            assert w.context().min() >= ctx - stride
        assert all(w.stop - w.start + int(w.bos) <= ctx for w in ws)
    ws = plan(1000, 64, mode="disjoint", bos=True)
    assert np.concatenate([np.arange(w.scored_from, w.stop) for w in ws]).tolist() == list(range(1000))
    assert [w.bos for w in ws[:2]] == [True, False]  # lm-eval: the prefix token only in the first window


def test_bits_per_byte_and_word_perplexity_are_lm_evals_formulas(tiny_lm):
    doc = "Wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n"
    ids = tiny_lm.tokenizer.encode(doc, add_special_tokens=False)
    result = evaluate(tiny_lm, doc, context=256, windows="disjoint", bos=True)
    # lm-eval's loglikelihood_rolling: every token from the prefix (EOT/BOS) token on, one window.
    x = torch.tensor([[tiny_lm.tokenizer.bos_token_id] + ids])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_lm.model(x).logits[0, :-1].float(), -1)
    loglik = float(logp.gather(1, torch.tensor(ids)[:, None]).sum())
    m = result.metrics
    assert m.bits_per_byte == pytest.approx(-loglik / len(doc.encode("utf-8")) / math.log(2), rel=1e-5)
    assert m.word_perplexity == pytest.approx(math.exp(-loglik / len(re.split(r"\s+", doc))), rel=1e-5)
    assert m.bits_per_char == pytest.approx(-loglik / len(doc) / math.log(2), rel=1e-5)
    assert m.bytes == len(doc.encode("utf-8")) and m.words == len(re.split(r"\s+", doc))


def test_accuracy_and_ranks_match_the_distribution(tiny_lm):
    result = evaluate(tiny_lm, TEXT[:400], context=256, bos=True)
    ids = tiny_lm.tokenizer.encode(TEXT[:400], add_special_tokens=False)
    pos = result.positions
    for i in (0, 5, 17):  # position i predicts ids[i] from BOS + ids[:i]
        d = tiny_lm.distribution([tiny_lm.tokenizer.bos_token_id] + ids[:i])
        assert pos.rank[i] == d.rank_of(ids[i])
        assert pos.logprob[i] == pytest.approx(float(d.logprobs[ids[i]]), abs=1e-4)
        assert pos.entropy[i] == pytest.approx(d.entropy, abs=1e-4)
    m = result.metrics
    assert m.top1 == pytest.approx(float((pos.rank == 1).mean()))
    assert m.mrr == pytest.approx(float((1 / pos.rank).mean()))
    assert sum(m.rank_histogram.values()) == m.tokens
    assert m.loss * m.tokens == pytest.approx(-pos.logprob.sum())  # the records sum to the total


def test_ece_and_brier_equal_hand_computed_values():
    conf = np.array([0.95, 0.85, 0.62, 0.55, 0.30, 0.25])
    correct = np.array([1, 0, 1, 1, 0, 0], dtype=bool)
    # Equal width, 10 bins: (0.9,1] {0.95:1}, (0.8,0.9] {0.85:0}, (0.6,0.7] {0.62:1}, (0.5,0.6] {0.55:1},
    # (0.2,0.3] {0.30:0, 0.25:0}.
    hand = (abs(1 - 0.95) + abs(0 - 0.85) + abs(1 - 0.62) + abs(1 - 0.55) + 2 * abs(0 - 0.275)) / 6
    assert ece(conf, correct) == pytest.approx(hand)
    # Equal mass, 3 bins over the sorted confidences: {0.25, 0.30}, {0.55, 0.62}, {0.85, 0.95}.
    hand_mass = (2 * abs(0 - 0.275) + 2 * abs(1 - 0.585) + 2 * abs(0.5 - 0.90)) / 6
    assert ece(conf, correct, bins=3, mass=True) == pytest.approx(hand_mass)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    targets = np.array([0, 1])
    hand_brier = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.7**2 + 0.6**2)) / 2
    assert brier((probs**2).sum(1), probs[np.arange(2), targets]) == pytest.approx(hand_brier)


def test_the_temperature_fit_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 50, generator=g) * 3  # the model's logits
    true_t = 1.7
    y = torch.multinomial(torch.softmax(z / true_t, -1), 1, generator=g)[:, 0]  # drawn at T = 1.7
    assert fit_temperature(z, y) == pytest.approx(true_t, rel=0.03)


def test_fit_temperature_reports_before_and_after(tiny_lm):
    result = evaluate(tiny_lm, TEXT, context=64, fit_temperature=True)
    fit = result.temperature
    assert fit is not None and fit.temperature > 0
    assert fit.loss_after <= fit.loss_before + 1e-6  # the fitted T is at least as good on held-out text here
    assert fit.reported_on == sum(j.window.scored for j in result.jobs[len(result.jobs) // 2 :])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"data": ""}, "the text is empty"),
        ({"data": "a"}, "at least two"),
        ({"data": TEXT, "context": 64, "stride": 64}, "--stride must be between 1"),
        ({"data": TEXT, "context": 64, "stride": 0}, "--stride must be between 1"),
        ({"data": TEXT, "context": 100000}, "above the model's 256"),
    ],
)
def test_bad_input_is_one_clear_error(tiny_lm, kwargs, match):
    with pytest.raises(NexttokError, match=match):
        evaluate(tiny_lm, **kwargs)


def test_the_public_api(tiny_model_dir):
    assert nexttok.evaluate is evaluate
    lm = nexttok.load(str(tiny_model_dir))
    out = nexttok.evaluate(lm, TEXT[:500], context=128).to_dict()
    assert out["schema"] == "nexttok.eval/1" and out["metrics"]["tokens"] > 0
