"""Sampling stages: one small class per stage, with the Hugging Face contract ``(input_ids, scores) -> scores``.

``input_ids`` is the context so far, shape (B, T); ``scores`` are the next token's scores, shape (B, V).
A stage that removes a token sets its score to ``-inf``. :func:`build_processors` is the one place that
fixes the order of the stages; :func:`apply` runs them and can record what each one did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch

from nexttok.errors import NexttokError

if TYPE_CHECKING:
    from nexttok.sampling import SamplingConfig

NEG_INF = float("-inf")


class Processor(Protocol):
    name: str

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor: ...


def _check_keep(min_tokens_to_keep: int) -> int:
    if not (isinstance(min_tokens_to_keep, int) and min_tokens_to_keep >= 1):
        raise NexttokError(f"min_tokens_to_keep must be an integer >= 1 (got {min_tokens_to_keep})", param="min_tokens")
    return min_tokens_to_keep


def _counts(input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """How often each token occurs in each row of the context, shape (B, V)."""
    counts = torch.zeros(input_ids.shape[0], vocab, dtype=torch.float32, device=input_ids.device)
    return counts.scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=torch.float32))


class RepetitionPenalty:
    """Tokens already in the context become less likely: a positive score is divided by ``penalty``, a
    negative one multiplied (the CTRL rule, as in HF). 1 is off; above 1 discourages repeats."""

    name = "repetition_penalty"

    def __init__(self, penalty: float):
        if not (math.isfinite(penalty) and penalty > 0):
            raise NexttokError(
                f"repetition_penalty must be > 0 (got {penalty}); 1 is off, 1.1-1.3 discourages repeats",
                param="repetition_penalty",
            )
        self.penalty = float(penalty)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = scores.gather(1, input_ids)  # (B, T)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, input_ids, seen)


class PresencePenalty:
    """Subtract ``penalty`` once from every token that already occurs in the context (OpenAI's rule)."""

    name = "presence_penalty"

    def __init__(self, penalty: float):
        if not math.isfinite(penalty):
            raise NexttokError(f"presence_penalty must be a finite number (got {penalty})", param="presence_penalty")
        self.penalty = float(penalty)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        present = _counts(input_ids, scores.shape[-1]) > 0  # (B, V)
        return scores - self.penalty * present.to(scores.dtype)


class FrequencyPenalty:
    """Subtract ``penalty`` times the number of times a token already occurs in the context."""

    name = "frequency_penalty"

    def __init__(self, penalty: float):
        if not math.isfinite(penalty):
            raise NexttokError(f"frequency_penalty must be a finite number (got {penalty})", param="frequency_penalty")
        self.penalty = float(penalty)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores - self.penalty * _counts(input_ids, scores.shape[-1]).to(scores.dtype)


class LogitBias:
    """Add a fixed bias to chosen token ids (-100 effectively bans a token, +100 forces it)."""

    name = "logit_bias"

    def __init__(self, bias: dict[int, float]):
        for token, value in bias.items():
            if not math.isfinite(value):
                raise NexttokError(f"the logit bias for token {token} must be finite (got {value})", param="logit_bias")
        self.ids = torch.tensor(list(bias), dtype=torch.long)  # (N,)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)  # (N,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.ids.numel() and int(self.ids.max()) >= scores.shape[-1]:
            raise NexttokError(f"logit bias token id {int(self.ids.max())} is outside the vocabulary", "logit_bias")
        return scores.index_add(1, self.ids, self.values.to(scores.dtype).expand(scores.shape[0], -1))


class Temperature:
    """Divide the scores by ``temperature``: below 1 sharpens the distribution, above 1 flattens it.
    Nothing is removed and the ranking never changes."""

    name = "temperature"

    def __init__(self, temperature: float):
        if not (math.isfinite(temperature) and temperature > 0):
            raise NexttokError(
                f"temperature must be > 0 for this stage (got {temperature}); temperature 0 means greedy decoding",
                param="temperature",
            )
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keep the ``k`` highest-scoring tokens; tokens tied with the k-th are kept too. 0 is off."""

    name = "top_k"

    def __init__(self, k: int, min_tokens_to_keep: int = 1):
        if not (isinstance(k, int) and k >= 0):
            raise NexttokError(f"top_k must be an integer >= 0 (got {k}); 0 turns it off", param="top_k")
        self.k = max(k, _check_keep(min_tokens_to_keep))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]  # (B, 1)
        return scores.masked_fill(scores < kth, NEG_INF)


def candidates(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens still alive in (B, V) ``scores``, best first, as (B, n) scores and ids.

    After a top-k the survivors are few, and a top-n over them gives the same order as sorting the
    whole vocabulary at a fraction of the cost (a full sort of 49k scores is slow on a CPU). Rows
    with fewer survivors than ``n`` are padded with -inf, which every later step treats as removed."""
    alive = int(torch.isfinite(scores).sum(-1).max())
    if alive * 4 < scores.shape[-1]:
        return torch.topk(scores, alive, dim=-1)
    return torch.sort(scores, dim=-1, descending=True, stable=True)


class TopP:
    """Nucleus sampling: keep the smallest set of best tokens whose probability reaches ``p``
    (a token tied with the last one kept is kept too). 1 is off."""

    name = "top_p"

    def __init__(self, p: float, min_tokens_to_keep: int = 1):
        if not (0 < p <= 1):
            raise NexttokError(f"top_p must be in (0, 1] (got {p}); 1 turns it off", param="top_p")
        self.p, self.keep = float(p), _check_keep(min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        values, _ = candidates(scores)  # (B, n)
        probs = torch.softmax(values, dim=-1)  # (B, n)
        mass_before = probs.cumsum(-1) - probs  # (B, n): mass of the better tokens
        n_keep = (mass_before < self.p).sum(-1, keepdim=True).clamp(min=self.keep, max=values.shape[-1])  # (B, 1)
        threshold = values.gather(1, n_keep - 1)  # (B, 1): the last kept score
        return scores.masked_fill(scores < threshold, NEG_INF)


class MinP:
    """Keep tokens whose probability is at least ``p`` times the top token's. 0 is off."""

    name = "min_p"

    def __init__(self, p: float, min_tokens_to_keep: int = 1):
        if not (0 <= p < 1):
            raise NexttokError(f"min_p must be in [0, 1) (got {p}); 0 turns it off, 0.05 is typical", param="min_p")
        self.p, self.keep = float(p), _check_keep(min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # p_i >= p * p_max  <=>  s_i >= s_max + log p: no softmax needed.
        cutoff = (
            scores.max(-1, keepdim=True).values + math.log(self.p) if self.p > 0 else scores.new_full((1, 1), NEG_INF)
        )
        if self.keep > 1:  # never drop below the floor: lower the cutoff to the keep-th best score
            cutoff = torch.minimum(cutoff, torch.topk(scores, min(self.keep, scores.shape[-1]), -1).values[:, -1:])
        return scores.masked_fill(scores < cutoff, NEG_INF)


class Typical:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy until their
    probability reaches ``p``. 1 is off. Unlike the other filters it can drop the most likely token."""

    name = "typical_p"

    def __init__(self, p: float, min_tokens_to_keep: int = 1):
        if not (0 < p <= 1):
            raise NexttokError(f"typical_p must be in (0, 1] (got {p}); 1 turns it off", param="typical_p")
        self.p, self.keep = float(p), _check_keep(min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores, dim=-1)  # (B, V)
        entropy = -(logp.exp() * logp).nan_to_num().sum(-1, keepdim=True)  # (B, 1)
        distance = (-logp - entropy).abs()  # (B, V): how far each token's surprise is from typical
        order = torch.argsort(distance, dim=-1, stable=True)  # (B, V): most typical first
        probs = logp.exp().gather(1, order)  # (B, V)
        n_keep = ((probs.cumsum(-1) - probs) < self.p).sum(-1, keepdim=True)  # (B, 1)
        n_keep = n_keep.clamp(min=self.keep, max=scores.shape[-1])
        limit = distance.gather(1, order).gather(1, n_keep - 1)  # (B, 1): distance of the last kept token
        return scores.masked_fill(distance > limit, NEG_INF)


# --- composition: the one function that fixes the order ------------------------------------------

STAGE_ORDER = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
)


def build_processors(config: SamplingConfig, logit_bias: dict[int, float] | None = None) -> list[Processor]:
    """The stages ``config`` turns on, in the fixed order of :data:`STAGE_ORDER`: penalties and bias
    first (they reshape the model's scores), then temperature, then the filters top-k, top-p, min-p,
    typical. Greedy decoding (temperature 0) keeps penalties and bias and takes the argmax, as HF does.
    ``logit_bias`` is the config's bias with token texts already resolved to ids."""
    keep = config.min_tokens_to_keep
    stages: list[Processor] = []
    if config.repetition_penalty != 1.0:
        stages.append(RepetitionPenalty(config.repetition_penalty))
    if config.presence_penalty:
        stages.append(PresencePenalty(config.presence_penalty))
    if config.frequency_penalty:
        stages.append(FrequencyPenalty(config.frequency_penalty))
    if logit_bias:
        stages.append(LogitBias(logit_bias))
    if config.greedy:
        return stages
    if config.temperature != 1.0:
        stages.append(Temperature(config.temperature))
    if config.top_k:
        stages.append(TopK(config.top_k, keep))
    if config.top_p < 1.0:
        stages.append(TopP(config.top_p, keep))
    if config.min_p > 0:
        stages.append(MinP(config.min_p, keep))
    if config.typical_p < 1.0:
        stages.append(Typical(config.typical_p, keep))
    return stages


@dataclass(frozen=True)
class StageRecord:
    """What one stage did to a row: ``survivors`` tokens left, ``mass_removed`` of the probability
    (measured before the stage), the ``entropy`` (nats) after it, and the ``top`` candidates after it as
    (id, probability). ``token_prob``: the chosen token's probability after the stage, once one is chosen."""

    name: str
    survivors: int
    mass_removed: float
    top: list[tuple[int, float]]
    entropy: float = 0.0
    token_prob: float | None = None


def record(name: str, before: torch.Tensor | None, after: torch.Tensor, top: int = 5) -> StageRecord:
    """Describe row 0 of ``after`` (V,) relative to ``before`` (None for the raw model scores)."""
    alive = torch.isfinite(after)  # (V,)
    removed = 0.0
    if before is not None:
        gone = torch.isfinite(before) & ~alive  # (V,)
        removed = float(torch.softmax(before, -1)[gone].sum())
    logp = torch.log_softmax(after, -1)  # (V,)
    probs = logp.exp()
    entropy = float(-(probs * logp).nan_to_num().sum()) + 0.0  # + 0.0: one survivor has entropy 0, not -0
    values, ids = torch.topk(probs, min(top, int(alive.sum())))
    pairs = list(zip(ids.tolist(), values.tolist(), strict=True))
    return StageRecord(name, int(alive.sum()), removed, pairs, entropy)


def apply(
    processors: Sequence[Processor], input_ids: torch.Tensor, scores: torch.Tensor, trace: bool = False
) -> tuple[torch.Tensor, list[list[StageRecord]]]:
    """Run the stages in order on (B, V) ``scores``. With ``trace``, ``records[row]`` lists what each
    stage left in that row, starting with the model's own distribution; without, it is empty. No stage
    and no trace: ``scores`` as they are (even None)."""
    scores, records, _ = apply_traced(processors, input_ids, scores, trace)
    return scores, records


def apply_traced(
    processors: Sequence[Processor], input_ids: torch.Tensor, scores: torch.Tensor, trace: bool = True
) -> tuple[torch.Tensor, list[list[StageRecord]], list[torch.Tensor]]:
    """:func:`apply`, also giving each stage's (B, V) scores with ``trace`` (the model's first), from which
    :func:`with_token` reads the chosen tokens' probability after every stage."""
    rows = range(scores.shape[0]) if trace else range(0)
    records = [[record("model", None, scores[r])] for r in rows] if trace else []
    history = [scores] if trace else []
    for stage in processors:
        new = stage(input_ids, scores)
        for r in rows:
            records[r].append(record(stage.name, scores[r], new[r]))
        scores = new
        history += [new] if trace else []
    return scores, records, history


def with_token(records: list[list[StageRecord]], history: list[torch.Tensor], chosen: torch.Tensor):
    """``records`` with each stage's ``token_prob`` of the row's ``chosen`` token (B,) filled in."""
    at = chosen.view(-1, 1)  # (B, 1)
    probs = [torch.softmax(h.float(), -1).gather(1, at)[:, 0].tolist() for h in history]  # per stage: (B,)
    return [[replace(rec, token_prob=probs[s][r]) for s, rec in enumerate(row)] for r, row in enumerate(records)]
