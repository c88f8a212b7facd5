"""samples: one prompt's samples; runs of equal settings picked together draw as they would alone."""

from __future__ import annotations

import pytest
import torch

from nexttok.sampling import SamplingConfig


def test_requests_of_equal_settings_are_picked_in_one_batch_and_draw_as_alone(tiny_lm):
    """pick_together batches the stages and draws of runs with equal settings; each run's tokens, logprobs and
    draws are those of its own pick."""
    from nexttok.decode import Scores
    from nexttok.samples import Samples, pick_together

    torch.manual_seed(3)
    config = lambda seed, **kw: SamplingConfig(temperature=0.7, top_k=30, seed=seed, max_new_tokens=4, **kw)  # noqa: E731
    make = lambda: [Samples(tiny_lm, [5, 6, 7], config(1), n=2, top=3), Samples(tiny_lm, [8], config(9), top=1),  # noqa: E731
                    Samples(tiny_lm, [9, 9], config(4, presence_penalty=0.5))]  # fmt: skip
    together, alone = make(), make()
    assert together[0].batch_key == together[1].batch_key and together[2].batch_key is None
    for _ in range(3):
        logits = [torch.randn(r.n if not r.index else len(r.live), tiny_lm.vocab_size) * 3 for r in together]
        got = pick_together(together, [Scores(x) for x in logits])
        want = [r.pick(Scores(x)) for r, x in zip(alone, logits, strict=True)]
        for (c1, k1, s1), (c2, k2, s2) in zip(got, want, strict=True):
            assert c1.tolist() == c2.tolist() and k1 == k2
            assert [(s.id, s.uniform, s.rank, len(s.alternatives)) for s in s1] == [
                (s.id, s.uniform, s.rank, len(s.alternatives)) for s in s2
            ]
            assert [s.logprob for s in s1] == pytest.approx([s.logprob for s in s2], abs=1e-6)


def test_fresh_seeds_survive_json_in_javascript(tiny_lm):
    from nexttok.samples import _seeds

    seeds = _seeds(SamplingConfig(), 16)
    assert len(set(seeds)) == 16 and max(seeds) < 2**53  # a double (JavaScript's number) is exact below 2**53
