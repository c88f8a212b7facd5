"""The next-token distribution: probabilities over the whole vocabulary at the last position."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nexttok.errors import NexttokError

if TYPE_CHECKING:
    from nexttok.lm import LM


def show_token(text: str) -> str:
    """Token text with its spaces and control characters made visible (' Paris' -> '␣Paris')."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "\\r")


@dataclass(frozen=True)
class Row:
    """One candidate token of a :class:`Distribution`."""

    rank: int
    id: int
    text: str
    prob: float
    logprob: float

    @property
    def shown(self) -> str:
        return show_token(self.text)


@dataclass(frozen=True)
class TokenProb:
    """How likely a named token (or word) is next.

    ``prob`` and ``rank`` are those of the word's first token; when the word is several tokens,
    ``word_prob`` multiplies each piece's probability given the prompt and the pieces before it.
    """

    query: str
    ids: list[int]
    pieces: list[str]
    prob: float
    logprob: float
    rank: int
    word_prob: float
    word_logprob: float

    @property
    def multi_token(self) -> bool:
        return len(self.ids) > 1


class Distribution:
    """Probabilities over the whole vocabulary for the token after ``context_ids``.

    Build one with :meth:`nexttok.lm.LM.distribution`. ``logits`` are the last position's raw
    scores, shape (V,); ``temperature`` divides them before the softmax.
    """

    def __init__(self, logits: torch.Tensor, lm: LM, context_ids: list[int], temperature: float = 1.0):
        if not temperature > 0:
            raise NexttokError(
                f"temperature must be > 0 to define a distribution (got {temperature}); "
                "greedy decoding is temperature 0 in `nexttok generate`",
                param="temperature",
            )
        self.lm = lm
        self.context_ids = list(context_ids)
        self.temperature = float(temperature)
        self.logits = logits.detach().float().reshape(-1)  # (V,)
        self.logprobs = torch.log_softmax(self.logits / self.temperature, dim=-1)  # (V,)
        self.probs = self.logprobs.exp()  # (V,)

    def with_temperature(self, temperature: float) -> Distribution:
        """The same scores under another temperature (the ranking never changes, the spread does)."""
        return Distribution(self.logits, self.lm, self.context_ids, temperature)

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[0]

    def top(self, k: int = 10) -> list[Row]:
        """The ``k`` most likely tokens, best first; ``k`` above the vocabulary size is clamped."""
        if k < 1:
            raise NexttokError(f"top k must be at least 1 (got {k})", param="top")
        ids = torch.topk(self.logprobs, min(k, self.vocab_size)).indices
        return [self._row(r + 1, int(i)) for r, i in enumerate(ids.tolist())]

    def _row(self, rank: int, token_id: int) -> Row:
        text = self.lm.token_text(token_id)
        return Row(rank, token_id, text, float(self.probs[token_id]), float(self.logprobs[token_id]))

    def rank_of(self, token_id: int) -> int:
        """1-based rank: one more than the number of tokens strictly more likely."""
        return int((self.logprobs > self.logprobs[token_id]).sum()) + 1

    def prob(self, token: str | int) -> TokenProb:
        """Probability and rank of ``token`` (text or id); for a multi-token word also its chain-rule
        probability."""
        ids = self.lm.token_ids(token)
        first = ids[0]
        word_logprob = float(self.logprobs[first])
        if len(ids) > 1:
            word_logprob += self.lm.continuation_logprob(self.context_ids + ids[:1], ids[1:], self.temperature)
        return TokenProb(
            query=token if isinstance(token, str) else self.lm.token_text(token),
            ids=ids,
            pieces=[self.lm.token_text(i) for i in ids],
            prob=float(self.probs[first]),
            logprob=float(self.logprobs[first]),
            rank=self.rank_of(first),
            word_prob=math.exp(word_logprob),
            word_logprob=word_logprob,
        )

    def rank(self, token: str | int) -> int:
        """Rank of ``token`` (its first token when it is several)."""
        return self.rank_of(self.lm.token_ids(token)[0])

    @property
    def entropy(self) -> float:
        """Entropy in nats: -sum p log p over the whole vocabulary."""
        return float(-(self.probs * self.logprobs).nan_to_num().sum())

    @property
    def entropy_bits(self) -> float:
        return self.entropy / math.log(2)

    def mass_cover(self, mass: float = 0.9) -> int:
        """How many of the most likely tokens it takes to cover ``mass`` of the probability."""
        cumulative = torch.sort(self.probs, descending=True).values.cumsum(0)  # (V,)
        return min(int((cumulative < mass).sum()) + 1, self.vocab_size)
