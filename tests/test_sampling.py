"""SamplingConfig validation and sample(): greedy, reproducible draws, frequencies that match."""

from __future__ import annotations

import pytest
import torch

from nexttok.errors import NexttokError
from nexttok.processors import apply, build_processors
from nexttok.sampling import SamplingConfig, make_generators, sample

# 99.9th percentile of the chi-square distribution with 3 degrees of freedom.
CHI2_3DF_999 = 16.27


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.2}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.0}, "min_p"),
        ({"typical_p": 0.0}, "typical_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": ("",)}, "stop"),
        ({"seed": -1}, "seed"),
        ({"min_tokens_to_keep": 0}, "min_tokens"),
    ],
)
def test_config_rejects_bad_values(kwargs, param):
    with pytest.raises(NexttokError) as e:
        SamplingConfig(**kwargs)
    assert e.value.param == param
    assert param.split("_")[0] in str(e.value)


def test_config_defaults_are_plain_sampling():
    c = SamplingConfig()
    assert (c.temperature, c.top_k, c.top_p, c.min_p, c.typical_p) == (1.0, 0, 1.0, 0.0, 1.0)
    assert not c.greedy and SamplingConfig(temperature=0).greedy
    assert SamplingConfig(stop=["a", "b"]).stop == ("a", "b")


def test_greedy_is_the_argmax():
    scores = torch.tensor([[0.1, 3.0, 2.0], [5.0, -1.0, 4.9]])
    assert sample(scores, None).tolist() == [1, 0]


def test_same_seed_same_draws_and_different_seeds_differ():
    scores = torch.zeros(1, 50)  # uniform over 50 tokens

    def draws(seed: int) -> list[int]:
        g = make_generators([seed])
        return [int(sample(scores, g)) for _ in range(40)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_each_row_uses_its_own_generator():
    scores = torch.zeros(3, 50)
    together = sample(scores, make_generators([1, 2, 3])).tolist()
    alone = [int(sample(scores[:1], make_generators([s]))) for s in (1, 2, 3)]
    assert together == alone  # a sample's draw does not depend on the batch it runs in


def test_removed_tokens_are_never_drawn():
    scores = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]])
    g = make_generators([0])
    assert {int(sample(scores, g)) for _ in range(200)} == {0, 2}


def test_frequencies_match_the_processed_distribution():
    """A chi-square test over 20,000 draws on a 6-token vocabulary after temperature and top-k."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0]])
    stages = build_processors(SamplingConfig(temperature=0.8, top_k=4))
    scores, _ = apply(stages, torch.zeros(1, 0, dtype=torch.long), logits)
    expected = torch.softmax(scores[0], -1) * 20_000  # (6,): the last two are 0
    g = make_generators([1234])
    counts = torch.bincount(torch.cat([sample(scores, g) for _ in range(20_000)]), minlength=6).float()
    assert counts[4:].sum() == 0
    chi2 = float(((counts[:4] - expected[:4]) ** 2 / expected[:4]).sum())
    assert chi2 < CHI2_3DF_999, (counts.tolist(), expected.tolist())


def test_sampling_after_top_k_uses_only_survivors_and_still_matches():
    """The fast path (a top-n over few survivors) must draw the same as the full sort would."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 4000, generator=g)
    (scores, _) = apply(build_processors(SamplingConfig(top_k=5)), torch.zeros(1, 0, dtype=torch.long), logits)
    top5 = torch.topk(logits[0], 5).indices.tolist()
    gens = make_generators([9])
    drawn = {int(sample(scores, gens)) for _ in range(300)}
    assert drawn == set(top5)


def test_a_draw_is_the_full_sorts_inverse_cdf_inside_and_past_the_window():
    """draw() orders only the best WINDOW tokens unless u lands past them; every pick equals the token a full
    stable sort (best first, ties by id) gives for the same u, on flat, peaked and tied rows."""
    from nexttok.sampling import WINDOW, draw

    torch.manual_seed(0)
    flat = torch.randn(40, 3000) * 0.1  # most of the mass lies past the window
    peaked = torch.randn(40, 3000) * 4
    tied = (torch.randn(40, 3000) * 3).round()  # many equal scores, also across the window's edge
    filtered = peaked.clone()
    filtered[:, 500:] = float("-inf")  # removed tokens are never picked
    for scores in (flat, peaked, tied, filtered):
        seeds = list(range(len(scores)))
        chosen, uniform = draw(scores, make_generators(seeds))
        probs = torch.softmax(scores, -1)
        for r in range(len(scores)):
            order = torch.sort(scores[r], descending=True, stable=True).indices
            ranked = probs[r, order]
            at = int(torch.searchsorted(ranked.cumsum(-1), torch.tensor([uniform[r]]) * probs[r].sum()))
            assert int(chosen[r]) == int(order[min(at, int((ranked > 0).sum()) - 1)])
            assert torch.isfinite(scores[r, chosen[r]])
    past = draw(flat, make_generators(list(range(40))))[0]
    assert any(int((flat[r] > flat[r, past[r]]).sum()) >= WINDOW for r in range(40))  # the fallback ran
