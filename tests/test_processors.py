"""Each sampling stage against a hand-computed example, ties and min_tokens_to_keep included."""

from __future__ import annotations

import math

import pytest
import torch

from nexttok.errors import NexttokError
from nexttok.processors import (
    STAGE_ORDER,
    FrequencyPenalty,
    LogitBias,
    MinP,
    PresencePenalty,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    Typical,
    apply,
    build_processors,
)
from nexttok.sampling import SamplingConfig

INF = float("-inf")
NO_IDS = torch.zeros(1, 0, dtype=torch.long)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()  # (1, V): scores whose softmax is exactly `probs`


def kept(scores: torch.Tensor) -> list[int]:
    return torch.isfinite(scores[0]).nonzero()[:, 0].tolist()


def test_temperature_divides_and_keeps_everything():
    out = Temperature(0.5)(NO_IDS, torch.tensor([[1.0, -2.0, 0.0]]))
    assert out.tolist() == [[2.0, -4.0, 0.0]]


def test_top_k_keeps_k_best_and_ties_with_the_kth():
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert kept(TopK(1)(NO_IDS, scores)) == [0]
    assert kept(TopK(2)(NO_IDS, scores)) == [0, 2, 3]  # 2.0 is tied at rank 2: both stay
    assert kept(TopK(9)(NO_IDS, scores)) == [0, 1, 2, 3, 4]  # k above the vocabulary keeps all
    assert kept(TopK(1, min_tokens_to_keep=3)(NO_IDS, scores)) == [0, 2, 3]


def test_top_p_keeps_smallest_set_reaching_p():
    scores = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(TopP(0.5)(NO_IDS, scores)) == [0]  # 0.5 alone reaches 0.5
    assert kept(TopP(0.6)(NO_IDS, scores)) == [0, 1]  # 0.5 < 0.6 <= 0.8
    assert kept(TopP(0.81)(NO_IDS, scores)) == [0, 1, 2]
    assert kept(TopP(0.1, min_tokens_to_keep=2)(NO_IDS, scores)) == [0, 1]
    ties = logits_of([0.4, 0.2, 0.2, 0.2])
    assert kept(TopP(0.5)(NO_IDS, ties)) == [0, 1, 2, 3]  # the 2nd token is tied with two others


def test_top_p_after_top_k_uses_survivors_only():
    scores = logits_of([0.4, 0.3, 0.2, 0.1] + [1e-6] * 100)
    after_k = TopK(2)(NO_IDS, scores)  # renormalized: 0.4/0.7, 0.3/0.7
    assert kept(TopP(0.5)(NO_IDS, after_k)) == [0]  # 0.571 >= 0.5
    assert kept(TopP(0.6)(NO_IDS, after_k)) == [0, 1]


def test_min_p_is_relative_to_top_token():
    scores = logits_of([0.5, 0.3, 0.1, 0.06, 0.04])
    assert kept(MinP(0.2)(NO_IDS, scores)) == [0, 1, 2]  # threshold 0.1, 0.1 itself kept
    assert kept(MinP(0.7)(NO_IDS, scores)) == [0]
    assert kept(MinP(0.7, min_tokens_to_keep=2)(NO_IDS, scores)) == [0, 1]


def test_typical_keeps_tokens_nearest_the_entropy():
    probs = [0.6, 0.2, 0.1, 0.1]
    entropy = -sum(p * math.log(p) for p in probs)
    distance = [abs(-math.log(p) - entropy) for p in probs]
    # Hand-computed: the most typical token is the 0.2 one (surprise 1.61 vs entropy 1.09).
    assert min(range(4), key=distance.__getitem__) == 1
    assert kept(Typical(0.15)(NO_IDS, logits_of(probs))) == [1]
    assert kept(Typical(0.25)(NO_IDS, logits_of(probs))) == [0, 1]  # next most typical: 0.6 (0.58 away)
    assert kept(Typical(0.15, min_tokens_to_keep=3)(NO_IDS, logits_of(probs))) == [0, 1, 2, 3]  # 0.1s tie


def test_repetition_penalty_divides_positive_multiplies_negative():
    ids = torch.tensor([[0, 1, 1]])
    out = RepetitionPenalty(2.0)(ids, torch.tensor([[4.0, -1.0, 3.0]]))
    assert out.tolist() == [[2.0, -2.0, 3.0]]


def test_presence_and_frequency_penalties_count_occurrences():
    ids = torch.tensor([[0, 1, 1]])
    scores = torch.zeros(1, 3)
    assert PresencePenalty(0.5)(ids, scores).tolist() == [[-0.5, -0.5, 0.0]]
    assert FrequencyPenalty(0.5)(ids, scores).tolist() == [[-0.5, -1.0, 0.0]]


def test_logit_bias_adds_to_chosen_ids():
    out = LogitBias({2: 5.0, 0: -100.0})(NO_IDS, torch.zeros(2, 3))
    assert out.tolist() == [[-100.0, 0.0, 5.0]] * 2


def test_stages_match_huggingface_warpers_on_random_scores():
    from transformers import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 500, generator=g) * 3  # (B, V), no ties
    ids = torch.randint(0, 500, (4, 12), generator=g)
    pairs = [
        (TopK(37), TopKLogitsWarper(37)),
        (TopP(0.8), TopPLogitsWarper(0.8)),
        (MinP(0.1), MinPLogitsWarper(0.1)),
        (Typical(0.7), TypicalLogitsWarper(0.7)),
        (Temperature(0.7), TemperatureLogitsWarper(0.7)),
        (RepetitionPenalty(1.3), RepetitionPenaltyLogitsProcessor(1.3)),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours(ids, scores), theirs(ids, scores.clone()), msg=ours.name)


@pytest.mark.parametrize(
    ("stage", "arg"),
    [(Temperature, 0), (Temperature, -1), (TopK, -1), (TopP, 0), (TopP, 1.5), (MinP, 1), (MinP, -0.1)]
    + [(Typical, 0), (Typical, 1.01), (RepetitionPenalty, 0), (RepetitionPenalty, -1)],
)
def test_bad_arguments_name_the_fix(stage, arg):
    with pytest.raises(NexttokError, match=stage.name):
        stage(arg)


def test_build_processors_fixes_the_order():
    config = SamplingConfig(
        typical_p=0.9, min_p=0.05, top_p=0.9, top_k=40, temperature=0.7, frequency_penalty=0.1,
        presence_penalty=0.2, repetition_penalty=1.1,
    )  # fmt: skip
    names = [s.name for s in build_processors(config, {5: 1.0})]
    assert names == list(STAGE_ORDER)
    assert [s.name for s in build_processors(SamplingConfig())] == []  # defaults: the model's own distribution
    greedy = build_processors(SamplingConfig(temperature=0, top_k=5, repetition_penalty=1.2))
    assert [s.name for s in greedy] == ["repetition_penalty"]  # greedy ignores the filters, as HF does


def test_apply_records_each_stage():
    scores = logits_of([0.5, 0.3, 0.15, 0.05])
    stages = build_processors(SamplingConfig(top_k=3, top_p=0.7))
    out, records = apply(stages, NO_IDS, scores, trace=True)
    names = [(r.name, r.survivors) for r in records[0]]
    assert names == [("model", 4), ("top_k", 3), ("top_p", 2)]
    assert records[0][1].mass_removed == pytest.approx(0.05)
    assert records[0][2].mass_removed == pytest.approx(0.15 / 0.95)
    assert records[0][2].top[0][0] == 0 and records[0][2].top[0][1] == pytest.approx(0.5 / 0.8)
    assert kept(out) == [0, 1]
