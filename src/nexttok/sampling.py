"""``SamplingConfig`` (validated when built) and ``sample()``: greedy, or a draw with an explicit generator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nexttok.errors import NexttokError
from nexttok.processors import MinP, RepetitionPenalty, TopK, TopP, Typical


@dataclass(frozen=True)
class SamplingConfig:
    """How to choose each next token. Defaults: plain sampling from the model's distribution
    (temperature 1, every filter off), at most 64 new tokens, stop at the end-of-sequence token.

    Stages run in a fixed order (see :func:`nexttok.processors.build_processors`): repetition,
    presence and frequency penalties, logit bias, temperature, top-k, top-p, min-p, typical-p.
    ``temperature=0`` is greedy decoding: penalties and bias apply, then the best token is taken.
    ``logit_bias`` maps a token (its text, or its id) to a number added to its score.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str | int, float] = field(default_factory=dict)
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise NexttokError(
                f"temperature must be >= 0 (got {self.temperature}); 0 is greedy, 1 is the model's own distribution",
                param="temperature",
            )
        # The stage classes own the range checks; building them here reports bad values at once.
        TopK(self.top_k, self.min_tokens_to_keep)
        TopP(self.top_p), MinP(self.min_p), Typical(self.typical_p), RepetitionPenalty(self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise NexttokError(f"{name} must be a finite number (got {getattr(self, name)})", param=name)
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise NexttokError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})", "max_new_tokens")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise NexttokError("stop must be a list of non-empty strings", param="stop")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise NexttokError(f"seed must be an integer in [0, 2**63) (got {self.seed})", param="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    """One generator per sample: sample i's draws depend on its seed alone, not on the batch."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def sample(scores: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """One token id per row of the processed (B, V) ``scores``: the argmax when ``generators`` is
    None (greedy), else an inverse-CDF draw over the survivors ordered best first (:func:`draw`)."""
    return draw(scores, generators)[0]


# The best tokens a draw looks at first; only a draw that lands past them orders the whole vocabulary.
WINDOW = 64


def draw(scores: torch.Tensor, generators: list[torch.Generator] | None) -> tuple[torch.Tensor, list[float] | None]:
    """:func:`sample`, with the uniform number each row drew (None when greedy).

    Each row takes one uniform number u from its own generator and picks the token where the cumulative
    probability, the candidates ordered best first (ties by id), first reaches u. Because of that order, the
    same seed under two settings lands on comparable tokens (common random numbers). The order is needed only
    up to the token picked: the best :data:`WINDOW` tokens usually hold it, and a full sort of the vocabulary
    (~4 ms for 49k scores on a CPU) is done only for rows whose u lands past them; both give the same token."""
    if generators is None:
        return scores.argmax(-1), None  # (B,)
    u = torch.cat([torch.rand(1, generator=g) for g in generators]).unsqueeze(1)  # (B, 1)
    probs = torch.softmax(scores.float(), dim=-1)  # (B, V): removed tokens have 0
    target = u * probs.sum(-1, keepdim=True)  # (B, 1)
    alive = int(torch.isfinite(scores).sum(-1).max())
    k = min(WINDOW, alive)
    values, ids = _best_first(scores, k)  # (B, k)
    window = probs.gather(1, ids)  # (B, k): best first, so the tokens of nonzero probability come first
    # Rounding may put the target past the last such token: it is then picked, never a removed one.
    last = (window > 0).sum(-1, keepdim=True).clamp(min=1) - 1  # (B, 1)
    pick = torch.minimum(torch.searchsorted(window.cumsum(-1), target), last)  # (B, 1)
    # A pick strictly above the window's last score has every better token inside the window: exact.
    exact = (values.gather(1, pick) > values[:, -1:]) | (k == alive)  # (B, 1)
    chosen = ids.gather(1, pick)[:, 0]  # (B,)
    for r in (~exact[:, 0]).nonzero()[:, 0].tolist():  # rows whose u lands past the window
        order = torch.sort(scores[r], descending=True, stable=True).indices  # (V,)
        ranked = probs[r, order]  # (V,)
        at = torch.searchsorted(ranked.cumsum(-1), target[r]).clamp(max=int((ranked > 0).sum()) - 1)
        chosen[r] = order[at]
    return chosen, u[:, 0].tolist()


def _best_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best scores of each row of (B, V) ``scores`` and their ids, in the order of a stable sort
    (best first, ties by id), (B, k) each."""
    values, ids = torch.topk(scores, k, dim=-1)  # (B, k): ties in no fixed order
    by_id = torch.argsort(ids, dim=-1)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(1, order), ids.gather(1, order)
