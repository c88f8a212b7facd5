"""Two models' next-token distributions for one prompt, side by side: what fine-tuning moved.

For models A and B (e.g. a base model and its fine-tune) on the same prompt: the top candidates of
each with both probabilities, the tokens that gained and lost the most probability, KL(A‖B), the
Jensen–Shannon divergence, and the rank under A of B's top token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from nexttok.distribution import Distribution, show_token
from nexttok.errors import NexttokError
from nexttok.lm import LM

LN2 = math.log(2)


@dataclass(frozen=True)
class Change:
    """One token's probability under A and under B."""

    id: int
    text: str
    prob_a: float
    prob_b: float
    rank_a: int
    rank_b: int

    @property
    def delta(self) -> float:
        return self.prob_b - self.prob_a

    @property
    def shown(self) -> str:
        return show_token(self.text)


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare`. Divergences are in nats (``*_bits`` in bits)."""

    context_ids: list[int]
    rows: list[Change]  # the union of both top-k lists, by B's probability
    gains: list[Change]
    losses: list[Change]
    kl_ab: float
    js: float
    b_top_rank_under_a: int
    entropy_a: float
    entropy_b: float

    @property
    def kl_ab_bits(self) -> float:
        return self.kl_ab / LN2

    @property
    def js_bits(self) -> float:
        return self.js / LN2

    @property
    def entropy_a_bits(self) -> float:
        return self.entropy_a / LN2

    @property
    def entropy_b_bits(self) -> float:
        return self.entropy_b / LN2

    def to_dict(self) -> dict:
        """Plain data for JSON output."""
        return {
            "context_ids": self.context_ids,
            "candidates": [asdict(c) for c in self.rows],
            "gains": [asdict(c) for c in self.gains],
            "losses": [asdict(c) for c in self.losses],
            "kl_ab_nats": self.kl_ab,
            "kl_ab_bits": self.kl_ab_bits,
            "js_bits": self.js_bits,
            "b_top_rank_under_a": self.b_top_rank_under_a,
            "entropy_a_bits": self.entropy_a_bits,
            "entropy_b_bits": self.entropy_b_bits,
        }


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(P‖Q) = Σ p (log p − log q) in nats, from log-probabilities over the same vocabulary."""
    return float((logp.exp() * (logp - logq)).nan_to_num().sum().clamp(min=0.0))


def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """Jensen–Shannon divergence in nats: symmetric, finite, at most ln 2."""
    logm = torch.logaddexp(logp, logq) - LN2  # (V,) log of the mixture (P + Q) / 2
    return 0.5 * kl_divergence(logp, logm) + 0.5 * kl_divergence(logq, logm)


def compare_distributions(a: Distribution, b: Distribution, top: int = 10, moves: int = 5) -> Comparison:
    """Compare two distributions over the same vocabulary."""
    if a.vocab_size != b.vocab_size:
        raise NexttokError(
            f"the models' vocabularies differ ({a.vocab_size:,} vs {b.vocab_size:,} tokens); compare needs two "
            "models with the same tokenizer, e.g. a base model and its fine-tune",
            param="model",
        )
    ids = {r.id for r in a.top(top)} | {r.id for r in b.top(top)}
    rows = sorted((_change(a, b, i) for i in ids), key=lambda c: -c.prob_b)
    delta = b.probs - a.probs  # (V,)
    k = min(moves, a.vocab_size)
    gains = [_change(a, b, int(i)) for i in torch.topk(delta, k).indices if delta[i] > 0]
    losses = [_change(a, b, int(i)) for i in torch.topk(-delta, k).indices if delta[i] < 0]
    return Comparison(
        context_ids=a.context_ids,
        rows=rows,
        gains=gains,
        losses=losses,
        kl_ab=kl_divergence(a.logprobs, b.logprobs),
        js=js_divergence(a.logprobs, b.logprobs),
        b_top_rank_under_a=a.rank_of(b.top(1)[0].id),
        entropy_a=a.entropy,
        entropy_b=b.entropy,
    )


def _change(a: Distribution, b: Distribution, token_id: int) -> Change:
    return Change(
        id=token_id,
        text=b.lm.token_text(token_id),
        prob_a=float(a.probs[token_id]),
        prob_b=float(b.probs[token_id]),
        rank_a=a.rank_of(token_id),
        rank_b=b.rank_of(token_id),
    )


def compare(lm_a: LM, lm_b: LM, prompt: str, chat: bool = False, top: int = 10, moves: int = 5) -> Comparison:
    """Next-token distributions of two models on ``prompt``, compared. Both must tokenize it alike."""
    ids = same_ids(lm_a.encode(prompt, chat=chat), lm_b.encode(prompt, chat=chat))
    return compare_distributions(lm_a.distribution(ids), lm_b.distribution(ids), top, moves)


def same_ids(ids_a: list[int], ids_b: list[int], param: str = "model") -> list[int]:
    """The prompt's ids, which must be the same under both models' tokenizers."""
    if ids_a != ids_b:
        raise NexttokError(
            "the two models tokenize the prompt differently; compare needs models with the same tokenizer "
            "(e.g. a base model and its fine-tune)",
            param=param,
        )
    return ids_a
