"""``SamplingConfig`` (validated when built) and ``sample()``: greedy, or a draw with an explicit generator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nexttok.errors import NexttokError
from nexttok.processors import MinP, RepetitionPenalty, TopK, TopP, Typical, candidates


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
    None (greedy), else an inverse-CDF draw over the survivors ordered best first.

    Each row takes one uniform number from its own generator. Because the candidates are ordered
    best first, the same seed under two settings lands on comparable tokens (common random numbers)."""
    if generators is None:
        return scores.argmax(-1)  # (B,)
    values, ids = candidates(scores)  # (B, n)
    cdf = torch.softmax(values.float(), dim=-1).cumsum(-1)  # (B, n)
    u = torch.cat([torch.rand(1, generator=g) for g in generators]).unsqueeze(1)  # (B, 1)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=values.shape[-1] - 1)  # (B, 1)
    return ids.gather(1, pick).squeeze(1)  # (B,)
